"""ONNX export: every registered semantic model, dynamic N/H/W, onnxruntime == PyTorch within
1e-4 on the logits; the CLI's `export` and `predict --onnx` (no checkpoint needed)."""
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn

pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import pixelwise  # noqa: E402
from pixelwise.export import OnnxSegmenter, export_onnx  # noqa: E402
from export_helpers import eval_model

SMALL = {
    "fcn8s": dict(width=0.125, backbone="vgg16_bn"),
    "fcn16s": dict(width=0.125, backbone="vgg16_bn"),
    "fcn32s": dict(width=0.125, backbone="vgg16_bn"),
    "segnet": dict(width=0.125),
    "segnet_basic": dict(channels=8),
    "unet": dict(width=0.125),
    "unet_original": dict(width=0.0625),
    "pspnet": dict(backbone="resnet18", ppm_channels=16, head_channels=16, aux_channels=8),
    "deeplabv3": dict(backbone="resnet18", aspp_channels=16),
    "deeplabv3plus": dict(backbone="resnet18", aspp_channels=16, decoder_channels=16),
}
EXTRA = {"unet[resnet18]": ("unet", dict(backbone="resnet18", decoder_channels=(16, 16, 8, 8, 8)))}
# SegNet's unpooling follows the max-pool's argmax, which a 1e-7 rounding difference between
# two runtimes can flip at a near-tie (onnxruntime has no float64 Conv to rule that out): the
# inputs are fixed by the seeds below, and the test runs the same graph at several sizes.
DOUBLE: set = set()
SEMANTIC = pixelwise.list_models(task="semantic")


def test_every_semantic_model_is_covered():
    assert set(SEMANTIC) <= set(SMALL), set(SEMANTIC) - set(SMALL)


def _model(name: str, kw: dict) -> nn.Module:
    return eval_model(name, **kw)


@pytest.mark.parametrize("key", sorted(SMALL) + sorted(EXTRA))
def test_dynamic_export_matches_pytorch(key, tmp_path):
    name, kw = EXTRA[key] if key in EXTRA else (key, SMALL[key])
    m = _model(name, kw)
    dtype = torch.float64 if name in DOUBLE else torch.float32
    m = m.to(dtype)
    path = export_onnx(m, tmp_path / "m.onnx", dynamic=True, size=64)
    seg = OnnxSegmenter(path, threads=1)
    assert seg.meta["dynamic"] and seg.meta["model"]["name"] == name
    if name == "unet_original":
        valid = m.valid_input_sizes(60, 400)
        sizes = [(1, valid[0], valid[0]), (2, valid[2], valid[1])]
    else:
        sizes = [(1, 64, 64), (2, 65, 47), (1, 96, 128)]
    for n, h, w in sizes:
        x = torch.randn(n, 3, h, w, dtype=dtype)
        with torch.no_grad():
            ref = m(x).numpy()
        y = seg.session.run(None, {"image": x.numpy()})[0]
        assert y.shape == ref.shape, (n, h, w)
        assert np.abs(y - ref).max() <= 1e-4, (n, h, w, np.abs(y - ref).max())


def test_fixed_size_export_and_unet_original_padding(tmp_path):
    m = _model("unet_original", SMALL["unet_original"])
    seg = OnnxSegmenter(export_onnx(m, tmp_path / "u.onnx", dynamic=True, size=64))
    image = (np.random.default_rng(0).random((50, 70, 3)) * 255).astype(np.uint8)
    label = seg.predict(image)  # mirror-padded to a valid tile, cropped back
    assert label.shape == (50, 70) and label.dtype == np.int64
    m2 = _model("segnet_basic", SMALL["segnet_basic"])
    seg2 = OnnxSegmenter(export_onnx(m2, tmp_path / "s.onnx", dynamic=False, size=32))
    assert seg2.meta["dynamic"] is False
    assert seg2.logits(np.zeros((1, 3, 32, 32), np.float32)).shape == (1, 3, 32, 32)


def test_cli_export_and_predict_onnx(tmp_path):
    from PIL import Image

    from pixelwise.cli import main
    from pixelwise.engine.checkpoint import save_checkpoint
    from pixelwise.engine.predict import predict_files

    m = _model("unet", SMALL["unet"])
    classes = [{"id": i, "name": n, "color": c} for i, (n, c) in
               enumerate([("bg", [0, 0, 0]), ("a", [255, 0, 0]), ("b", [0, 255, 0])])]
    norm = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "image_mode": "RGB"}
    ckpt = tmp_path / "m.pt"
    save_checkpoint(ckpt, {"model": m.pixelwise_spec, "state_dict": m.state_dict(), "classes": classes,
                           "normalization": norm, "config": {}, "epoch": 0, "step": 0, "metrics": {}})
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    rng = np.random.default_rng(1)
    for i, (h, w) in enumerate([(40, 56), (33, 45)]):
        Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(imgs / f"im{i}.png")
    onnx_path = tmp_path / "m.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["export", "--checkpoint", str(ckpt), "--format", "onnx", "--out", str(onnx_path),
                     "--dynamic", "--size", "64"]) == 0
    assert onnx_path.is_file()
    from pixelwise.export import open_onnx

    assert type(open_onnx(onnx_path)) is OnnxSegmenter  # the runner follows the task in the metadata
    assert main(["predict", "--onnx", str(onnx_path), str(imgs), "--out", str(tmp_path / "p_onnx"), "--quiet"]) == 0
    predict_files(ckpt, [imgs], tmp_path / "p_torch", device="cpu", progress=False)
    assert main(["predict", "--checkpoint", str(ckpt), "--fast", str(imgs), "--out", str(tmp_path / "p_fast"),
                 "--quiet", "--device", "cpu"]) == 0
    for i in range(2):
        a = np.asarray(Image.open(tmp_path / "p_onnx" / f"im{i}.png"))
        b = np.asarray(Image.open(tmp_path / "p_torch" / f"im{i}.png"))
        c = np.asarray(Image.open(tmp_path / "p_fast" / f"im{i}.png"))
        assert (a == b).mean() > 0.999 and (c == b).mean() > 0.999
        assert (tmp_path / "p_onnx" / f"im{i}_overlay.png").is_file()
    # a checkpoint is not needed any more, and unknown formats are refused in one line
    ckpt.unlink()
    assert main(["predict", "--onnx", str(onnx_path), str(imgs), "--out", str(tmp_path / "p2"), "--quiet"]) == 0
    assert main(["export", "--checkpoint", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "x.onnx")]) == 2
