"""Export formats (issue 16 item 5): ONNX with free height/width by default, fixed only with
--size (then `predict --onnx` resizes), torch.export programs equal to PyTorch, and
`--format safetensors` pretrained folders."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import pixelwise
from pixelwise.data.loading import normalization_for
from pixelwise.engine.checkpoint import save_checkpoint
from export_helpers import eval_model

CLASSES = [{"id": i, "name": n, "color": c} for i, (n, c) in
           enumerate([("bg", [0, 0, 0]), ("a", [255, 0, 0]), ("b", [0, 255, 0])])]
TINY = {"fcn8s": dict(width=0.125, backbone="vgg16_bn"), "unet": dict(width=0.125),
        "deeplabv3plus": dict(backbone="resnet18", aspp_channels=16, decoder_channels=16)}


def _model(name: str) -> nn.Module:
    return eval_model(name, **TINY[name])


def _ckpt(tmp_path: Path, name: str) -> Path:
    m = _model(name)
    return save_checkpoint(tmp_path / f"{name}.pt", {
        "model": m.pixelwise_spec, "state_dict": m.state_dict(), "classes": CLASSES,
        "normalization": normalization_for("RGB", None, None), "config": {}, "epoch": 0, "step": 0, "metrics": {},
        "task": "semantic"})


def _logits(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        y = m(x)
    return y["out"] if isinstance(y, dict) else y


@pytest.mark.parametrize("name", sorted(TINY))
def test_torch_export_equals_pytorch(name, tmp_path):
    from pixelwise.cli import main
    from pixelwise.export import TorchExportSegmenter

    ckpt = _ckpt(tmp_path, name)
    assert main(["export", "--checkpoint", str(ckpt), "--format", "torch-export", "--out",
                 str(tmp_path / "m.pt2")]) == 0
    runner = TorchExportSegmenter(tmp_path / "m.pt2")
    assert runner.meta["model"]["name"] == name and runner.meta["dynamic"] and runner.meta["classes"] == CLASSES
    m = _model(name)
    g = torch.Generator().manual_seed(1)
    for shape in ((1, 3, 64, 64), (2, 3, 96, 128)):  # free batch, height and width
        x = torch.randn(*shape, generator=g)
        want = _logits(m, x)
        got = runner.module(x)
        assert got.shape == want.shape
        assert (got - want).abs().max().item() <= 1e-5, (shape, (got - want).abs().max().item())
    # any size through the runner's padding: same classes as PyTorch on the padded image
    img = (np.random.default_rng(2).random((50, 70, 3)) * 255).astype(np.uint8)
    labels = runner.predict(img)
    assert labels.shape == (50, 70)
    seg = pixelwise.load(ckpt, device="cpu")
    x = torch.nn.functional.pad(
        (torch.from_numpy(img).permute(2, 0, 1).float() / 255 - torch.tensor(seg.normalization["mean"])[:, None, None])
        / torch.tensor(seg.normalization["std"])[:, None, None], (0, 26, 0, 14), mode="reflect")[None]
    assert np.array_equal(labels, _logits(m, x)[0, :, :50, :70].argmax(0).numpy())


def test_onnx_is_free_size_by_default_and_fixed_with_size(tmp_path):
    from pixelwise.cli import main
    from pixelwise.export import open_onnx
    from pixelwise.engine.predict import predict_files

    ckpt = _ckpt(tmp_path, "unet")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "free.onnx")]) == 0
        assert main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "fixed.onnx"), "--size", "64"]) == 0
    free, fixed = open_onnx(tmp_path / "free.onnx"), open_onnx(tmp_path / "fixed.onnx")
    assert free.meta["dynamic"] is True and fixed.meta["dynamic"] is False and fixed.meta["export_size"] == [64, 64]
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    rng = np.random.default_rng(1)
    img = (rng.random((40, 56, 3)) * 255).astype(np.uint8)
    Image.fromarray(img).save(imgs / "im.png")
    predict_files(ckpt, [imgs], tmp_path / "p_torch", device="cpu", progress=False)
    want = np.asarray(Image.open(tmp_path / "p_torch" / "im.png"))
    assert main(["predict", "--onnx", str(tmp_path / "free.onnx"), str(imgs), "--out", str(tmp_path / "p_free"),
                 "--quiet"]) == 0
    assert (np.asarray(Image.open(tmp_path / "p_free" / "im.png")) == want).mean() > 0.999
    # the fixed graph takes 64x64 only: a 56x40 image is resized to it and the logits back
    assert main(["predict", "--onnx", str(tmp_path / "fixed.onnx"), str(imgs), "--out", str(tmp_path / "p_fixed"),
                 "--quiet"]) == 0
    got = np.asarray(Image.open(tmp_path / "p_fixed" / "im.png"))
    from pixelwise.export import _resize

    m = _model("unet")
    seg = pixelwise.load(ckpt, device="cpu")
    small = _resize(img, (64, 64))
    from pixelwise.data.transforms import normalize_image

    logits = _logits(m, normalize_image(small, seg.normalization)[None])[0].permute(1, 2, 0).numpy()
    ref = _resize(logits, (40, 56)).argmax(2)
    assert got.shape == (40, 56) and (got == ref).mean() > 0.999


def test_safetensors_format_is_a_pretrained_folder(tmp_path, capsys):
    from pixelwise.cli import main

    ckpt = _ckpt(tmp_path, "unet")
    assert main(["export", "--checkpoint", str(ckpt), "--format", "safetensors", "--out", str(tmp_path / "pre")]) == 0
    assert "model.safetensors" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "pre").iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((tmp_path / "pre" / "config.json").read_text())["classes"][1]["name"] == "a"
    img = (np.random.default_rng(0).random((33, 47, 3)) * 255).astype(np.uint8)
    a = pixelwise.load(ckpt, device="cpu").predict(img, probs=True).probs
    b = pixelwise.load(tmp_path / "pre", device="cpu").predict(img, probs=True).probs
    assert np.array_equal(a, b)
    # a pretrained folder exports again (here to ONNX), and unknown formats are one line
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["export", "--checkpoint", str(tmp_path / "pre"), "--out", str(tmp_path / "m.onnx")]) == 0
    with pytest.raises(SystemExit):
        main(["export", "--checkpoint", str(ckpt), "--format", "tflite", "--out", str(tmp_path / "x")])


def test_fixed_size_mask_rcnn_says_its_size_in_one_line(tmp_path, capsys):
    from pixelwise.cli import main

    torch.manual_seed(0)
    m = pixelwise.build_model("maskrcnn", 3, preset="cpu", fpn_channels=16, mask_head_channels=8, box_head_dim=32,
                              min_size=64, max_size=64, rpn_pre_nms_top_n_test=50, rpn_post_nms_top_n_test=20,
                              anchor_sizes=(8, 16, 32, 64, 128))
    ckpt = save_checkpoint(tmp_path / "mrcnn.pt", {
        "model": m.pixelwise_spec, "state_dict": m.state_dict(), "classes": CLASSES, "category_ids": [0, 1, 2],
        "normalization": normalization_for("RGB", None, None), "config": {}, "epoch": 0, "step": 0, "metrics": {},
        "task": "instance"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "m.onnx"), "--size", "64"]) == 0
    (tmp_path / "imgs").mkdir()
    Image.fromarray(np.zeros((48, 80, 3), np.uint8)).save(tmp_path / "imgs" / "wide.png")
    capsys.readouterr()
    assert main(["predict", "--onnx", str(tmp_path / "m.onnx"), str(tmp_path / "imgs"), "--out",
                 str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "wide.png" in err and "80x48" in err and "64x64" in err, err


PAN_CATEGORIES = [{"id": 1, "name": "circle", "isthing": 1, "color": [220, 20, 60]},
                  {"id": 2, "name": "square", "isthing": 1, "color": [30, 144, 255]},
                  {"id": 3, "name": "sky", "isthing": 0, "color": [135, 206, 235]},
                  {"id": 4, "name": "grass", "isthing": 0, "color": [34, 139, 34]}]


def test_panoptic_fpn_onnx_matches_pytorch_on_pq(tmp_path):
    """Panoptic FPN to ONNX (free size): the graph's outputs equal PyTorch's, the merge after it
    gives the same panoptic maps (PQ 1.0 against PyTorch's own prediction on every image), and
    `predict --onnx` writes what `predict --checkpoint` writes."""
    from pixelwise.cli import main
    from pixelwise.engine.predict import predict_files
    from pixelwise.export import OnnxPanopticSegmenter, open_onnx
    from pixelwise.metrics.panoptic import PQStat, pq_single_image
    from pixelwise.tasks.panoptic import PREDICTIONS_JSON

    torch.manual_seed(0)
    m = pixelwise.build_model("panoptic_fpn", 4, num_things=3, merge_score_threshold=0.3, stuff_area=16.0,
                              scale_stuff_area=False, semantic_channels=32, preset="cpu", fpn_channels=16,
                              mask_head_channels=8, box_head_dim=32, min_size=64, max_size=64,
                              rpn_pre_nms_top_n_test=50, rpn_post_nms_top_n_test=20,
                              anchor_sizes=(8, 16, 32, 64, 128)).eval()
    ckpt = save_checkpoint(tmp_path / "pan.pt", {
        "model": m.pixelwise_spec, "state_dict": m.state_dict(), "classes": PAN_CATEGORIES,
        "categories": PAN_CATEGORIES, "thing_ids": [1, 2], "stuff_ids": [3, 4],
        "normalization": normalization_for("RGB", None, None), "config": {}, "epoch": 0, "step": 0, "metrics": {},
        "task": "panoptic"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "pan.onnx")]) == 0
    runner = open_onnx(tmp_path / "pan.onnx")
    assert isinstance(runner, OnnxPanopticSegmenter) and runner.meta["dynamic"]
    seg = pixelwise.load(ckpt, device="cpu")
    rng = np.random.default_rng(0)
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    total_torch, total_onnx = PQStat(), PQStat()
    for i, (h, w) in enumerate([(48, 64), (70, 50), (64, 64)]):
        img = (rng.random((h, w, 3)) * 80).astype(np.uint8)
        img[h // 6: h // 2, w // 8: w // 2] = (220, 40, 60)
        img[h // 2:, w // 2:] = (40, 120, 240)
        Image.fromarray(img).save(imgs / f"im{i}.png")
        want = seg.predict(img)
        x = torch.from_numpy(runner.normalize(img)[0])
        with torch.no_grad():
            ref = m([x])[0]
        got = runner.outputs(runner.normalize(img)[0])
        for k in ("boxes", "scores", "masks", "sem_seg"):
            assert got[k].shape == tuple(ref[k].shape), k
            assert np.abs(got[k] - ref[k].numpy()).max() < 1e-4, k
        id_map, segments = runner.panoptic(img)
        assert len(want.segments) >= 2
        truth = want.segments_info()
        total_torch += pq_single_image(want.id_map, truth, want.id_map, truth, PAN_CATEGORIES)
        total_onnx += pq_single_image(want.id_map, truth, id_map, segments, PAN_CATEGORIES)
    pq_torch = total_torch.pq_average(PAN_CATEGORIES, isthing=None)["pq"]
    pq_onnx = total_onnx.pq_average(PAN_CATEGORIES, isthing=None)["pq"]
    assert pq_torch == pytest.approx(1.0) and abs(pq_onnx - pq_torch) <= 1e-9, (pq_onnx, pq_torch)
    # the CLI: predict --onnx writes the files predict --checkpoint writes
    assert main(["predict", "--onnx", str(tmp_path / "pan.onnx"), str(imgs), "--out", str(tmp_path / "p_onnx"),
                 "--quiet"]) == 0
    predict_files(ckpt, [imgs], tmp_path / "p_torch", device="cpu", progress=False)
    a = json.loads((tmp_path / "p_onnx" / PREDICTIONS_JSON).read_text())["annotations"]
    b = json.loads((tmp_path / "p_torch" / PREDICTIONS_JSON).read_text())["annotations"]
    assert a == b
    for i in range(3):
        assert np.array_equal(np.asarray(Image.open(tmp_path / "p_onnx" / f"im{i}.png")),
                              np.asarray(Image.open(tmp_path / "p_torch" / f"im{i}.png")))
