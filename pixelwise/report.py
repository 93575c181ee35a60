"""Run reports: ``RUN/report.html`` and the pictures behind it.

:func:`write_report` reads a run folder (``metrics.jsonl``, ``config.json``, ``best.pt`` or
else ``last.pt``), evaluates the checkpoint once on a split of the data it was trained on
and writes, next to the checkpoints:

============================  ==============================================================
``curves.png``                training loss, learning rate and the validation metric per epoch
``confusion_matrix.png``      semantic: confusion matrix normalised per ground-truth row,
                              with class names
``per_class_iou.png``         semantic: per-class IoU bars
``per_class_ap.png``          instance: per-class mask AP bars (COCOeval on each category)
``per_class_pq.png``          panoptic: per-class PQ bars
``val_grid.png``              image | ground truth | prediction for ``max_images`` images
                              (instance: each instance in its own colour with class (+ score);
                              panoptic: each segment in its own colour with class and id)
``report_metrics.json``       every number of that evaluation
``coco_results_{split}.json`` instance: the detections (COCO results, RLE)
``report.html``               one self-contained page (the PNGs inlined as base64, no
                              external resource): the final metrics, the per-epoch table of
                              ``metrics.jsonl``, the pictures, the class legend and the
                              resolved config
============================  ==============================================================

Each task is one small function (:data:`TASK_REPORTS`: ``"semantic"``, ``"instance"``,
``"panoptic"``) that evaluates and draws; everything else (curves, HTML) is shared.
:func:`write_eval_plots` draws the confusion matrix and per-class IoU of a
``pixelwise evaluate`` result.
"""
from __future__ import annotations

import base64
import html
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from pixelwise.data.io import atomic_write_text, write_image
from pixelwise.engine.common import uint8_image
from pixelwise.errors import DataError, PixelwiseError

__all__ = ["write_report", "write_eval_plots", "read_history", "per_class_mask_ap", "TaskReport", "TASK_REPORTS"]

GRID_SIDE = 256
"""Longest side of one panel of ``val_grid.png`` (larger images are scaled down)."""

SCORE_THRESHOLD = 0.5
"""Instances drawn in the grid: score at least this (as ``pixelwise predict``)."""


@dataclass
class TaskReport:
    """What a task's report function returns.

    Attributes:
        summary: ``(key, label, value)`` rows of the final-metrics table.
        figures: ``(file name in the run folder, caption)`` of the pictures it wrote.
        curve_keys: ``metrics.jsonl`` keys plotted per epoch besides the loss.
        legend: ``(class name, colour)`` pairs.
        evaluation: the whole evaluation (written to ``report_metrics.json``).
    """

    summary: list[tuple[str, str, float | None]]
    figures: list[tuple[str, str]]
    curve_keys: tuple[str, ...]
    legend: list[tuple[str, tuple[int, int, int]]] = field(default_factory=list)
    evaluation: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Context:
    """Everything a task's report function needs."""

    ckpt: dict[str, Any]
    ckpt_path: Path
    data: str
    split: str
    run_dir: Path
    max_images: int
    device: torch.device
    batch_size: int

    @property
    def class_names(self) -> list[str]:
        return [c["name"] for c in self.ckpt["classes"]]

    @property
    def class_colors(self) -> list[tuple[int, int, int]]:
        from pixelwise.data.classes import palette

        fallback = palette(len(self.ckpt["classes"]))
        return [tuple(int(v) for v in c.get("color", fallback[i]))[:3] for i, c in enumerate(self.ckpt["classes"])]

    def eval_transforms(self):
        from pixelwise.data.transforms import build_transforms

        norm = self.ckpt["normalization"]
        return build_transforms(train=False, mean=norm["mean"], std=norm["std"])

    @property
    def image_mode(self) -> str:
        return self.ckpt["normalization"].get("image_mode", "RGB")


# ---------------------------------------------------------------------------------------
# the run folder
# ---------------------------------------------------------------------------------------


def read_history(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of ``RUN/metrics.jsonl`` (one per epoch; empty when there is none)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    records = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except ValueError as e:
                raise DataError(path, f"line {n} is not JSON ({e})") from None
    return records


def _pick_checkpoint(run_dir: Path) -> Path:
    for name in ("best.pt", "last.pt"):
        if (run_dir / name).is_file():
            return run_dir / name
    if not run_dir.is_dir():
        raise PixelwiseError(f"{run_dir}: run folder not found")
    raise PixelwiseError(f"{run_dir}: no best.pt or last.pt in the run folder (has training written a checkpoint?)")


def write_report(run_dir: str | os.PathLike, data: str | os.PathLike | None = None, split: str | None = None,
                 max_images: int = 8, device: str = "auto", batch_size: int | None = None) -> Path:
    """Evaluate the run's ``best.pt`` (else ``last.pt``) once on ``split`` of ``data``
    (defaults: the ``val_split`` and ``data`` of the run's config) and write the pictures and ``report.html``
    into ``run_dir`` (see the module docstring). Returns the path of ``report.html``.
    Needs matplotlib (the ``extra`` dependencies)."""
    from pixelwise.engine.checkpoint import load_checkpoint
    from pixelwise.engine.common import resolve_device, write_json
    from pixelwise.viz import save_curves

    run_dir = Path(run_dir)
    ckpt_path = _pick_checkpoint(run_dir)
    ckpt = load_checkpoint(ckpt_path)
    config_file = run_dir / "config.json"
    config = (json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file()
              else dict(ckpt.get("config") or {}))
    data = str(data) if data is not None else str(config.get("data") or "")
    if not data:
        raise PixelwiseError(f"{run_dir}: the run's config names no dataset; pass --data DIR")
    split = split or str(config.get("val_split") or "val")
    task = ckpt.get("task", "semantic")
    if task not in TASK_REPORTS:
        raise PixelwiseError(f"{ckpt_path}: no report for task {task!r} (known: {', '.join(TASK_REPORTS)})")
    bs = int(batch_size or config.get("batch_size") or 1)
    ctx = _Context(ckpt, ckpt_path, data, split, run_dir, max(0, int(max_images)), resolve_device(device), max(1, bs))
    report = TASK_REPORTS[task](ctx)

    history = read_history(run_dir)
    figures = list(report.figures)
    keys = [k for k in ("train_loss", "lr", *report.curve_keys) if any(h.get(k) is not None for h in history)]
    if keys:
        save_curves(run_dir / "curves.png", history, keys)
        figures.insert(0, ("curves.png", "training loss, learning rate and validation metrics per epoch "
                                         "(metrics.jsonl)"))
    evaluation = {"checkpoint": str(ckpt_path), "epoch": ckpt.get("epoch"), "data": data, "split": split,
                  "task": task, **report.evaluation}
    write_json(run_dir / "report_metrics.json", evaluation)
    page = _html(run_dir, ckpt, ckpt_path, task, data, split, report, figures, history, config)
    out = run_dir / "report.html"
    atomic_write_text(out, page)
    return out


def write_eval_plots(metrics: dict[str, Any], out: str | os.PathLike) -> list[Path]:
    """For a semantic ``pixelwise evaluate --out F`` result: ``F_confusion_matrix.png``
    (row-normalised, class names) and ``F_per_class_iou.png`` next to ``F``. Other tasks:
    nothing (returns [])."""
    from pixelwise.viz import save_confusion_matrix, save_per_class_bars

    if "confusion" not in metrics or "iou" not in metrics:
        return []
    out = Path(out)
    names = metrics.get("class_names") or [str(i) for i in range(len(metrics["iou"]))]
    return [save_confusion_matrix(out.with_name(f"{out.stem}_confusion_matrix.png"), metrics["confusion"], names),
            save_per_class_bars(out.with_name(f"{out.stem}_per_class_iou.png"), metrics["iou"], names,
                                title=f"per-class IoU (mIoU {_fmt(metrics.get('miou'))})")]


# ---------------------------------------------------------------------------------------
# one function per task
# ---------------------------------------------------------------------------------------


def _semantic_report(ctx: _Context) -> TaskReport:
    """Confusion matrix over the split (FCN §5 metrics), per-class IoU, image | truth | prediction."""
    from pixelwise.engine.checkpoint import model_from_checkpoint
    from pixelwise.engine.common import make_loader, open_dataset
    from pixelwise.engine.evaluate import evaluate_model, predict_labels
    from pixelwise.viz import colorize, save_confusion_matrix, save_per_class_bars

    names, colors = ctx.class_names, ctx.class_colors
    model = model_from_checkpoint(ctx.ckpt, ctx.ckpt_path).to(ctx.device).eval()
    ds = open_dataset(ctx.data, ctx.split, ctx.eval_transforms(), image_mode=ctx.image_mode)
    if len(ds.classes) != len(names):
        raise DataError(ctx.data, f"dataset has {len(ds.classes)} classes but the checkpoint was trained on "
                                  f"{len(names)} ({', '.join(names)})")
    loader = make_loader(ds, ctx.batch_size, shuffle=False, num_workers=0)
    m = evaluate_model(model, loader, len(names), ctx.device)
    save_confusion_matrix(ctx.run_dir / "confusion_matrix.png", m["confusion"], names)
    save_per_class_bars(ctx.run_dir / "per_class_iou.png", m["iou"], names,
                        title=f"per-class IoU on {ctx.split} (mIoU {_fmt(m['miou'])})")
    rows = []
    for i in range(min(ctx.max_images, len(ds))):
        raw = ds.load(i)
        pred = predict_labels(model, ds[i]["image"][None].to(ctx.device))[0].cpu().numpy()
        rows.append([_fit(uint8_image(raw["image"])), _fit(colorize(raw["semantic"].numpy(), colors), nearest=True),
                     _fit(colorize(pred, colors), nearest=True)])
    figures = [("confusion_matrix.png", f"confusion matrix on {ctx.split}, each ground-truth row normalised to 1"),
               ("per_class_iou.png", f"per-class IoU on {ctx.split}")]
    figures += _save_grid(ctx, rows, ("image", "ground truth", "prediction"),
                          "image | ground truth | prediction (class colours as in the legend; void in beige)")
    labels = (("miou", "mean IoU"), ("pixel_accuracy", "pixel accuracy"), ("mean_accuracy", "mean accuracy"),
              ("fwiou", "frequency-weighted IoU"), ("mean_dice", "mean Dice"))
    summary = [(k, label, m[k]) for k, label in labels]
    return TaskReport(summary, figures, ("miou", "pixel_accuracy"), list(zip(names, colors)),
                      {**m, "class_names": names})


def _instance_report(ctx: _Context) -> TaskReport:
    """COCO mask and box AP over the split, per-class mask AP, instances with class and score."""
    from torch.utils.data import DataLoader

    from pixelwise.data.formats.coco import CocoInstances
    from pixelwise.engine.checkpoint import model_from_checkpoint
    from pixelwise.engine.instance import draw_instances, evaluate_instance_model, instance_collate, instance_colors
    from pixelwise.viz import draw_labelled_masks, save_per_class_bars

    names = ctx.class_names
    model = model_from_checkpoint(ctx.ckpt, ctx.ckpt_path).to(ctx.device).eval()
    if not Path(ctx.data).exists():
        raise DataError(ctx.data, "dataset not found", "pass --data (a COCO JSON or a folder with annotations/)")
    ds = CocoInstances(ctx.data, ctx.split, transforms=ctx.eval_transforms(), image_mode=ctx.image_mode)
    if [c.name for c in ds.classes] != names:
        raise DataError(ctx.data, f"dataset classes {[c.name for c in ds.classes]} differ from the checkpoint's "
                                  f"{names}")
    loader = DataLoader(ds, batch_size=ctx.batch_size, shuffle=False, num_workers=0, collate_fn=instance_collate)
    results_path = ctx.run_dir / f"coco_results_{ctx.split}.json"
    category_ids = list(ctx.ckpt["category_ids"])
    m = evaluate_instance_model(model, loader, category_ids, ds.annotation_file, ctx.device, results_path)

    gt = json.loads(Path(ds.annotation_file).read_text(encoding="utf-8"))
    dets = json.loads(results_path.read_text(encoding="utf-8"))
    per_class = per_class_mask_ap(gt, dets, category_ids[1:], ds.ids)
    save_per_class_bars(ctx.run_dir / "per_class_ap.png", per_class, names[1:],
                        title=f"per-class mask AP on {ctx.split} (mask AP {_fmt(m['segm']['AP'])})", xlabel="mask AP")

    thr = float(getattr(model, "mask_threshold", 0.5))
    rows = []
    with torch.inference_mode():
        for i in range(min(ctx.max_images, len(ds))):
            raw = ds.load(i)
            img = uint8_image(raw["image"])
            s = _scale_for(*img.shape[:2])
            big = _fit(img)  # drawn at display size, so that the text stays small
            inst = raw["instances"]
            crowd = inst["iscrowd"].tolist() if "iscrowd" in inst else [False] * len(inst["labels"])
            texts = [f"{names[lab]}{' (crowd)' if c else ''}" for lab, c in zip(inst["labels"].tolist(), crowd)]
            truth = draw_labelled_masks(big, _fit_masks(inst["masks"].numpy().astype(bool), big.shape[:2]), texts,
                                        instance_colors(len(texts)))
            out = model([ds[i]["image"].to(ctx.device)])[0]
            keep = out["scores"] >= SCORE_THRESHOLD
            out = {k: v[keep].cpu() for k, v in out.items()}
            pred = draw_instances(big, _fit_masks((out["masks"][:, 0] >= thr).numpy(), big.shape[:2]),
                                  out["boxes"].numpy() * s, out["labels"].tolist(), out["scores"].tolist(), names)
            rows.append([big, truth, pred])
    figures = [("per_class_ap.png", f"per-class mask AP on {ctx.split} (COCOeval on each category alone)")]
    figures += _save_grid(ctx, rows, ("image", "ground truth", "prediction"),
                          f"image | ground-truth instances | predicted instances with score >= {SCORE_THRESHOLD}")
    summary = [(f"mask_{k}", f"mask {k}", m["segm"][k]) for k in ("AP", "AP50", "AP75", "AR100")]
    summary += [(f"box_{k}", f"box {k}", m["bbox"][k]) for k in ("AP", "AP50", "AP75")]
    evaluation = {**m, "per_class_mask_AP": dict(zip(names[1:], per_class)), "results_json": str(results_path),
                  "class_names": names}
    return TaskReport(summary, figures, ("mask_AP", "mask_AP50", "box_AP"), list(zip(names, ctx.class_colors)),
                      evaluation)


def per_class_mask_ap(gt: dict[str, Any], detections: list[dict[str, Any]], category_ids: Sequence[int],
                      img_ids: Sequence[Any] | None = None, iou_type: str = "segm") -> list[float | None]:
    """COCO AP of each category alone (COCOeval on that category's ground truth and
    detections), in the order of ``category_ids``; None for a category without ground truth."""
    from pixelwise.metrics.instance import coco_evaluate

    out: list[float | None] = []
    for cid in category_ids:
        anns = [a for a in gt.get("annotations", []) if a.get("category_id") == cid]
        if not anns:
            out.append(None)
            continue
        ap = coco_evaluate({**gt, "annotations": anns}, [d for d in detections if d.get("category_id") == cid],
                           iou_type, img_ids=img_ids)["AP"]
        out.append(None if ap < 0 else ap)
    return out


def _panoptic_report(ctx: _Context) -> TaskReport:
    """PQ / SQ / RQ (All, Things, Stuff) over the split (SPEC §8), per-class PQ, and every
    segment in its own colour with its class and segment id."""
    from torch.utils.data import DataLoader

    from pixelwise.data.formats.coco_panoptic import CocoPanoptic
    from pixelwise.engine.checkpoint import model_from_checkpoint
    from pixelwise.engine.instance import instance_collate
    from pixelwise.engine.panoptic import draw_panoptic, evaluate_panoptic_model
    from pixelwise.viz import save_per_class_bars

    cats = list(ctx.ckpt["categories"])
    model = model_from_checkpoint(ctx.ckpt, ctx.ckpt_path).to(ctx.device).eval()
    if not Path(ctx.data).exists():
        raise DataError(ctx.data, "dataset not found",
                        "pass --data (a COCO panoptic JSON or a folder with annotations/)")
    ds = CocoPanoptic(ctx.data, ctx.split, transforms=ctx.eval_transforms(), image_mode=ctx.image_mode)
    have = [(int(c["id"]), bool(c["isthing"])) for c in ds.categories]
    want = [(int(c["id"]), bool(c["isthing"])) for c in cats]
    if have != want:
        raise DataError(ctx.data, f"dataset categories (id, isthing) {have} differ from the checkpoint's {want}")
    loader = DataLoader(ds, batch_size=ctx.batch_size, shuffle=False, num_workers=0, collate_fn=instance_collate)
    m = evaluate_panoptic_model(model, loader, cats, ctx.device)
    p = m["panoptic"]
    names = [c["name"] for c in cats]
    per_class = [p["per_class"].get(c["id"], p["per_class"].get(str(c["id"]), {})).get("pq") for c in cats]
    save_per_class_bars(ctx.run_dir / "per_class_pq.png", per_class,
                        [f"{n} ({'thing' if c['isthing'] else 'stuff'})" for n, c in zip(names, cats)],
                        title=f"per-class PQ on {ctx.split} (PQ {_fmt(p['All']['pq'])})", xlabel="PQ")
    rows = []
    with torch.inference_mode():
        for i in range(min(ctx.max_images, len(ds))):
            raw = ds.load(i)
            img = uint8_image(raw["image"])
            big = _fit(img)
            out = model([ds[i]["image"].to(ctx.device)])[0]
            truth = draw_panoptic(big, _fit_ids(raw["panoptic"].numpy(), big.shape[:2]), raw["segments"], cats)
            pred = draw_panoptic(big, _fit_ids(out["panoptic"].cpu().numpy(), big.shape[:2]), out["segments_info"],
                                 cats)
            rows.append([big, truth, pred])
    figures = [("per_class_pq.png", f"per-class panoptic quality on {ctx.split}")]
    figures += _save_grid(ctx, rows, ("image", "ground truth", "prediction"),
                          "image | ground-truth segments | predicted segments (each in its own colour; things "
                          "labelled with class and segment id)")
    summary = []
    for group, suffix in (("All", ""), ("Things", "_th"), ("Stuff", "_st")):
        summary += [(f"{k}{suffix}", f"{k.upper()} {group.lower()}", p[group][k]) for k in ("pq", "sq", "rq")]
    if m.get("segm"):
        summary += [(f"mask_{k}", f"things mask {k}", m["segm"][k]) for k in ("AP", "AP50")]
    evaluation = {k: v for k, v in m.items() if k != "stat"}
    evaluation["categories"] = cats
    return TaskReport(summary, figures, ("pq", "pq_th", "pq_st"), [(n, tuple(c["color"])) for n, c in zip(names, cats)],
                      evaluation)


TASK_REPORTS: dict[str, Callable[[_Context], TaskReport]] = {
    "semantic": _semantic_report,
    "instance": _instance_report,
    "panoptic": _panoptic_report,
}
"""Checkpoint task -> the function that evaluates and draws its part of the report."""


# ---------------------------------------------------------------------------------------
# pictures
# ---------------------------------------------------------------------------------------


def _scale_for(h: int, w: int, side: int = GRID_SIDE) -> float:
    """The factor that brings an image's longest side to at most ``side``; images under
    ``side / 2`` are enlarged by a whole factor (pixel replication) to stay legible."""
    n = max(h, w, 1)
    if n > side:
        return side / n
    return float(side // n) if n < side // 2 else 1.0


def _fit(panel: np.ndarray, side: int = GRID_SIDE, nearest: bool = False) -> np.ndarray:
    """A (H, W, 3) uint8 panel scaled by :func:`_scale_for` (nearest for label colours)."""
    from PIL import Image

    h, w = panel.shape[:2]
    s = _scale_for(h, w, side)
    if s == 1.0:
        return panel
    if s > 1:
        k = int(s)
        return np.repeat(np.repeat(panel, k, axis=0), k, axis=1)
    size = (max(1, round(w * s)), max(1, round(h * s)))
    return np.asarray(Image.fromarray(panel).resize(size, Image.NEAREST if nearest else Image.BILINEAR))


def _fit_masks(masks: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """(K, H, W) bool masks resized (nearest) to ``hw``."""
    if masks.shape[1:] == tuple(hw) or len(masks) == 0:
        return masks.reshape(len(masks), *hw) if len(masks) == 0 else masks
    t = torch.from_numpy(masks.astype(np.uint8))[None].float()
    return torch.nn.functional.interpolate(t, size=hw, mode="nearest")[0].numpy() > 0.5


def _fit_ids(id_map: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """An (H, W) id map resized (nearest) to ``hw``."""
    if id_map.shape == tuple(hw):
        return id_map
    t = torch.from_numpy(id_map.astype(np.float64))[None, None]
    return torch.nn.functional.interpolate(t, size=hw, mode="nearest")[0, 0].numpy().astype(id_map.dtype)


def _save_grid(ctx: _Context, rows: list[list[np.ndarray]], titles: Sequence[str], caption: str
               ) -> list[tuple[str, str]]:
    from pixelwise.viz import titled_grid

    if not rows:
        return []
    write_image(ctx.run_dir / "val_grid.png", titled_grid(rows, titles))
    return [("val_grid.png", f"{caption}; {len(rows)} {ctx.split} images")]


# ---------------------------------------------------------------------------------------
# the page
# ---------------------------------------------------------------------------------------


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else ""
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"
    return html.escape(str(v))


def _cell(key: str, v: Any, shown: str | None = None, **attrs: Any) -> str:
    """A table cell with the exact value in ``data-value`` (JSON) beside the rounded text."""
    extra = "".join(f' data-{k}="{html.escape(str(a))}"' for k, a in attrs.items())
    exact = html.escape(json.dumps(v if not (isinstance(v, float) and not math.isfinite(v)) else None))
    return f'<td data-key="{html.escape(key)}"{extra} data-value="{exact}">{_fmt(v) if shown is None else shown}</td>'


def _epoch1(record: dict[str, Any]) -> str:
    """Epochs are counted from 0 in metrics.jsonl and from 1 on screen (as the CLI prints them)."""
    e = record.get("epoch")
    return str(e + 1) if isinstance(e, int) else _fmt(e)


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1100px;
color:#222;padding:0 1em}
h1{font-size:1.5em;margin-bottom:.2em}h2{font-size:1.15em;margin-top:1.8em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.85em}td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}
th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}
figure{margin:1em 0}figure img{max-width:100%;border:1px solid #eee}figcaption{font-size:.85em;color:#555}
.meta td{text-align:left}.swatch{display:inline-block;width:1em;height:1em;vertical-align:middle;
border:1px solid #999;margin-right:.4em}pre{background:#f7f7f7;padding:1em;overflow:auto;font-size:.85em}
.scroll{overflow-x:auto}
"""


def _html(run_dir: Path, ckpt: dict[str, Any], ckpt_path: Path, task: str, data: str, split: str,
          report: TaskReport, figures: list[tuple[str, str]], history: list[dict[str, Any]],
          config: dict[str, Any]) -> str:
    import yaml

    import pixelwise

    esc = html.escape
    spec = ckpt.get("model", {})
    meta = [("model", f"{spec.get('name')} ({task}), {spec.get('num_classes')} classes"),
            ("model options", json.dumps(spec.get("kwargs", {}))),
            ("checkpoint", f"{ckpt_path.name} (epoch {int(ckpt.get('epoch', -1)) + 1}, step {ckpt.get('step', '?')})"),
            ("evaluated on", f"{data} (split {split})"),
            ("epochs logged", str(len(history))),
            ("training time", f"{history[-1]['time']:.0f} s" if history and "time" in history[-1] else "n/a"),
            ("pixelwise", str(ckpt.get("version", pixelwise.__version__)))]
    parts = [f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
             f"<title>pixelwise report: {esc(run_dir.name)}</title><style>{_CSS}</style></head><body>",
             f"<h1>pixelwise run report: {esc(str(run_dir))}</h1>",
             '<table class="meta">' + "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in meta)
             + "</table>",
             f"<h2>Final metrics ({esc(ckpt_path.name)} on {esc(split)})</h2>",
             '<table id="final-metrics"><tr><th>metric</th><th>value</th></tr>'
             + "".join(f"<tr><td>{esc(label)}</td>{_cell(key, v)}</tr>" for key, label, v in report.summary)
             + "</table>"]
    for name, caption in figures:
        png = (run_dir / name).read_bytes()
        parts.append(f"<h2>{esc(caption.split(' (')[0].split(';')[0])}</h2><figure>"
                     f'<img src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}" alt="{esc(name)}">'
                     f"<figcaption>{esc(name)}: {esc(caption)}</figcaption></figure>")
    if report.legend:
        parts.append("<h2>Classes</h2><p>" + " &nbsp; ".join(
            f'<span class="swatch" style="background:rgb{tuple(c)}"></span>{esc(n)}' for n, c in report.legend)
            + "</p>")
    keys: list[str] = []
    for h in history:
        keys += [k for k, v in h.items() if k not in keys and k != "epoch" and not isinstance(v, (list, dict))]
    if history:
        rows = "".join("<tr>" + _cell("epoch", h.get("epoch"), epoch=h.get("epoch"), shown=_epoch1(h))
                       + "".join(_cell(k, h.get(k), shown=None if k in h else "", epoch=h.get("epoch")) for k in keys)
                       + "</tr>" for h in history)
        parts.append("<h2>Per epoch (metrics.jsonl)</h2><div class=\"scroll\"><table id=\"history\"><tr><th>epoch</th>"
                     + "".join(f"<th>{esc(k)}</th>" for k in keys) + f"</tr>{rows}</table></div>")
    parts.append("<h2>Resolved config</h2><pre id=\"config\">"
                 + esc(yaml.safe_dump(config, sort_keys=False, default_flow_style=None)) + "</pre>")
    parts.append("</body></html>\n")
    return "\n".join(parts)
