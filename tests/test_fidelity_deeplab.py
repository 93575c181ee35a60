"""configs/paper/deeplabv3.yaml builds the paper's DeepLab v3 head (issue 17 item 6):
ASPP (whose fusion is a 1x1 conv + BN + ReLU) straight into a 1x1 classifier, without
torchvision's extra 3x3 conv, which stays available as the model option ``head_conv``."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from pixelwise.engine.config import load_config
from pixelwise.models import build_model
from pixelwise.models.deeplab import ASPP

PAPER_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "paper" / "deeplabv3.yaml"


def _head_layers(model) -> list[nn.Module]:
    return list(model.head)


def test_paper_config_builds_aspp_then_1x1_classifier():
    cfg = load_config(PAPER_CONFIG)
    with torch.device("meta"):  # ResNet-101 without memory or time
        model = build_model(cfg.model, 21, **cfg.model_kwargs)
    layers = _head_layers(model)
    assert len(layers) == 2, [type(m).__name__ for m in layers]
    aspp, classifier = layers
    assert isinstance(aspp, ASPP) and aspp.rates == (6, 12, 18) and aspp.out_channels == 256
    assert isinstance(classifier, nn.Conv2d)
    assert classifier.kernel_size == (1, 1) and classifier.in_channels == 256 and classifier.out_channels == 21


def test_head_conv_option_adds_torchvision_3x3_conv():
    with torch.device("meta"):
        with_conv = build_model("deeplabv3", 21, backbone="resnet18", head_conv=True)
        paper = build_model("deeplabv3", 21, backbone="resnet18", head_conv=False)
    extra = _head_layers(with_conv)[1]
    convs = [m for m in extra.modules() if isinstance(m, nn.Conv2d)]
    assert len(_head_layers(with_conv)) == 3 and len(convs) == 1 and convs[0].kernel_size == (3, 3)
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(with_conv) - n(paper) == 256 * 256 * 9 + 2 * 256  # 3x3 conv (no bias) + BN
