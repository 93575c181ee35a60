"""Panoptic FPN: semantic branch structure, loss composition, eval output with a panoptic map,
and learning on a fixed tiny batch."""
from __future__ import annotations

import pytest
import torch

from pixelwise.models import build_model, list_models, model_info
from pixelwise.models.panoptic_fpn import STAGES_PER_LEVEL, PanopticFPN, SemanticStage

TINY = dict(preset="cpu", fpn_channels=16, mask_head_channels=8, box_head_dim=32, min_size=64, max_size=64,
            rpn_pre_nms_top_n_train=100, rpn_post_nms_top_n_train=50, rpn_pre_nms_top_n_test=50,
            rpn_post_nms_top_n_test=20, box_batch_size_per_image=32, rpn_batch_size_per_image=32,
            anchor_sizes=(8, 16, 32, 64, 128), semantic_channels=32)
# 2 thing categories (+ background) and 2 stuff categories: num_classes = 2 + 2
N_CLASSES, N_THINGS, N_STUFF = 4, 3, 2


def _model(**kw) -> PanopticFPN:
    torch.manual_seed(0)
    return build_model("panoptic_fpn", N_CLASSES, num_things=N_THINGS, **{**TINY, **kw})


def _batch():
    g = torch.Generator().manual_seed(0)
    images = [torch.randn(3, 64, 64, generator=g) for _ in range(2)]
    targets = []
    for i, img in enumerate(images):
        masks = torch.zeros(2, 64, 64, dtype=torch.uint8)
        masks[0, 8:28, 8:28] = 1
        masks[1, 36 + i:60, 30:56] = 1
        for m in masks:
            img[:, m.bool()] += 2.0
        boxes = torch.tensor([[8.0, 8.0, 28.0, 28.0], [30.0, 36.0 + i, 56.0, 60.0]])
        sem = torch.zeros(64, 64, dtype=torch.long)  # stuff 0 on top, stuff 1 below, thing class = 2
        sem[32:] = 1
        sem[masks.any(0).bool()] = N_STUFF
        sem[0, :] = 255  # an ignored row
        targets.append({"boxes": boxes, "labels": torch.tensor([1, 2]), "masks": masks, "semantic": sem})
    return images, targets


def test_registered_as_panoptic():
    assert "panoptic_fpn" in list_models(task="panoptic")
    assert "Panoptic Feature Pyramid Networks" in model_info("panoptic_fpn").paper


def test_class_counts_and_validation():
    m = _model()
    assert m.num_things == 3 and m.num_stuff == 2 and m.thing_class == 2
    assert m.instance.num_classes == 3 and m.semantic.predictor.out_channels == 3
    assert m.thing_ids == [1, 2] and m.stuff_ids == [3, 4]
    m2 = build_model("panoptic_fpn", N_CLASSES, num_stuff=2, **TINY)
    assert m2.num_things == 3
    m3 = build_model("panoptic_fpn", 3, thing_ids=[5], stuff_ids=[7, 9], **TINY)
    assert (m3.num_things, m3.num_stuff) == (2, 2)
    with pytest.raises(ValueError):
        build_model("panoptic_fpn", 5, num_things=3, num_stuff=2, **TINY)


def test_fpn_is_shared_with_the_instance_branch():
    m = _model()
    assert m.backbone is m.instance.backbone
    fpn_params = {id(p) for p in m.instance.backbone.parameters()}
    assert not fpn_params & {id(p) for p in m.semantic.parameters()}


def test_semantic_branch_stages_and_scales():
    m = _model(semantic_channels=32)
    assert {k: len(v) for k, v in m.semantic.levels.items()} == STAGES_PER_LEVEL == {"p2": 1, "p3": 1, "p4": 2, "p5": 3}
    for name, stages in m.semantic.levels.items():
        for i, st in enumerate(stages):
            assert isinstance(st, SemanticStage)
            assert st.conv.kernel_size == (3, 3) and st.conv.out_channels == 32
            assert isinstance(st.norm, torch.nn.GroupNorm) and st.norm.num_groups == 32
            assert st.upsample == (name != "p2")
    assert m.semantic.predictor.kernel_size == (1, 1)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        feats = m.backbone(x)
        for name, stages in m.semantic.levels.items():
            assert stages(feats[name]).shape[-2:] == (16, 16)  # every level at 1/4 scale
        assert m.semantic(feats, upsample=False).shape == (1, N_STUFF + 1, 16, 16)
        assert m.semantic(feats).shape == (1, N_STUFF + 1, 64, 64)


def test_paper_defaults():
    m = build_model("panoptic_fpn", N_CLASSES, num_things=N_THINGS, preset="cpu")
    assert m.semantic_weight == 0.5
    assert all(st.conv.out_channels == 128 and st.norm.num_groups == 32
               for stages in m.semantic.levels.values() for st in stages)


def test_loss_dict_has_instance_losses_and_weighted_semantic_loss():
    m = _model().train()
    images, targets = _batch()
    torch.manual_seed(1)
    losses = m(images, targets)
    assert {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_mask",
            "loss_semantic"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    half = losses["loss_semantic"].detach()
    m.semantic_weight = 0.0
    assert float(m(images, targets)["loss_semantic"].detach()) == 0.0
    m.semantic_weight = 1.0
    full = m(images, targets)["loss_semantic"].detach()
    assert float(full) > 0
    assert float(half) == pytest.approx(0.5 * float(full), rel=1e-4)
    # initial logits ~0 -> CE ~ log(num semantic classes)
    assert float(full) == pytest.approx(torch.log(torch.tensor(3.0)).item(), rel=0.05)


def test_training_needs_semantic_targets():
    m = _model().train()
    images, targets = _batch()
    del targets[0]["semantic"]
    with pytest.raises(ValueError, match="semantic"):
        m(images, targets)


def test_eval_output_has_semantic_logits_and_a_panoptic_map():
    m = _model().eval()
    m.instance.roi_heads.score_thresh = 0.0  # keep untrained detections so things get pasted too
    m.merge_score_threshold = 0.0
    images, _ = _batch()
    images.append(torch.randn(3, 48, 80))  # another size in the batch
    with torch.no_grad():
        outs = m(images)
    assert len(outs) == 3
    for img, out in zip(images, outs):
        h, w = img.shape[-2:]
        assert {"boxes", "labels", "scores", "masks", "sem_seg", "panoptic", "segments_info"} <= set(out)
        assert out["sem_seg"].shape == (N_STUFF + 1, h, w)
        pan, segs = out["panoptic"], out["segments_info"]
        assert pan.shape == (h, w)
        ids = [s["id"] for s in segs]
        assert ids == list(range(1, len(segs) + 1))
        assert set(torch.unique(pan).tolist()) <= {0, *ids}
        # non-overlapping: each pixel has one id, and the areas add up to the non-void pixels
        assert sum(s["area"] for s in segs) == int((pan > 0).sum())
        for s in segs:
            assert int((pan == s["id"]).sum()) == s["area"]
            if s["isthing"]:
                assert s["category_id"] in m.thing_ids
            else:
                assert s["category_id"] in m.stuff_ids
    assert any(s["isthing"] for out in outs for s in out["segments_info"])


def test_a_few_steps_lower_the_total_loss():
    m = _model().train()
    images, targets = _batch()
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    totals, semantic = [], []
    for step in range(8):
        torch.manual_seed(step)
        losses = m(images, targets)
        total = sum(losses.values())
        opt.zero_grad()
        total.backward()
        opt.step()
        totals.append(float(total.detach()))
        semantic.append(float(losses["loss_semantic"].detach()))
    assert totals[-1] < totals[0] * 0.9, totals
    assert semantic[-1] < semantic[0], semantic  # the semantic branch learns too
