"""Bad input end to end: readers that accept and convert 16-bit / RGBA / grayscale images,
skipping (and counting) bad samples in training and evaluation, clear one-line errors from
DataLoader workers, and `predict --skip-existing` resuming an interrupted run."""
from __future__ import annotations

import json
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from pixelwise.cli import main
from pixelwise.data.formats.base import LoaderDataError, SkipBadSamples
from pixelwise.data.formats.voc import VOCSegmentation
from pixelwise.data.io import read_image, read_image_info, read_label
from pixelwise.data.synthetic import generate_shapes
from pixelwise.engine.common import pad_collate
from pixelwise.engine.config import load_config
from pixelwise.errors import DataError

TINY = {"model": "fcn8s", "model_kwargs": {"width": 0.125, "backbone": "vgg16_bn"}, "epochs": 1, "batch_size": 4,
        "lr": 0.001, "optimizer": "adamw", "num_workers": 0, "progress": False}


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_shapes(tmp_path_factory.mktemp("clean") / "shapes", num_train=8, num_val=4, size=48, seed=3)


@pytest.fixture(scope="module")
def checkpoint(clean: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pixelwise.engine.train import train

    out = tmp_path_factory.mktemp("run")
    train(load_config(None, {**TINY, "data": str(clean), "out": str(out)}))
    return out / "last.pt"


def _ids(root: Path, split: str) -> list[str]:
    return (root / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.fixture()
def bad(clean: Path, tmp_path: Path) -> tuple[Path, dict[str, Path]]:
    """The clean set with 2 bad train samples (truncated image, mask of another size) and 1
    bad val sample (label out of range)."""
    root = tmp_path / "bad"
    shutil.copytree(clean, root)
    train, val = _ids(root, "train"), _ids(root, "val")
    _truncate(root / "JPEGImages" / f"{train[2]}.png")
    lab = root / "SegmentationClass" / f"{train[5]}.png"
    Image.open(lab).crop((0, 0, 40, 48)).save(lab)
    vlab = root / "SegmentationClass" / f"{val[1]}.png"
    im = Image.open(vlab)
    a = np.asarray(im).copy()
    a[0, 0] = 9
    out = Image.fromarray(a)
    out.putpalette(im.getpalette())
    out.save(vlab)
    return root, {"truncated": root / "JPEGImages" / f"{train[2]}.png", "size": lab, "range": vlab}


# ---------------------------------------------------------------------------------------
# readers: accepted and converted, errors name the file
# ---------------------------------------------------------------------------------------


def _png48(path: Path, a: np.ndarray) -> None:
    """A 16-bit-per-channel RGB PNG (PIL cannot write one)."""
    h, w, _ = a.shape
    raw = b"".join(b"\x00" + a[y].astype(">u2").tobytes() for y in range(h))

    def chunk(t: bytes, d: bytes) -> bytes:
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    body = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)


def test_readers_accept_and_convert_16bit_rgba_and_gray(tmp_path: Path) -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (6, 5, 3), dtype=np.uint8)
    deep = (rgb[:, :, 0].astype(np.uint16) * 100 + 1000)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    a, note = read_image_info(tmp_path / "deep.png")
    assert a.shape == (6, 5, 3) and a.dtype == np.uint8 and "16-bit" in note and "scaled to 8 bits" in note
    order = np.argsort(deep.ravel(), kind="stable")
    assert np.all(np.diff(a[:, :, 0].ravel()[order].astype(int)) >= 0) and a.max() == 255 and a.min() == 0

    _png48(tmp_path / "deep_rgb.png", rgb.astype(np.uint16) * 257)
    a, note = read_image_info(tmp_path / "deep_rgb.png")
    assert np.array_equal(a, rgb) and "16-bit RGB" in note

    Image.fromarray(np.dstack([rgb, np.full((6, 5), 9, np.uint8)])).save(tmp_path / "rgba.png")
    a, note = read_image_info(tmp_path / "rgba.png")
    assert np.array_equal(a, rgb) and "alpha" in note

    Image.fromarray(rgb[:, :, 1]).save(tmp_path / "gray.png")
    a, note = read_image_info(tmp_path / "gray.png")
    assert a.shape == (6, 5, 3) and all(np.array_equal(a[:, :, c], rgb[:, :, 1]) for c in range(3))
    assert "grayscale" in note
    assert read_image_info(tmp_path / "gray.png", "L")[1] is None  # read as stored
    assert read_image_info(tmp_path / "rgba.png", "L")[0].shape == (6, 5, 1)

    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg")
    a, note = read_image_info(tmp_path / "cmyk.jpg")
    assert a.shape == (6, 5, 3) and "CMYK" in note
    Image.fromarray(rgb).save(tmp_path / "plain.png")
    assert read_image_info(tmp_path / "plain.png")[1] is None


def test_converted_images_load_in_a_voc_dataset(clean: Path, tmp_path: Path) -> None:
    """Training / evaluation read them through the same reader: 3 channels whatever the file."""
    root = tmp_path / "mixed"
    shutil.copytree(clean, root)
    ids = _ids(root, "train")
    rgb = [read_image(root / "JPEGImages" / f"{i}.png") for i in ids[:3]]
    Image.fromarray(rgb[0][:, :, 0].astype(np.uint16) * 250).save(root / "JPEGImages" / f"{ids[0]}.png")
    Image.fromarray(np.dstack([rgb[1], np.zeros((48, 48), np.uint8)])).save(root / "JPEGImages" / f"{ids[1]}.png")
    Image.fromarray(rgb[2][:, :, 2]).save(root / "JPEGImages" / f"{ids[2]}.png")
    ds = VOCSegmentation(root, "train")
    for i in range(3):
        s = ds[i]
        assert s["image"].shape == (3, 48, 48) and s["image"].dtype == torch.float32
    assert torch.equal(ds[1]["image"], VOCSegmentation(clean, "train")[1]["image"])  # alpha dropped, nothing else
    assert torch.equal(ds[2]["image"][0], ds[2]["image"][1])  # gray repeated


def test_reader_errors_name_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    Image.fromarray(np.zeros((4, 4), np.float32)).save(tmp_path / "float.tif")
    with pytest.raises(DataError, match="floating-point") as info:
        read_label(tmp_path / "float.tif")
    assert info.value.path == str(tmp_path / "float.tif")
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).convert("CMYK").save(tmp_path / "c.jpg")

    def broken_convert(self, *args, **kwargs):
        raise ValueError("conversion not supported")

    monkeypatch.setattr(Image.Image, "convert", broken_convert)
    with pytest.raises(DataError, match="cannot be converted") as info:
        read_image(tmp_path / "c.jpg")
    assert info.value.path == str(tmp_path / "c.jpg") and "CMYK" in info.value.problem


# ---------------------------------------------------------------------------------------
# skipping bad samples
# ---------------------------------------------------------------------------------------


def test_skip_bad_samples_leaves_out_and_counts(bad: tuple[Path, dict[str, Path]]) -> None:
    root, files = bad
    base = VOCSegmentation(root, "train")
    ds = SkipBadSamples(base)
    assert len(base) == 8 and len(ds) == 6 and ds.num_skipped == 2
    assert sorted(e.path for e in ds.bad) == sorted(str(files[k]) for k in ("truncated", "size"))
    assert {s["meta"]["id"] for s in (ds[i] for i in range(len(ds)))} == set(_ids(root, "train")) - {
        files["truncated"].stem, files["size"].stem}
    report = ds.report()
    assert report["count"] == 2 and report["total"] == 8 and "truncated" in report["samples"][0]["problem"]
    assert "skipped 2 bad sample(s) of 8" in ds.warning()
    ds.transforms = lambda s: {**s, "tag": 1}  # set on the wrapper, used by the dataset it wraps
    assert base.transforms is ds.transforms and ds[0]["tag"] == 1
    assert ds.classes == base.classes  # other attributes are the dataset's


def test_training_skips_bad_samples_or_stops_at_the_first(bad: tuple[Path, dict[str, Path]], tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    from pixelwise.engine.train import train

    root, files = bad
    with pytest.raises(DataError) as info:  # default: the first bad sample stops training
        train(load_config(None, {**TINY, "data": str(root), "out": str(tmp_path / "strict")}))
    assert info.value.path in {str(f) for f in files.values()}

    out = tmp_path / "skip"
    result = train(load_config(None, {**TINY, "data": str(root), "out": str(out), "skip_bad_samples": True}))
    assert result["steps"] == 1  # 6 good train images / batch 4, drop_last
    err = capsys.readouterr().err
    assert "skipped 2 bad sample(s) of 8 in split 'train'" in err and "skipped 1 bad sample(s) of 4" in err
    report = json.loads((out / "skipped_samples.json").read_text())
    assert report["train"]["count"] == 2 and report["val"]["count"] == 1
    assert report["val"]["samples"][0]["file"] == str(files["range"])
    assert json.loads((out / "config.json").read_text())["skip_bad_samples"] is True


def test_evaluation_counts_skipped_samples_and_never_scores_them(bad: tuple[Path, dict[str, Path]],
                                                                checkpoint: Path, tmp_path: Path) -> None:
    root, files = bad
    out = tmp_path / "m.json"
    assert main(["evaluate", "--checkpoint", str(checkpoint), "--data", str(root), "--out", str(out), "--quiet",
                 "--skip-bad-samples"]) == 0
    m = json.loads(out.read_text())
    assert m["skipped_samples"]["count"] == 1 and m["skipped_samples"]["samples"][0]["file"] == str(files["range"])
    good = [i for i in _ids(root, "val") if i != files["range"].stem]
    labelled = sum(int((read_label(root / "SegmentationClass" / f"{i}.png") != 255).sum()) for i in good)
    assert int(np.asarray(m["confusion"]).sum()) == labelled  # exactly the good images, none twice
    # without the flag: a one-line error naming the file, exit code 2
    assert main(["evaluate", "--checkpoint", str(checkpoint), "--data", str(root), "--quiet"]) == 2


# ---------------------------------------------------------------------------------------
# clear messages from DataLoader workers and the CLI
# ---------------------------------------------------------------------------------------


def test_error_in_a_dataloader_worker_keeps_its_message(bad: tuple[Path, dict[str, Path]]) -> None:
    root, files = bad
    ds = VOCSegmentation(root, "train")
    index = _ids(root, "train").index(files["truncated"].stem)
    with pytest.raises(DataError) as direct:
        ds[index]
    sub = torch.utils.data.Subset(ds, [index])
    with pytest.raises(DataError) as worker:
        next(iter(DataLoader(sub, batch_size=1, num_workers=1, collate_fn=pad_collate)))
    assert isinstance(worker.value, LoaderDataError)
    assert str(worker.value) == str(direct.value)  # the one line, no worker traceback in it
    assert worker.value.path == str(files["truncated"])


def test_cli_prints_one_line_without_traceback(bad: tuple[Path, dict[str, Path]], tmp_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    root, files = bad
    argv = ["train", "--model", "fcn8s", "--model-arg", "width=0.125", "--model-arg", "backbone=vgg16_bn",
            "--data", str(root), "--out", str(tmp_path / "r"), "--epochs", "1", "--batch-size", "8",
            "--num-workers", "1", "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0]
    assert any(str(f) in err[0] for f in (files["truncated"], files["size"]))
    with pytest.raises(DataError):  # --debug: the exception itself, for its traceback
        main(["--debug", *argv[:-2], "0", "--quiet"])  # (in this process: faster)


# ---------------------------------------------------------------------------------------
# predict --skip-existing
# ---------------------------------------------------------------------------------------


def test_predict_resumes_after_an_interruption(clean: Path, checkpoint: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture) -> None:
    import pixelwise.engine.predict as pred
    import pixelwise.tasks.semantic as sem
    from pixelwise.tasks import get_task

    images = clean / "JPEGImages"
    names = sorted(p.stem for p in images.iterdir())
    out = tmp_path / "pred"
    task = get_task("semantic")
    real_write, real_predict = sem.write_image, task.predict
    calls = {"write": 0, "predict": []}

    def write_then_die(path, *args, **kwargs):  # killed while writing the 3rd overlay
        calls["write"] += 1
        if calls["write"] == 3:
            raise KeyboardInterrupt
        return real_write(path, *args, **kwargs)

    monkeypatch.setattr(sem, "write_image", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        pred.predict_files(checkpoint, [images], out, progress=False)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"{n}.png" for n in names[:3]] + [f"{n}_overlay.png" for n in names[:2]])  # no partial or temp file
    done = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    monkeypatch.setattr(sem, "write_image", real_write)

    def counting_predict(model, image, *args, **kwargs):
        calls["predict"].append(image.shape)
        return real_predict(model, image, *args, **kwargs)

    monkeypatch.setattr(task, "predict", counting_predict)
    assert main(["predict", "--checkpoint", str(checkpoint), str(images), "--out", str(out), "--quiet",
                 "--skip-existing", "--batch-size", "1"]) == 0  # counts task.predict: one image per call
    assert len(calls["predict"]) == len(names) - 2  # the third image had no overlay: it is redone
    assert "2 images already had their outputs" in capsys.readouterr().out
    for n in names:
        assert (out / f"{n}.png").is_file() and (out / f"{n}_overlay.png").is_file()
    for name in (f"{n}{s}" for n in names[:2] for s in (".png", "_overlay.png")):
        assert (out / name).stat().st_mtime_ns == done[name], name  # finished images untouched
    calls["predict"].clear()
    assert main(["predict", "--checkpoint", str(checkpoint), str(images), "--out", str(out), "--quiet",
                 "--skip-existing", "--batch-size", "1"]) == 0  # counts task.predict: one image per call
    assert calls["predict"] == []  # all done: nothing to predict


def test_predict_converts_16bit_and_rgba_inputs(checkpoint: Path, clean: Path, tmp_path: Path) -> None:
    from pixelwise.engine.predict import predict_files

    rgb = read_image(next((clean / "JPEGImages").iterdir()))
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(rgb[:, :, 0].astype(np.uint16) * 250).save(src / "deep.png")
    Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 128, np.uint8)])).save(src / "alpha.png")
    written = predict_files(checkpoint, [src], tmp_path / "out", progress=False)
    assert sorted(p.name for p in written) == ["alpha.png", "deep.png"]
    for p in written:
        assert Image.open(p).size == (48, 48)
