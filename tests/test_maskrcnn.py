"""Mask R-CNN: RoIAlign vs RoIPool (the lecture's claims), FPN level rule, presets, the model's
train/eval contract, and the instance engine end to end (train -> evaluate -> predict)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.ops import roi_align, roi_pool

from pixelwise.metrics import box_iou
from pixelwise.models import build_model, list_models, model_info
from pixelwise.models.fpn import FPN
from pixelwise.models.maskrcnn import CPU, PAPER, MultiScaleRoIPooler, assign_fpn_levels, binarize_masks

TINY = dict(preset="cpu", fpn_channels=16, mask_head_channels=8, box_head_dim=32, min_size=64, max_size=64,
            rpn_pre_nms_top_n_train=100, rpn_post_nms_top_n_train=50, rpn_pre_nms_top_n_test=50,
            rpn_post_nms_top_n_test=20, box_batch_size_per_image=32, rpn_batch_size_per_image=32,
            anchor_sizes=(8, 16, 32, 64, 128))


def _square_feature(shift: int, stride: int = 4) -> torch.Tensor:
    """An 8x8 px square on a 64x64 image, shifted right by ``shift`` px, seen through a
    stride-``stride`` feature map that holds each cell's area coverage."""
    img = torch.zeros(1, 1, 64, 64)
    img[..., 26:34, 26 + shift:34 + shift] = 1.0
    return F.avg_pool2d(img, stride)


def _centre_x(pooled: torch.Tensor) -> float:
    w = pooled[0, 0].sum(0).double()
    return float((w * torch.arange(w.numel(), dtype=torch.float64)).sum() / w.sum())


def test_box_iou_lecture_exercise():
    # a 2x2 and a 2x3 box overlapping in 1x1: IoU = 1 / (4 + 6 - 1) = 1/9
    iou = box_iou([0, 0, 2, 2], [1, 1, 3, 4])
    assert iou.shape == (1, 1)
    assert float(iou) == pytest.approx(1 / 9, abs=1e-12)


def test_roialign_is_translation_equivariant_roipool_is_not():
    """Moving the object by 1..3 px (less than one 4 px feature cell) inside a FIXED box must
    move the pooled 7x7 map by shift * 7 / 42 bins. RoIAlign does (within 0.04 bin); RoIPool's
    quantised bins lose ~40 % of the motion."""
    box = torch.tensor([[0, 9.0, 9.0, 51.0, 51.0]])  # 42 px: not a whole number of cells
    results = {}
    for op in ("roi_align", "roi_pool"):
        pooled = []
        for shift in (0, 1, 2, 3):
            f = _square_feature(shift)
            pooled.append(roi_pool(f, box, 7, 0.25) if op == "roi_pool" else roi_align(f, box, 7, 0.25, 4, aligned=True))
        base = _centre_x(pooled[0])
        results[op] = [(_centre_x(p) - base) - s * 7 / 42 for p, s in zip(pooled, (0, 1, 2, 3))]
    assert max(abs(e) for e in results["roi_align"]) < 0.04, results
    assert max(abs(e) for e in results["roi_pool"]) > 0.1, results


def test_roipool_quantises_a_subcell_box_shift_away():
    f = _square_feature(0)
    box = torch.tensor([[0, 8.0, 8.0, 56.0, 56.0]])
    moved = box.clone()
    moved[0, [1, 3]] += 1.0  # a quarter of a feature cell
    assert torch.equal(roi_pool(f, box, 7, 0.25), roi_pool(f, moved, 7, 0.25))
    assert not torch.allclose(roi_align(f, box, 7, 0.25, 2, True), roi_align(f, moved, 7, 0.25, 2, True))


def test_fpn_level_rule():
    side = torch.tensor([10.0, 56.0, 112.0, 223.0, 224.0, 448.0, 2000.0])
    boxes = torch.stack([torch.zeros_like(side), torch.zeros_like(side), side, side], 1)
    # k = floor(4 + log2(sqrt(wh) / 224)) clamped to [2, 5]
    assert assign_fpn_levels(boxes).tolist() == [2, 2, 3, 3, 4, 5, 5]


def test_pooler_options_route_levels_and_switch_ops():
    torch.manual_seed(0)
    feats = {f"p{k}": torch.randn(1, 3, 64 // 2 ** (k - 2), 64 // 2 ** (k - 2)) for k in (2, 3, 4, 5)}
    boxes = [torch.tensor([[4.0, 4.0, 20.0, 24.0], [0.0, 0.0, 480.0, 480.0]])]  # -> P2 and P5
    names = ["p2", "p3", "p4", "p5"]
    pooler = MultiScaleRoIPooler(names, 7, 2, roi_op="roi_align", aligned=True)
    out = pooler(feats, boxes, [(256, 256)])
    rois = torch.cat([torch.zeros(2, 1), boxes[0]], 1)
    assert torch.allclose(out[0], roi_align(feats["p2"], rois[:1], 7, 1 / 4, 2, True)[0])
    assert torch.allclose(out[1], roi_align(feats["p5"], rois[1:], 7, 1 / 32, 2, True)[0])
    unaligned = MultiScaleRoIPooler(names, 7, 2, aligned=False)(feats, boxes, [(256, 256)])
    assert not torch.allclose(out, unaligned)
    pooled = MultiScaleRoIPooler(names, 7, 2, roi_op="roi_pool")(feats, boxes, [(256, 256)])
    assert torch.allclose(pooled[0], roi_pool(feats["p2"], rois[:1], 7, 1 / 4)[0])
    with pytest.raises(ValueError):
        MultiScaleRoIPooler(names, 7, 2, roi_op="roi_max")


def test_pooler_scales_of_small_padded_images():
    # 40 px and 33 px images are padded to 64 (multiple of 32): P2 is 16 px, yet its stride is 4
    feats = [torch.zeros(1, 1, 64 // s, 64 // s) for s in (4, 8, 16, 32)]
    for h in (33, 40, 64):
        assert MultiScaleRoIPooler.feature_scales(feats, [(h, h)]) == [1 / 4, 1 / 8, 1 / 16, 1 / 32]
    big = [torch.zeros(1, 1, 800 // s, 1344 // s) for s in (4, 8, 16, 32)]
    assert MultiScaleRoIPooler.feature_scales(big, [(800, 1333), (780, 1000)]) == [1 / 4, 1 / 8, 1 / 16, 1 / 32]


def test_fpn_shapes_on_odd_sizes():
    fpn = FPN((8, 16, 32, 64), 12)
    feats = [torch.randn(1, c, s, s) for c, s in zip((8, 16, 32, 64), (25, 13, 7, 4))]
    outs = fpn(feats)
    assert [tuple(o.shape[-2:]) for o in outs] == [(25, 25), (13, 13), (7, 7), (4, 4), (2, 2)]
    assert all(o.shape[1] == 12 for o in outs)


def test_registry_and_presets():
    assert "maskrcnn" in list_models(task="instance")
    assert model_info("maskrcnn").paper
    assert PAPER["anchor_sizes"] == (32, 64, 128, 256, 512) and PAPER["aspect_ratios"] == (0.5, 1.0, 2.0)
    assert (PAPER["box_batch_size_per_image"], PAPER["box_positive_fraction"]) == (512, 0.25)
    assert (PAPER["rpn_batch_size_per_image"], PAPER["rpn_positive_fraction"]) == (256, 0.5)
    assert (PAPER["rpn_fg_iou_thresh"], PAPER["rpn_bg_iou_thresh"]) == (0.7, 0.3)
    assert (PAPER["roi_op"], PAPER["sampling_ratio"], PAPER["mask_roi_size"], PAPER["box_roi_size"]) == (
        "roi_align", 2, 14, 7)
    assert (CPU["fpn_channels"], CPU["mask_head_channels"], CPU["box_batch_size_per_image"]) == (128, 128, 128)
    assert CPU["anchor_sizes"] == (12, 24, 48, 96, 192) and CPU["frozen_bn"] is False
    with torch.device("meta"):
        m = build_model("maskrcnn", 4)  # the paper model: ResNet-50-FPN 256
    assert m.options["backbone"] == "resnet50" and m.backbone.out_channels == 256
    assert m.transform.min_size == (800,) and m.transform.max_size == 1333
    # mask head: 4 x (conv3x3 256 + ReLU), deconv 2x2/2, 1x1 conv to C masks
    convs = [mod for mod in m.roi_heads.mask_head.modules() if isinstance(mod, nn.Conv2d)]
    assert [(c.kernel_size, c.out_channels) for c in convs] == [((3, 3), 256)] * 4
    deconv = m.roi_heads.mask_predictor.conv5_mask
    assert isinstance(deconv, nn.ConvTranspose2d) and deconv.kernel_size == (2, 2) and deconv.stride == (2, 2)
    assert m.roi_heads.mask_predictor.mask_fcn_logits.out_channels == 4
    assert m.roi_heads.box_head.fc6.out_features == 1024 and m.roi_heads.box_head.fc7.out_features == 1024
    assert m.roi_heads.mask_roi_pool.output_size == (14, 14) and m.roi_heads.box_roi_pool.output_size == (7, 7)
    with pytest.raises(ValueError, match="unknown maskrcnn option"):
        build_model("maskrcnn", 4, preset="cpu", fpn_chanels=8)
    with pytest.raises(ValueError, match="preset"):
        build_model("maskrcnn", 4, preset="gpu")


def test_frozen_bn_and_pretrained_efficientnet():
    from torchvision.ops import FrozenBatchNorm2d

    from pixelwise.models.backbones import load_weights_file, packaged_weights_path

    try:
        path = packaged_weights_path()
    except Exception as e:  # pragma: no cover - optional package
        pytest.skip(f"efficientnet-lite0 weights not installed: {e}")
    m = build_model("maskrcnn", 3, **{**TINY, "backbone": "efficientnet_lite0", "pretrained": "efficientnet-lite0",
                                      "frozen_bn": True})
    enc = m.backbone.encoder
    assert not any(isinstance(x, nn.BatchNorm2d) for x in enc.modules())
    assert any(isinstance(x, FrozenBatchNorm2d) for x in enc.modules())
    ref = load_weights_file(path)
    assert torch.equal(enc._conv_stem.weight, ref["_conv_stem.weight"])
    assert m.options["trainable_stages"] == 3  # pretrained: stem + stage 2 frozen
    assert not enc._conv_stem.weight.requires_grad and enc._blocks[15]._project_conv.weight.requires_grad


def _tiny_batch():
    images = [torch.randn(3, 64, 64), torch.randn(3, 48, 56)]
    m0 = torch.zeros(2, 64, 64, dtype=torch.uint8)
    m0[0, 8:30, 10:40] = 1
    m0[1, 36:60, 40:60] = 1
    targets = [{"boxes": torch.tensor([[10.0, 8, 40, 30], [40, 36, 60, 60]]), "labels": torch.tensor([1, 2]), "masks": m0},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
                "masks": torch.zeros(0, 48, 56, dtype=torch.uint8)}]
    return images, targets


@pytest.mark.parametrize("roi_op", ["roi_align", "roi_pool"])
def test_train_losses_and_eval_outputs(roi_op):
    torch.manual_seed(0)
    model = build_model("maskrcnn", 3, **TINY, backbone="resnet18", roi_op=roi_op)
    images, targets = _tiny_batch()
    model.train()
    losses = model(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    model.eval()
    with torch.no_grad():
        out = model(images)
    assert len(out) == 2 and out[1]["masks"].shape[-2:] == (48, 56)
    assert out[0]["masks"].shape[1] == 1 and out[0]["boxes"].shape[1] == 4
    bm = binarize_masks(out[0])
    assert bm.dtype == torch.bool and bm.shape == (out[0]["boxes"].shape[0], 64, 64)


def test_min_size_zero_keeps_the_image_size():
    model = build_model("maskrcnn", 2, **{**TINY, "min_size": 0})
    batch = model.transform([torch.randn(3, 100, 70)])[0]
    assert batch.image_sizes == [(100, 70)] and tuple(batch.tensors.shape[-2:]) == (128, 96)  # padded to /32 only


def test_mask_head_gives_28x28_per_class():
    model = build_model("maskrcnn", 5, **TINY)
    x = torch.randn(3, 16, 14, 14)
    logits = model.roi_heads.mask_predictor(model.roi_heads.mask_head(x))
    assert logits.shape == (3, 5, 28, 28)


def test_a_few_steps_lower_the_loss():
    torch.manual_seed(0)
    model = build_model("maskrcnn", 3, **TINY)
    images, targets = _tiny_batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()
    first = None
    for _ in range(6):
        loss = sum(model(images, targets).values())
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        opt.step()
    assert loss.item() < first


def test_engine_train_evaluate_predict(tmp_path):
    """pixelwise train/evaluate/predict on a tiny synthetic COCO set (instance dispatch)."""
    pytest.importorskip("pycocotools")
    from pixelwise.cli import main
    from pixelwise.data.synthetic import generate_shapes

    data = generate_shapes(tmp_path / "shapes", num_train=4, num_val=2, size=64, seed=1)
    run = tmp_path / "run"
    args = ["train", "--model", "maskrcnn", "--data", str(data), "--out", str(run), "--epochs", "1",
            "--batch-size", "2", "--lr", "0.005", "--num-workers", "0", "--quiet"]
    for k, v in TINY.items():
        args += ["--model-arg", f"{k}={list(v) if isinstance(v, tuple) else v}"]
    assert main(args) == 0
    ck = torch.load(run / "last.pt", weights_only=False)
    assert ck["task"] == "instance" and ck["category_ids"] == [0, 3, 4, 5]
    rec = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"mask_AP", "mask_AP50", "box_AP", "mask_AR100"} <= set(rec)

    out_json = tmp_path / "metrics.json"
    assert main(["evaluate", "--checkpoint", str(run / "last.pt"), "--data", str(data), "--out", str(out_json),
                 "--quiet"]) == 0
    m = json.loads(out_json.read_text())
    assert set(m["segm"]) == {"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"}
    results = json.loads((tmp_path / "metrics_coco_results.json").read_text())
    assert all(isinstance(r["segmentation"]["counts"], str) for r in results)

    pred = tmp_path / "pred"
    assert main(["predict", "--checkpoint", str(run / "last.pt"), str(data / "JPEGImages" / "val_00000.png"),
                 "--out", str(pred), "--quiet"]) == 0
    assert (pred / "val_00000_overlay.png").is_file() and (pred / "val_00000.json").is_file()


def test_draw_instances_gives_each_instance_its_own_colour():
    from pixelwise.engine.instance import draw_instances

    img = np.zeros((40, 60, 3), np.uint8)
    masks = np.zeros((2, 40, 60), bool)
    masks[0, 20:30, 2:12] = True
    masks[1, 20:30, 40:50] = True
    vis = draw_instances(img, masks, np.array([[2, 20, 12, 30], [40, 20, 50, 30]]), [1, 2], [0.9, 0.8],
                         ["bg", "circle", "square"], alpha=1.0)
    assert vis.shape == (40, 60, 3)
    assert tuple(vis[27, 7]) != tuple(vis[27, 45])  # two colours
    assert vis[:20].any()  # the labels are drawn above the boxes
