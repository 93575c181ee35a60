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
is Mask R-CNN's; :mod:`pixelwise.engine.panoptic` defines Panoptic FPN's. It is the semantic
loop's twin (:mod:`pixelwise.engine.train`): under ``torchrun`` each rank trains on its share of
every epoch's permutation under DistributedDataParallel and evaluates its own block of the
validation split; the detections (and PQ counts) are gathered in dataset order and scored
once, so the metrics are those of one process. Only rank 0 prints and writes files. Step
checkpoints every ``checkpoint_every`` steps, ``resume`` in the middle of an epoch
(:class:`~pixelwise.engine.train.SeededSamples`), ``--skip-bad-samples`` and ``--tensorboard``
(scalars per epoch, a few val images with their predictions at each evaluation) work as there.
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
from pixelwise.engine import distributed as dist
from pixelwise.engine.checkpoint import (
    RunState, load_checkpoint, model_from_checkpoint, restore_run, rng_state, save_epoch, save_step,
    step_checkpoints,
)
from pixelwise.engine.common import (RepeatDataset, apply_skip_bad, make_loader, resolve_device, skipped_report,
                                     uint8_image, write_json)
from pixelwise.engine.config import TrainConfig
from pixelwise.errors import DataError, PixelwiseError
from pixelwise.metrics.instance import coco_evaluate, detections_to_coco, format_coco_metrics, write_coco_results
from pixelwise.models.registry import build_model

__all__ = [
    "DetectionTask",
    "INSTANCE_TASK",
    "train_detection",
    "tensorboard_pictures",
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
            drop_last: bool = False, sampler=None) -> DataLoader:
    """:func:`~pixelwise.engine.common.make_loader` with :func:`instance_collate`."""
    if len(ds) == 0:
        raise DataError(getattr(ds, "annotation_file", "dataset"), "the split has no images")
    return make_loader(ds, batch_size, shuffle, num_workers, seed, drop_last, sampler, collate_fn=instance_collate)


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
    to the images seen). Writes the results JSON to ``results_path`` when given.

    Under torchrun, a loader whose sampler is a
    :class:`~pixelwise.engine.distributed.ShardSampler` holds this rank's block of the split:
    the detections of every rank are gathered in dataset order and scored once on rank 0
    (every rank gets the metrics, exactly those of one process; rank 0 writes the file)."""
    sharded = dist.is_sharded_eval(loader, "evaluate_instance_model")
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
    if sharded:  # rank order = dataset order
        results, img_ids = dist.gather_objects(results), dist.gather_objects(img_ids)

    def score() -> dict[str, Any]:
        if results_path is not None:
            write_coco_results(results_path, results)
        gt = json.loads(Path(gt_json).read_text()) if isinstance(gt_json, (str, os.PathLike)) else gt_json
        return {"segm": coco_evaluate(gt, results, "segm", img_ids=img_ids),
                "bbox": coco_evaluate(gt, results, "bbox", img_ids=img_ids)}

    m = dist.run_on_main(score) if sharded else score()
    return {**m, "num_images": len(img_ids), "num_detections": len(results), "seconds_per_image": seconds}


def format_instance_metrics(m: dict[str, Any]) -> str:
    return "\n".join([format_coco_metrics(m["segm"], "mask"), format_coco_metrics(m["bbox"], "box ")])


def evaluate_instance_checkpoint(checkpoint: str | os.PathLike, data: str | os.PathLike, split: str = "val",
                                 out: str | os.PathLike | None = None, batch_size: int = 4, num_workers: int = 0,
                                 device: str = "auto", progress: bool = True, results: str | os.PathLike | None = None,
                                 ckpt: dict[str, Any] | None = None, skip_bad_samples: bool = False,
                                 **_ignored: Any) -> dict[str, Any]:
    """Evaluate an instance checkpoint on a COCO split: writes the COCO results JSON
    (``results``, default ``OUT`` with ``_coco_results.json`` or ``coco_results_{split}.json``
    next to the checkpoint) and, with ``out``, the metrics JSON. ``skip_bad_samples``: leave
    out the images whose files are unusable (a warning line; ``metrics["skipped_samples"]``
    counts and lists them)."""
    ckpt = ckpt if ckpt is not None else load_checkpoint(checkpoint)
    model = model_from_checkpoint(ckpt, checkpoint)
    dev = resolve_device(device)
    model.to(dev)
    norm = ckpt["normalization"]
    ds = _open(str(data), split, build_transforms(train=False, mean=norm["mean"], std=norm["std"]),
               norm.get("image_mode", "RGB"))
    ds = apply_skip_bad(ds, skip_bad_samples, split, data)
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
    if skip_bad_samples:
        m["skipped_samples"] = skipped_report(ds)
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
            (``best_metric`` among them); with a loader of this rank's block of the split
            under torchrun it returns the metrics of the whole split on every rank.
        describe: ``record -> the metrics part of the epoch's progress line``.
        picture: ``(model in eval mode, val dataset, index, device) -> uint8 (H, W, 3)``
            panel "image | prediction" for TensorBoard (None: no pictures).
    """

    name: str
    best_metric: str
    best_key: str
    open: Callable[..., Any]
    model_args: Callable[[Any], tuple[int, dict[str, Any]]]
    extras: Callable[[Any], dict[str, Any]]
    evaluate: Callable[..., dict[str, Any]]
    describe: Callable[[dict[str, Any]], str]
    picture: Callable[..., np.ndarray] | None = None


def _instance_record(model: torch.nn.Module, loader: DataLoader, ds: CocoInstances, device: torch.device,
                     progress: bool) -> dict[str, Any]:
    m = evaluate_instance_model(model, loader, ds.category_ids, ds.annotation_file, device, progress=progress,
                                desc="eval")
    return {**{f"mask_{k}": v for k, v in m["segm"].items()}, **{f"box_{k}": v for k, v in m["bbox"].items()},
            "seconds_per_image": m["seconds_per_image"]}


#: TensorBoard pictures show the detections with at least this score
PICTURE_SCORE = 0.5


def _instance_picture(model: torch.nn.Module, ds: Any, index: int, device: torch.device) -> np.ndarray:
    """image | its instances with score >= :data:`PICTURE_SCORE` (class and score written)."""
    from pixelwise.viz import comparison_grid

    image = uint8_image(ds.load(index)["image"])
    out = model([ds[index]["image"].to(device)])[0]
    keep = out["scores"] >= PICTURE_SCORE
    out = {k: v[keep].cpu() for k, v in out.items()}
    masks = (out["masks"][:, 0] >= float(getattr(model, "mask_threshold", 0.5))).numpy()
    pred = draw_instances(image, masks, out["boxes"].numpy(), out["labels"].tolist(), out["scores"].tolist(),
                          [c.name for c in ds.classes])
    return comparison_grid([[image, pred]])


INSTANCE_TASK = DetectionTask(
    name="instance", best_metric="mask_AP", best_key="best_mask_ap",
    open=lambda data, split, tf, mode: _open(data, split, tf, mode),
    model_args=lambda ds: (len(ds.classes), {}),
    extras=lambda ds: {"category_ids": list(ds.category_ids)},
    evaluate=_instance_record,
    describe=lambda r: (f"mask AP {r['mask_AP']:.3f} AP50 {r['mask_AP50']:.3f}"
                        f"  box AP {r['box_AP']:.3f} AP50 {r['box_AP50']:.3f}"),
    picture=_instance_picture,
)
"""Mask R-CNN on COCO instance data; best by mask AP."""

@torch.inference_mode()
def tensorboard_pictures(picture: Callable[..., np.ndarray], model: torch.nn.Module, ds: Any, device: torch.device,
                         count: int) -> list[np.ndarray]:
    """``picture(model, ds, i, device)`` for the first ``count`` images of ``ds``, the model in
    eval mode (its mode is restored)."""
    was_training = model.training
    model.eval()
    try:
        return [picture(model, ds, i, device) for i in range(min(count, len(ds)))]
    finally:
        model.train(was_training)


def train_instance(cfg: TrainConfig) -> dict[str, Any]:
    """Train an instance model (``cfg.model``, e.g. ``maskrcnn``) on a COCO dataset; returns
    the best (by mask AP) and last validation records."""
    return train_detection(cfg, INSTANCE_TASK)


def train_detection(cfg: TrainConfig, task: DetectionTask) -> dict[str, Any]:
    """The training loop of detection-style models (a loss dict in training, one dict per
    image in eval): ``task`` supplies data, model arguments, evaluation and checkpoint
    entries. Returns the best (by ``task.best_metric``) and last validation records.

    As the semantic loop (:func:`pixelwise.engine.train.train`): torchrun / DDP (the
    logged losses are the means over ranks), step checkpoints and mid-epoch resume, skipped
    bad samples, TensorBoard."""
    from pixelwise.engine.train import TENSORBOARD_IMAGES, SeededSamples, build_optimizer, poly_lr_lambda, start_run

    device, out, norm = start_run(cfg, distributed=True)
    main = dist.is_main()  # rank 0: the one process that prints and writes files
    train_tf = build_transforms(train=True, crop_size=cfg.crop_size, scale=(cfg.scale_min, cfg.scale_max),
                                flip=cfg.flip, mean=norm["mean"], std=norm["std"])
    eval_tf = build_transforms(train=False, mean=norm["mean"], std=norm["std"])
    report_to = out / "skipped_samples.json" if main else None  # bad samples left out, listed per split
    train_ds = apply_skip_bad(task.open(cfg.data, cfg.train_split, train_tf, cfg.image_mode), cfg.skip_bad_samples,
                              cfg.train_split, cfg.data, report_to, quiet=not main)
    val_ds = apply_skip_bad(task.open(cfg.data, cfg.val_split, eval_tf, cfg.image_mode), cfg.skip_bad_samples,
                            cfg.val_split, cfg.data, report_to, quiet=not main)
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
    # sample i of epoch e is augmented from (seed, e, i): a run resumed mid-epoch sees the same data
    train_set = SeededSamples(RepeatDataset(train_ds, repeat) if repeat > 1 else train_ds, cfg.seed)
    sampler = dist.distributed_sampler(train_set, shuffle=True, seed=cfg.seed)  # this rank's share, per epoch
    train_loader = _loader(train_set, cfg.batch_size, False, cfg.num_workers, cfg.seed, drop_last=True,
                           sampler=sampler)
    val_loader = _loader(val_ds, max(1, cfg.batch_size), False, cfg.num_workers,
                         sampler=dist.shard_sampler(val_ds) if dist.is_distributed() else None)
    steps_per_epoch = len(train_loader)
    total_steps = cfg.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, poly_lr_lambda(total_steps, cfg.poly_power,
                                                                            cfg.warmup_steps))

    state = RunState()
    last_path = out / "last.pt"
    if cfg.resume:
        state = restore_run(out, spec, num_classes, model, optimizer, scheduler, task.best_key)
    elif main:  # a fresh run: step checkpoints of an older run here must not look newer than ours
        for _, old in step_checkpoints(out):
            old.unlink()
    step, best, history = state.step, state.best, state.history
    # DistributedDataParallel under torchrun, else the model itself; a head may sit out a batch
    ddp = dist.wrap_model(model, device, find_unused_parameters=True)

    resolved = cfg.to_dict()
    if main:
        write_json(out / "config.json", resolved)
    class_dicts = [c.to_dict() for c in classes]
    tb = None
    if cfg.tensorboard and main:
        from pixelwise.engine.loggers import TensorBoardLogger

        tb = TensorBoardLogger(out, [c.name for c in classes])

    def checkpoint(epoch: int, metrics: dict[str, Any], progress: dict[str, Any] | None = None) -> dict[str, Any]:
        ck = {"model": spec, "state_dict": model.state_dict(), "classes": class_dicts, "normalization": norm,
              "config": resolved, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
              "epoch": epoch, "step": step, "rng": rng_state(), "metrics": metrics, task.best_key: best,
              "task": task.name, **extras}
        if progress is not None:  # written mid-epoch: where to continue
            ck["epoch_progress"] = progress
        return ck

    t0 = time.time()
    stop = False
    ddp.train()
    for epoch in range(state.epoch, cfg.epochs):
        skip = state.batches if epoch == state.epoch else 0  # batches of this epoch already trained
        sums = dict(state.sums) if epoch == state.epoch else {}  # running loss sums, and "n"
        n = int(sums.pop("n", 0))
        # the epoch's order, as in an uninterrupted run, without the batches already trained
        sampler.set_epoch(epoch, skip=min(skip * cfg.batch_size, sampler.num_samples))
        train_set.epoch = epoch
        bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not (cfg.progress and main),
                   unit="it", dynamic_ncols=True, leave=False, initial=skip, total=steps_per_epoch)
        batches = skip
        for batch in bar:
            images = [im.to(device) for im in batch["images"]]
            targets = [{k: v.to(device) for k, v in t.items()} for t in batch["targets"]]
            with dist.autocast(device, cfg.amp):  # bf16 on CUDA; nothing on the CPU
                losses = {k: v.float() for k, v in ddp(images, targets).items()}
            loss = sum(losses.values())
            # the step's one host sync: every loss term averaged over ranks, NaN check, time limit
            timed_out = bool(cfg.time_limit and time.time() - t0 > cfg.time_limit)
            values, stop = dist.step_sync_values(torch.stack([*losses.values(), loss]), timed_out)
            loss_value = values[-1]
            if not math.isfinite(loss_value):
                raise PixelwiseError(f"loss became {loss_value} at epoch {epoch + 1}, step {step}; lower --lr. "
                                     f"The last good checkpoint is kept in {last_path}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            optimizer.step()
            scheduler.step()
            step += 1
            batches += 1
            n += 1
            terms = dict(zip(losses, values))
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v
            sums["loss"] = sums.get("loss", 0.0) + loss_value
            bar.set_postfix(loss=f"{loss_value:.3f}", mask=f"{terms['loss_mask']:.3f}" if "loss_mask" in terms
                            else "", lr=f"{scheduler.get_last_lr()[0]:.1e}")
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and main:
                save_step(out, checkpoint(epoch, {}, {"batches": batches, "sums": {**sums, "n": n}}), cfg.keep_last)
            if stop:
                break
        bar.close()
        is_last = stop or epoch == cfg.epochs - 1
        record: dict[str, Any] = {"epoch": epoch, "step": step, "train_loss": sums.get("loss", 0.0) / max(1, n),
                                  **{f"train_{k}": v / max(1, n) for k, v in sums.items() if k != "loss"},
                                  "lr": scheduler.get_last_lr()[0], "time": round(time.time() - t0, 2)}
        evaluated = (epoch + 1) % cfg.eval_every == 0 or is_last
        if evaluated:
            dist.sync_buffers(model)  # every rank evaluates rank 0's model: the one saved
            record.update(task.evaluate(model, val_loader, val_ds, device, cfg.progress and main))
            if record[task.best_metric] > best:
                best = record[task.best_metric]
                record["best"] = True
        history.append(record)
        if main:
            save_epoch(out, history, checkpoint(epoch, record), bool(record.get("best")))
        if tb is not None:
            tb.log_epoch(record, step)
            if evaluated and task.picture is not None:
                tb.log_images("val/predictions", tensorboard_pictures(task.picture, model, val_ds, device,
                                                                      TENSORBOARD_IMAGES), step)
        if cfg.progress and main:
            msg = f"epoch {epoch + 1}/{cfg.epochs}  loss {record['train_loss']:.4f}"
            if task.best_metric in record:
                msg += "  " + task.describe(record)
            tqdm.write(msg + f"  ({record['time']:.0f}s)")
        if stop:
            if cfg.progress and main:
                tqdm.write(f"time limit of {cfg.time_limit:.0f}s reached: stopping after {step} steps")
            break
    if tb is not None:
        tb.close()
    evaluated_records = [h for h in history if task.best_metric in h]
    best_rec = max(evaluated_records, key=lambda h: h[task.best_metric]) if evaluated_records else {}
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
    from pixelwise.engine.predict import collect_inputs, normalize_image, pending_inputs
    from pixelwise.export import instance_id_map  # NumPy only: export.py imports no torch at module level

    ckpt = ckpt if ckpt is not None else load_checkpoint(checkpoint)
    model = model_from_checkpoint(ckpt, checkpoint).eval()
    dev = resolve_device(device)
    model.to(dev)
    norm = ckpt["normalization"]
    mode = norm.get("image_mode", "RGB")
    names = [c["name"] for c in ckpt["classes"]]
    thr = float(getattr(model, "mask_threshold", 0.5))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    files = collect_inputs(inputs)
    if skip_existing:
        files = pending_inputs(files, out, (".png", "_overlay.png", ".json"))
    for f in tqdm(files, desc="predict", unit="img", disable=not progress):
        image = read_image(f, mode=mode)
        pred = model([normalize_image(image, norm).to(dev)])[0]
        keep = pred["scores"] >= score_threshold
        pred = {k: v[keep].cpu() for k, v in pred.items()}
        masks = (pred["masks"][:, 0] >= thr).numpy()
        ids = instance_id_map(masks, image.shape)  # the same map the ONNX predict writes
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
