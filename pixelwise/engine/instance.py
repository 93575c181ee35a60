"""Train / evaluate / predict for instance models (Mask R-CNN) on COCO-format datasets.

The semantic engine dispatches here when the model's task is ``"instance"`` (training) or the
checkpoint's is (evaluation, prediction). Conventions are those of the semantic loop: one
:class:`~pixelwise.engine.config.TrainConfig`, a tqdm progress bar, ``metrics.jsonl`` (one
JSON line per epoch), atomic ``last.pt`` / ``best.pt`` checkpoints in the same format plus
``task: "instance"`` and ``category_ids`` (label i of the model is COCO category
``category_ids[i]``; 0 = background), exact resume.

Data: ``--data`` is a COCO instance JSON or a folder holding ``annotations/instances_{split}.json``
(``pixelwise data synth`` writes one per split) - see :mod:`pixelwise.data.formats.coco`.
Crowd regions are left out of the training targets and kept in the evaluation's ground truth.

Evaluation writes the COCO results JSON (RLE masks) and reports mask AP and box AP
(:func:`pixelwise.metrics.instance.coco_evaluate`, faster-coco-eval). Prediction draws each
instance in its own colour with its class name and score.

The training loop (:func:`train_detection`) serves every model of torchvision's detection
convention (training returns a loss dict): a :class:`DetectionTask` says how to open the
data, build the model, evaluate, and what goes into the checkpoint. :data:`INSTANCE_TASK`
is Mask R-CNN's; :mod:`pixelwise.engine.panoptic` defines Panoptic FPN's.
"""
from __future__ import annotations

import colorsys
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from pixelwise.data.formats.coco import CocoInstances
from pixelwise.data.transforms import build_transforms
from pixelwise.engine.checkpoint import (
    load_checkpoint, model_from_checkpoint, resume_run, rng_state, save_epoch,
)
from pixelwise.engine.common import RepeatDataset, resolve_device, write_json
from pixelwise.engine.config import TrainConfig
from pixelwise.errors import DataError, PixelwiseError
from pixelwise.metrics.instance import coco_evaluate, detections_to_coco, format_coco_metrics, write_coco_results
from pixelwise.models.registry import build_model

__all__ = [
    "DetectionTask",
    "INSTANCE_TASK",
    "train_detection",
    "train_instance",
    "evaluate_instance_model",
    "evaluate_instance_checkpoint",
    "format_instance_metrics",
    "predict_instance_files",
    "draw_instances",
    "instance_collate",
    "instance_colors",
]


def instance_collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Images stay a list (sizes may differ; the model batches them); targets are
    torchvision-style dicts without crowd regions, plus the ``semantic`` map when samples
    have one (Panoptic FPN). Panoptic ground truth (``panoptic``, ``segments``) and the
    full ``instances`` (crowd included) are kept as lists for evaluation."""
    images, targets, meta = [], [], []
    extra: dict[str, list] = {k: [] for k in ("instances", "panoptic", "segments") if k in samples[0]}
    for s in samples:
        images.append(s["image"])
        inst = s["instances"]
        keep = ~inst["iscrowd"] if "iscrowd" in inst else torch.ones(len(inst["labels"]), dtype=torch.bool)
        t = {"boxes": inst["boxes"][keep].float(), "labels": inst["labels"][keep].long(),
             "masks": inst["masks"][keep].to(torch.uint8)}
        if "semantic" in s:
            t["semantic"] = s["semantic"].long()
        targets.append(t)
        meta.append(s["meta"])
        for k, v in extra.items():
            v.append(s[k])
    return {"images": images, "targets": targets, "meta": meta, **extra}


def _loader(ds, batch_size: int, shuffle: bool, num_workers: int | None, seed: int = 0,
            drop_last: bool = False) -> DataLoader:
    """``num_workers=None``: auto (:func:`pixelwise.inference.default_num_workers`)."""
    from pixelwise.inference import resolve_num_workers

    if len(ds) == 0:
        raise DataError(getattr(ds, "annotation_file", "dataset"), "the split has no images")
    g = torch.Generator()
    g.manual_seed(seed)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, num_workers=resolve_num_workers(num_workers),
                      collate_fn=instance_collate, generator=g, drop_last=drop_last and len(ds) > batch_size)


def _open(data: str, split: str, transforms, image_mode: str, skip_empty: bool = False) -> CocoInstances:
    if not Path(data).exists():
        raise DataError(data, "dataset not found", "create one with `pixelwise data synth --out DIR`")
    return CocoInstances(data, split, transforms=transforms, image_mode=image_mode, skip_empty=skip_empty)


# ---------------------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------------------


@torch.inference_mode()
def evaluate_instance_model(model: torch.nn.Module, loader: DataLoader, category_ids: list[int],
                            gt_json: str | os.PathLike | dict, device: torch.device | str = "cpu",
                            results_path: str | os.PathLike | None = None, progress: bool = False,
                            desc: str = "eval") -> dict[str, Any]:
    """Run ``model`` over ``loader``; COCO mask and box metrics against ``gt_json`` (restricted
    to the images seen). Writes the results JSON to ``results_path`` when given."""
    was_training = model.training
    model.eval()
    threshold = float(getattr(model, "mask_threshold", 0.5))
    results: list[dict[str, Any]] = []
    img_ids: list[Any] = []
    t0, n = time.time(), 0
    for batch in tqdm(loader, desc=desc, disable=not progress, leave=False, unit="batch"):
        outputs = model([im.to(device) for im in batch["images"]])
        for out, meta in zip(outputs, batch["meta"]):
            img_ids.append(meta["image_id"])
            results.extend(detections_to_coco(meta["image_id"], out, category_ids, threshold))
            n += 1
    seconds = (time.time() - t0) / max(1, n)
    model.train(was_training)
    if results_path is not None:
        write_coco_results(results_path, results)
    gt = json.loads(Path(gt_json).read_text()) if isinstance(gt_json, (str, os.PathLike)) else gt_json
    return {"segm": coco_evaluate(gt, results, "segm", img_ids=img_ids),
            "bbox": coco_evaluate(gt, results, "bbox", img_ids=img_ids),
            "num_images": n, "num_detections": len(results), "seconds_per_image": seconds}


def format_instance_metrics(m: dict[str, Any]) -> str:
    return "\n".join([format_coco_metrics(m["segm"], "mask"), format_coco_metrics(m["bbox"], "box ")])


def evaluate_instance_checkpoint(checkpoint: str | os.PathLike, data: str | os.PathLike, split: str = "val",
                                 out: str | os.PathLike | None = None, batch_size: int = 4, num_workers: int = 0,
                                 device: str = "auto", progress: bool = True, results: str | os.PathLike | None = None,
                                 ckpt: dict[str, Any] | None = None, **_ignored: Any) -> dict[str, Any]:
    """Evaluate an instance checkpoint on a COCO split: writes the COCO results JSON
    (``results``, default ``OUT`` with ``_coco_results.json`` or ``coco_results_{split}.json``
    next to the checkpoint) and, with ``out``, the metrics JSON."""
    ckpt = ckpt if ckpt is not None else load_checkpoint(checkpoint)
    model = model_from_checkpoint(ckpt, checkpoint)
    dev = resolve_device(device)
    model.to(dev)
    norm = ckpt["normalization"]
    ds = _open(str(data), split, build_transforms(train=False, mean=norm["mean"], std=norm["std"]),
               norm.get("image_mode", "RGB"))
    ckpt_names = [c["name"] for c in ckpt["classes"]]
    if [c.name for c in ds.classes] != ckpt_names:
        raise DataError(data, f"dataset classes {[c.name for c in ds.classes]} differ from the checkpoint's {ckpt_names}")
    if results is None:
        results = (Path(out).with_name(Path(out).stem + "_coco_results.json") if out is not None
                   else Path(checkpoint).parent / f"coco_results_{split}.json")
    loader = _loader(ds, batch_size, False, num_workers)
    m = evaluate_instance_model(model, loader, ckpt["category_ids"], ds.annotation_file, dev, results,
                                progress, f"eval {split}")
    m.update({"task": "instance", "class_names": ckpt_names, "checkpoint": str(checkpoint), "split": split,
              "results_json": str(results)})
    if out is not None:
        write_json(out, m)
    return m


# ---------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DetectionTask:
    """What :func:`train_detection` needs to know about one task (instance, panoptic).

    Attributes:
        name: the checkpoint's ``task`` and the result's.
        best_metric: the validation record key that picks ``best.pt`` (higher is better).
        best_key: the checkpoint key holding the best value so far (for ``--resume``).
        open: ``(data, split, transforms, image_mode) -> dataset`` of sample dicts.
        model_args: ``train dataset -> (num_classes, extra build_model kwargs)``.
        extras: ``dataset -> the checkpoint's category entries`` (also compared between
            the training and validation splits).
        evaluate: ``(model, loader, val dataset, device, progress) -> flat record entries``
            (``best_metric`` among them).
        describe: ``record -> the metrics part of the epoch's progress line``.
    """

    name: str
    best_metric: str
    best_key: str
    open: Callable[..., Any]
    model_args: Callable[[Any], tuple[int, dict[str, Any]]]
    extras: Callable[[Any], dict[str, Any]]
    evaluate: Callable[..., dict[str, Any]]
    describe: Callable[[dict[str, Any]], str]


def _instance_record(model: torch.nn.Module, loader: DataLoader, ds: CocoInstances, device: torch.device,
                     progress: bool) -> dict[str, Any]:
    m = evaluate_instance_model(model, loader, ds.category_ids, ds.annotation_file, device, progress=progress,
                                desc="eval")
    return {**{f"mask_{k}": v for k, v in m["segm"].items()}, **{f"box_{k}": v for k, v in m["bbox"].items()},
            "seconds_per_image": m["seconds_per_image"]}


INSTANCE_TASK = DetectionTask(
    name="instance", best_metric="mask_AP", best_key="best_mask_ap",
    open=lambda data, split, tf, mode: _open(data, split, tf, mode),
    model_args=lambda ds: (len(ds.classes), {}),
    extras=lambda ds: {"category_ids": list(ds.category_ids)},
    evaluate=_instance_record,
    describe=lambda r: (f"mask AP {r['mask_AP']:.3f} AP50 {r['mask_AP50']:.3f}"
                        f"  box AP {r['box_AP']:.3f} AP50 {r['box_AP50']:.3f}"),
)
"""Mask R-CNN on COCO instance data; best by mask AP."""


def train_instance(cfg: TrainConfig) -> dict[str, Any]:
    """Train an instance model (``cfg.model``, e.g. ``maskrcnn``) on a COCO dataset; returns
    the best (by mask AP) and last validation records."""
    return train_detection(cfg, INSTANCE_TASK)


def train_detection(cfg: TrainConfig, task: DetectionTask) -> dict[str, Any]:
    """The training loop of detection-style models (a loss dict in training, one dict per
    image in eval): ``task`` supplies data, model arguments, evaluation and checkpoint
    entries. Returns the best (by ``task.best_metric``) and last validation records."""
    from pixelwise.engine.train import build_optimizer, poly_lr_lambda, start_run

    device, out, norm = start_run(cfg)
    train_tf = build_transforms(train=True, crop_size=cfg.crop_size, scale=(cfg.scale_min, cfg.scale_max),
                                flip=cfg.flip, mean=norm["mean"], std=norm["std"])
    eval_tf = build_transforms(train=False, mean=norm["mean"], std=norm["std"])
    train_ds = task.open(cfg.data, cfg.train_split, train_tf, cfg.image_mode)
    val_ds = task.open(cfg.data, cfg.val_split, eval_tf, cfg.image_mode)
    classes, extras = train_ds.classes, task.extras(train_ds)
    if task.extras(val_ds) != extras:
        raise DataError(val_ds.annotation_file, "the validation split has other categories than the training split")

    num_classes, task_kwargs = task.model_args(train_ds)
    model_kwargs = {**task_kwargs, **cfg.model_kwargs}
    if cfg.image_mode == "L":
        model_kwargs.setdefault("in_channels", 1)
    model = build_model(cfg.model, num_classes, **model_kwargs).to(device)
    spec = model.pixelwise_spec
    optimizer = build_optimizer(model.parameters(), cfg)
    repeat = int(getattr(cfg, "repeat", 1) or 1)
    train_loader = _loader(RepeatDataset(train_ds, repeat) if repeat > 1 else train_ds, cfg.batch_size, True,
                           cfg.num_workers, cfg.seed, drop_last=True)
    val_loader = _loader(val_ds, max(1, cfg.batch_size), False, cfg.num_workers)
    total_steps = cfg.epochs * len(train_loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, poly_lr_lambda(total_steps, cfg.poly_power,
                                                                            cfg.warmup_steps))

    start_epoch, step, best, history = 0, 0, -1.0, []
    last_path = out / "last.pt"
    if cfg.resume:
        start_epoch, step, best, history = resume_run(out, spec, num_classes, model, optimizer, scheduler,
                                                      task.best_key)

    resolved = cfg.to_dict()
    write_json(out / "config.json", resolved)
    class_dicts = [c.to_dict() for c in classes]

    def checkpoint(epoch: int, metrics: dict[str, Any]) -> dict[str, Any]:
        return {"model": spec, "state_dict": model.state_dict(), "classes": class_dicts, "normalization": norm,
                "config": resolved, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "epoch": epoch, "step": step, "rng": rng_state(), "metrics": metrics, task.best_key: best,
                "task": task.name, **extras}

    t0 = time.time()
    stop = False
    model.train()
    for epoch in range(start_epoch, cfg.epochs):
        train_loader.generator.manual_seed(cfg.seed * 100_003 + epoch)
        bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not cfg.progress, unit="it",
                   dynamic_ncols=True, leave=False)
        sums: dict[str, float] = {}
        n = 0
        for batch in bar:
            images = [im.to(device) for im in batch["images"]]
            targets = [{k: v.to(device) for k, v in t.items()} for t in batch["targets"]]
            losses = model(images, targets)
            loss = sum(losses.values())
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                raise PixelwiseError(f"loss became {loss_value} at epoch {epoch + 1}, step {step}; lower --lr. "
                                     f"The last good checkpoint is kept in {last_path}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            optimizer.step()
            scheduler.step()
            step += 1
            n += 1
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + v.item()
            sums["loss"] = sums.get("loss", 0.0) + loss_value
            bar.set_postfix(loss=f"{loss_value:.3f}", mask=f"{losses['loss_mask'].item():.3f}" if "loss_mask" in losses
                            else "", lr=f"{scheduler.get_last_lr()[0]:.1e}")
            if cfg.time_limit and time.time() - t0 > cfg.time_limit:
                stop = True
                break
        bar.close()
        is_last = stop or epoch == cfg.epochs - 1
        record: dict[str, Any] = {"epoch": epoch, "step": step, "train_loss": sums.get("loss", 0.0) / max(1, n),
                                  **{f"train_{k}": v / max(1, n) for k, v in sums.items() if k != "loss"},
                                  "lr": scheduler.get_last_lr()[0], "time": round(time.time() - t0, 2)}
        if (epoch + 1) % cfg.eval_every == 0 or is_last:
            record.update(task.evaluate(model, val_loader, val_ds, device, cfg.progress))
            if record[task.best_metric] > best:
                best = record[task.best_metric]
                record["best"] = True
        history.append(record)
        save_epoch(out, history, checkpoint(epoch, record), bool(record.get("best")))
        if cfg.progress:
            msg = f"epoch {epoch + 1}/{cfg.epochs}  loss {record['train_loss']:.4f}"
            if task.best_metric in record:
                msg += "  " + task.describe(record)
            tqdm.write(msg + f"  ({record['time']:.0f}s)")
        if stop:
            if cfg.progress:
                tqdm.write(f"time limit of {cfg.time_limit:.0f}s reached: stopping after {step} steps")
            break
    evaluated = [h for h in history if task.best_metric in h]
    best_rec = max(evaluated, key=lambda h: h[task.best_metric]) if evaluated else {}
    return {"task": task.name, "best": best_rec, "last": history[-1] if history else {}, "steps": step,
            "time": time.time() - t0, "out": str(out)}


# ---------------------------------------------------------------------------------------
# prediction and drawing
# ---------------------------------------------------------------------------------------


def instance_colors(n: int, seed: int = 0) -> list[tuple[int, int, int]]:
    """``n`` well-separated saturated colours (golden-ratio hue steps)."""
    out = []
    for i in range(n):
        h = (seed * 0.1 + i * 0.618033988749895) % 1.0
        r, g, b = colorsys.hsv_to_rgb(h, 0.85, 0.95)
        out.append((int(r * 255), int(g * 255), int(b * 255)))
    return out


def draw_instances(image: np.ndarray, masks: np.ndarray, boxes: np.ndarray, labels: Iterable[int],
                   scores: Iterable[float], class_names: list[str], alpha: float = 0.5) -> np.ndarray:
    """uint8 (H, W, 3): each instance's mask blended in its own colour, its box outlined and
    ``"class 0.93"`` written at the box's top-left corner."""
    from PIL import Image, ImageDraw

    rgb = image if image.ndim == 3 else np.repeat(image[:, :, None], 3, 2)
    canvas = rgb.astype(np.float32).copy()
    labels, scores = list(labels), list(scores)
    colors = instance_colors(len(labels))
    for m, c in zip(masks, colors):
        canvas[m] = (1 - alpha) * canvas[m] + alpha * np.array(c, np.float32)
    pil = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    for box, lab, sc, c in zip(boxes, labels, scores, colors):
        x1, y1, x2, y2 = [float(v) for v in box]
        draw.rectangle([x1, y1, max(x1, x2 - 1), max(y1, y2 - 1)], outline=c, width=1)
        text = f"{class_names[lab] if 0 <= lab < len(class_names) else lab} {sc:.2f}"
        tb = draw.textbbox((x1, y1), text)
        ty = y1 - (tb[3] - tb[1]) - 2 if y1 - (tb[3] - tb[1]) - 2 >= 0 else y1
        tb = draw.textbbox((x1 + 1, ty), text)
        draw.rectangle(tb, fill=c)
        draw.text((x1 + 1, ty), text, fill=(0, 0, 0) if sum(c) > 380 else (255, 255, 255))
    return np.asarray(pil)


@torch.inference_mode()
def predict_instance_files(checkpoint: str | os.PathLike, inputs: Iterable[str | os.PathLike], out: str | os.PathLike,
                           device: str = "auto", alpha: float = 0.5, progress: bool = True,
                           score_threshold: float = 0.5, ckpt: dict[str, Any] | None = None,
                           skip_existing: bool = False, **_ignored: Any) -> list[Path]:
    """Per input image write ``OUT/{stem}.png`` (palette PNG of instance ids 1..K, 0 = none,
    highest score on top), ``OUT/{stem}_overlay.png`` (each instance in its own colour with
    class and score) and ``OUT/{stem}.json`` (COCO results, RLE) for detections with score
    >= ``score_threshold``, each atomically, the JSON last. ``skip_existing``: leave out the
    images whose three files exist (resume an interrupted run)."""
    from pixelwise.data.classes import palette_bytes
    from pixelwise.data.io import read_image, write_image, write_label_png
    from pixelwise.engine.predict import collect_inputs, pending_inputs

    ckpt = ckpt if ckpt is not None else load_checkpoint(checkpoint)
    model = model_from_checkpoint(ckpt, checkpoint).eval()
    dev = resolve_device(device)
    model.to(dev)
    norm = ckpt["normalization"]
    mode = norm.get("image_mode", "RGB")
    names = [c["name"] for c in ckpt["classes"]]
    thr = float(getattr(model, "mask_threshold", 0.5))
    mean = torch.tensor(norm["mean"]).view(-1, 1, 1)
    std = torch.tensor(norm["std"]).view(-1, 1, 1)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    files = collect_inputs(inputs)
    if skip_existing:
        files = pending_inputs(files, out, (".png", "_overlay.png", ".json"))
    for f in tqdm(files, desc="predict", unit="img", disable=not progress):
        image = read_image(f, mode=mode)
        x = torch.from_numpy(np.ascontiguousarray(image)).float().div_(255)
        x = x[None] if x.dim() == 2 else x.permute(2, 0, 1)
        pred = model([((x - mean) / std).to(dev)])[0]
        keep = pred["scores"] >= score_threshold
        pred = {k: v[keep].cpu() for k, v in pred.items()}
        masks = (pred["masks"][:, 0] >= thr).numpy()
        ids = np.zeros(image.shape[:2], np.uint8)
        for k in range(len(masks) - 1, -1, -1):  # lowest score first, so the best ends on top
            ids[masks[k]] = min(k + 1, 254)
        write_label_png(out / f"{f.stem}.png", ids, palette_bytes(None))
        vis = draw_instances(image, masks, pred["boxes"].numpy(), pred["labels"].tolist(), pred["scores"].tolist(),
                             names, alpha)
        write_image(out / f"{f.stem}_overlay.png", vis)
        dets = detections_to_coco(f.stem, {**pred, "masks": masks}, ckpt["category_ids"])
        for d, lab in zip(dets, pred["labels"].tolist()):
            d["class_name"] = names[lab]
        write_json(out / f"{f.stem}.json", dets)
        written.append(out / f"{f.stem}.png")
    return written
