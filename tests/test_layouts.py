"""Semantic data layouts users have (issue 15 item 1): every layout detected and read from
real data (stardist nuclei, histolytics H&E) written as folders, every mask encoding decoded
to the class ids it stands for, the seeded automatic split, and one line for anything
guessed or unexplained."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import layouts_data as L
from pixelwise.data.formats.cityscapes import CITYSCAPES_CLASSES, LABEL_TO_TRAIN_ID
from pixelwise.data.formats.detect import detect_layout, layout_splits, open_semantic
from pixelwise.data.formats.folder import auto_split
from pixelwise.data.formats.voc import VOCSegmentation
from pixelwise.engine.common import open_dataset
from pixelwise.errors import DataError


def _semantic(ds, i: int) -> np.ndarray:
    return ds.load(i)["semantic"].numpy()


def _by_id(ds) -> dict[str, np.ndarray]:
    return {str(ds.load(i)["meta"]["id"]): _semantic(ds, i) for i in range(len(ds))}


# ---------------------------------------------------------------------------------------
# detection: each layout by name, train and val open, samples in the VOC sample format
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("build,layout,num_classes", [
    (L.images_masks, "folder", 2), (L.split_folders, "folder-splits", 4), (L.cvat_export, "cvat", 4),
    (L.cityscapes_tree, "cityscapes", 19), (L.ade20k_tree, "ade20k", 150), (L.voc_binary, "voc", 2),
])
def test_every_layout_is_detected_and_opens(tmp_path: Path, build, layout: str, num_classes: int) -> None:
    root = build(tmp_path / "d")
    assert detect_layout(root) == layout
    n = 0
    for split in layout_splits(root):
        ds = open_semantic(root, split)
        assert len(ds.classes) == num_classes and [c.id for c in ds.classes] == list(range(num_classes))
        s = ds[0]
        assert s["image"].shape == (3, L.CROP, L.CROP) and s["image"].dtype == torch.float32
        assert s["semantic"].dtype == torch.int64 and s["semantic"].shape == (L.CROP, L.CROP)
        n += len(ds)
    assert n == len(open_semantic(root, "all")) and {"train", "val"} <= set(layout_splits(root))


def test_no_layout_names_what_is_expected(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    with pytest.raises(DataError, match="images/ but no masks/"):
        detect_layout(tmp_path)
    with pytest.raises(DataError, match="no dataset found: expected images/ \\+ masks/"):
        detect_layout(tmp_path / "images")


# ---------------------------------------------------------------------------------------
# mask encodings, against the real labels they were written from
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("value,mask_ext,image_ext", [(255, ".png", ".png"), (1, ".png", ".jpg"),
                                                      (255, ".tif", ".tif")])
def test_binary_masks_are_background_foreground(tmp_path: Path, value: int, mask_ext: str, image_ext: str,
                                                capsys: pytest.CaptureFixture) -> None:
    root = L.images_masks(tmp_path / "d", value=value, mask_ext=mask_ext, image_ext=image_ext)
    ds = open_dataset(root, "all")
    assert [c.name for c in ds.classes] == ["background", "foreground"]
    truth = {f"sd{k}": (inst > 0).astype(np.int64) for k, (_, inst) in enumerate(L.stardist_crops(6))}
    got = _by_id(ds)
    assert got.keys() == truth.keys() and all(np.array_equal(got[k], truth[k]) for k in truth)
    err = capsys.readouterr().err
    assert f"masks are binary 0/{value}: read as classes background (0) and foreground ({value})" in err
    assert err.count("masks are binary") == 1
    open_dataset(root, "train")
    assert "masks are binary" not in capsys.readouterr().err  # said once per process


def test_index_palette_and_16bit_masks(tmp_path: Path) -> None:
    """histolytics types 0..3 as an 8-bit palette PNG and as a 16-bit grayscale PNG."""
    crops = L.histolytics_crops(4)
    for name, save in (("pal", lambda a, p: _palette_png(a, p)),
                       ("deep", lambda a, p: Image.fromarray(a.astype(np.uint16)).save(p))):
        root = tmp_path / name
        (root / "images").mkdir(parents=True)
        (root / "masks").mkdir()
        for k, (image, types) in enumerate(crops):
            Image.fromarray(image).save(root / "images" / f"h{k}.png")
            save(types, root / "masks" / f"h{k}.png")
        (root / "classes.txt").write_text("background\nconnective\ninflammatory\nneoplastic\n")
        ds = open_semantic(root, "all")
        assert [c.name for c in ds.classes] == ["background", "connective", "inflammatory", "neoplastic"]
        assert all(np.array_equal(_semantic(ds, k), crops[k][1]) for k in range(4))


def _palette_png(a: np.ndarray, path: Path) -> None:
    img = Image.fromarray(a.astype(np.uint8), "L").convert("P")
    img.putpalette([0, 0, 0, 0, 200, 0, 255, 255, 0, 200, 0, 0] + [0] * 756)
    img.save(path)
    assert Image.open(path).mode == "P"


def test_rgb_masks_with_a_colour_table(tmp_path: Path) -> None:
    crops = L.histolytics_crops(4)
    root = tmp_path / "rgb"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    colors = np.array(list(L.HIST_COLORS.values()), np.uint8)
    for k, (image, types) in enumerate(crops):
        Image.fromarray(image).save(root / "images" / f"h{k}.jpg")
        Image.fromarray(colors[types]).save(root / "masks" / f"h{k}.png")
    with pytest.raises(DataError, match="RGB colour images and there is no colour table.*--colors FILE"):
        open_semantic(root, "train")
    (tmp_path / "colors.json").write_text(json.dumps({k: list(v) for k, v in L.HIST_COLORS.items()}))
    lines = [f"{n}:{r},{g},{b}::" for n, (r, g, b) in L.HIST_COLORS.items()]
    (tmp_path / "labelmap.txt").write_text("# label:color_rgb:parts:actions\n" + "\n".join(lines) + "\n")
    for table in ("colors.json", "labelmap.txt"):
        ds = open_semantic(root, "all", colors=tmp_path / table)
        assert [c.name for c in ds.classes] == list(L.HIST_COLORS)
        assert all(np.array_equal(_semantic(ds, k), crops[k][1]) for k in range(4))
    # a colour the table does not list: one line naming the file and the colour
    a = np.asarray(Image.open(root / "masks" / "h2.png")).copy()
    a[5, 5] = (1, 2, 3)
    Image.fromarray(a).save(root / "masks" / "h2.png")
    ds = open_semantic(root, "all", colors=tmp_path / "colors.json")
    with pytest.raises(DataError, match=r"h2.png: mask colours \(1, 2, 3\) are not in the class table colors.json"):
        ds.load(2)


def test_class_table_ignore_value_and_unexplained_values(tmp_path: Path) -> None:
    root = L.split_folders(tmp_path / "s")
    (root / "classes.json").write_text(json.dumps({"classes": [{"name": n} for n in ("bg", "a", "b", "c")],
                                                  "ignore_index": 9}))
    mask = root / "train" / "masks" / "h0.png"
    a = np.asarray(Image.open(mask)).copy()
    a[:3] = 9
    Image.fromarray(a).save(mask)
    ds = open_semantic(root, "train")
    assert ds.ignore_index == 9 and (_by_id(ds)["h0"][:3] == 9).all()
    a[:3] = 7  # neither a class nor the ignore value
    Image.fromarray(a).save(mask)
    ds = open_semantic(root, "train")
    with pytest.raises(DataError, match=r"h0.png: mask values 7 are not explained by the class table classes.json "
                                        r"\(classes 0..3, 9 = ignore\)"):
        ds.load(0)


def test_grey_level_masks_are_not_taken_as_class_ids(tmp_path: Path) -> None:
    root = L.images_masks(tmp_path / "d", value=200)  # 0/200: not binary 0/255 or 0/1
    for p in (root / "masks").glob("*.png"):
        a = np.asarray(Image.open(p)).copy()
        a[:4, :4] = 100
        Image.fromarray(a).save(p)
    with pytest.raises(DataError, match="mask values 0, 100, 200 leave most ids 0..200 unused: they look like grey"):
        open_semantic(root, "train")


def test_cityscapes_official_table(tmp_path: Path) -> None:
    # spot checks against cityscapesscripts/helpers/labels.py
    assert (LABEL_TO_TRAIN_ID[7], LABEL_TO_TRAIN_ID[26], LABEL_TO_TRAIN_ID[33], LABEL_TO_TRAIN_ID[9]) == (0, 13, 18, 255)
    assert sum(v != 255 for v in LABEL_TO_TRAIN_ID.values()) == 19 and len(LABEL_TO_TRAIN_ID) == 34
    assert CITYSCAPES_CLASSES[0].name == "road" and CITYSCAPES_CLASSES[0].color == (128, 64, 128)
    assert [c.name for c in CITYSCAPES_CLASSES if c.isthing] == [
        "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle"]
    root = L.cityscapes_tree(tmp_path / "cs")
    ds = open_semantic(root, "val")
    types = L.histolytics_crops(4)[2][1]
    expected = np.array([0, 13, 11, 10])[types]  # road, car, person, sky
    expected[:2, :] = 255  # unlabeled
    expected[10:14, 10:14] = 255  # parking: not evaluated
    assert np.array_equal(_semantic(ds, 0), expected)


def test_ade20k_zero_is_ignore_and_values_shift_by_one(tmp_path: Path) -> None:
    root = L.ade20k_tree(tmp_path / "ade")
    ds = open_semantic(root, "val")
    types = L.histolytics_crops(4)[2][1]
    expected = np.array([0, 4, 12, 149])[types]
    expected[-3:, :] = 255
    assert np.array_equal(_semantic(ds, 0), expected) and len(ds.classes) == 150


def test_cvat_export(tmp_path: Path) -> None:
    root = L.cvat_export(tmp_path / "cvat")
    train, val = open_semantic(root, "train"), open_semantic(root, "val")
    assert [c.name for c in train.classes] == list(L.HIST_COLORS)
    assert sorted(train.ids + val.ids) == [f"frame_{k:06d}" for k in range(4)] and len(val) == 1
    truth = {f"frame_{k:06d}": t for k, (_, t) in enumerate(L.histolytics_crops(4))}
    assert all(np.array_equal(m, truth[i]) for i, m in {**_by_id(train), **_by_id(val)}.items())
    val_inst = open_semantic(root, "val", with_instances=True).load(0)
    inst = val_inst["instance_map"].numpy()
    real = L.histolytics_instances(4)[int(val_inst["meta"]["id"][-1])]
    # one id per nucleus (colour order, not the original ids): the same partition of the pixels
    pairs = set(zip(inst.ravel().tolist(), real.ravel().tolist()))
    assert len(pairs) == len(np.unique(inst)) == len(np.unique(real)) and (inst[real == 0] == 0).all()


# ---------------------------------------------------------------------------------------
# the automatic split
# ---------------------------------------------------------------------------------------


def test_auto_split_hand_computed_and_reproducible() -> None:
    ids = ["a", "b", "c", "d", "e"]
    # by hand: sha256 of "0:a".."0:e" starts 9df3c5fa, e02192fd, be086d93, 7d98c2ee, e0782eae, so the
    # order is d, a, c, b, e and round(5 * 0.4) = 2 images form val: d and a
    assert [hashlib.sha256(f"0:{i}".encode()).hexdigest()[:8] for i in ids] == [
        "9df3c5fa", "e02192fd", "be086d93", "7d98c2ee", "e0782eae"]
    assert auto_split(ids, "val", 0.4, seed=0) == ["a", "d"]
    assert auto_split(ids, "train", 0.4, seed=0) == ["b", "c", "e"]
    assert auto_split(list(reversed(ids)), "val", 0.4, 0) == auto_split(ids, "val", 0.4, 0)  # file order irrelevant
    assert len(auto_split(ids, "val", 0.2, 0)) == 1 and auto_split(ids, "all", 0.2, 0) == ids
    assert auto_split(["x", "y"], "val", 0.01, 0) != []  # at least one val image
    seeds = {tuple(auto_split(list("abcdefghij"), "val", 0.3, s)) for s in range(6)}
    assert len(seeds) > 1  # the seed matters
    with pytest.raises(DataError, match="split 'test' does not exist"):
        auto_split(ids, "test")


def test_voc_without_imagesets_gets_the_automatic_split(tmp_path: Path) -> None:
    root = L.voc_binary(tmp_path / "voc")
    train = open_dataset(root, "train", val_fraction=0.34, seed=5, quiet=True)
    val = open_dataset(root, "val", val_fraction=0.34, seed=5, quiet=True)
    names = [f"sd{k}" for k in range(6)]
    assert train.ids == auto_split(names, "train", 0.34, 5) and val.ids == auto_split(names, "val", 0.34, 5)
    assert len(val) == 2 and not set(train.ids) & set(val.ids)
    again = open_dataset(root, "val", val_fraction=0.34, seed=5, quiet=True)  # what evaluate opens
    assert again.ids == val.ids


def test_voc_with_a_class_table_stays_a_voc_dataset(tmp_path: Path) -> None:
    from pixelwise.data.synthetic import generate_shapes

    root = generate_shapes(tmp_path / "shapes", num_train=3, num_val=2, size=32, seed=1)
    ds = open_dataset(root, "train")
    assert isinstance(ds, VOCSegmentation) and len(ds) == 3


# ---------------------------------------------------------------------------------------
# pairing
# ---------------------------------------------------------------------------------------


def test_pairing_by_stem_and_its_errors(tmp_path: Path) -> None:
    root = L.images_masks(tmp_path / "d")
    (root / "masks" / "sd0.png").rename(root / "masks" / "sd0_mask.png")  # a common suffix
    assert len(open_semantic(root, "all")) == 6
    shutil.copy(root / "images" / "sd1.png", root / "images" / "extra.png")
    with pytest.raises(DataError, match=r"extra.png: image without mask: no extra.png / .tif in"):
        open_semantic(root, "train")
    (root / "images" / "extra.png").unlink()
    shutil.copy(root / "masks" / "sd1.png", root / "masks" / "lonely.png")
    with pytest.raises(DataError, match=r"lonely.png: mask without image"):
        open_semantic(root, "train")


def test_ade20k_class_names_from_object_info(tmp_path: Path) -> None:
    root = L.ade20k_tree(tmp_path / "ade")
    rows = ["Idx,Ratio,Train,Val,Name"] + [f"{k},0.1,1,1,name{k};alias" for k in range(1, 151)]
    (root / "objectInfo150.csv").write_text("\n".join(rows) + "\n")
    names = [c.name for c in open_semantic(root, "train").classes]
    assert names[0] == "name1" and names[149] == "name150" and len(names) == 150


LABELME_VOC = Path("/usr/share/doc/labelme-examples/examples/semantic_segmentation/data_dataset_voc")


@pytest.mark.skipif(not LABELME_VOC.is_dir(), reason="apt-get install labelme-examples")
def test_real_labelme_voc_export_without_imagesets_trains_on_the_automatic_split() -> None:
    train, val = open_dataset(LABELME_VOC, "train", quiet=True), open_dataset(LABELME_VOC, "val", quiet=True)
    every = sorted(p.stem for p in (LABELME_VOC / "SegmentationClassPNG").glob("*.png"))
    assert sorted(train.ids + val.ids) == every and len(val) == 1 and isinstance(train, VOCSegmentation)
    assert train.class_names[0] == "background" and len(train.classes) > 2  # its class_names.txt
    assert train.load(0)["semantic"].shape == train.load(0)["image"].shape[1:]
