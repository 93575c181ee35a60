"""COCO panoptic format: conversion round trip, the shapes dataset's panoptic files, and
`pixelwise evaluate panoptic` end to end (kept tiny: 48 px images, a few of them)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from pixelwise.cli import main
from pixelwise.data.classes import ClassInfo
from pixelwise.data.formats.coco_panoptic import (
    panoptic_to_semantic_instance,
    read_panoptic_png,
    semantic_instance_to_panoptic,
    voc_to_coco_panoptic,
    write_coco_panoptic,
    write_panoptic_png,
)
from pixelwise.data.io import read_label
from pixelwise.data.synthetic import SHAPES_CLASSES, iter_shapes
from pixelwise.metrics.panoptic import pq_compute

CLASSES = [ClassInfo(0, "sky"), ClassInfo(1, "grass"), ClassInfo(2, "person", True), ClassInfo(3, "dog", True)]


def run(*args) -> int:
    return main([str(a) for a in args])


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("panoptic") / "shapes"
    assert run("data", "synth", "--out", out, "--num-train", 1, "--num-val", 3, "--size", 48) == 0
    return out


def _eval_args(root: Path, pred_json: Path, pred_dir: Path, *extra) -> list:
    ann = root / "annotations"
    return ["evaluate", "panoptic", "--gt-json", ann / "panoptic_val.json", "--gt-dir", ann / "panoptic_val",
            "--pred-json", pred_json, "--pred-dir", pred_dir, *extra]


def test_round_trip_hand_made():
    sem = np.array([[0, 0, 1, 1, 255],
                    [0, 2, 2, 1, 1],
                    [3, 3, 2, 1, 1],
                    [3, 3, 2, 2, 255]], np.uint8)
    inst = np.array([[0, 0, 0, 0, 255],
                     [0, 1, 1, 0, 0],
                     [2, 2, 3, 0, 0],
                     [2, 2, 3, 3, 255]], np.uint8)
    id_map, segments = semantic_instance_to_panoptic(sem, inst, CLASSES)
    assert id_map.dtype == np.uint32 and id_map.shape == sem.shape
    assert (id_map[sem == 255] == 0).all() and (id_map[sem != 255] != 0).all()
    ids = [s["id"] for s in segments]
    assert len(set(ids)) == len(ids) and 0 not in ids
    # two stuff segments (sky, grass) + three instances with their classes
    assert [s["category_id"] for s in segments] == [0, 1, 2, 3, 2]
    assert all(s["iscrowd"] == 0 for s in segments)
    by_id = {s["id"]: s for s in segments}
    for sid, s in by_id.items():
        ys, xs = np.nonzero(id_map == sid)
        assert s["area"] == ys.size
        assert s["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
    assert by_id[5]["bbox"] == [2, 2, 2, 2] and by_id[5]["area"] == 3

    sem2, inst2 = panoptic_to_semantic_instance(id_map, segments, CLASSES)
    np.testing.assert_array_equal(sem2, sem)
    np.testing.assert_array_equal(inst2, inst)


def test_round_trip_shapes_and_png(tmp_path):
    for sample_id, s in iter_shapes("val", 2, 48, seed=3):
        for sem, inst in ((s.semantic, s.instance_map), (s.voc_semantic(), s.voc_instance_map())):
            id_map, segments = semantic_instance_to_panoptic(sem, inst, SHAPES_CLASSES)
            assert len(segments) == len(np.unique(s.semantic[s.semantic < 3])) + len(s.instances)
            path = write_panoptic_png(tmp_path / f"{sample_id}.png", id_map)
            back = read_panoptic_png(path)
            np.testing.assert_array_equal(back, id_map)
            sem2, inst2 = panoptic_to_semantic_instance(back, segments, SHAPES_CLASSES)
            np.testing.assert_array_equal(sem2, sem)
            np.testing.assert_array_equal(inst2, inst)


def test_write_coco_panoptic_checks_segments(tmp_path):
    id_map = np.array([[1, 2]], np.uint32)
    rec = {"image_id": 1, "file_name": "a.png", "id_map": id_map,
           "segments": [{"id": 1, "category_id": 0}]}  # id 2 has no segment
    with pytest.raises(ValueError, match="do not match"):
        write_coco_panoptic(tmp_path, "val", [rec], CLASSES)
    assert not (tmp_path / "annotations" / "panoptic_val.json").exists()
    assert not (tmp_path / "annotations" / "panoptic_val").exists()


def test_synthetic_dataset_has_panoptic_files(shapes, tmp_path):
    ann = shapes / "annotations"
    data = json.loads((ann / "panoptic_val.json").read_text())
    assert {c["name"]: c["isthing"] for c in data["categories"]} == {
        "sky": 0, "grass": 0, "water": 0, "circle": 1, "rectangle": 1, "triangle": 1}
    instances = json.loads((ann / "instances_val.json").read_text())
    assert [(i["id"], i["file_name"]) for i in data["images"]] == [(i["id"], i["file_name"]) for i in instances["images"]]
    assert len(data["annotations"]) == 3
    for a, (sample_id, s) in zip(data["annotations"], iter_shapes("val", 3, 48, seed=0)):
        id_map = read_panoptic_png(ann / "panoptic_val" / a["file_name"])
        sem, inst = panoptic_to_semantic_instance(id_map, a["segments_info"], SHAPES_CLASSES)
        np.testing.assert_array_equal(sem, s.semantic)
        np.testing.assert_array_equal(inst, s.instance_map)
        things = [x for x in a["segments_info"] if x["category_id"] >= 3]
        assert len(things) == len(s.instances)
    assert not list(shapes.parent.glob(".*tmp"))  # built atomically: no temporary folder left

    # the generic VOC converter on the written dataset: the ignore band becomes VOID
    copy = tmp_path / "copy"
    shutil.copytree(shapes, copy)
    shutil.rmtree(copy / "annotations")
    written = voc_to_coco_panoptic(copy)
    assert [p.name for p in written] == ["panoptic_train.json", "panoptic_val.json"]
    conv = json.loads(written[1].read_text())
    assert [i["file_name"] for i in conv["images"]] == [i["file_name"] for i in data["images"]]
    a = conv["annotations"][0]
    id_map = read_panoptic_png(copy / "annotations" / "panoptic_val" / a["file_name"])
    sem, inst = panoptic_to_semantic_instance(id_map, a["segments_info"], SHAPES_CLASSES)
    np.testing.assert_array_equal(sem, read_label(copy / "SegmentationClass" / "val_00000.png"))
    np.testing.assert_array_equal(inst, read_label(copy / "SegmentationObject" / "val_00000.png"))


def test_evaluate_panoptic_self_is_perfect(shapes, tmp_path, capsys):
    ann = shapes / "annotations"
    out = tmp_path / "res" / "results.json"
    capsys.readouterr()
    assert run(*_eval_args(shapes, ann / "panoptic_val.json", ann / "panoptic_val", "--workers", 1, "--out", out)) == 0
    printed = capsys.readouterr().out
    assert "PQ" in printed and "Things" in printed and "Stuff" in printed
    for row in ("All", "Things", "Stuff"):
        line = next(ln for ln in printed.splitlines() if ln.startswith(row))
        assert line.split("|")[1].split()[:3] == ["100.0", "100.0", "100.0"]
    res = json.loads(out.read_text())
    for group in ("All", "Things", "Stuff"):
        assert res[group]["pq"] == 1.0 and res[group]["sq"] == 1.0 and res[group]["rq"] == 1.0
    assert set(res["per_class"]) <= {str(i) for i in range(6)} and res["per_class"]
    assert not list(out.parent.glob(".*.tmp"))


def test_evaluate_panoptic_perturbed_matches_pq_compute(shapes, tmp_path, capsys):
    ann = shapes / "annotations"
    pred = json.loads((ann / "panoptic_val.json").read_text())
    pred_dir = tmp_path / "pred"
    shutil.copytree(ann / "panoptic_val", pred_dir)
    a = pred["annotations"][0]
    thing = next(s for s in a["segments_info"] if s["category_id"] >= 3)  # drop one thing segment: VOID
    a["segments_info"].remove(thing)
    id_map = read_panoptic_png(pred_dir / a["file_name"])
    assert (id_map == thing["id"]).any()
    id_map[id_map == thing["id"]] = 0
    write_panoptic_png(pred_dir / a["file_name"], id_map)
    pred_json = tmp_path / "pred.json"
    pred_json.write_text(json.dumps(pred))

    out = tmp_path / "results.json"
    assert run(*_eval_args(shapes, pred_json, pred_dir, "--workers", 2, "--out", out)) == 0
    assert "Things" in capsys.readouterr().out
    res = json.loads(out.read_text())
    assert res["All"]["pq"] < 1.0 and res["Things"]["pq"] < 1.0 and res["Stuff"]["pq"] == 1.0
    assert res["per_class"][str(thing["category_id"])]["fn"] == 1
    direct = pq_compute(ann / "panoptic_val.json", pred_json, ann / "panoptic_val", pred_dir, workers=1)
    assert res == json.loads(json.dumps(direct))


def test_evaluate_panoptic_errors(shapes, tmp_path, capsys):
    ann = shapes / "annotations"
    capsys.readouterr()
    assert run(*_eval_args(shapes, ann / "panoptic_val.json", tmp_path / "missing")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "missing" in err and "\n" not in err
    assert run(*_eval_args(shapes, tmp_path / "nope.json", ann / "panoptic_val")) == 2
    err = capsys.readouterr().err.strip()
    assert "nope.json" in err and "\n" not in err
    with pytest.raises(SystemExit) as e:  # argparse: missing required flag
        run("evaluate", "panoptic", "--gt-json", ann / "panoptic_val.json")
    assert e.value.code == 2


def test_evaluate_help_unchanged(capsys):
    for argv in (["evaluate", "--help"], ["evaluate", "panoptic", "--help"], ["--debug", "evaluate", "panoptic", "-h"]):
        with pytest.raises(SystemExit) as e:
            run(*argv)
        assert e.value.code == 0
    printed = capsys.readouterr().out
    assert "--checkpoint" in printed and "--pred-json" in printed
    with pytest.raises(SystemExit) as e:  # plain `evaluate` still needs its own flags
        run("evaluate", "--data", "x")
    assert e.value.code == 2
