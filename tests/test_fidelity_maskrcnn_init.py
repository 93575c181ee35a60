"""Mask R-CNN output layers start as detectron2's (issue 17 item 3): mask logits N(0, 0.001),
class scores N(0, 0.01), box deltas N(0, 0.001), zero biases, so every mask starts at
probability ~0.5 and the first mask loss is ~ln 2 (torchvision's kaiming init of the 1x1
mask-logit conv gave 3.9 with ResNet-18 and 11 with the pretrained EfficientNet-Lite0)."""
from __future__ import annotations

import math
import warnings

import pytest
import torch

from pixelwise.models import build_model

EFFNET = dict(preset="cpu", backbone="efficientnet_lite0", pretrained="efficientnet-lite0", fpn_channels=64,
              mask_head_channels=64, box_head_dim=256, box_batch_size_per_image=64)  # configs/maskrcnn_shapes.yaml
RESNET18 = dict(preset="cpu")  # configs/maskrcnn_cpu.yaml
TINY_PANOPTIC = dict(preset="cpu", fpn_channels=16, mask_head_channels=8, box_head_dim=32, semantic_channels=32)


def _toy_batch():
    """2 normalised-looking 128 x 128 images, a disk and a rectangle in each."""
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(128), torch.arange(128), indexing="ij")
    images, targets = [], []
    for i in range(2):
        img = torch.randn(3, 128, 128, generator=g) * 0.5
        masks = torch.zeros(2, 128, 128, dtype=torch.uint8)
        masks[0] = (yy - 40) ** 2 + (xx - 40) ** 2 <= 20 ** 2
        masks[1, 70 + i:110, 60:115] = 1
        for m in masks:
            img[:, m.bool()] += 1.5
        boxes = torch.tensor([[20.0, 20.0, 61.0, 61.0], [60.0, 70.0 + i, 115.0, 110.0]])
        images.append(img)
        targets.append({"boxes": boxes, "labels": torch.tensor([1, 2]), "masks": masks})
    return images, targets


def _build(name: str, kw: dict, seed: int, **extra):
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_model(name, 4, **kw, **extra)


@pytest.mark.parametrize("kw", [RESNET18, EFFNET], ids=["resnet18", "efficientnet_lite0"])
def test_initial_mask_loss_is_ln2(kw):
    images, targets = _toy_batch()
    for seed in (0, 1):
        m = _build("maskrcnn", kw, seed).train()
        with torch.no_grad():
            losses = m(images, targets)
        assert float(losses["loss_mask"]) == pytest.approx(math.log(2), abs=0.05), (seed, float(losses["loss_mask"]))


@pytest.mark.parametrize("name", ["maskrcnn", "panoptic_fpn"])
def test_output_layers_have_detectron2_inits(name):
    m = _build(name, TINY_PANOPTIC if name == "panoptic_fpn" else RESNET18, 0,
               **({"num_things": 3} if name == "panoptic_fpn" else {}))
    heads = m.instance.roi_heads if name == "panoptic_fpn" else m.roi_heads
    box, mask = heads.box_predictor, heads.mask_predictor
    for layer, std in ((box.cls_score, 0.01), (box.bbox_pred, 0.001), (mask.mask_fcn_logits, 0.001)):
        w = layer.weight.detach().double()
        assert w.std().item() == pytest.approx(std, rel=0.25) and abs(w.mean().item()) < std / 2
        assert torch.count_nonzero(layer.bias) == 0
    # the deconvolution keeps the MSRA fill (kaiming normal, fan_out): much larger than 0.001
    deconv = mask.conv5_mask.weight.detach()
    fan_out = deconv.shape[1] * deconv.shape[2] * deconv.shape[3]
    assert deconv.std().item() == pytest.approx(math.sqrt(2 / fan_out), rel=0.25)
