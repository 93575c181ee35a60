"""ONNX export of Mask R-CNN: onnxruntime gives PyTorch's detections (same count, boxes within
1e-3, equal labels, equal thresholded masks) on an image with detections, on one with none and
on a batch of two; `pixelwise export` of an instance checkpoint carries its metadata, and
`predict --onnx` writes what `predict --checkpoint` writes, without running PyTorch."""
import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from pixelwise.export import OnnxInstanceSegmenter, export_onnx, open_onnx  # noqa: E402
from pixelwise.models import build_model  # noqa: E402

TINY = dict(preset="cpu", fpn_channels=16, mask_head_channels=8, box_head_dim=32, min_size=0, max_size=96,
            rpn_pre_nms_top_n_test=50, rpn_post_nms_top_n_test=20, anchor_sizes=(8, 16, 32, 64, 128))
NORM = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "image_mode": "RGB"}


def _detector() -> nn.Module:
    """A tiny seeded Mask R-CNN that detects class 1 on textured images and nothing on a blank
    one: every bias and BatchNorm shift is zero, so the network is positively homogeneous and
    a zero image gives zero features, i.e. the class logits' biases (class 1 at -5: score
    0.007 < the 0.05 score threshold); the class-1 logit rises with the box head's features.
    BatchNorm keeps non-trivial scales and variances, so the export's conv+BN folding is exercised."""
    torch.manual_seed(0)
    m = build_model("maskrcnn", 3, **TINY)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.zero_()
                mod.running_mean.zero_()
                mod.running_var.uniform_(0.5, 2.0)
            elif isinstance(mod, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)) and mod.bias is not None:
                mod.bias.zero_()
        cls = m.roi_heads.box_predictor.cls_score
        cls.weight.zero_()
        cls.weight[1] = torch.rand(cls.weight.shape[1])
        cls.bias.copy_(torch.tensor([0.0, -5.0, -10.0]))
    return m.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    m = _detector()
    path = export_onnx(m, tmp_path_factory.mktemp("onnx") / "maskrcnn.onnx", dynamic=True, size=64)
    return m, open_onnx(path, threads=1)


def _assert_same(ref: dict, got: dict, what: str) -> None:
    """Same detections: count, labels, boxes within 1e-3, scores within 1e-4, masks equal after
    thresholding at 0.5 (mask probabilities agree to ~1e-5; none of these inputs puts a pasted
    pixel that close to 0.5, so no border pixel is allowed to differ)."""
    n = len(ref["scores"])
    assert len(got["scores"]) == n, (what, n, len(got["scores"]))
    assert got["boxes"].shape == (n, 4) and got["masks"].shape == tuple(ref["masks"].shape), what
    assert np.array_equal(got["labels"], ref["labels"].numpy()), what
    if n:
        assert np.abs(got["boxes"] - ref["boxes"].numpy()).max() <= 1e-3, what
        assert np.abs(got["scores"] - ref["scores"].numpy()).max() <= 1e-4, what
        assert np.array_equal(got["masks"] >= 0.5, ref["masks"].numpy() >= 0.5), what


def test_image_with_detections(exported):
    m, runner = exported
    assert isinstance(runner, OnnxInstanceSegmenter) and runner.meta["dynamic"]
    x = torch.randn(3, 64, 96, generator=torch.Generator().manual_seed(1))  # not the export size
    with torch.no_grad():
        ref = m([x])[0]
    assert len(ref["scores"]) >= 5 and set(ref["labels"].tolist()) == {1}
    assert (ref["masks"] >= 0.5).any(dim=(1, 2, 3)).sum() >= 3  # several non-empty masks to compare
    _assert_same(ref, runner.outputs(x.numpy()), "image with detections")
    # an odd size, padded to a multiple of 32 inside the graph
    x = torch.randn(3, 50, 70, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = m([x])[0]
    assert len(ref["scores"]) >= 5
    _assert_same(ref, runner.outputs(x.numpy()), "50x70 image")


def test_image_without_detections(exported):
    m, runner = exported
    x = torch.zeros(3, 64, 64)
    with torch.no_grad():
        ref = m([x])[0]
    assert len(ref["scores"]) == 0
    got = runner.outputs(x.numpy())
    _assert_same(ref, got, "blank image")
    assert got["masks"].shape == (0, 1, 64, 64)
    det = runner.detect(np.full((64, 64, 3), 128, np.uint8), score_threshold=0.0)  # 128 = the mean: x = 0
    assert len(det["scores"]) == 0 and det["masks"].shape == (0, 64, 64)
    assert not runner.predict(np.full((64, 64, 3), 128, np.uint8)).any()


def test_batch_of_two_is_two_runs(exported):
    """The graph takes one image; a batch of N is N runs, each equal to the PyTorch model's
    result for that image in a batched call (images of one size: the batch adds no padding)."""
    m, runner = exported
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(3, 64, 96, generator=g), 1.5 * torch.randn(3, 64, 96, generator=g)
    with torch.no_grad():
        refs = m([a, b])
    assert len(refs[0]["scores"]) and len(refs[1]["scores"])
    assert len(refs[0]["scores"]) != len(refs[1]["scores"]) or not torch.equal(refs[0]["boxes"], refs[1]["boxes"])
    for i, (x, ref) in enumerate(zip((a, b), refs)):
        _assert_same(ref, runner.outputs(x.numpy()), f"batch item {i}")
    with pytest.raises(ValueError, match="one"):
        runner.outputs(np.stack([a.numpy(), b.numpy()]))


def _checkpoint(tmp_path):
    from pixelwise.engine.checkpoint import save_checkpoint

    m = _detector()
    classes = [{"id": 0, "name": "background", "isthing": False, "color": [0, 0, 0]},
               {"id": 1, "name": "circle", "isthing": True, "color": [255, 0, 0]},
               {"id": 2, "name": "square", "isthing": True, "color": [0, 255, 0]}]
    path = tmp_path / "maskrcnn.pt"
    save_checkpoint(path, {"model": m.pixelwise_spec, "state_dict": m.state_dict(), "classes": classes,
                           "normalization": NORM, "config": {}, "epoch": 0, "step": 0, "metrics": {},
                           "task": "instance", "category_ids": [0, 7, 9]})
    return path


def test_cli_export_metadata_and_predict_onnx_match_pytorch(tmp_path, monkeypatch):
    from PIL import Image

    from pixelwise.cli import main
    from pixelwise.engine.instance import predict_instance_files

    ckpt = _checkpoint(tmp_path)
    onnx_path = tmp_path / "maskrcnn.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["export", "--checkpoint", str(ckpt), "--format", "onnx", "--out", str(onnx_path),
                     "--size", "64"]) == 0  # fixed size: the graph takes 64x64 images
    runner = open_onnx(onnx_path)
    meta = runner.meta
    assert meta["task"] == "instance" and meta["dynamic"] is False and meta["export_size"] == [64, 64]
    assert [c["name"] for c in meta["classes"]] == ["background", "circle", "square"]
    assert meta["category_ids"] == [0, 7, 9] and meta["normalization"] == NORM
    assert meta["mask_threshold"] == 0.5 and meta["box_score_thresh"] == 0.05
    assert meta["model"]["name"] == "maskrcnn"

    imgs = tmp_path / "imgs"
    imgs.mkdir()
    rng = np.random.default_rng(4)
    Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8)).save(imgs / "textured.png")
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(imgs / "blank.png")
    predict_instance_files(ckpt, [imgs], tmp_path / "p_torch", device="cpu", progress=False)

    def no_torch(*args, **kwargs):
        raise AssertionError("a PyTorch module ran during ONNX prediction")

    with monkeypatch.context() as mp:
        mp.setattr(torch.nn.Module, "__call__", no_torch)
        assert main(["predict", "--onnx", str(onnx_path), str(imgs), "--out", str(tmp_path / "p_onnx"),
                     "--quiet"]) == 0
    for stem in ("textured", "blank"):
        a = np.asarray(Image.open(tmp_path / "p_onnx" / f"{stem}.png"))
        b = np.asarray(Image.open(tmp_path / "p_torch" / f"{stem}.png"))
        assert np.array_equal(a, b), stem
        da = json.loads((tmp_path / "p_onnx" / f"{stem}.json").read_text())
        db = json.loads((tmp_path / "p_torch" / f"{stem}.json").read_text())
        assert len(da) == len(db)
        for x, y in zip(da, db):
            assert (x["category_id"], x["class_name"], x["segmentation"]) == \
                   (y["category_id"], y["class_name"], y["segmentation"])
            assert np.allclose(x["bbox"], y["bbox"], atol=0.011) and abs(x["score"] - y["score"]) <= 1e-4
        va = np.asarray(Image.open(tmp_path / "p_onnx" / f"{stem}_overlay.png")).astype(int)
        vb = np.asarray(Image.open(tmp_path / "p_torch" / f"{stem}_overlay.png")).astype(int)
        assert va.shape == vb.shape and (va != vb).any(-1).mean() < 1e-3, stem
    textured = json.loads((tmp_path / "p_onnx" / "textured.json").read_text())
    assert textured and {(d["class_name"], d["category_id"]) for d in textured} == {("circle", 7)}
    assert json.loads((tmp_path / "p_onnx" / "blank.json").read_text()) == []
    assert 1 <= np.asarray(Image.open(tmp_path / "p_onnx" / "textured.png")).max() <= len(textured)
