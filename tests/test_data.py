"""Data layer: classes, image/label I/O, the shapes generator and the VOC reader."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile
from scipy import ndimage

from pixelwise.data.classes import (
    VOC_CLASSES,
    ClassInfo,
    load_class_file,
    load_classes,
    palette,
    palette_bytes,
    save_classes,
)
from pixelwise.data.formats.voc import VOCSegmentation
from pixelwise.data.io import (
    atomic_directory,
    atomic_open,
    atomic_write_text,
    colors_to_label,
    read_image,
    read_label,
    write_image,
    write_label_png,
)
from pixelwise.data.synthetic import (
    MIN_VISIBLE_PIXELS,
    SHAPES_CLASSES,
    generate_shapes,
    iter_shapes,
    render_sample,
)
from pixelwise.errors import DataError

LABELME_VOC = Path("/usr/share/doc/labelme-examples/examples/instance_segmentation/data_dataset_voc")


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.rglob(".*") if p.name.endswith((".tmp", ".old"))]


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_shapes(tmp_path_factory.mktemp("gen") / "shapes", num_train=6, num_val=3, size=64, seed=0)


def _copy_dataset(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


# ---------------------------------------------------------------------------------------
# classes
# ---------------------------------------------------------------------------------------


def test_voc_palette_and_classes() -> None:
    assert palette(4) == [(0, 0, 0), (128, 0, 0), (0, 128, 0), (128, 128, 0)]
    assert palette(256)[255] == (224, 224, 192)
    assert len(set(palette(1000))) == 1000  # extends past 256 with distinct colours
    assert len(VOC_CLASSES) == 21
    assert VOC_CLASSES[0].name == "background" and not VOC_CLASSES[0].isthing
    assert all(c.isthing for c in VOC_CLASSES[1:])
    assert VOC_CLASSES[15].name == "person" and VOC_CLASSES[15].color == (192, 128, 128)
    pal = palette_bytes(SHAPES_CLASSES)
    assert len(pal) == 768
    assert tuple(pal[3 * 3:3 * 3 + 3]) == SHAPES_CLASSES[3].color
    assert tuple(pal[255 * 3:]) == (224, 224, 192)


def test_classes_roundtrip_and_errors(tmp_path: Path) -> None:
    path = save_classes(SHAPES_CLASSES, tmp_path / "classes.json")
    assert load_classes(path) == list(SHAPES_CLASSES)
    assert load_class_file(path)[1] == 255
    assert _no_temp_files(tmp_path)

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"classes": [{"id": 0, "name": "a"}, {"id": 2, "name": "b"}]}))
    with pytest.raises(DataError, match="without gaps"):
        load_classes(bad)
    bad.write_text("{not json")
    with pytest.raises(DataError, match="invalid JSON"):
        load_classes(bad)
    with pytest.raises(DataError, match="not found"):
        load_classes(tmp_path / "missing.json")
    with pytest.raises(DataError):
        save_classes([ClassInfo(1, "x")], tmp_path / "gap.json")


# ---------------------------------------------------------------------------------------
# image and label I/O
# ---------------------------------------------------------------------------------------


def test_read_image_converts_modes(tmp_path: Path) -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (12, 10, 3), dtype=np.uint8)
    write_image(tmp_path / "rgb.png", rgb)
    assert np.array_equal(read_image(tmp_path / "rgb.png"), rgb)
    assert read_image(tmp_path / "rgb.png", "L").shape == (12, 10, 1)

    rgba = np.concatenate([rgb, np.full((12, 10, 1), 7, np.uint8)], axis=2)
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    assert np.array_equal(read_image(tmp_path / "rgba.png"), rgb)
    assert read_image(tmp_path / "rgba.png", None).shape == (12, 10, 4)

    gray = rgb[:, :, 0]
    Image.fromarray(gray).save(tmp_path / "gray.png")
    out = read_image(tmp_path / "gray.png")
    assert out.shape == (12, 10, 3) and all(np.array_equal(out[:, :, c], gray) for c in range(3))
    assert np.array_equal(read_image(tmp_path / "gray.png", "L")[:, :, 0], gray)

    deep = np.linspace(1000, 5000, 120).reshape(12, 10).astype(np.uint16)  # uses a small part of 16 bits
    Image.fromarray(deep).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    out = read_image(tmp_path / "deep.png")
    assert out.dtype == np.uint8 and out.shape == (12, 10, 3)
    assert out.min() == 0 and out.max() == 255  # scaled by the value range
    assert np.all(np.diff(out[:, :, 0].ravel().astype(int)) >= 0)  # order kept

    pal = Image.fromarray(np.arange(120, dtype=np.uint8).reshape(12, 10) % 4)
    pal.putpalette(palette_bytes())
    pal.save(tmp_path / "pal.png")
    out = read_image(tmp_path / "pal.png")
    assert out.shape == (12, 10, 3) and tuple(out[0, 1]) == (128, 0, 0)


def test_read_image_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(DataError, match="not found"):
        read_image(tmp_path / "missing.png")
    (tmp_path / "junk.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(200)))
    with pytest.raises(DataError, match="not a readable image"):
        read_image(tmp_path / "junk.png")
    img = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    for ext in ("png", "jpg"):
        write_image(tmp_path / f"full.{ext}", img)
        data = (tmp_path / f"full.{ext}").read_bytes()
        (tmp_path / f"cut.{ext}").write_bytes(data[: len(data) // 2])
        with pytest.raises(DataError, match="truncated") as info:
            read_image(tmp_path / f"cut.{ext}")
        assert info.value.path == str(tmp_path / f"cut.{ext}")
        # still an error when someone allowed truncated images globally
        monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
        with pytest.raises(DataError, match="truncated"):
            read_image(tmp_path / f"cut.{ext}")
        assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # the global setting is restored
        monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", False)


def test_label_io(tmp_path: Path) -> None:
    label = np.random.default_rng(2).integers(0, 6, (20, 30))
    label[0, :5] = 255
    path = write_label_png(tmp_path / "l.png", label, SHAPES_CLASSES)
    assert Image.open(path).mode == "P"
    out = read_label(path)
    assert out.dtype == np.int64 and np.array_equal(out, label)
    Image.fromarray(label.astype(np.uint8)).save(tmp_path / "gray.png")  # index PNG in mode L
    assert np.array_equal(read_label(tmp_path / "gray.png"), label)

    colors = np.array([c.color for c in SHAPES_CLASSES], np.uint8)[np.minimum(label, 5)]
    Image.fromarray(colors).save(tmp_path / "rgb.png")
    with pytest.raises(DataError, match="palette/index PNG is expected") as info:
        read_label(tmp_path / "rgb.png")
    assert "colors_to_label" in str(info.value)
    fixed = colors_to_label(read_image(tmp_path / "rgb.png"), [c.color for c in SHAPES_CLASSES])
    assert np.array_equal(fixed, np.minimum(label, 5))

    Image.fromarray(label.astype(np.uint8)).save(tmp_path / "lossy.jpg")
    with pytest.raises(DataError, match="JPEG"):
        read_label(tmp_path / "lossy.jpg")
    with pytest.raises(DataError, match="do not fit"):
        write_label_png(tmp_path / "big.png", np.full((3, 3), 300))
    assert _no_temp_files(tmp_path)


def test_atomic_writes(tmp_path: Path) -> None:
    target = tmp_path / "note.txt"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_open(target, "w") as f:
            f.write("half written")
            raise RuntimeError("interrupted")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["note.txt"]
    assert (target.stat().st_mode & 0o777) != 0o600  # normal permissions, not mkstemp's

    out = tmp_path / "ds"
    with pytest.raises(RuntimeError):
        with atomic_directory(out) as tmp:
            (tmp / "a.txt").write_text("x")
            raise RuntimeError("interrupted")
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["note.txt"]


# ---------------------------------------------------------------------------------------
# shapes generator
# ---------------------------------------------------------------------------------------


def test_generator_is_deterministic(tmp_path: Path, shapes_root: Path) -> None:
    again = generate_shapes(tmp_path / "again", num_train=6, num_val=3, size=64, seed=0)
    assert _files(again) == _files(shapes_root)
    other = generate_shapes(tmp_path / "other", num_train=6, num_val=3, size=64, seed=1)
    assert _files(other) != _files(shapes_root)
    # image i of a split does not depend on how many images are generated
    a = dict(iter_shapes("train", 2, 64, 0))["train_00001"]
    b = dict(iter_shapes("train", 5, 64, 0))["train_00001"]
    assert np.array_equal(a.image, b.image) and np.array_equal(a.instance_map, b.instance_map)


def test_generator_layout(shapes_root: Path) -> None:
    sets = shapes_root / "ImageSets" / "Segmentation"
    train = (sets / "train.txt").read_text().split()
    val = (sets / "val.txt").read_text().split()
    assert len(train) == 6 and len(val) == 3 and not set(train) & set(val)
    classes = load_classes(shapes_root / "classes.json")
    assert [c.name for c in classes] == ["sky", "grass", "water", "circle", "rectangle", "triangle"]
    assert [c.isthing for c in classes] == [False, False, False, True, True, True]
    for sample_id in train + val:
        image = Image.open(shapes_root / "JPEGImages" / f"{sample_id}.png")
        assert image.mode == "RGB" and image.size == (64, 64) and image.format == "PNG"
        for sub in ("SegmentationClass", "SegmentationObject"):
            assert Image.open(shapes_root / sub / f"{sample_id}.png").mode == "P"
        sem = read_label(shapes_root / "SegmentationClass" / f"{sample_id}.png")
        obj = read_label(shapes_root / "SegmentationObject" / f"{sample_id}.png")
        assert set(np.unique(sem)) <= {0, 1, 2, 3, 4, 5, 255}
        assert 255 in sem  # the ignore band around things
        assert np.array_equal(sem == 255, obj == 255)
        things = (sem >= 3) & (sem <= 5)
        assert np.array_equal(things, (obj > 0) & (obj != 255))
    assert _no_temp_files(shapes_root.parent)


def test_generator_refuses_non_empty_folder(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(DataError, match="not empty"):
        generate_shapes(out, num_train=1, num_val=1, size=32)
    assert (out / "keep.txt").read_text() == "mine"
    generate_shapes(out, num_train=1, num_val=1, size=32, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "classes.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]  # no temp folders left


def test_rendered_samples_are_consistent() -> None:
    touching = 0
    for i in range(30):
        s = render_sample(np.random.default_rng(i), 96)
        assert s.image.shape == (96, 96, 3) and s.image.dtype == np.uint8
        assert 2 <= len(s.instances) <= 6
        ids = [inst.id for inst in s.instances]
        assert ids == list(range(1, len(ids) + 1))
        assert set(np.unique(s.instance_map)) <= {0, *ids}
        for inst in s.instances:
            mask = s.instance_map == inst.id
            assert inst.area == mask.sum() >= MIN_VISIBLE_PIXELS
            assert np.all(s.semantic[mask] == inst.class_id)
            x, y, w, h = inst.bbox
            assert mask[y:y + h, x:x + w].sum() == inst.area
        assert np.all(s.semantic[s.instance_map == 0] <= 2)  # stuff outside instances
        assert s.masks().shape == (len(ids), 96, 96)
        # the ignore band: only pixels next to an instance boundary (1 px each side)
        m = s.instance_map
        boundary = ndimage.maximum_filter(m, 3, mode="nearest") != ndimage.minimum_filter(m, 3, mode="nearest")
        assert s.border.any() and not (s.border & ~boundary).any()
        assert np.array_equal(s.voc_semantic() == 255, s.border)
        touching += bool(((m[:, 1:] != m[:, :-1]) & (m[:, 1:] > 0) & (m[:, :-1] > 0)).any()
                         or ((m[1:] != m[:-1]) & (m[1:] > 0) & (m[:-1] > 0)).any())
    assert 0 < touching < 30  # some instances touch or overlap, not all


# ---------------------------------------------------------------------------------------
# VOC reader
# ---------------------------------------------------------------------------------------


def test_voc_reader_on_shapes(shapes_root: Path) -> None:
    ds = VOCSegmentation(shapes_root, "train", with_instances=True)
    assert len(ds) == 6 and ds.num_classes == 6 and ds.class_names[3] == "circle"
    sample = ds[0]
    image, semantic = sample["image"], sample["semantic"]
    assert image.dtype == torch.float32 and image.shape == (3, 64, 64)
    assert 0.0 <= image.min() and image.max() <= 1.0
    assert semantic.dtype == torch.int64 and semantic.shape == (64, 64)
    assert sample["instance_map"].dtype == torch.int64
    assert sample["meta"] == {"id": "train_00000", "file": str(shapes_root / "JPEGImages" / "train_00000.png"),
                              "size": (64, 64)}
    stored = read_image(shapes_root / "JPEGImages" / "train_00000.png")
    assert torch.equal((image * 255).round().to(torch.uint8).permute(1, 2, 0), torch.from_numpy(stored))

    gray = VOCSegmentation(shapes_root, "val", image_mode="L", transforms=lambda s: {**s, "seen": True})
    assert len(gray) == 3 and gray[-1]["image"].shape == (1, 64, 64) and gray[0]["seen"]
    assert "instance_map" not in gray[0]
    assert len(VOCSegmentation(shapes_root, "all")) == 9
    with pytest.raises(IndexError):
        gray[3]


def test_voc_reader_default_classes(tmp_path: Path, shapes_root: Path) -> None:
    root = _copy_dataset(shapes_root, tmp_path / "ds")
    (root / "classes.json").unlink()
    ds = VOCSegmentation(root, "train")
    assert ds.classes == list(VOC_CLASSES)
    assert ds[0]["semantic"].max() <= 255


def test_voc_reader_errors(tmp_path: Path, shapes_root: Path) -> None:
    root = _copy_dataset(shapes_root, tmp_path / "ds")
    sets = root / "ImageSets" / "Segmentation"
    with pytest.raises(DataError, match="split file for split 'test' not found") as info:
        VOCSegmentation(root, "test")
    assert "train" in str(info.value)

    (sets / "empty.txt").write_text("\n\n")
    with pytest.raises(DataError, match="empty"):
        VOCSegmentation(root, "empty")

    (sets / "ghost.txt").write_text("train_00000\nno_such_image\n")
    with pytest.raises(DataError, match="no image for id 'no_such_image'"):
        VOCSegmentation(root, "ghost")

    # label map of the wrong size
    ds = VOCSegmentation(root, "train")
    write_label_png(root / "SegmentationClass" / "train_00001.png", np.zeros((100, 120), np.uint8))
    with pytest.raises(DataError, match="mask 120x100 but image 64x64"):
        ds[1]
    # values that are no class ids (6 classes: 0..5, 255 = ignore)
    bad = read_label(root / "SegmentationClass" / "train_00002.png")
    bad[0, 0], bad[1, 1] = 7, 42
    write_label_png(root / "SegmentationClass" / "train_00002.png", bad)
    with pytest.raises(DataError, match="label values 7, 42 are not class ids"):
        ds[2]
    # a colour mask instead of an index PNG
    rgb = np.zeros((64, 64, 3), np.uint8)
    Image.fromarray(rgb).save(root / "SegmentationClass" / "train_00003.png")
    with pytest.raises(DataError, match="palette/index PNG"):
        ds[3]
    # a corrupt image
    (root / "JPEGImages" / "train_00004.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match="train_00004"):
        ds[4]
    assert ds[0]["semantic"].shape == (64, 64)  # the good ones still load

    with pytest.raises(DataError, match="not found"):
        VOCSegmentation(tmp_path / "nowhere")


@pytest.mark.skipif(not LABELME_VOC.is_dir(),
                    reason="labelme-examples is not installed (apt-get install labelme-examples)")
def test_voc_reader_on_labelme_examples() -> None:
    with pytest.raises(DataError, match="split='all'"):
        VOCSegmentation(LABELME_VOC, "train")
    ds = VOCSegmentation(LABELME_VOC, "all", with_instances=True)
    assert len(ds) == 3 and ds.num_classes == 21
    assert ds.class_names[0] == "background" and ds.class_names[15] == "person"
    assert ds.label_dir.name == "SegmentationClassPNG"  # SegmentationClass holds .npy files there
    for i in range(len(ds)):
        s = ds[i]
        h, w = s["meta"]["size"]
        assert s["image"].shape == (3, h, w) and s["semantic"].shape == (h, w)
        values = set(s["semantic"].unique().tolist())
        assert values <= set(range(21)) | {255} and len(values - {0, 255}) >= 1
        assert s["instance_map"].max() >= 1
    assert set(ds[0]["semantic"].unique().tolist()) == {0, 5, 15, 255}  # bottle, person
