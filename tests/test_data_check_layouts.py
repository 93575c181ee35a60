"""Nothing silent (issue 15 item 3): a bad-input corpus on which `data check` and training
must agree. Every case is a dataset folder; `data check` reports its errors, and training's
own dataset-opening path (open_dataset / CocoInstances / CocoPanoptic for train and val, every
sample loaded) must fail exactly when check reports an error, with a message naming the
file, the entry and the field. No case may change a file of the dataset. Malformed JSON
fields are covered by --skip-bad-samples; a full disk is one line."""
from __future__ import annotations

import errno
import hashlib
import json
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image

import layouts_data as L
from pixelwise.cli import main
from pixelwise.data.check import DatasetCheck
from pixelwise.data.formats.base import SkipBadSamples
from pixelwise.data.formats.coco import CocoInstances
from pixelwise.data.formats.coco_panoptic import CocoPanoptic
from pixelwise.data.synthetic import generate_shapes
from pixelwise.engine.common import open_dataset
from pixelwise.errors import DataError


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_shapes(tmp_path_factory.mktemp("shapes") / "s", num_train=3, num_val=2, size=32, seed=4)


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------
# the corpus: (name, builder(tmp) -> (root, task), expected message or None)
# ---------------------------------------------------------------------------------------


def _folder_with(tmp: Path, edit: Callable[[Path], None]) -> Path:
    root = L.images_masks(tmp / "d")
    edit(root)
    return root


def _write_mask(path: Path, a: np.ndarray) -> None:
    Image.fromarray(a.astype(np.uint8)).save(path)


def _mask(root: Path, name: str = "sd0") -> np.ndarray:
    return np.asarray(Image.open(root / "masks" / f"{name}.png")).copy()


def _coco_only(shapes: Path, tmp: Path, kind: str, edit: Callable[[dict], None] | None = None,
               drop_train: bool = False) -> Path:
    root = tmp / "c"
    shutil.copytree(shapes / "JPEGImages", root / "JPEGImages")
    (root / "annotations").mkdir()
    for split in ("train", "val"):
        src = shapes / "annotations" / f"{kind}_{split}.json"
        if kind == "panoptic":
            shutil.copytree(shapes / "annotations" / f"panoptic_{split}", root / "annotations" / f"panoptic_{split}")
        if drop_train and split == "train":
            continue
        doc = json.loads(src.read_text())
        if edit is not None and split == "train":
            edit(doc)
        (root / "annotations" / src.name).write_text(json.dumps(doc))
    return root


def _ann(doc: dict, key: str, value) -> None:
    doc["annotations"][0][key] = value


def _seg(doc: dict, key: str, value=None) -> None:
    seg = doc["annotations"][0]["segments_info"][0]
    if value is None:
        del seg[key]
    else:
        seg[key] = value


def _rle_int_counts(doc: dict) -> None:
    doc["annotations"][0]["segmentation"] = {"size": [32, 32], "counts": 17}


def _invert(root: Path) -> None:  # background stored as 255: most pixels read as ignore under classes.txt
    (root / "classes.txt").write_text("background\nnucleus\n")
    for p in (root / "masks").glob("*.png"):
        a = np.asarray(Image.open(p))
        _write_mask(p, np.where(a == 255, 1, 255))


def _voc_without_val(tmp: Path) -> Path:
    root = L.voc_binary(tmp / "v", with_imagesets=True)
    (root / "ImageSets" / "Segmentation" / "val.txt").unlink()
    return root


CASES: list[tuple[str, Callable, str | None]] = [
    ("clean_folder", lambda s, t: (L.images_masks(t / "d"), "semantic"), None),
    ("clean_cvat", lambda s, t: (L.cvat_export(t / "d"), "semantic"), None),
    ("clean_cityscapes", lambda s, t: (L.cityscapes_tree(t / "d"), "semantic"), None),
    ("clean_voc_binary_no_imagesets", lambda s, t: (L.voc_binary(t / "d"), "semantic"), None),
    ("clean_coco", lambda s, t: (_coco_only(s, t, "instances"), "instance"), None),
    ("clean_panoptic", lambda s, t: (_coco_only(s, t, "panoptic"), "panoptic"), None),
    ("binary_masks_under_a_class_table",
     lambda s, t: (_folder_with(t, lambda r: (r / "classes.txt").write_text("background\nnucleus\ncytoplasm\n")),
                   "semantic"), "masks look binary 0/255: under the class table classes.txt 255 is ignore"),
    ("more_than_half_ignore", lambda s, t: (_folder_with(t, _invert), "semantic"),
     "% of the mask pixels are ignore (255)"),
    ("value_not_in_binary_table",
     lambda s, t: (_folder_with(t, lambda r: _write_mask(r / "masks" / "sd3.png", np.where(_mask(r, "sd3") > 0, 255, 7))),
                   "semantic"), "mask values 7 are not explained by binary masks (0/255)"),
    ("value_not_in_class_table",
     lambda s, t: (_folder_with(t, lambda r: ((r / "classes.txt").write_text("background\nnucleus\n"),
                                              [_write_mask(p, (np.asarray(Image.open(p)) > 0) * 1)
                                               for p in (r / "masks").glob("*.png")],
                                              _write_mask(r / "masks" / "sd2.png", _mask(r, "sd2") * 3))),
                   "semantic"), "sd2.png: mask values 3 are not explained by the class table classes.txt"),
    ("image_without_mask",
     lambda s, t: (_folder_with(t, lambda r: (r / "masks" / "sd4.png").unlink()), "semantic"),
     "sd4.png: image without mask"),
    ("mask_of_another_size",
     lambda s, t: (_folder_with(t, lambda r: _write_mask(r / "masks" / "sd1.png", _mask(r, "sd1")[:40])), "semantic"),
     "mask 64x40 but image 64x64"),
    ("rgb_and_index_masks_mixed",
     lambda s, t: (_folder_with(t, lambda r: Image.fromarray(np.dstack([_mask(r, "sd5")] * 3)).save(
         r / "masks" / "sd5.png")), "semantic"), "1 masks are RGB colour images and 5 are class-index images"),
    ("voc_split_file_missing_for_val", lambda s, t: (_voc_without_val(t), "semantic"),
     "split file for split 'val' not found"),
    ("coco_image_id_as_list", lambda s, t: (_coco_only(s, t, "instances", lambda d: d["images"][0].update(id=[1])),
                                            "instance"), "images[0] ('JPEGImages/train_00000.png'): field 'id' must be an integer, got [1]"),
    ("coco_category_id_as_string", lambda s, t: (_coco_only(s, t, "instances", lambda d: _ann(d, "category_id", "1")),
                                                 "instance"), "annotations[0] (id 1) of image 1: field 'category_id' must be an integer, got '1'"),
    ("coco_iscrowd_no", lambda s, t: (_coco_only(s, t, "instances", lambda d: _ann(d, "iscrowd", "no")), "instance"),
     "annotations[0] (id 1) of image 1: field 'iscrowd' must be 0 or 1, got 'no'"),
    ("coco_string_image_id", lambda s, t: (_coco_only(s, t, "instances", lambda d: _ann(d, "image_id", "1")), "instance"),
     "annotations[0] (id 1): field 'image_id' must be an integer, got '1'"),
    ("coco_rle_int_counts", lambda s, t: (_coco_only(s, t, "instances", _rle_int_counts), "instance"),
     "field 'segmentation.counts' must be a string (compressed RLE) or a list of non-negative run lengths, got int 17"),
    ("coco_missing_train_split", lambda s, t: (_coco_only(s, t, "instances", drop_train=True), "instance"),
     "no train split"),
    ("panoptic_segment_without_category_id",
     lambda s, t: (_coco_only(s, t, "panoptic", lambda d: _seg(d, "category_id")), "panoptic"),
     "annotations[0] (image_id 1): segments_info[0] (id 1) has no field 'category_id'"),
    ("panoptic_segment_id_as_list",
     lambda s, t: (_coco_only(s, t, "panoptic", lambda d: _seg(d, "id", [1])), "panoptic"),
     "segments_info[0]: field 'id' must be an integer, got [1]"),
    ("panoptic_image_id_as_string",
     lambda s, t: (_coco_only(s, t, "panoptic", lambda d: _ann(d, "image_id", "1")), "panoptic"),
     "annotations[0] (image_id '1'): field 'image_id' must be an integer, got '1'"),
    ("panoptic_iscrowd_no", lambda s, t: (_coco_only(s, t, "panoptic", lambda d: _seg(d, "iscrowd", "no")), "panoptic"),
     "segments_info[0] (id 1): field 'iscrowd' must be 0 or 1, got 'no'"),
]


def train_verdict(root: Path, task: str, skip_bad: bool = False) -> str | None:
    """What training does with ``root``: the datasets its engine opens (train and val splits),
    every sample loaded; the first DataError's message, or None when it would train."""
    try:
        for split in ("train", "val"):
            if task == "semantic":
                ds = open_dataset(root, split, skip_bad=skip_bad, quiet=True)
            else:
                cls = CocoInstances if task == "instance" else CocoPanoptic
                ds = cls(root, split)
                if skip_bad:
                    ds = SkipBadSamples(ds)
            for i in range(len(ds)):
                ds.load(i)
    except DataError as e:
        return str(e)
    return None


@pytest.mark.parametrize("name,build,expected", CASES, ids=[c[0] for c in CASES])
def test_check_and_train_agree(shapes: Path, tmp_path: Path, name: str, build, expected: str | None) -> None:
    root, task = build(shapes, tmp_path)
    before = _tree_digest(root)
    check = DatasetCheck(root).run()
    errors = [f"{p.file}: {p.problem}" for p in check.errors]
    verdict = train_verdict(root, task)
    assert _tree_digest(root) == before  # nothing written, nothing changed
    if expected is None:
        assert errors == [] and verdict is None
        return
    assert any(expected in e for e in errors), errors
    if name == "coco_missing_train_split":
        assert verdict is not None and "no COCO annotation file for split 'train'" in verdict
    else:
        assert verdict is not None and expected in verdict, verdict
    assert "\n" not in verdict and "Traceback" not in verdict


def test_a_real_training_run_agrees_with_the_corpus_verdict(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The verdict above is training's: `pixelwise train` on a clean folder trains, on a bad one
    it stops with the same one line."""
    root = L.images_masks(tmp_path / "good")
    args = ["train", "--model", "fcn8s", "--model-arg", "width=0.125", "--model-arg", "backbone=vgg16_bn",
            "--epochs", "1", "--batch-size", "2", "--num-workers", "0", "--quiet", "--no-report"]
    assert main([*args, "--data", str(root), "--out", str(tmp_path / "run")]) == 0
    assert "masks are binary 0/255" in capsys.readouterr().err
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["val_fraction"] == 0.2  # recorded in the run config
    bad = _folder_with(tmp_path / "b", lambda r: (r / "classes.txt").write_text("background\nnucleus\ncytoplasm\n"))
    assert main([*args, "--data", str(bad), "--out", str(tmp_path / "run2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "masks look binary 0/255" in err[0]


@pytest.mark.parametrize("name", ["coco_iscrowd_no", "coco_string_image_id", "coco_rle_int_counts",
                                  "coco_category_id_as_string", "coco_image_id_as_list",
                                  "panoptic_segment_without_category_id", "panoptic_image_id_as_string",
                                  "panoptic_segment_id_as_list"])
def test_skip_bad_samples_covers_malformed_fields(shapes: Path, tmp_path: Path, name: str) -> None:
    _, build, expected = next(c for c in CASES if c[0] == name)
    root, task = build(shapes, tmp_path)
    assert train_verdict(root, task, skip_bad=True) is None
    cls = CocoInstances if task == "instance" else CocoPanoptic
    ds = SkipBadSamples(cls(root, "train"))
    assert ds.num_skipped == 1 and len(ds) == ds.num_total - 1 and expected in str(ds.bad[0])


def test_iscrowd_no_is_never_read_as_crowd(shapes: Path, tmp_path: Path) -> None:
    root, _ = next(c for c in CASES if c[0] == "coco_iscrowd_no")[1](shapes, tmp_path)
    ds = CocoInstances(root, "train")
    with pytest.raises(DataError, match="'iscrowd' must be 0 or 1"):
        ds.load(0)
    assert all(not ds.load(i)["instances"]["iscrowd"].any() for i in range(1, len(ds)))


def test_check_cli_says_binary_in_one_note_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = L.images_masks(tmp_path / "d")
    assert main(["data", "check", str(root)]) == 0
    out = capsys.readouterr().out
    assert out.count("masks are binary 0/255: read as classes background (0) and foreground (255)") == 1
    assert "folder (d)" in out and "0 errors" in out


# ---------------------------------------------------------------------------------------
# a full disk
# ---------------------------------------------------------------------------------------


class _FullDisk:
    """A file object whose writes fail like a full disk after ``room`` bytes."""

    def __init__(self, f, room: int = 0):
        self.f, self.room = f, room

    def write(self, data):
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()
        return False


def test_disk_full_is_one_line_and_replaces_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture) -> None:
    import os

    from pixelwise import fs as pio

    target = tmp_path / "labels.json"
    target.write_text("old content")
    real_fdopen = os.fdopen
    monkeypatch.setattr(pio.os, "fdopen", lambda fd, *a, **k: _FullDisk(real_fdopen(fd, *a, **k)))
    with pytest.raises(pio.DiskFullError) as info:
        pio.atomic_write_text(target, "new content that does not fit")
    assert str(info.value) == f"no space left on device while writing {target}; nothing was replaced"
    assert target.read_text() == "old content" and sorted(p.name for p in tmp_path.iterdir()) == ["labels.json"]

    # through the CLI: `data convert` into a folder, one line, no output folder, no temp left
    src = L.images_masks(tmp_path / "src")
    monkeypatch.undo()
    before = _tree_digest(src)
    monkeypatch.setattr(pio.os, "fdopen", lambda fd, *a, **k: _FullDisk(real_fdopen(fd, *a, **k)))
    assert main(["data", "convert", str(src), "--to", "voc", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: no space left on device while writing {tmp_path / 'out'}; nothing was replaced"]
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))
    assert _tree_digest(src) == before


def test_check_cli_takes_the_colour_table(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = L.cvat_export(tmp_path / "cvat")
    (root / "labelmap.txt").rename(tmp_path / "labelmap.txt")  # now a VOC layout with RGB masks and no table
    assert main(["data", "check", str(root)]) == 1
    assert "masks are RGB colour images and there is no colour table" in capsys.readouterr().out
    assert main(["data", "check", str(root), "--colors", str(tmp_path / "labelmap.txt")]) == 0
    assert "0 errors" in capsys.readouterr().out
    assert train_verdict(root, "semantic") is not None  # training without the table refuses too
