"""`pixelwise data convert` (issue 15 item 2): any layout -> VOC / COCO instances / COCO
panoptic, from real data (stardist binary masks, a CVAT export of histolytics nuclei), read
back by the readers training uses; atomic (a failure leaves nothing) and with a summary."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import layouts_data as L
from pixelwise.cli import main
from pixelwise.data.check import check_dataset
from pixelwise.data.convert import convert_dataset
from pixelwise.data.formats.coco import CocoInstances
from pixelwise.data.formats.coco_panoptic import CocoPanoptic
from pixelwise.data.formats.detect import open_semantic
from pixelwise.data.formats.voc import VOCSegmentation
from pixelwise.errors import DataError


def test_folder_of_binary_masks_to_voc(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = L.images_masks(tmp_path / "src")
    out = tmp_path / "voc"
    assert main(["data", "convert", str(src), "--to", "voc", "--out", str(out), "--val-fraction", "0.34"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "note: masks are binary 0/255: read as classes background (0) and foreground (255)"
    assert lines[1] == f"converted folder -> voc: 4 train, 2 val images, 2 classes; wrote {out.resolve()}"
    for split in ("train", "val"):
        before = open_semantic(src, split, val_fraction=0.34)
        after = VOCSegmentation(out, split)  # a plain VOC folder: classes.json, ImageSets, palette PNGs
        assert after.ids == before.ids and after.class_names == ["background", "foreground"]
        for i in range(len(after)):
            assert np.array_equal(after.load(i)["semantic"].numpy(), before.load(i)["semantic"].numpy())
            assert Image.open(after.label_dir / f"{after.ids[i]}.png").mode == "P"
            assert (hashlib.sha256((out / "JPEGImages" / f"{after.ids[i]}.png").read_bytes()).digest()
                    == hashlib.sha256((src / "images" / f"{after.ids[i]}.png").read_bytes()).digest())
    assert [p for p in check_dataset(out) if p.is_error] == []


def test_16bit_tiff_images_are_written_as_png(tmp_path: Path) -> None:
    src = L.images_masks(tmp_path / "src", mask_ext=".tif", image_ext=".tif")
    summary = convert_dataset(src, "voc", tmp_path / "voc")
    assert sum(summary.splits.values()) == 6 and len(list((tmp_path / "voc" / "JPEGImages").glob("*.png"))) == 6


def test_cvat_export_to_coco_instances_and_panoptic(tmp_path: Path) -> None:
    src = L.cvat_export(tmp_path / "cvat")
    real = {f"frame_{k:06d}": (t, i) for k, ((_, t), i) in
            enumerate(zip(L.histolytics_crops(4), L.histolytics_instances(4)))}
    coco = convert_dataset(src, "coco", tmp_path / "coco")
    assert coco.instances == sum(len(np.unique(i)) - 1 for _, i in real.values())
    n = 0
    for split in coco.splits:
        ds = CocoInstances(tmp_path / "coco", split)
        for k in range(len(ds)):
            s = ds.load(k)
            types, inst = real[Path(s["meta"]["file"]).stem]
            for mask, cid in zip(s["instances"]["masks"].numpy(), s["instances"]["category_ids"].tolist()):
                ids = np.unique(inst[mask])
                assert len(ids) == 1 and ids[0] > 0 and (inst == ids[0]).sum() == mask.sum()  # one real nucleus
                assert cid == np.bincount(types[mask]).argmax()  # its type
                n += 1
    assert n == coco.instances
    pan = convert_dataset(src, "coco-panoptic", tmp_path / "pan")
    ds = CocoPanoptic(tmp_path / "pan", "train")
    s = ds.load(0)
    assert len(s["instances"]["masks"]) == len(np.unique(real[Path(s["meta"]["file"]).stem][1])) - 1
    assert pan.files == [tmp_path.resolve() / "pan" / "annotations" / f"panoptic_{x}.json" for x in ("train", "val")]
    for out in ("coco", "pan"):
        assert [p for p in check_dataset(tmp_path / out) if p.is_error] == []


def test_failures_leave_nothing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = L.images_masks(tmp_path / "src")
    assert main(["data", "convert", str(src), "--to", "coco", "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "coco needs instance masks and this folder dataset has none" in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no output, no temp folder
    with pytest.raises(DataError, match="inside the source dataset"):
        convert_dataset(src, "voc", src / "voc")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    with pytest.raises(DataError, match="output folder exists and is not empty"):
        convert_dataset(src, "voc", tmp_path / "busy")
    assert (tmp_path / "busy" / "keep.txt").read_text() == "mine"
    # a bad mask stops the conversion at that file; nothing is written
    Image.fromarray(np.full((64, 64), 7, np.uint8)).save(src / "masks" / "sd2.png")
    with pytest.raises(DataError, match="sd2.png: mask values 7 are not explained by binary masks"):
        convert_dataset(src, "voc", tmp_path / "v")
    assert not (tmp_path / "v").exists()
