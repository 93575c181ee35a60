"""`pixelwise data check`: a corpus of broken files (VOC + COCO + COCO panoptic), generated
here, in which every problem must be reported at once, with its file and a recognisable
message; a clean synthetic dataset passes."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pixelwise.cli import main
from pixelwise.data.check import DatasetCheck, Problem, check_dataset, detect_formats, format_problems
from pixelwise.data.synthetic import generate_shapes


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_shapes(tmp_path_factory.mktemp("clean") / "shapes", num_train=8, num_val=3, size=32, seed=2)


def _ids(root: Path, split: str) -> list[str]:
    return (root / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def _save(path: Path, doc: dict) -> None:
    path.write_text(json.dumps(doc))


def _problems(problems: list[Problem], file: Path | str, *words: str, severity: str = "error") -> list[Problem]:
    """The problems of ``file`` (path or name) whose text has every one of ``words``."""
    f = str(file)
    return [p for p in problems if (p.file == f or Path(p.file).name == f) and p.severity == severity
            and all(w.lower() in p.problem.lower() for w in words)]


@pytest.fixture(scope="module")
def broken(clean: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """One copy of the clean set with one broken file per case; returns (root, what was broken)."""
    root = tmp_path_factory.mktemp("broken") / "shapes"
    shutil.copytree(clean, root)
    train, val = _ids(root, "train"), _ids(root, "val")
    img = lambda i: root / "JPEGImages" / f"{i}.png"  # noqa: E731
    lab = lambda i: root / "SegmentationClass" / f"{i}.png"  # noqa: E731
    b: dict = {}

    # -- VOC layout: one broken file per case ------------------------------------------------
    data = img(train[0]).read_bytes()
    img(train[0]).write_bytes(data[: len(data) // 2])  # truncated image
    b["truncated"] = img(train[0])
    img(train[1]).write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(64)))  # not an image
    b["unreadable"] = img(train[1])
    small = Image.open(lab(train[2]))
    small.crop((0, 0, 30, 32)).save(lab(train[2]))  # mask 30x32 for a 32x32 image
    b["size"] = lab(train[2])
    im = Image.open(lab(train[3]))
    a = np.asarray(im).copy()
    a[5, 5] = 17  # not a class id (6 classes, 255 = ignore)
    out = Image.fromarray(a)
    out.putpalette(im.getpalette())
    out.save(lab(train[3]))
    b["range"] = lab(train[3])
    Image.open(lab(train[4])).convert("RGB").save(lab(train[4]))  # colour mask instead of palette PNG
    b["rgb_mask"] = lab(train[4])
    rgb = np.asarray(Image.open(img(train[5])).convert("RGB"))
    Image.fromarray(rgb[:, :, 0].astype(np.uint16) * 200).save(img(train[5]))  # 16-bit grayscale
    b["16bit"] = img(train[5])
    Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 200, np.uint8)])).save(img(train[6]))  # RGBA
    b["rgba"] = img(train[6])
    Image.fromarray(rgb[:, :, 1]).save(img(train[7]))  # 8-bit grayscale
    b["gray"] = img(train[7])
    (root / "ImageSets" / "Segmentation" / "test.txt").write_text("\n")  # empty split
    b["empty_split"] = root / "ImageSets" / "Segmentation" / "test.txt"
    with open(root / "ImageSets" / "Segmentation" / "val.txt", "a") as f:
        f.write("ghost\n")  # an id without image or label
    b["ghost"] = "ghost"

    # -- COCO instances --------------------------------------------------------------------
    inst = root / "annotations" / "instances_train.json"
    doc = _load(inst)
    doc["images"].append({"id": 99, "file_name": "JPEGImages/missing.png", "height": 32, "width": 32})
    polys = [a for a in doc["annotations"] if isinstance(a["segmentation"], list)]
    outside, unknown = polys[0], polys[1]
    outside["segmentation"] = [[v + 100 if k % 2 == 0 else v for k, v in enumerate(outside["segmentation"][0])]]
    unknown["category_id"] = 42
    doc["annotations"].append({**polys[2], "id": 1000, "image_id": 12345})
    _save(inst, doc)
    b["coco"] = {"json": inst, "outside": outside["id"], "unknown": unknown["id"], "orphan": 1000}
    inst_val = root / "annotations" / "instances_val.json"
    doc = _load(inst_val)
    doc["images"], doc["annotations"] = [], []
    _save(inst_val, doc)  # empty split
    b["coco_empty"] = inst_val

    # -- COCO panoptic ---------------------------------------------------------------------
    pan = root / "annotations" / "panoptic_train.json"
    doc = _load(pan)
    anns = doc["annotations"]
    dropped = anns[0]["segments_info"].pop()  # its pixels stay in the PNG: id in PNG, not in JSON
    anns[1]["segments_info"].append({"id": 999, "category_id": 0, "iscrowd": 0, "area": 1, "bbox": [0, 0, 1, 1]})
    anns[2]["segments_info"][0]["category_id"] = 77  # unknown category
    (root / "annotations" / "panoptic_train" / anns[3]["file_name"]).unlink()  # missing PNG
    _save(pan, doc)
    b["pan"] = {"json": pan, "dir": root / "annotations" / "panoptic_train", "dropped": dropped["id"],
                "png_missing_id": anns[0]["file_name"], "json_extra": anns[1]["file_name"],
                "unknown": anns[2]["image_id"], "no_png": anns[3]["file_name"], "no_png_id": anns[3]["image_id"]}
    return root, b


def test_clean_synthetic_dataset_passes(clean: Path, capsys: pytest.CaptureFixture) -> None:
    check = DatasetCheck(clean).run()
    assert check.problems == []
    assert sorted({fmt for fmt, _ in check.formats}) == ["coco", "coco_panoptic", "voc"]
    assert check.num_images == 11  # every image read once, whichever formats name it
    assert main(["data", "check", str(clean)]) == 0
    out = capsys.readouterr().out
    assert "0 errors, 0 warnings" in out and "coco_panoptic" in out


def test_every_voc_problem_is_reported(broken: tuple[Path, dict]) -> None:
    root, b = broken
    problems = check_dataset(root)
    assert _problems(problems, b["truncated"], "truncated")
    assert _problems(problems, b["unreadable"], "not a readable image")
    assert _problems(problems, b["size"], "mask 30x32 but image 32x32")
    assert _problems(problems, b["range"], "label values 17", "not class ids")
    rgb = _problems(problems, b["rgb_mask"], "colour image", "palette/index PNG is expected")
    assert rgb and "colors_to_label" in rgb[0].fix
    assert _problems(problems, b["empty_split"], "'test' is empty")
    assert _problems(problems, "ghost", "no image for id 'ghost'")
    assert _problems(problems, "ghost.png", "label file for id 'ghost'")
    # each problem once, although COCO and panoptic files name the same images again
    assert len(_problems(problems, b["truncated"], "truncated")) == 1


def test_converted_images_are_warnings_not_errors(broken: tuple[Path, dict]) -> None:
    root, b = broken
    problems = check_dataset(root)
    for key, words in (("16bit", ("16-bit", "scaled to 8 bits")), ("rgba", ("alpha",)), ("gray", ("grayscale",))):
        assert _problems(problems, b[key], *words, severity="warning"), key
        assert not [p for p in problems if p.file == str(b[key]) and p.is_error], key
    # read as grayscale (e.g. an imported microscopy set), a gray image needs no conversion
    as_l = check_dataset(root, image_mode="L")
    assert not [p for p in as_l if p.file == str(b["gray"])]
    assert _problems(as_l, b["rgba"], "converted to grayscale", severity="warning")


def test_every_coco_problem_is_reported(broken: tuple[Path, dict]) -> None:
    root, b = broken
    problems = check_dataset(root)
    c = b["coco"]
    assert _problems(problems, root / "JPEGImages" / "missing.png", "image file not found", "instances_train.json")
    assert _problems(problems, c["json"], f"annotation {c['outside']}", "points outside the 32x32 image")
    assert _problems(problems, c["json"], f"annotation {c['unknown']}", "unknown category_id 42")
    assert _problems(problems, c["json"], f"annotation {c['orphan']}", "image_id 12345", "not in 'images'")
    assert _problems(problems, b["coco_empty"], "'val' is empty")
    # the broken images are images of the COCO file too; its size check did not add noise
    assert not _problems(problems, b["16bit"], "says")


def test_every_panoptic_problem_is_reported(broken: tuple[Path, dict]) -> None:
    root, b = broken
    problems = check_dataset(root)
    p = b["pan"]
    assert _problems(problems, p["dir"] / p["png_missing_id"], f"segment ids {p['dropped']}",
                     "in the PNG but not in segments_info")
    assert _problems(problems, p["dir"] / p["json_extra"], "segment ids 999", "in segments_info but not in the PNG")
    assert _problems(problems, p["json"], f"image {p['unknown']}", "unknown category_id 77")
    assert _problems(problems, p["dir"] / p["no_png"], "panoptic PNG not found", f"image {p['no_png_id']}")


def test_cli_prints_a_table_and_exits_1(broken: tuple[Path, dict], capsys: pytest.CaptureFixture) -> None:
    root, b = broken
    assert main(["data", "check", str(root)]) == 1
    out = capsys.readouterr().out
    header = out.splitlines()[0].split()
    assert header[:3] == ["level", "file", "problem"]
    n_errors = len([p for p in check_dataset(root) if p.is_error])
    assert f"{n_errors} errors, 3 warnings" in out
    for f in ("JPEGImages/" + b["truncated"].name, "SegmentationClass/" + b["rgb_mask"].name,
              "annotations/instances_train.json", "annotations/panoptic_train.json"):
        assert f in out, f
    assert "Traceback" not in out


def test_many_identical_warnings_fold_into_one_row(tmp_path: Path) -> None:
    problems = [Problem(str(tmp_path / f"{i}.png"), "grayscale image: repeated over 3 channels (RGB)",
                        severity="warning") for i in range(5)]
    problems.append(Problem(str(tmp_path / "x.png"), "image file not found"))
    table = format_problems(problems, tmp_path)
    rows = table.splitlines()[2:]
    assert len(rows) == 2 and "0.png (and 4 more files)" in table and "x.png" in table


def test_formats_are_detected_in_folders_and_files(clean: Path, tmp_path: Path) -> None:
    kinds = {(fmt, p.name) for fmt, p in detect_formats(clean)}
    assert ("voc", clean.name) in kinds and ("coco", "instances_val.json") in kinds
    assert ("coco_panoptic", "panoptic_train.json") in kinds
    # a COCO JSON given directly, and a labelme-style name judged by its content
    assert detect_formats(clean / "annotations" / "instances_train.json") == [
        ("coco", clean / "annotations" / "instances_train.json")]
    labelme = tmp_path / "labelme"
    shutil.copytree(clean / "JPEGImages", labelme / "JPEGImages")
    shutil.copy(clean / "annotations" / "instances_train.json", labelme / "annotations.json")
    # labelme's COCO export: images in JPEGImages/ but no VOC labels -> COCO only, and clean
    assert [(f, p.name) for f, p in detect_formats(labelme)] == [("coco", "annotations.json")]
    assert [p for p in check_dataset(labelme) if p.is_error] == []
    # JPEGImages/ without any JSON is a VOC layout missing its labels
    (labelme / "annotations.json").unlink()
    assert [(f, p.name) for f, p in detect_formats(labelme)] == [("voc", "labelme")]
    assert [p.problem for p in check_dataset(labelme) if p.is_error] == [
        "no label folder with PNG files (SegmentationClass or SegmentationClassPNG)"]
    assert check_dataset(tmp_path / "nowhere")[0].problem == "dataset not found"
    (tmp_path / "empty").mkdir()
    assert "no dataset found" in check_dataset(tmp_path / "empty")[0].problem


def test_unreadable_json_is_reported_not_raised(clean: Path, tmp_path: Path) -> None:
    root = tmp_path / "d"
    shutil.copytree(clean, root)
    (root / "annotations" / "instances_train.json").write_text('{"images": [')  # truncated
    (root / "annotations" / "panoptic_val.json").write_text('{"images": [], "annotations": 3, "categories": '
                                                           '[{"id": 1, "isthing": 1}]}')
    problems = check_dataset(root)
    assert _problems(problems, root / "annotations" / "instances_train.json", "invalid JSON")
    assert _problems(problems, root / "annotations" / "panoptic_val.json", "no 'annotations' list")
    assert not _problems(problems, root / "annotations" / "instances_val.json", "")  # the others still checked


LABELME = Path("/usr/share/doc/labelme-examples/examples")


@pytest.mark.skipif(not LABELME.is_dir(), reason="labelme-examples not installed (apt-get install labelme-examples)")
@pytest.mark.parametrize("folder, formats", [
    ("semantic_segmentation/data_dataset_voc", ["voc"]),
    ("instance_segmentation/data_dataset_voc", ["voc"]),
    ("instance_segmentation/data_dataset_coco", ["coco"]),
])
def test_real_labelme_exports_are_clean(folder: str, formats: list[str]) -> None:
    root = LABELME / folder
    assert [f for f, _ in detect_formats(root)] == formats
    assert [p for p in check_dataset(root) if p.is_error] == []
