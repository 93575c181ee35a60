"""Panoptic engine: the CocoPanoptic dataset's targets, Panoptic FPN training through the shared
detection loop, in-memory PQ vs pq_compute on predicted files, ground truth scoring PQ 1,
and the segment overlay."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from pixelwise.data.formats.coco_panoptic import CocoPanoptic, read_panoptic_png, write_panoptic_png
from pixelwise.data.synthetic import SHAPES_CLASSES, generate_shapes, iter_shapes
from pixelwise.metrics.panoptic import pq_compute

TINY = dict(preset="cpu", fpn_channels=16, mask_head_channels=8, box_head_dim=32, min_size=64, max_size=64,
            rpn_pre_nms_top_n_train=100, rpn_post_nms_top_n_train=50, rpn_pre_nms_top_n_test=50,
            rpn_post_nms_top_n_test=20, box_batch_size_per_image=32, rpn_batch_size_per_image=32,
            anchor_sizes=(8, 16, 32, 64, 128), semantic_channels=32,
            scale_stuff_area=True)  # 64 x 64 images: the unscaled 4096 px would drop every stuff region
SIZE, SEED = 64, 1
STUFF = [c.id for c in SHAPES_CLASSES if not c.isthing]  # 0 sky, 1 grass, 2 water
THINGS = [c.id for c in SHAPES_CLASSES if c.isthing]  # 3 circle, 4 rectangle, 5 triangle


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return generate_shapes(tmp_path_factory.mktemp("pan") / "shapes", num_train=4, num_val=2, size=SIZE, seed=SEED)


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    """A 2-step training through the CLI (4 images, batch 2, one epoch)."""
    from pixelwise.cli import main

    out = tmp_path_factory.mktemp("pan") / "run"
    args = ["train", "--model", "panoptic_fpn", "--data", str(data), "--out", str(out), "--epochs", "1",
            "--batch-size", "2", "--lr", "0.005", "--num-workers", "0", "--quiet"]
    for k, v in TINY.items():
        args += ["--model-arg", f"{k}={list(v) if isinstance(v, tuple) else v}"]
    assert main(args) == 0
    return out


def _gt(data, split="val"):
    doc = json.loads((data / "annotations" / f"panoptic_{split}.json").read_text())
    return doc, data / "annotations" / f"panoptic_{split}"


# ---------------------------------------------------------------------------------------
# dataset
# ---------------------------------------------------------------------------------------


def test_dataset_targets_follow_the_model_conventions(data):
    ds = CocoPanoptic(data, "val")
    assert ds.thing_ids == THINGS and ds.stuff_ids == STUFF and ds.thing_class == 3
    assert [c.id for c in ds.classes] == list(range(6)) and ds.num_things == 4 and ds.num_stuff == 3
    doc, png_dir = _gt(data)
    for index, (_, shape) in enumerate(iter_shapes("val", 2, SIZE, SEED)):
        s = ds.load(index)
        # semantic: stuff class j -> j, every thing pixel -> 3 (the 'thing' class); no void in the shapes data
        expected = np.where(shape.semantic < 3, shape.semantic, 3)
        assert np.array_equal(s["semantic"].numpy(), expected)
        # instances: one per thing segment of the PNG, its mask exactly the segment's pixels
        ids = read_panoptic_png(png_dir / doc["annotations"][index]["file_name"])
        things = [seg for seg in doc["annotations"][index]["segments_info"] if seg["category_id"] in THINGS]
        inst = s["instances"]
        assert len(things) == len(inst["labels"]) == len(shape.instances) > 0
        for k, seg in enumerate(things):
            assert torch.equal(inst["masks"][k], torch.from_numpy(ids == seg["id"]))
            assert int(inst["labels"][k]) == THINGS.index(seg["category_id"]) + 1
            assert int(inst["category_ids"][k]) == seg["category_id"]
        for k, sh in enumerate(shape.instances):  # and they are the renderer's instances
            assert torch.equal(inst["masks"][k], torch.from_numpy(shape.instance_map == sh.id))
        ys, xs = np.nonzero(shape.instance_map == shape.instances[0].id)
        assert inst["boxes"][0].tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
        assert not inst["iscrowd"].any()
        assert torch.equal(s["panoptic"], torch.from_numpy(ids.astype(np.int64)))
        assert s["meta"]["image_id"] == doc["annotations"][index]["image_id"]


def test_crowd_and_void_become_ignore(data, tmp_path):
    """A crowd thing segment and a VOID patch are 255 in the semantic map; the crowd segment
    stays an instance marked iscrowd, and the training collate leaves it out."""
    from pixelwise.engine.instance import instance_collate

    root = tmp_path / "d"
    shutil.copytree(data, root)
    doc, png_dir = _gt(root)
    ann = doc["annotations"][0]
    crowd = next(seg for seg in ann["segments_info"] if seg["category_id"] in THINGS)
    crowd["iscrowd"] = 1
    (root / "annotations" / "panoptic_val.json").write_text(json.dumps(doc))
    ids = read_panoptic_png(png_dir / ann["file_name"])
    ids[:4, :4] = 0  # VOID corner
    write_panoptic_png(png_dir / ann["file_name"], ids)

    s = CocoPanoptic(root, "val").load(0)
    sem, inst = s["semantic"].numpy(), s["instances"]
    assert (sem[ids == crowd["id"]] == 255).all()
    assert (sem[:4, :4] == 255).all()
    assert (sem[(ids != crowd["id"]) & (ids != 0)] != 255).all()
    k = inst["segment_ids"].tolist().index(crowd["id"])
    assert inst["iscrowd"].tolist() == [i == k for i in range(len(inst["labels"]))]
    batch = instance_collate([s])
    assert len(batch["targets"][0]["labels"]) == len(inst["labels"]) - 1
    assert torch.equal(batch["targets"][0]["semantic"], s["semantic"])


# ---------------------------------------------------------------------------------------
# training, evaluation, prediction
# ---------------------------------------------------------------------------------------


def test_training_writes_a_panoptic_checkpoint(run):
    from pixelwise.engine.checkpoint import load_checkpoint, model_from_checkpoint

    ck = load_checkpoint(run / "last.pt")
    assert ck["task"] == "panoptic" and ck["step"] == 2 and "best_pq" in ck
    assert ck["thing_ids"] == THINGS and ck["stuff_ids"] == STUFF
    assert [(c["id"], c["name"], bool(c["isthing"])) for c in ck["categories"]] == \
        [(c.id, c.name, c.isthing) for c in SHAPES_CLASSES]
    model = model_from_checkpoint(ck)
    assert model.thing_ids == THINGS and model.stuff_ids == STUFF and model.num_classes == 6
    rec = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"pq", "sq", "rq", "pq_th", "pq_st", "mask_AP", "train_loss_semantic", "train_loss_mask"} <= set(rec)
    assert set(rec["pq_per_class"]) == {c.name for c in SHAPES_CLASSES}
    assert (run / "best.pt").is_file()


def test_predicted_files_score_exactly_the_in_memory_pq(run, data, tmp_path, capsys):
    from pixelwise.cli import main
    from pixelwise.engine.evaluate import evaluate_checkpoint

    pred = tmp_path / "pred"
    val_images = sorted((data / "JPEGImages").glob("val_*.png"))
    assert main(["predict", "--checkpoint", str(run / "last.pt"), *map(str, val_images), "--out", str(pred),
                 "--quiet"]) == 0
    assert (f"wrote {len(val_images)} panoptic PNGs and overlays to {pred} and their segments to "
            f"{pred / 'panoptic.json'}") in capsys.readouterr().out
    doc = json.loads((pred / "panoptic.json").read_text())
    gt_doc, gt_dir = _gt(data)
    assert [a["image_id"] for a in doc["annotations"]] == [a["image_id"] for a in gt_doc["annotations"]]
    assert [c["id"] for c in doc["categories"]] == [c.id for c in SHAPES_CLASSES]
    for im in val_images:
        assert (pred / f"{im.stem}.png").is_file() and (pred / f"{im.stem}_overlay.png").is_file()
    files = pq_compute(data / "annotations" / "panoptic_val.json", pred / "panoptic.json", gt_dir, pred, workers=1)

    out_json = tmp_path / "metrics.json"
    m = evaluate_checkpoint(run / "last.pt", data, "val", out=out_json, batch_size=1, progress=False)
    assert m["task"] == "panoptic"
    assert m["panoptic"] == files  # same counts, same order of summation: bit-identical
    per_class = m["panoptic"]["per_class"]
    assert any(a["segments_info"] for a in doc["annotations"])  # the model did predict segments
    assert sum(v["tp"] + v["fp"] for v in per_class.values()) > 0
    assert set(m["segm"]) >= {"AP", "AP50", "AP75"}
    assert json.loads(out_json.read_text())["panoptic"]["All"]["pq"] == pytest.approx(files["All"]["pq"])

    assert main(["evaluate", "--checkpoint", str(run / "last.pt"), "--data", str(data), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "Things" in printed and "Stuff" in printed and "rectangle" in printed and "mask AP" in printed


class _Oracle(torch.nn.Module):
    """Returns the ground truth of the dataset, image after image, as a model's output."""

    def __init__(self, ds: CocoPanoptic):
        super().__init__()
        self.samples = [ds.load(i) for i in range(len(ds))]
        self.i = 0

    def forward(self, images):
        outs = []
        for _ in images:
            s = self.samples[self.i]
            self.i += 1
            inst = s["instances"]
            segs = [{"id": g["id"], "category_id": g["category_id"], "isthing": g["isthing"]} for g in s["segments"]]
            outs.append({"panoptic": s["panoptic"].int(), "segments_info": segs, "boxes": inst["boxes"],
                         "labels": inst["labels"], "scores": torch.ones(len(inst["labels"])),
                         "masks": inst["masks"][:, None].float()})
        return outs


def test_ground_truth_as_prediction_scores_pq_1(data, tmp_path):
    from pixelwise.engine.instance import _loader
    from pixelwise.engine.panoptic import evaluate_panoptic_model, segments_info, write_panoptic_predictions

    ds = CocoPanoptic(data, "val")
    # in memory
    m = evaluate_panoptic_model(_Oracle(ds), _loader(ds, 2, False, 0), ds.categories)
    assert m["num_images"] == 2
    assert {g: m["panoptic"][g]["pq"] for g in ("All", "Things", "Stuff")} == {"All": 1.0, "Things": 1.0, "Stuff": 1.0}
    assert m["segm"]["AP"] == pytest.approx(1.0)
    # files written the way predict writes them
    doc, gt_dir = _gt(data)
    anns = []
    for a in doc["annotations"]:
        ids = read_panoptic_png(gt_dir / a["file_name"])
        write_panoptic_png(tmp_path / a["file_name"], ids)
        anns.append({"image_id": a["image_id"], "file_name": a["file_name"],
                     "segments_info": segments_info(ids, a["segments_info"])})
    assert anns[0]["segments_info"][0]["bbox"] == doc["annotations"][0]["segments_info"][0]["bbox"]
    write_panoptic_predictions(tmp_path / "p.json", anns, ds.categories)
    r = pq_compute(data / "annotations" / "panoptic_val.json", tmp_path / "p.json", gt_dir, tmp_path, workers=1)
    assert r["All"]["pq"] == 1.0 and r["All"]["n"] == 6
    assert all(v["pq"] == 1.0 for v in r["per_class"].values())


def test_overlay_gives_every_segment_its_own_colour():
    from pixelwise.engine.panoptic import draw_panoptic, segment_colors

    cats = [{"id": 0, "name": "sky", "isthing": 0, "color": [200, 0, 0]},
            {"id": 1, "name": "grass", "isthing": 0, "color": [200, 0, 0]},  # same colour as sky
            {"id": 7, "name": "circle", "isthing": 1, "color": [0, 0, 200]}]
    id_map = np.zeros((60, 90), np.int32)
    id_map[:30] = 1
    id_map[30:] = 2
    segs = [{"id": 1, "category_id": 0, "isthing": False}, {"id": 2, "category_id": 1, "isthing": False}]
    for k, x in enumerate((5, 35, 65)):  # three circles
        id_map[34:56, x:x + 20] = 3 + k
        segs.append({"id": 3 + k, "category_id": 7, "isthing": True})
    colors = segment_colors(segs, cats)
    assert colors[0] == (200, 0, 0) and len(set(colors)) == len(segs)
    vis = draw_panoptic(np.zeros((60, 90, 3), np.uint8), id_map, segs, cats, alpha=1.0)
    # the bottom-right inside of each segment: away from outlines and labels
    inside = [vis[20, 80], vis[40, 2], vis[52, 22], vis[52, 52], vis[52, 82]]
    assert [tuple(v) for v in inside] == colors
    # each circle carries a text label at the top-left of its box (pixels of another colour there)
    for k, x in enumerate((5, 35, 65)):
        patch = vis[35:45, x + 1:x + 19].reshape(-1, 3)
        assert (patch != np.array(colors[2 + k], np.uint8)).any(1).sum() > 5
