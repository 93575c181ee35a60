"""int8 export (pixelwise/quantize.py): a small trained model's int8 labels agree with fp32
eager on >= 98 % of the val pixels and its mIoU stays close; the graph is really integer; the
calibration inputs are predict's inputs; the CLI writes atomically and a bad calibration folder
is one line."""
import shutil
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import pixelwise  # noqa: E402
from pixelwise.cli import main  # noqa: E402

NORM = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "image_mode": "RGB"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A U-Net (1/8 width) trained for 120 Adam steps on 16 synthetic 48 px shapes images."""
    from pixelwise.data.classes import load_classes
    from pixelwise.data.synthetic import generate_shapes
    from pixelwise.engine.checkpoint import save_checkpoint
    from pixelwise.tasks.semantic import open_dataset

    root = tmp_path_factory.mktemp("int8")
    data = generate_shapes(root / "data", num_train=16, num_val=6, size=48, seed=0)
    ds = open_dataset(data, "train", quiet=True)
    mean, std = torch.tensor(NORM["mean"])[:, None, None], torch.tensor(NORM["std"])[:, None, None]
    x = torch.stack([(ds.load(i)["image"] - mean) / std for i in range(len(ds))])
    y = torch.stack([ds.load(i)["semantic"] for i in range(len(ds))])
    classes = load_classes(data / "classes.json")
    torch.manual_seed(0)
    model = pixelwise.build_model("unet", len(classes), width=0.125)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for step in range(120):
            idx = torch.arange(8) + 8 * (step % 2)
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx], ignore_index=255)
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    ckpt = root / "m.pt"
    save_checkpoint(ckpt, {"model": model.pixelwise_spec, "state_dict": model.eval().state_dict(),
                           "classes": [{"id": c.id, "name": c.name, "color": list(c.color)} for c in classes],
                           "normalization": NORM, "config": {}, "epoch": 0, "step": 120, "metrics": {}})
    return ckpt, data, len(classes)


def _val(data):
    from pixelwise.data.io import read_image
    from pixelwise.tasks.semantic import open_dataset

    val = open_dataset(data, "val", quiet=True)
    return ([read_image(val.load(i)["meta"]["file"]) for i in range(len(val))],
            [val.load(i)["semantic"].numpy() for i in range(len(val))])


def _miou(preds, targets, k):
    from pixelwise.metrics.semantic import ConfusionMatrix

    cm = ConfusionMatrix(k)
    for p, t in zip(preds, targets):
        cm.update(p, t)
    return cm.compute()["miou"]


def test_int8_labels_agree_with_fp32(trained, tmp_path):
    import onnx

    from pixelwise.engine.checkpoint import load_checkpoint, model_from_checkpoint
    from pixelwise.engine.predict import predict_array
    from pixelwise.export import open_onnx
    from pixelwise.quantize import quantize

    ckpt, data, k = trained
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = quantize(ckpt, data, n=8, out=tmp_path / "m.int8.onnx")
    graph = onnx.load(str(path)).graph
    ops = [n.op_type for n in graph.node]
    convs = ops.count("Conv") + ops.count("ConvTranspose")
    # every conv reads int8 weights (QDQ: a DequantizeLinear of an int8 initializer per conv)
    int8_weights = [t for t in graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert ops.count("QuantizeLinear") >= convs > 0 and len(int8_weights) >= convs
    seg = open_onnx(path)
    assert seg.meta["quantization"]["calibration_images"] == 8 and seg.meta["dynamic"] is True

    model = model_from_checkpoint(load_checkpoint(ckpt)).eval()
    images, targets = _val(data)
    fp32 = [predict_array(model, im, NORM) for im in images]
    int8 = [seg.predict(im) for im in images]
    m32, m8 = _miou(fp32, targets, k), _miou(int8, targets, k)
    assert m32 > 0.5, f"the fixture's model is not trained enough to test against ({m32:.3f})"
    agree = np.mean([(a == b).mean() for a, b in zip(fp32, int8)])
    assert agree >= 0.98, agree
    assert abs(m8 - m32) <= 0.02, (m32, m8)


def test_calibration_inputs_are_predict_inputs(trained, tmp_path):
    """A plain image folder: the inputs are spread over it and normalised as predict --onnx does."""
    from pixelwise.data.io import read_image
    from pixelwise.export import OnnxSegmenter, export_checkpoint
    from pixelwise.quantize import calibration_inputs

    ckpt, data, _ = trained
    f = export_checkpoint(ckpt, tmp_path / "m.onnx", dynamic=True, size=48)
    folder = tmp_path / "images"
    folder.mkdir()
    files = sorted((data / "JPEGImages").glob("train_*.png"))[:5]
    for p in files:
        shutil.copy(p, folder / p.name)
    xs = calibration_inputs(f, folder, n=3)
    seg = OnnxSegmenter(f)
    assert len(xs) == 3
    picked = [files[0], files[2], files[4]]  # 3 of 5, spread evenly
    for x, p in zip(xs, picked):
        np.testing.assert_allclose(x, seg.normalize(read_image(p)), atol=1e-5)


def test_cli_export_int8_atomic_and_predict(trained, tmp_path, monkeypatch):
    ckpt, data, _ = trained
    out = tmp_path / "models" / "m.int8.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["export", "--checkpoint", str(ckpt), "--int8", "--calibrate", str(data),
                     "--calibration-images", "4", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["m.int8.onnx"]  # no temporary left
    before = out.read_bytes()
    imgs = data / "JPEGImages"
    assert main(["predict", "--onnx", str(out), str(imgs / "val_00000.png"), "--out", str(tmp_path / "p"),
                 "--quiet"]) == 0
    assert (tmp_path / "p" / "val_00000.png").is_file()

    # a failure half way leaves the previous file whole and no temporary behind
    import onnxruntime.quantization as q

    def broken(model_input, model_output, *a, **kw):
        with open(model_output, "wb") as fh:
            fh.write(b"half a model")
        raise RuntimeError("killed")

    monkeypatch.setattr(q, "quantize_static", broken)
    with pytest.raises(RuntimeError):
        main(["export", "--checkpoint", str(ckpt), "--int8", "--calibrate", str(data), "--out", str(out)])
    assert out.read_bytes() == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["m.int8.onnx"]


@pytest.mark.parametrize("case", ["missing", "empty", "junk", "none"])
def test_bad_calibration_folder_is_one_line(trained, tmp_path, capsys, case):
    ckpt, _, _ = trained
    folder = tmp_path / "calib"
    if case != "missing":
        folder.mkdir()
    if case == "junk":
        (folder / "notes.txt").write_text("no images here")
    args = ["export", "--checkpoint", str(ckpt), "--int8", "--out", str(tmp_path / "m.onnx")]
    if case != "none":
        args += ["--calibrate", str(folder)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err
    assert (str(folder) in err) if case != "none" else ("--calibrate" in err)
    assert not (tmp_path / "m.onnx").exists()


def test_int8_is_an_onnx_export(trained, tmp_path, capsys):
    ckpt, data, _ = trained
    assert main(["export", "--checkpoint", str(ckpt), "--int8", "--calibrate", str(data), "--format", "safetensors",
                 "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--int8" in err and "safetensors" in err
    assert not (tmp_path / "m").exists()
