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

The checkpoint is evaluated once through the engine's one evaluation driver; the task
(:meth:`pixelwise.tasks.base.Task.report`) draws its sections; everything else (curves, grid,
HTML) is shared.
:func:`write_eval_plots` draws the confusion matrix and per-class IoU of a
``pixelwise evaluate`` result.
"""
from __future__ import annotations

import base64
import html
import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from pixelwise.data.io import atomic_write_text, write_image
from pixelwise.errors import DataError, PixelwiseError
from pixelwise.tasks import Task, task_of_checkpoint
from pixelwise.tasks.base import ReportContext, ReportSections
from pixelwise.tasks.instance import per_class_mask_ap  # noqa: F401  (re-exported)

__all__ = ["write_report", "write_eval_plots", "read_history", "per_class_mask_ap"]



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
    task = task_of_checkpoint(ckpt)
    bs = int(batch_size or config.get("batch_size") or 1)
    ctx = ReportContext(ckpt, ckpt_path, data, split, run_dir, max(0, int(max_images)), resolve_device(device),
                        max(1, bs))
    report = _task_sections(task, ctx)

    history = read_history(run_dir)
    figures = list(report.figures)
    keys = [k for k in ("train_loss", "lr", *report.curve_keys) if any(h.get(k) is not None for h in history)]
    if keys:
        save_curves(run_dir / "curves.png", history, keys)
        figures.insert(0, ("curves.png", "training loss, learning rate and validation metrics per epoch "
                                         "(metrics.jsonl)"))
    evaluation = {"checkpoint": str(ckpt_path), "epoch": ckpt.get("epoch"), "data": data, "split": split,
                  "task": task.name, **report.evaluation}
    write_json(run_dir / "report_metrics.json", evaluation)
    page = _html(run_dir, ckpt, ckpt_path, task.name, data, split, report, figures, history, config)
    out = run_dir / "report.html"
    atomic_write_text(out, page)
    return out


def _task_sections(task: Task, ctx: ReportContext) -> ReportSections:
    """Evaluate the checkpoint once on the split (the one evaluation driver) and let the task
    draw its sections; the grid of its picture rows is saved here."""
    from pixelwise.data.loading import make_loader
    from pixelwise.data.transforms import build_transforms
    from pixelwise.engine.checkpoint import model_from_checkpoint
    from pixelwise.engine.evaluate import run_evaluation

    model = model_from_checkpoint(ctx.ckpt, ctx.ckpt_path).to(ctx.device).eval()
    if not Path(ctx.data).exists():
        raise DataError(ctx.data, "dataset not found", "pass --data DIR")
    norm = ctx.ckpt["normalization"]
    ds = task.open(ctx.data, ctx.split, build_transforms(train=False, mean=norm["mean"], std=norm["std"]),
                   ctx.image_mode, quiet=True, **task.data_options(ctx.ckpt.get("config") or {}))
    task.check_data(ds, ctx.ckpt, ctx.data)
    loader = make_loader(ds, ctx.batch_size, shuffle=False, num_workers=0, collate_fn=task.collate())
    evaluator = task.evaluator(ds, ctx.ckpt, model, **task.evaluation_files(ctx.ckpt_path, None, ctx.split))
    metrics = run_evaluation(model, loader, evaluator, ctx.device)
    sections = task.report(ctx, model, ds, metrics)
    sections.figures += _save_grid(ctx, sections.rows, ("image", "ground truth", "prediction"),
                                   sections.grid_caption)
    return sections


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
# pictures
# ---------------------------------------------------------------------------------------


def _save_grid(ctx: ReportContext, rows: list[list[np.ndarray]], titles: Sequence[str], caption: str
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
          report: ReportSections, figures: list[tuple[str, str]], history: list[dict[str, Any]],
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
