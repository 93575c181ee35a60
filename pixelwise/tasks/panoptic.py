"""Panoptic segmentation (Panoptic FPN) on COCO panoptic datasets.

Data: :class:`~pixelwise.data.formats.coco_panoptic.CocoPanoptic` (Mask R-CNN targets + the
``semantic`` map of stuff classes and one 'thing' class); the model is built with the
dataset's ``thing_ids`` / ``stuff_ids`` so its segments carry the dataset's category ids;
checkpoints record ``categories`` (COCO panoptic ``{id, name, isthing, color}``),
``thing_ids`` and ``stuff_ids``. Training is the detection step (the model's loss dict).

Evaluation (SPEC §8) adds up :func:`~pixelwise.metrics.panoptic.pq_single_image` over the
split in memory -- the same per-image counts, summed in the same image order, as
:func:`~pixelwise.metrics.panoptic.pq_compute` on files -- and reports PQ, SQ, RQ for All /
Things / Stuff and per class; the thing detections are also scored by COCO mask AP against
the thing segments of the ground truth (crowd segments as COCO crowd regions).

Prediction writes, per image, the COCO panoptic PNG ``{stem}.png`` and ``{stem}_overlay.png``
(every segment in its own colour, things labelled with their class and segment id), and one
``panoptic.json`` for the folder (``images``, ``annotations`` with ``segments_info``,
``categories``) that ``pixelwise evaluate panoptic --pred-json OUT/panoptic.json --pred-dir
OUT`` scores directly: image ids are taken from the dataset's panoptic JSON when the images
come from one (or from ``gt_json``), else they are the file stems.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn

from pixelwise.data.formats.coco_panoptic import CocoPanoptic, write_panoptic_png
from pixelwise.data.io import write_image
from pixelwise.data.loading import uint8_image, write_json
from pixelwise.data.transforms import normalize_image
from pixelwise.errors import DataError, PixelwiseError
from pixelwise.metrics.panoptic import PQStat, format_pq_table, pq_single_image
from pixelwise.tasks.base import Evaluator, ReportContext, ReportSections
from pixelwise.tasks.instance import InstanceTask
from pixelwise.viz import comparison_grid, draw_panoptic, fit_ids, fit_panel, segment_colors

__all__ = ["PanopticTask", "PanopticEvaluator", "PanopticResult", "segments_info", "format_panoptic_metrics",
           "write_panoptic_predictions", "PREDICTIONS_JSON"]

#: name of the predictions JSON that prediction writes next to the PNGs
PREDICTIONS_JSON = "panoptic.json"


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


class PanopticEvaluator(Evaluator):
    """PQ / SQ / RQ of the ``panoptic`` / ``segments_info`` outputs against the ground truth,
    and (``mask_ap``) the things' COCO mask AP. Per image, in dataset order: the PQ counts,
    the COCO image entry, its ground-truth annotations and the detections; summed in that
    order, as :func:`~pixelwise.metrics.panoptic.pq_compute` does on files."""

    def __init__(self, categories: Sequence[Mapping[str, Any]], mask_threshold: float = 0.5, mask_ap: bool = True,
                 root: Any = "dataset") -> None:
        self.categories, self.threshold, self.mask_ap, self.root = list(categories), float(mask_threshold), mask_ap, root
        thing_ids = [int(c["id"]) for c in self.categories if c["isthing"]]
        self.label_to_category = [0] + thing_ids  # label l of the instance branch is thing_ids[l - 1]
        self.reset()

    def reset(self) -> None:
        self.items: list[tuple[dict[str, list], dict[str, Any] | None, list[dict], list[dict]]] = []

    def forward(self, model: nn.Module, batch: dict[str, Any], device: torch.device) -> list[dict[str, Any]]:
        if "panoptic" not in batch:
            raise DataError(self.root, "no panoptic ground truth", "evaluate on a COCO panoptic dataset (CocoPanoptic)")
        return model([im.to(device) for im in batch["images"]])

    def process(self, batch: dict[str, Any], outputs: list[dict[str, Any]]) -> None:
        from pixelwise.metrics.instance import detections_to_coco

        for i, (out, meta) in enumerate(zip(outputs, batch["meta"])):
            image_id = meta["image_id"]
            counts = pq_single_image(batch["panoptic"][i].numpy(), batch["segments"][i],
                                     out["panoptic"].cpu().numpy(), out["segments_info"], self.categories,
                                     image_id=image_id).state_dict()
            gt_image, anns, dets = None, [], []
            if self.mask_ap:
                h, w = out["panoptic"].shape[-2:]
                gt_image = {"id": image_id, "height": int(h), "width": int(w)}
                anns = _coco_gt_annotations(image_id, batch["instances"][i], 1)
                dets = detections_to_coco(image_id, out, self.label_to_category, self.threshold)
            self.items.append((counts, gt_image, anns, dets))

    def state(self) -> list[Any]:
        return list(self.items)

    def load_state(self, items: list[Any]) -> None:
        self.items = list(items)

    def evaluate(self) -> dict[str, Any]:
        stat = PQStat()
        gt_images: list[dict[str, Any]] = []
        gt_anns: list[dict[str, Any]] = []
        results: list[dict[str, Any]] = []
        for counts, gt_image, anns, dets in self.items:  # summed in dataset order, as pq_compute does
            stat += PQStat().load_state_dict(counts)
            if gt_image is not None:
                gt_images.append(gt_image)
                gt_anns.extend({**a, "id": len(gt_anns) + 1} for a in anns)  # ids 1..N over the split
                results.extend(dets)
        segm = None
        if self.mask_ap:
            from pixelwise.data.formats.coco import _have_mask_api
            from pixelwise.metrics.instance import coco_evaluate

            if _have_mask_api():
                gt = {"images": gt_images, "annotations": gt_anns,
                      "categories": [{"id": c["id"], "name": c["name"]} for c in self.categories if c["isthing"]]}
                segm = coco_evaluate(gt, results, "segm", img_ids=[im["id"] for im in gt_images])
        return {"panoptic": stat.results(self.categories), "stat": stat.state_dict(), "segm": segm,
                "num_images": len(self.items)}


@dataclass
class PanopticResult:
    """One image's panoptic segmentation: ``id_map`` (H, W) segment ids (0 = void) and
    ``segments`` (``id``, ``category_id``, ``isthing``, ``score`` for things)."""

    id_map: np.ndarray
    segments: list[dict[str, Any]]
    categories: Sequence[Mapping[str, Any]]

    def segments_info(self) -> list[dict[str, Any]]:
        return segments_info(self.id_map, self.segments)

    def overlay(self, image: np.ndarray, alpha: float = 0.5) -> np.ndarray:
        return draw_panoptic(image, self.id_map, self.segments, self.categories, alpha)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the COCO panoptic PNG (id = R + 256 G + 256^2 B) at ``path`` and its
        ``segments_info`` (plus the categories) at ``path`` with suffix ``.json``; both atomically."""
        path = Path(write_panoptic_png(Path(path), self.id_map))
        write_json(path.with_suffix(".json"), {"file_name": path.name, "segments_info": self.segments_info(),
                                               "categories": [dict(c) for c in self.categories]})
        return path


class PanopticTask(InstanceTask):
    """Panoptic FPN: the detection data pipeline and step of :class:`InstanceTask`, scored by PQ."""

    name: ClassVar[str] = "panoptic"
    best_metric: ClassVar[str] = "pq"
    best_key: ClassVar[str] = "best_pq"
    output_suffixes: ClassVar[tuple[str, ...]] = (".png", "_overlay.png")
    export_kind: ClassVar[str | None] = "detection+semantic"
    #: the model merges with its own ``merge_score_threshold``
    predict_options: ClassVar[frozenset[str]] = frozenset()

    # -- data ---------------------------------------------------------------------------
    def open(self, data: str, split: str, transforms: Any = None, image_mode: str = "RGB", **options: Any) -> Any:
        if not Path(data).exists():
            raise DataError(data, "dataset not found", "create one with `pixelwise data synth --out DIR`")
        return CocoPanoptic(data, split, transforms=transforms, image_mode=image_mode)

    def model_args(self, ds: Any) -> tuple[int, dict[str, Any]]:
        if not ds.thing_ids:
            raise DataError(ds.annotation_file, "no thing category (isthing 1): Panoptic FPN needs at least one",
                            "mark the countable categories isthing 1")
        return (len(ds.thing_ids) + len(ds.stuff_ids),
                {"thing_ids": list(ds.thing_ids), "stuff_ids": list(ds.stuff_ids)})

    def checkpoint_extras(self, ds: Any) -> dict[str, Any]:
        return {"categories": [dict(c) for c in ds.categories], "thing_ids": list(ds.thing_ids),
                "stuff_ids": list(ds.stuff_ids)}

    def check_data(self, ds: Any, ckpt: dict[str, Any], data: Any) -> None:
        have = [(int(c["id"]), bool(c["isthing"])) for c in ds.categories]
        want = [(int(c["id"]), bool(c["isthing"])) for c in ckpt["categories"]]
        if have != want:
            raise DataError(data, f"dataset categories (id, isthing) {have} differ from the checkpoint's {want}")

    def classes_of(self, ckpt: dict[str, Any]) -> list[dict[str, Any]]:
        return super().classes_of({"classes": ckpt["categories"]})  # segments name COCO panoptic categories

    # -- evaluation ---------------------------------------------------------------------
    def evaluator(self, ds: Any, ckpt_like: dict[str, Any], model: nn.Module, **options: Any) -> PanopticEvaluator:
        return PanopticEvaluator(ckpt_like["categories"], getattr(model, "mask_threshold", 0.5),
                                 options.get("mask_ap", True), getattr(ds, "annotation_file", "dataset"))

    def evaluation_files(self, checkpoint: Path, out: Path | None, split: str) -> dict[str, Any]:
        return {}

    def naming(self, ckpt: dict[str, Any]) -> dict[str, Any]:
        return {"categories": ckpt["categories"]}

    def record(self, metrics: dict[str, Any], ds: Any) -> dict[str, Any]:
        p = metrics["panoptic"]
        rec: dict[str, Any] = {}
        for group, suffix in (("All", ""), ("Things", "_th"), ("Stuff", "_st")):
            rec.update({f"{k}{suffix}": p[group][k] for k in ("pq", "sq", "rq")})
        names = {c["id"]: c["name"] for c in ds.categories}
        rec["pq_per_class"] = {names[int(cid)]: v["pq"] for cid, v in p["per_class"].items()}
        if metrics["segm"] is not None:
            rec.update({f"mask_{k}": v for k, v in metrics["segm"].items()})
        rec["seconds_per_image"] = metrics["seconds_per_image"]
        return rec

    def describe(self, r: dict[str, Any]) -> str:
        msg = f"PQ {r['pq']:.3f} (Th {r['pq_th']:.3f}, St {r['pq_st']:.3f})  SQ {r['sq']:.3f}  RQ {r['rq']:.3f}"
        if "mask_AP" in r:
            msg += f"  mask AP {r['mask_AP']:.3f} AP50 {r['mask_AP50']:.3f}"
        return msg

    def format(self, metrics: dict[str, Any]) -> str:
        return format_panoptic_metrics(metrics)

    def summary(self, result: dict[str, Any]) -> str:
        best, nan = result["best"], float("nan")
        return (f"best val PQ {best.get('pq', nan):.4f} (PQ^Th {best.get('pq_th', nan):.4f}, "
                f"PQ^St {best.get('pq_st', nan):.4f}) (epoch {best.get('epoch', -1) + 1})")

    def picture(self, model: nn.Module, ds: Any, index: int, device: torch.device) -> np.ndarray:
        image = uint8_image(ds.load(index)["image"])
        out = model([ds[index]["image"].to(device)])[0]
        return comparison_grid([[image, draw_panoptic(image, out["panoptic"].cpu().numpy(), out["segments_info"],
                                                      ds.categories)]])

    # -- prediction ---------------------------------------------------------------------
    def predict(self, model: nn.Module, image: np.ndarray, ckpt: dict[str, Any], device: torch.device,
                **options: Any) -> PanopticResult:
        pred = model([normalize_image(image, ckpt["normalization"]).to(device)])[0]
        return PanopticResult(pred["panoptic"].cpu().numpy(), list(pred["segments_info"]), ckpt["categories"])

    write_in_workers: ClassVar[bool] = False  # its annotations go into one JSON per run
    per_run_files: ClassVar[tuple[str, ...]] = (PREDICTIONS_JSON,)

    def begin_predict(self, files: Sequence[Path], out: Path, ckpt: dict[str, Any], **options: Any) -> dict[str, Any]:
        if options.get("skip_existing"):  # its one JSON for the whole folder would have to be merged
            raise PixelwiseError("--skip-existing is not supported for panoptic checkpoints")
        names = list(options.get("names") or [f.stem for f in files])
        seen: dict[str, Path] = {}
        for f, n in zip(files, names):
            if n in seen:
                raise DataError(f, f"has the same name as {seen[n]}: their predictions would overwrite each "
                                   "other", "predict them into different --out folders")
            seen[n] = f
        ids = _image_ids(files, options.get("gt_json")) or names
        return {"ids": dict(zip(names, ids)), "annotations": [], "images": [],
                "names": {n: f.name for f, n in zip(files, names)}}

    def write(self, result: PanopticResult, image: np.ndarray, out: Path, stem: str, ckpt: dict[str, Any],
              state: dict[str, Any], alpha: float = 0.5, *, outputs: Sequence[str] = ("labels", "overlay")) -> Path:
        path = write_panoptic_png(out / f"{stem}.png", result.id_map)
        if "overlay" in outputs:
            write_image(out / f"{stem}_overlay.png", result.overlay(image, alpha))
        image_id = state["ids"][stem]
        state["annotations"].append({"image_id": image_id, "file_name": f"{stem}.png",
                                     "segments_info": result.segments_info()})
        state["images"].append({"id": image_id, "file_name": state["names"][stem],
                                "height": int(result.id_map.shape[0]), "width": int(result.id_map.shape[1])})
        return Path(path)

    def gather_predict_state(self, state: dict[str, Any], gather: Any) -> dict[str, Any]:
        return {**state, "annotations": gather(state["annotations"]), "images": gather(state["images"])}

    def end_predict(self, out: Path, ckpt: dict[str, Any], state: dict[str, Any]) -> list[Path]:
        return [write_panoptic_predictions(out / PREDICTIONS_JSON, state["annotations"], ckpt["categories"],
                                           state["images"])]

    end_predict_files: ClassVar[int] = 1

    def predict_summary(self, images: int, out: Any, extra: Sequence[Path]) -> str:
        return (f"wrote {images} panoptic PNGs and overlays to {out} and their segments to {extra[0]}; "
                f"score them with: pixelwise evaluate panoptic --gt-json GT.json --gt-dir GT_DIR "
                f"--pred-json {extra[0]} --pred-dir {out}")

    def serve_layer(self, result: PanopticResult, ckpt: dict[str, Any]) -> dict[str, Any]:
        classes = self.classes_of(ckpt)
        ids = result.id_map.astype(np.int64)  # segment ids, 0 = void
        segments = result.segments
        colors = segment_colors(segments, classes)
        lut = np.zeros((max([int(ids.max(initial=0))] + [int(s["id"]) for s in segments]) + 1, 4), np.uint8)
        names = {c["id"]: c["name"] for c in classes}
        counts = np.bincount(ids.ravel(), minlength=len(lut))
        total = max(1, ids.size)
        legend: list[dict[str, Any]] = [{"id": 0, "name": "(void)", "color": None, "pixels": int(counts[0]),
                                         "share": float(counts[0]) / total}]
        for s, info, color in zip(segments, segments_info(ids, segments), colors):
            lut[info["id"]] = (*color, 255)
            row = {"id": info["id"], "name": names.get(info["category_id"], str(info["category_id"])),
                   "category_id": info["category_id"], "isthing": bool(info["isthing"]), "color": list(color),
                   "pixels": int(counts[info["id"]]), "share": float(counts[info["id"]]) / total}
            if "score" in s:
                row["score"] = float(s["score"])
            legend.append(row)
        return {"labels": ids, "layer": lut[ids], "legend": legend}

    # -- report -------------------------------------------------------------------------
    def report(self, ctx: ReportContext, model: nn.Module, ds: Any, metrics: dict[str, Any]) -> ReportSections:
        """PQ / SQ / RQ (All, Things, Stuff) over the split (SPEC §8), per-class PQ, and every
        segment in its own colour with its class and segment id."""
        from pixelwise.viz import save_per_class_bars

        m, cats = metrics, list(ctx.ckpt["categories"])
        p = m["panoptic"]
        names = [c["name"] for c in cats]
        per_class = [p["per_class"].get(c["id"], p["per_class"].get(str(c["id"]), {})).get("pq") for c in cats]
        save_per_class_bars(ctx.run_dir / "per_class_pq.png", per_class,
                            [f"{n} ({'thing' if c['isthing'] else 'stuff'})" for n, c in zip(names, cats)],
                            title=f"per-class PQ on {ctx.split} (PQ {p['All']['pq']:.4f})", xlabel="PQ")
        rows = []
        with torch.inference_mode():
            for i in range(min(ctx.max_images, len(ds))):
                raw = ds.load(i)
                big = fit_panel(uint8_image(raw["image"]))
                out = model([ds[i]["image"].to(ctx.device)])[0]
                truth = draw_panoptic(big, fit_ids(raw["panoptic"].numpy(), big.shape[:2]), raw["segments"], cats)
                pred = draw_panoptic(big, fit_ids(out["panoptic"].cpu().numpy(), big.shape[:2]), out["segments_info"],
                                     cats)
                rows.append([big, truth, pred])
        figures = [("per_class_pq.png", f"per-class panoptic quality on {ctx.split}")]
        summary = []
        for group, suffix in (("All", ""), ("Things", "_th"), ("Stuff", "_st")):
            summary += [(f"{k}{suffix}", f"{k.upper()} {group.lower()}", p[group][k]) for k in ("pq", "sq", "rq")]
        if m.get("segm"):
            summary += [(f"mask_{k}", f"things mask {k}", m["segm"][k]) for k in ("AP", "AP50")]
        evaluation = {k: v for k, v in m.items() if k != "stat"}
        evaluation["categories"] = cats
        return ReportSections(summary, figures, ("pq", "pq_th", "pq_st"),
                              [(n, tuple(c["color"])) for n, c in zip(names, cats)], evaluation, rows,
                              "image | ground-truth segments | predicted segments (each in its own colour; things "
                              "labelled with class and segment id)")
