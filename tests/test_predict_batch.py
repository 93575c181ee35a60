"""Fast bulk prediction (issue 18 item 1): batches of one image size, decoding and writing in
worker processes, --outputs labels|overlay|probs, optimize() by default. Every fast path
writes the same bytes as the one-by-one path; instance and panoptic checkpoints still work."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pixelwise.cli import main
from pixelwise.data.synthetic import generate_shapes
from pixelwise.engine.predict import predict_files, size_batches
from tests.predict_helpers import mixed_sizes, semantic_checkpoint, tree_bytes


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_shapes(tmp_path_factory.mktemp("shapes") / "d", num_train=8, num_val=4, size=48, seed=7)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return semantic_checkpoint(tmp_path_factory.mktemp("run") / "unet.pt")


@pytest.fixture(scope="module")
def images(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("in") / "imgs"
    mixed_sizes(data / "JPEGImages", folder)
    return folder


def test_size_batches_groups_by_size_in_order() -> None:
    sizes = [(4, 4), (4, 4), (5, 3), (4, 4), None, (5, 3), (4, 4), (4, 4)]
    assert size_batches(sizes, 3) == [[0, 1, 3], [2, 5], [4], [6, 7]]
    assert size_batches(sizes, 1) == [[i] for i in range(8)]
    assert sorted(i for b in size_batches(sizes, 2) for i in b) == list(range(8))  # each index once
    # the automatic batch: a pixel budget per pass (4 x 4 = 16 px: 2 images; 5 x 3 = 15 px: 2)
    assert size_batches(sizes, 8, max_pixels=35) == [[0, 1], [2, 5], [3, 6], [4], [7]]
    assert size_batches([(100, 100)] * 2, 8, max_pixels=10) == [[0], [1]]  # at least one image


@pytest.mark.parametrize("optimize", [True, False])
def test_batched_with_workers_writes_the_bytes_of_one_by_one(ckpt, images, tmp_path, optimize, monkeypatch):
    import pixelwise.tasks.semantic as sem

    forwards: list[int] = []
    real = sem.SemanticTask._infer

    def counting(self, model, imgs, *a, **k):
        forwards.append(len(imgs))
        return real(self, model, imgs, *a, **k)

    monkeypatch.setattr(sem.SemanticTask, "_infer", counting)
    one = predict_files(ckpt, [images], tmp_path / "one", progress=False, optimize=optimize)
    assert forwards == [1] * 7
    forwards.clear()
    fast = predict_files(ckpt, [images], tmp_path / "fast", progress=False, optimize=optimize, batch_size=3,
                         num_workers=2)
    assert forwards == [3, 2, 1, 1]  # 4 images of 48x48 (3 + 1), 2 of 40x56, 1 of 33x45
    assert [p.name for p in fast] == [p.name for p in one] == [f"im{k}.png" for k in range(7)]  # input order
    a, b = tree_bytes(tmp_path / "one"), tree_bytes(tmp_path / "fast")
    assert sorted(a) == sorted(b) and len(a) == 14
    assert a == b  # label PNGs and overlays byte for byte
    labels = [np.asarray(Image.open(p)) for p in one]
    assert len(np.unique(np.concatenate([x.ravel() for x in labels]))) > 1  # the model predicts several classes


def test_optimize_is_on_by_default_and_can_be_turned_off(ckpt, images, tmp_path, monkeypatch, capsys):
    import pixelwise.optimize as opt

    calls = []
    real = opt.optimize
    monkeypatch.setattr(opt, "optimize", lambda m, **k: calls.append(1) or real(m, **k))
    assert main(["predict", "--checkpoint", str(ckpt), str(images), "--out", str(tmp_path / "a"), "--quiet"]) == 0
    assert calls == [1]
    assert main(["predict", "--checkpoint", str(ckpt), str(images), "--out", str(tmp_path / "b"), "--quiet",
                 "--no-optimize"]) == 0
    assert calls == [1]
    # the folded model's labels equal the model's as trained here (1e-4 on the logits)
    a, b = tree_bytes(tmp_path / "a"), tree_bytes(tmp_path / "b")
    same = [np.array_equal(np.asarray(Image.open(tmp_path / "a" / k)), np.asarray(Image.open(tmp_path / "b" / k)))
            for k in a if not k.endswith("_overlay.png")]
    assert sorted(a) == sorted(b) and all(same)


def test_outputs_labels_only_and_probs(ckpt, images, tmp_path, capsys):
    assert main(["predict", "--checkpoint", str(ckpt), str(images), "--out", str(tmp_path / "lab"), "--quiet",
                 "--outputs", "labels", "--batch-size", "4", "--num-workers", "1"]) == 0
    assert capsys.readouterr().out.strip().startswith(f"wrote 7 label maps to {tmp_path / 'lab'}")
    assert sorted(tree_bytes(tmp_path / "lab")) == [f"im{k}.png" for k in range(7)]  # no overlay drawn
    full = predict_files(ckpt, [images], tmp_path / "full", progress=False)
    for p in full:
        assert (tmp_path / "lab" / p.name).read_bytes() == p.read_bytes()

    assert main(["predict", "--checkpoint", str(ckpt), str(images), "--out", str(tmp_path / "pr"), "--quiet",
                 "--outputs", "labels,probs", "--batch-size", "4"]) == 0
    names = sorted(tree_bytes(tmp_path / "pr"))
    assert names == sorted([f"im{k}.png" for k in range(7)] + [f"im{k}_probs.npz" for k in range(7)])
    from pixelwise.data.io import read_image
    from pixelwise.data.transforms import normalize_image
    from pixelwise.engine.checkpoint import load_checkpoint, model_from_checkpoint

    ck = load_checkpoint(ckpt)
    model = model_from_checkpoint(ck, ckpt).eval()
    for p in full:
        z = np.load(tmp_path / "pr" / f"{p.stem}_probs.npz")
        probs, label = z["probs"].astype(np.float64), np.asarray(Image.open(p))
        assert z["probs"].dtype == np.float16 and probs.shape == (len(ck["classes"]),) + label.shape
        assert list(z["classes"]) == [c["name"] for c in ck["classes"]]
        with torch.no_grad():  # the eager model's softmax, by hand
            ref = torch.softmax(model(normalize_image(read_image(images / f"{p.stem}.png"),
                                                      ck["normalization"])[None]), 1)[0].double().numpy()
        assert np.abs(probs - ref).max() < 1e-3  # float16 storage + the folded model's 1e-4
        top = np.sort(ref, 0)
        clear = top[-1] - top[-2] > 3e-3
        assert clear.mean() > 0.5 and (probs.argmax(0) == label)[clear].all()
        assert (tmp_path / "pr" / p.name).read_bytes() == p.read_bytes()

    assert main(["predict", "--checkpoint", str(ckpt), str(images), "--out", str(tmp_path / "x"),
                 "--outputs", "labels,masks"]) == 2
    assert "--outputs: unknown kind(s) masks" in capsys.readouterr().err


def test_skip_existing_with_batches(ckpt, images, tmp_path):
    out = tmp_path / "o"
    first = predict_files(ckpt, [images], out, progress=False, batch_size=3, num_workers=1)
    done = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    (out / "im3_overlay.png").unlink()
    again = predict_files(ckpt, [images], out, progress=False, batch_size=3, num_workers=1, skip_existing=True)
    assert [p.name for p in again] == ["im3.png"]
    assert all((out / n).stat().st_mtime_ns == t for n, t in done.items() if not n.startswith("im3"))
    assert len(first) == 7


# ---------------------------------------------------------------------------------------
# instance and panoptic: still one image per forward pass, same files with workers
# ---------------------------------------------------------------------------------------

DET = dict(preset="cpu", fpn_channels=16, mask_head_channels=8, box_head_dim=32, min_size=64, max_size=64,
           rpn_pre_nms_top_n_train=100, rpn_post_nms_top_n_train=50, rpn_pre_nms_top_n_test=50,
           rpn_post_nms_top_n_test=20, box_batch_size_per_image=32, rpn_batch_size_per_image=32,
           anchor_sizes=(8, 16, 32, 64, 128))


@pytest.fixture(scope="module")
def det_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_shapes(tmp_path_factory.mktemp("det") / "d", num_train=4, num_val=3, size=64, seed=1)


@pytest.mark.parametrize("model", ["maskrcnn", "panoptic_fpn"])
def test_instance_and_panoptic_checkpoints_still_predict(model, det_data, tmp_path, capsys):
    run = tmp_path / "run"
    kwargs = dict(DET, **({"semantic_channels": 32, "scale_stuff_area": True} if model == "panoptic_fpn" else {}))
    args = ["train", "--model", model, "--data", str(det_data), "--out", str(run), "--epochs", "1",
            "--batch-size", "2", "--lr", "0.005", "--num-workers", "0", "--quiet", "--no-report"]
    for k, v in kwargs.items():
        args += ["--model-arg", f"{k}={list(v) if isinstance(v, tuple) else v}"]
    assert main(args) == 0
    imgs = sorted((det_data / "JPEGImages").glob("val_*.png"))
    base = ["predict", "--checkpoint", str(run / "last.pt"), *map(str, imgs), "--quiet"]
    assert main([*base, "--out", str(tmp_path / "one"), "--batch-size", "1", "--num-workers", "0"]) == 0
    assert main([*base, "--out", str(tmp_path / "fast"), "--batch-size", "4", "--num-workers", "2"]) == 0
    capsys.readouterr()
    a, b = tree_bytes(tmp_path / "one"), tree_bytes(tmp_path / "fast")
    assert a == b and len(a) == 3 * (3 if model == "maskrcnn" else 2) + (model == "panoptic_fpn")
    assert main([*base, "--out", str(tmp_path / "lab"), "--outputs", "labels"]) == 0
    lab = tree_bytes(tmp_path / "lab")
    assert not any("_overlay" in k for k in lab) and all(a[k] == v for k, v in lab.items())
    assert main([*base, "--out", str(tmp_path / "p"), "--outputs", "probs"]) == 2
    assert "cannot write --outputs probs" in capsys.readouterr().err


def test_interrupted_run_with_writer_processes_leaves_only_whole_files(ckpt, images, tmp_path, monkeypatch):
    import pixelwise.tasks.semantic as sem

    calls = []
    real = sem.SemanticTask.predict_batch

    def stop_at_third(self, *a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(sem.SemanticTask, "predict_batch", stop_at_third)
    out = tmp_path / "o"
    with pytest.raises(KeyboardInterrupt):
        predict_files(ckpt, [images], out, progress=False, batch_size=2, num_workers=2)
    left = sorted(p.name for p in out.iterdir())
    assert not [n for n in left if n.endswith(".tmp")] and len(left) <= 8  # two batches of 2 at most
    for p in out.iterdir():
        Image.open(p).load()  # every file there is whole
    monkeypatch.setattr(sem.SemanticTask, "predict_batch", real)
    predict_files(ckpt, [images], out, progress=False, batch_size=2, num_workers=2, skip_existing=True)
    assert len(list(out.iterdir())) == 14
