"""RoIAlign's half-pixel offset (issue 17 item 4): the default, and the paper config, use
``aligned=True`` (detectron2's ROIAlignV2); ``aligned=False`` is the paper's RoIAlign, the
one torchvision's MultiScaleRoIAlign computes."""
from __future__ import annotations

from pathlib import Path

import torch
from torchvision.ops import MultiScaleRoIAlign

from pixelwise.engine.config import load_config
from pixelwise.models import build_model
from pixelwise.models.maskrcnn import PAPER, MultiScaleRoIPooler

PAPER_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "paper" / "maskrcnn.yaml"


def test_default_and_paper_config_are_aligned_with_2x2_samples():
    assert PAPER["aligned"] is True and PAPER["sampling_ratio"] == 2
    cfg = load_config(PAPER_CONFIG)
    with torch.device("meta"):
        m = build_model(cfg.model, 81, **cfg.model_kwargs)
    for pool in (m.roi_heads.box_roi_pool, m.roi_heads.mask_roi_pool):
        assert isinstance(pool, MultiScaleRoIPooler) and pool.aligned is True and pool.sampling_ratio == 2
    text = PAPER_CONFIG.read_text()
    assert "aligned: true" in text and "NO half-pixel offset" in text


def test_aligned_false_is_torchvision_multiscale_roialign_and_true_differs():
    g = torch.Generator().manual_seed(0)
    feats = {"p2": torch.randn(1, 4, 32, 32, generator=g), "p3": torch.randn(1, 4, 16, 16, generator=g)}
    boxes = [torch.tensor([[3.3, 5.1, 40.7, 51.9], [60.2, 10.0, 120.0, 90.5]])]
    sizes = [(128, 128)]
    theirs = MultiScaleRoIAlign(["p2", "p3"], 7, 2)(feats, boxes, sizes)
    paper = MultiScaleRoIPooler(["p2", "p3"], 7, 2, aligned=False)(feats, boxes, sizes)
    v2 = MultiScaleRoIPooler(["p2", "p3"], 7, 2, aligned=True)(feats, boxes, sizes)
    torch.testing.assert_close(paper, theirs, atol=1e-6, rtol=0)
    assert (v2 - theirs).abs().max() > 1e-2
