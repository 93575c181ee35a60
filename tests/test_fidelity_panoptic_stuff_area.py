"""Panoptic FPN's minimum stuff area (issue 17 item 1): by default 4096 px counted at the
ORIGINAL image resolution, as detectron2's PanopticFPN does after ``sem_seg_postprocess``;
scaling it with the image area is an explicit pixelwise option (shapes configs)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn

from pixelwise.engine.config import load_config
from pixelwise.models import build_model
from pixelwise.postprocess_panoptic import scaled_stuff_area

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
TINY = dict(preset="cpu", fpn_channels=16, mask_head_channels=8, box_head_dim=32,
            rpn_pre_nms_top_n_test=50, rpn_post_nms_top_n_test=20, semantic_channels=32,
            merge_score_threshold=1.1)  # no thing is pasted: only the stuff merge is under test
N_CLASSES, N_THINGS = 4, 3  # 2 things (+ background), 2 stuff classes; semantic class 2 = 'thing'


def _model(**kw):
    torch.manual_seed(0)
    return build_model("panoptic_fpn", N_CLASSES, num_things=N_THINGS, **{**TINY, **kw}).eval()


def _no_instances():
    return {"masks": torch.zeros(0, 1, 480, 640), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}


def _logits_with_stuff1_area(n_pixels: int) -> torch.Tensor:
    """(3, 480, 640) semantic logits: stuff 1 on ``n_pixels`` pixels (whole rows from the top,
    then part of a row), stuff 0 elsewhere."""
    lg = torch.zeros(3, 480, 640)
    flat = lg[1].view(-1)
    flat[:n_pixels] = 5.0
    lg[0] = 1.0
    return lg


def _stuff_areas(segments) -> dict[int, int]:
    return {s["category_id"]: s["area"] for s in segments if not s["isthing"]}


def test_default_threshold_is_4096_px_at_the_original_size():
    """On a 640 x 480 image (the issue's example) a 3000 px stuff region is dropped (< 4096),
    a 5000 px one kept; scaling would have kept the first (threshold ~1180 px)."""
    m = _model()
    assert m.stuff_area == 4096 and m.scale_stuff_area is False
    stuff1 = m.stuff_ids[1]
    _, segs = m.merge(_no_instances(), _logits_with_stuff1_area(3000))
    assert stuff1 not in _stuff_areas(segs)
    _, segs = m.merge(_no_instances(), _logits_with_stuff1_area(5000))
    assert _stuff_areas(segs)[stuff1] == 5000
    _, segs = m.merge(_no_instances(), _logits_with_stuff1_area(4096))
    assert _stuff_areas(segs)[stuff1] == 4096  # 'smaller than' drops, exactly 4096 stays


def test_scale_stuff_area_option_scales_with_the_image_area():
    m = _model(scale_stuff_area=True)
    thr = 4096 * 480 * 640 / (800 * 1333)
    assert scaled_stuff_area(480, 640) == pytest.approx(thr, abs=1e-9)  # ~1179.8 px
    stuff1 = m.stuff_ids[1]
    _, segs = m.merge(_no_instances(), _logits_with_stuff1_area(3000))
    assert _stuff_areas(segs)[stuff1] == 3000
    _, segs = m.merge(_no_instances(), _logits_with_stuff1_area(1179))
    assert stuff1 not in _stuff_areas(segs)
    _, segs = m.merge(_no_instances(), _logits_with_stuff1_area(1180))
    assert _stuff_areas(segs)[stuff1] == 1180


class _LeftColumnsStuff(nn.Module):
    """A stand-in semantic head: stuff 1 on the first ``columns`` columns of the (resized,
    padded) batch, stuff 0 on the rest, whatever the features."""

    def __init__(self, columns: int):
        super().__init__()
        self.columns = columns

    def forward(self, features, upsample: bool = True):
        p2 = features["p2"]
        h, w = 4 * p2.shape[-2], 4 * p2.shape[-1]
        lg = torch.zeros(p2.shape[0], 3, h, w)
        lg[:, 0] = 1.0
        lg[:, 1, :, :self.columns] = 5.0
        return lg


def test_forward_merges_at_the_original_size_not_the_resized_one():
    """A 480 x 640 image resized to 240 x 320 inside the model: stuff 1 covers the left 10 of
    320 resized columns = 2400 px there (< 4096) but ~20 x 480 = 9600 px at the original size,
    where the merge counts it (detectron2: after sem_seg_postprocess), so it is kept."""
    m = _model(min_size=240, max_size=320)
    m.semantic = _LeftColumnsStuff(10)
    with torch.no_grad():
        (out,) = m([torch.zeros(3, 480, 640)])
    assert out["sem_seg"].shape[-2:] == (480, 640)
    areas = _stuff_areas(out["segments_info"])
    assert abs(areas[m.stuff_ids[1]] - 9600) <= 480  # bilinear resize: the edge within one column
    assert areas[m.stuff_ids[0]] + areas[m.stuff_ids[1]] == 480 * 640


def test_configs_paper_unscaled_shapes_scaled():
    paper = load_config(CONFIGS / "paper" / "panoptic_fpn.yaml")
    assert paper.model_kwargs.get("scale_stuff_area", False) is False
    assert paper.model_kwargs.get("stuff_area", 4096) == 4096
    shapes = sorted(CONFIGS.glob("*panoptic*shapes*.yaml"))
    assert shapes
    for path in shapes:
        assert load_config(path).model_kwargs.get("scale_stuff_area") is True, path.name
