"""`predict` never destroys its inputs or its own outputs (issue 15 item 6): an --out that would
overwrite an input is refused before anything is written, equal names in different folders
are mirrored, colliding outputs are refused, unreadable images are skipped and listed with
--skip-bad-images (one error line without it), and export writes atomically."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
from PIL import Image

from pixelwise.cli import main
from pixelwise.data.synthetic import generate_shapes
from tests.predict_helpers import train_semantic, tree_bytes


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_shapes(tmp_path_factory.mktemp("shapes") / "d", num_train=8, num_val=4, size=48, seed=5)


@pytest.fixture(scope="module")
def ckpt(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_semantic(data, tmp_path_factory.mktemp("run"))


def _copy_images(data: Path, dst: Path, n: int = 3) -> list[Path]:
    dst.mkdir(parents=True, exist_ok=True)
    files = []
    for f in sorted((data / "JPEGImages").iterdir())[:n]:
        (dst / f.name).write_bytes(f.read_bytes())
        files.append(dst / f.name)
    return files


def _err(capsys: pytest.CaptureFixture, *argv: object) -> str:
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def test_out_onto_the_inputs_is_refused_and_nothing_changes(ckpt, data, tmp_path, capsys):
    folder = tmp_path / "imgs"
    files = _copy_images(data, folder)
    before = tree_bytes(folder)
    err = _err(capsys, "predict", "--checkpoint", ckpt, folder, "--out", folder, "--quiet")
    assert f"would overwrite the input image {files[0]}" in err and "choose an --out folder" in err
    assert tree_bytes(folder) == before  # no input replaced, no output started
    # the same through a path spelled differently (a symlink to the folder)
    (tmp_path / "link").symlink_to(folder)
    err = _err(capsys, "predict", "--checkpoint", ckpt, files[1], "--out", tmp_path / "link", "--quiet")
    assert f"would overwrite the input image {files[1]}" in err
    assert tree_bytes(folder) == before
    # and through --onnx (the exported runner writes the same names)
    err = _err(capsys, "predict", "--onnx", tmp_path / "missing.onnx", folder, "--out", folder, "--quiet")
    assert "would overwrite the input image" in err


def test_equal_names_in_two_folders_are_mirrored(ckpt, data, tmp_path, capsys):
    a = _copy_images(data, tmp_path / "a", 2)
    b = tmp_path / "b"
    b.mkdir()
    src = sorted((data / "JPEGImages").iterdir())
    for f, other in zip(a, src[5:7]):  # same names, other pictures
        (b / f.name).write_bytes(other.read_bytes())
    out = tmp_path / "out"
    assert main(["predict", "--checkpoint", str(ckpt), str(tmp_path / "a"), str(b), "--out", str(out),
                 "--quiet"]) == 0
    assert "wrote 4 label maps and overlays" in capsys.readouterr().out
    names = sorted(tree_bytes(out))
    assert names == sorted(f"{d}/{f.stem}{s}" for d in "ab" for f in a for s in (".png", "_overlay.png"))
    # each equals that folder predicted alone (flat names, as before)
    for d in "ab":
        alone = tmp_path / f"alone_{d}"
        assert main(["predict", "--checkpoint", str(ckpt), str(tmp_path / d), "--out", str(alone), "--quiet"]) == 0
        assert {f"{d}/{k}": v for k, v in tree_bytes(alone).items()} == {
            k: v for k, v in tree_bytes(out).items() if k.startswith(f"{d}/")}
    assert (out / "a" / a[0].name).read_bytes() != (out / "b" / a[0].name).read_bytes()


def test_outputs_that_would_collide_are_refused(ckpt, data, tmp_path, capsys):
    folder = tmp_path / "imgs"
    x = _copy_images(data, folder, 1)[0]
    (folder / f"{x.stem}_overlay.png").write_bytes(x.read_bytes())  # its overlay's name is another input's label
    out = tmp_path / "out"
    err = _err(capsys, "predict", "--checkpoint", ckpt, folder, "--out", out, "--quiet")
    assert f"the outputs of {x} and {folder / (x.stem + '_overlay.png')} would both be written to" in err
    assert not out.exists()
    # the same stem with two extensions keeps the extension in the output names
    y = folder / f"{x.stem}.jpg"
    Image.open(x).convert("RGB").save(y)
    (folder / f"{x.stem}_overlay.png").unlink()
    assert main(["predict", "--checkpoint", str(ckpt), str(folder), "--out", str(out), "--quiet"]) == 0
    assert sorted(tree_bytes(out)) == sorted(f"{n}{s}" for n in (x.name, y.name) for s in (".png", "_overlay.png"))


def test_unreadable_images_stop_or_are_skipped_and_listed(ckpt, data, tmp_path, capsys):
    folder = tmp_path / "imgs"
    files = _copy_images(data, folder, 4)
    bad = files[1]
    bad.write_bytes(bad.read_bytes()[:200])  # truncated
    out = tmp_path / "out"
    err = _err(capsys, "predict", "--checkpoint", ckpt, folder, "--out", out, "--quiet", "--num-workers", "1")
    assert err.startswith(f"error: {bad}:") and "--skip-bad-images" in err, err
    for workers in ("0", "1"):
        dst = tmp_path / f"out{workers}"
        assert main(["predict", "--checkpoint", str(ckpt), str(folder), "--out", str(dst), "--quiet",
                     "--skip-bad-images", "--num-workers", workers]) == 0
        cap = capsys.readouterr()
        warning = [line for line in cap.err.splitlines() if line.strip()]
        assert len(warning) == 1 and "1 unreadable image(s) left out" in warning[0] and str(bad) in warning[0]
        assert "wrote 3 label maps" in cap.out
        doc = json.loads((dst / "skipped_images.json").read_text())
        assert [e["file"] for e in doc["skipped"]] == [str(bad)] and doc["skipped"][0]["error"]
        assert sorted(tree_bytes(dst)) == sorted([f"{f.stem}{s}" for f in files if f != bad
                                                  for s in (".png", "_overlay.png")] + ["skipped_images.json"])


def test_export_is_atomic_with_a_unique_temporary_name(tmp_path, monkeypatch):
    import torch

    import pixelwise.export as export
    from pixelwise.models.registry import build_model

    model = build_model("unet", 2, width=0.0625).eval()
    out = tmp_path / "m.onnx"
    out.write_bytes(b"the previous export")
    temps: list[Path] = []
    real = torch.onnx.export

    def half_then_fail(module, args, f, *a, **k):
        temps.append(Path(f))
        Path(f).write_bytes(b"partial")
        raise RuntimeError("exporter crashed")

    monkeypatch.setattr(torch.onnx, "export", half_then_fail)
    for _ in range(2):
        with pytest.raises(RuntimeError, match="exporter crashed"):
            export.export_onnx(model, out, size=32)
    assert out.read_bytes() == b"the previous export"  # untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]  # no temporary file left
    assert len(set(temps)) == 2 and all(t.parent == tmp_path and t.name != ".m.onnx.tmp" for t in temps)
    monkeypatch.setattr(torch.onnx, "export", real)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export.export_onnx(model, out, size=32)
    assert out.read_bytes()[:20] != b"the previous export"[:20]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
