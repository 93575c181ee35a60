"""Train / evaluate / predict for panoptic models (Panoptic FPN) on COCO panoptic datasets.

The engine dispatches here when the model's registry task is ``"panoptic"`` (training) or
the checkpoint's ``task`` is (evaluation, prediction). Training is the detection loop of
:mod:`pixelwise.engine.instance` (:func:`~pixelwise.engine.instance.train_detection`) with
:data:`PANOPTIC_TASK`: data from :class:`~pixelwise.data.formats.coco_panoptic.CocoPanoptic`
(Mask R-CNN targets + the ``semantic`` map of stuff classes and one 'thing' class), the model
built with the dataset's ``thing_ids`` / ``stuff_ids`` (so its segments carry the dataset's
category ids), ``best.pt`` by PQ, and checkpoints with ``task: "panoptic"``, ``categories``
(COCO panoptic ``{id, name, isthing, color}``), ``thing_ids``, ``stuff_ids`` and ``best_pq``.

Evaluation (SPEC §8) adds up :func:`~pixelwise.metrics.panoptic.pq_single_image` over the
split in memory -- the same per-image counts, summed in the same image order, as
:func:`~pixelwise.metrics.panoptic.pq_compute` on files -- and reports PQ, SQ, RQ for All /
Things / Stuff and per class; the thing detections are also scored by COCO mask AP against
the thing segments of the ground truth (crowd segments as COCO crowd regions). Under torchrun
each rank evaluates its block of the split; the per-image counts and the COCO entries are
gathered in dataset order and summed / scored as one process would.

Prediction writes, per image, the COCO panoptic PNG ``{stem}.png`` and ``{stem}_overlay.png``
(every segment in its own colour, things labelled with their class and segment id), and one
``panoptic.json`` for the folder (``images``, ``annotations`` with ``segments_info``,
``categories``) that ``pixelwise evaluate panoptic --pred-json OUT/panoptic.json --pred-dir
OUT`` scores directly: image ids are taken from the dataset's panoptic JSON when the images
come from one (or from ``gt_json``), else they are the file stems.
"""
from __future__ import annotations

import colorsys
import json
import os
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from pixelwise.data.formats.coco_panoptic import CocoPanoptic, write_panoptic_png
from pixelwise.data.transforms import build_transforms
from pixelwise.engine import distributed as dist
from pixelwise.engine.checkpoint import load_checkpoint, model_from_checkpoint
from pixelwise.engine.common import apply_skip_bad, resolve_device, skipped_report, uint8_image, write_json
from pixelwise.engine.config import TrainConfig
from pixelwise.engine.instance import DetectionTask, _loader, train_detection
from pixelwise.errors import DataError
from pixelwise.metrics.panoptic import PQStat, format_pq_table, pq_single_image

__all__ = [
    "PANOPTIC_TASK",
    "PREDICTIONS_JSON",
    "draw_panoptic",
    "evaluate_panoptic_checkpoint",
    "evaluate_panoptic_model",
    "format_panoptic_metrics",
    "predict_panoptic_files",
    "segment_colors",
    "segments_info",
    "train_panoptic",
    "write_panoptic_predictions",
]

#: name of the predictions JSON that :func:`predict_panoptic_files` writes next to the PNGs
PREDICTIONS_JSON = "panoptic.json"


def _open(data: str | os.PathLike, split: str, transforms: Any, image_mode: str) -> CocoPanoptic:
    return CocoPanoptic(data, split, transforms=transforms, image_mode=image_mode)


def _model_args(ds: CocoPanoptic) -> tuple[int, dict[str, Any]]:
    if not ds.thing_ids:
        raise DataError(ds.annotation_file, "no thing category (isthing 1): Panoptic FPN needs at least one",
                        "mark the countable categories isthing 1")
    return len(ds.thing_ids) + len(ds.stuff_ids), {"thing_ids": list(ds.thing_ids), "stuff_ids": list(ds.stuff_ids)}


def _extras(ds: CocoPanoptic) -> dict[str, Any]:
    return {"categories": [dict(c) for c in ds.categories], "thing_ids": list(ds.thing_ids),
            "stuff_ids": list(ds.stuff_ids)}


# ---------------------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------------------


def segments_info(id_map: np.ndarray, segments: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """COCO panoptic ``segments_info`` of a predicted id map: per segment ``id``,
    ``category_id``, ``iscrowd`` 0, ``isthing``, ``area`` and ``bbox`` [x, y, w, h] counted on
    the map, and ``score`` for things."""
    out = []
    for s in segments:
        ys, xs = np.nonzero(id_map == int(s["id"]))
        bbox = [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)] \
            if len(xs) else [0, 0, 0, 0]
        d = {"id": int(s["id"]), "category_id": int(s["category_id"]), "iscrowd": 0,
             "isthing": int(bool(s.get("isthing", False))), "area": int(len(xs)), "bbox": bbox}
        if "score" in s:
            d["score"] = round(float(s["score"]), 5)
        out.append(d)
    return out


def _coco_gt_annotations(image_id: Any, instances: Mapping[str, torch.Tensor], first_id: int) -> list[dict[str, Any]]:
    from pixelwise.data.formats.coco import annotation_from_mask

    masks = instances["masks"].numpy()
    cats = instances["category_ids"].tolist()
    crowd = instances["iscrowd"].tolist()
    return [annotation_from_mask(m, image_id, c, first_id + k, int(cr), encoding="rle")
            for k, (m, c, cr) in enumerate(zip(masks, cats, crowd))]


@torch.inference_mode()
def evaluate_panoptic_model(model: torch.nn.Module, loader: DataLoader, categories: Sequence[Mapping[str, Any]],
                            device: torch.device | str = "cpu", progress: bool = False, desc: str = "eval",
                            mask_ap: bool = True) -> dict[str, Any]:
    """Run ``model`` over ``loader`` (batches of :class:`CocoPanoptic` samples) and score its
    ``panoptic`` / ``segments_info`` outputs against the ground truth.

    Returns ``{"panoptic": {"All", "Things", "Stuff": {pq, sq, rq, n}, "per_class": {id: {pq,
    sq, rq, tp, fp, fn, iou_sum}}}, "stat": PQStat.state_dict(), "segm": COCO mask metrics of
    the thing detections (None when ``mask_ap`` is False or no COCO evaluator is installed),
    "num_images", "seconds_per_image"}``. The PQ counts are those of
    :func:`~pixelwise.metrics.panoptic.pq_compute` on the same predictions written as files.

    Under torchrun, a loader whose sampler is a
    :class:`~pixelwise.engine.distributed.ShardSampler` holds this rank's block of the split:
    the per-image PQ counts and COCO entries of every rank are gathered in dataset order and
    added up in that order (mask AP scored once, on rank 0), so every rank gets exactly the
    metrics of one process.
    """
    from pixelwise.metrics.instance import detections_to_coco

    sharded = dist.is_sharded_eval(loader, "evaluate_panoptic_model")
    was_training = model.training
    model.eval()
    thing_ids = [int(c["id"]) for c in categories if c["isthing"]]
    label_to_category = [0] + thing_ids  # label l of the instance branch is thing_ids[l - 1]
    threshold = float(getattr(model, "mask_threshold", 0.5))
    # per image, in loader order: (PQ counts, COCO image entry, its ground-truth annotations, detections)
    per_image: list[tuple[dict[str, list], dict[str, Any] | None, list[dict[str, Any]], list[dict[str, Any]]]] = []
    t0, n = time.time(), 0
    for batch in tqdm(loader, desc=desc, disable=not progress, leave=False, unit="batch"):
        if "panoptic" not in batch:
            raise DataError(getattr(loader.dataset, "annotation_file", "dataset"), "no panoptic ground truth",
                            "evaluate on a COCO panoptic dataset (CocoPanoptic)")
        outputs = model([im.to(device) for im in batch["images"]])
        for i, (out, meta) in enumerate(zip(outputs, batch["meta"])):
            image_id = meta["image_id"]
            counts = pq_single_image(batch["panoptic"][i].numpy(), batch["segments"][i],
                                     out["panoptic"].cpu().numpy(), out["segments_info"], categories,
                                     image_id=image_id).state_dict()
            gt_image, anns, dets = None, [], []
            if mask_ap:
                h, w = out["panoptic"].shape[-2:]
                gt_image = {"id": image_id, "height": int(h), "width": int(w)}
                anns = _coco_gt_annotations(image_id, batch["instances"][i], 1)
                dets = detections_to_coco(image_id, out, label_to_category, threshold)
            per_image.append((counts, gt_image, anns, dets))
            n += 1
    seconds = (time.time() - t0) / max(1, n)
    model.train(was_training)
    if sharded:  # rank order = dataset order
        per_image = dist.gather_objects(per_image)
    stat = PQStat()
    gt_images: list[dict[str, Any]] = []
    gt_anns: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    for counts, gt_image, anns, dets in per_image:  # summed in dataset order, as pq_compute does
        stat += PQStat().load_state_dict(counts)
        if gt_image is not None:
            gt_images.append(gt_image)
            gt_anns.extend({**a, "id": len(gt_anns) + 1} for a in anns)  # ids 1..N over the split
            results.extend(dets)
    segm = None
    if mask_ap:
        from pixelwise.data.formats.coco import _have_mask_api
        from pixelwise.metrics.instance import coco_evaluate

        if _have_mask_api():
            gt = {"images": gt_images, "annotations": gt_anns,
                  "categories": [{"id": c["id"], "name": c["name"]} for c in categories if c["isthing"]]}
            img_ids = [im["id"] for im in gt_images]
            segm = (dist.run_on_main(coco_evaluate, gt, results, "segm", img_ids=img_ids) if sharded
                    else coco_evaluate(gt, results, "segm", img_ids=img_ids))
    return {"panoptic": stat.results(categories), "stat": stat.state_dict(), "segm": segm,
            "num_images": len(per_image), "seconds_per_image": seconds}


def _panoptic_record(model: torch.nn.Module, loader: DataLoader, ds: CocoPanoptic, device: torch.device,
                     progress: bool) -> dict[str, Any]:
    """Flat ``metrics.jsonl`` entries of one validation pass."""
    m = evaluate_panoptic_model(model, loader, ds.categories, device, progress=progress, desc="eval")
    p = m["panoptic"]
    rec: dict[str, Any] = {}
    for group, suffix in (("All", ""), ("Things", "_th"), ("Stuff", "_st")):
        rec.update({f"{k}{suffix}": p[group][k] for k in ("pq", "sq", "rq")})
    names = {c["id"]: c["name"] for c in ds.categories}
    rec["pq_per_class"] = {names[int(cid)]: v["pq"] for cid, v in p["per_class"].items()}
    if m["segm"] is not None:
        rec.update({f"mask_{k}": v for k, v in m["segm"].items()})
    rec["seconds_per_image"] = m["seconds_per_image"]
    return rec


def _describe(r: dict[str, Any]) -> str:
    msg = f"PQ {r['pq']:.3f} (Th {r['pq_th']:.3f}, St {r['pq_st']:.3f})  SQ {r['sq']:.3f}  RQ {r['rq']:.3f}"
    if "mask_AP" in r:
        msg += f"  mask AP {r['mask_AP']:.3f} AP50 {r['mask_AP50']:.3f}"
    return msg


def _panoptic_picture(model: torch.nn.Module, ds: Any, index: int, device: torch.device) -> np.ndarray:
    """image | its predicted segments (things labelled with class and segment id)."""
    from pixelwise.viz import comparison_grid

    image = uint8_image(ds.load(index)["image"])
    out = model([ds[index]["image"].to(device)])[0]
    return comparison_grid([[image, draw_panoptic(image, out["panoptic"].cpu().numpy(), out["segments_info"],
                                                  ds.categories)]])


PANOPTIC_TASK = DetectionTask(
    name="panoptic", best_metric="pq", best_key="best_pq", open=_open, model_args=_model_args, extras=_extras,
    evaluate=_panoptic_record, describe=_describe, picture=_panoptic_picture)
"""Panoptic FPN on COCO panoptic data; best by PQ."""


def train_panoptic(cfg: TrainConfig) -> dict[str, Any]:
    """Train a panoptic model (``cfg.model``, e.g. ``panoptic_fpn``) on a COCO panoptic dataset;
    returns the best (by PQ) and last validation records."""
    return train_detection(cfg, PANOPTIC_TASK)


def format_panoptic_metrics(m: dict[str, Any]) -> str:
    """panopticapi's table (All / Things / Stuff), the per-class PQ, SQ, RQ with TP / FP / FN,
    and the thing detections' mask AP when present."""
    p = m["panoptic"]
    names = {int(c["id"]): c["name"] for c in m.get("categories", [])}
    lines = [format_pq_table(p), "", f"{'class':<16}{'PQ':>7}{'SQ':>7}{'RQ':>7}{'TP':>6}{'FP':>6}{'FN':>6}"]
    for cid, v in p["per_class"].items():
        lines.append(f"{names.get(int(cid), str(cid)):<16}{100 * v['pq']:7.1f}{100 * v['sq']:7.1f}{100 * v['rq']:7.1f}"
                     f"{v['tp']:6d}{v['fp']:6d}{v['fn']:6d}")
    if m.get("segm"):
        s = m["segm"]
        lines.append(f"things, mask AP {s['AP']:.4f}  AP50 {s['AP50']:.4f}  AP75 {s['AP75']:.4f}")
    return "\n".join(lines)


def _check_categories(ds: CocoPanoptic, ckpt: dict[str, Any], data: Any) -> None:
    have = [(int(c["id"]), bool(c["isthing"])) for c in ds.categories]
    want = [(int(c["id"]), bool(c["isthing"])) for c in ckpt["categories"]]
    if have != want:
        raise DataError(data, f"dataset categories (id, isthing) {have} differ from the checkpoint's {want}")


def evaluate_panoptic_checkpoint(checkpoint: str | os.PathLike, data: str | os.PathLike, split: str = "val",
                                 out: str | os.PathLike | None = None, batch_size: int = 4, num_workers: int = 0,
                                 device: str = "auto", progress: bool = True, ckpt: dict[str, Any] | None = None,
                                 mask_ap: bool = True, skip_bad_samples: bool = False,
                                 **_ignored: Any) -> dict[str, Any]:
    """Evaluate a panoptic checkpoint on a COCO panoptic split (PQ in memory, see
    :func:`evaluate_panoptic_model`); with ``out``, write the metrics JSON.
    ``skip_bad_samples``: leave out the images whose files are unusable (a warning line;
    ``metrics["skipped_samples"]`` counts and lists them)."""
    ckpt = ckpt if ckpt is not None else load_checkpoint(checkpoint)
    model = model_from_checkpoint(ckpt, checkpoint)
    dev = resolve_device(device)
    model.to(dev)
    norm = ckpt["normalization"]
    if not Path(data).exists():
        raise DataError(data, "dataset not found", "create one with `pixelwise data synth --out DIR`")
    ds = _open(data, split, build_transforms(train=False, mean=norm["mean"], std=norm["std"]),
               norm.get("image_mode", "RGB"))
    ds = apply_skip_bad(ds, skip_bad_samples, split, data)
    _check_categories(ds, ckpt, data)
    loader = _loader(ds, batch_size, False, num_workers)
    m = evaluate_panoptic_model(model, loader, ckpt["categories"], dev, progress, f"eval {split}", mask_ap)
    m.update({"task": "panoptic", "categories": ckpt["categories"], "checkpoint": str(checkpoint), "split": split})
    if skip_bad_samples:
        m["skipped_samples"] = skipped_report(ds)
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        write_json(out, m)
    return m


# ---------------------------------------------------------------------------------------
# prediction and drawing
# ---------------------------------------------------------------------------------------


def segment_colors(segments: Sequence[Mapping[str, Any]], categories: Sequence[Mapping[str, Any]]) -> list[tuple]:
    """One distinct colour per segment: a stuff segment keeps its category's colour (unless
    an earlier segment has it), things get well-separated hues (golden-ratio steps)."""
    cat_color = {int(c["id"]): tuple(int(v) for v in c.get("color", ())) for c in categories}
    used: set[tuple] = set()
    out = []
    k = 0

    def next_hue() -> tuple:
        nonlocal k
        while True:
            h = (k * 0.618033988749895) % 1.0
            sat = 0.85 if (k // 7) % 2 == 0 else 0.6
            k += 1
            r, g, b = colorsys.hsv_to_rgb(h, sat, 0.95)
            c = (int(r * 255), int(g * 255), int(b * 255))
            if c not in used:
                return c

    for s in segments:
        c = cat_color.get(int(s["category_id"])) if not s.get("isthing") else None
        if not c or len(c) != 3 or c in used:
            c = next_hue()
        used.add(c)
        out.append(c)
    return out


def draw_panoptic(image: np.ndarray, id_map: np.ndarray, segments: Sequence[Mapping[str, Any]],
                  categories: Sequence[Mapping[str, Any]], alpha: float = 0.5) -> np.ndarray:
    """uint8 (H, W, 3): every segment blended in its own colour (:func:`segment_colors`) and
    outlined; things labelled ``"{class} {segment id}"`` at the top-left of their box. VOID
    pixels keep the image."""
    from pixelwise.viz import draw_labelled_masks

    names = {int(c["id"]): c["name"] for c in categories}
    masks = np.stack([id_map == int(s["id"]) for s in segments]) if segments else np.zeros((0, *id_map.shape), bool)
    texts = [f"{names.get(int(s['category_id']), s['category_id'])} {s['id']}" if s.get("isthing") else ""
             for s in segments]
    rgb = image if image.ndim == 3 else image[:, :, None]
    if rgb.shape[2] == 1:
        rgb = np.repeat(rgb, 3, 2)
    return draw_labelled_masks(rgb, masks, texts, segment_colors(segments, categories), alpha)


def write_panoptic_predictions(path: str | os.PathLike, annotations: Sequence[Mapping[str, Any]],
                               categories: Sequence[Mapping[str, Any]],
                               images: Sequence[Mapping[str, Any]] | None = None) -> Path:
    """Write a COCO panoptic predictions JSON atomically: ``annotations`` (``{image_id,
    file_name (the PNG), segments_info}``), ``categories`` and ``images``."""
    doc = {"info": {"description": "panoptic predictions (pixelwise)"}, "images": list(images or []),
           "annotations": list(annotations), "categories": [dict(c) for c in categories]}
    write_json(path, doc)
    return Path(path)


def _image_ids(files: Sequence[Path], gt_json: str | os.PathLike | None) -> list[Any] | None:
    """Ids of ``files`` in a COCO panoptic JSON (``gt_json``, else one found in
    ``annotations/`` next to or above the images that lists every file), matched by file
    name; None when no JSON lists them all."""
    if gt_json is not None:
        candidates = [Path(gt_json)]
    else:
        roots = {p for f in files for p in (f.parent, f.parent.parent)}
        candidates = sorted({c for r in roots for c in (r / "annotations").glob("panoptic_*.json")})
    for cand in candidates:
        try:
            doc = json.loads(cand.read_text(encoding="utf-8"))
            by_name: dict[str, list] = {}
            for im in doc["images"]:
                by_name.setdefault(Path(str(im["file_name"])).name, []).append(im["id"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            if gt_json is not None:
                raise DataError(cand, f"cannot read the image list of the panoptic JSON ({e})") from None
            continue
        ids = [by_name.get(f.name, []) for f in files]
        if all(len(i) == 1 for i in ids):
            return [i[0] for i in ids]
        if gt_json is not None:
            missing = [f.name for f, i in zip(files, ids) if len(i) != 1]
            raise DataError(cand, f"images {missing[:5]} are not listed (once) in its 'images'",
                            "predict images of that split, or leave out gt_json to use the file stems as ids")
    return None


@torch.inference_mode()
def predict_panoptic_files(checkpoint: str | os.PathLike, inputs: Iterable[str | os.PathLike], out: str | os.PathLike,
                           device: str = "auto", alpha: float = 0.5, progress: bool = True,
                           ckpt: dict[str, Any] | None = None, gt_json: str | os.PathLike | None = None,
                           **_ignored: Any) -> list[Path]:
    """Per input image write ``OUT/{stem}.png`` (COCO panoptic PNG, id = R + 256 G + 256^2 B)
    and ``OUT/{stem}_overlay.png``; then ``OUT/panoptic.json`` (see the module docstring for
    the image ids). Returns the PNG paths and, last, the JSON path."""
    from pixelwise.data.io import read_image, write_image
    from pixelwise.engine.predict import collect_inputs, normalize_image

    ckpt = ckpt if ckpt is not None else load_checkpoint(checkpoint)
    model = model_from_checkpoint(ckpt, checkpoint).eval()
    dev = resolve_device(device)
    model.to(dev)
    norm = ckpt["normalization"]
    mode = norm.get("image_mode", "RGB")
    categories = ckpt["categories"]
    files = collect_inputs(inputs)
    stems: dict[str, Path] = {}
    for f in files:
        if f.stem in stems:
            raise DataError(f, f"has the same name as {stems[f.stem]}: their predictions would overwrite each other",
                            "predict them into different --out folders")
        stems[f.stem] = f
    ids = _image_ids(files, gt_json) or [f.stem for f in files]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written, annotations, images = [], [], []
    for f, image_id in tqdm(list(zip(files, ids)), desc="predict", unit="img", disable=not progress):
        image = read_image(f, mode=mode)
        pred = model([normalize_image(image, norm).to(dev)])[0]
        id_map = pred["panoptic"].cpu().numpy()
        write_panoptic_png(out / f"{f.stem}.png", id_map)
        write_image(out / f"{f.stem}_overlay.png", draw_panoptic(image, id_map, pred["segments_info"], categories,
                                                                 alpha))
        annotations.append({"image_id": image_id, "file_name": f"{f.stem}.png",
                            "segments_info": segments_info(id_map, pred["segments_info"])})
        images.append({"id": image_id, "file_name": f.name, "height": int(id_map.shape[0]),
                       "width": int(id_map.shape[1])})
        written.append(out / f"{f.stem}.png")
    written.append(write_panoptic_predictions(out / PREDICTIONS_JSON, annotations, categories, images))
    return written
