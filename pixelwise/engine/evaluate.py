"""Semantic evaluation: the confusion matrix over a whole split (FCN §5 metrics).

Inference goes through :func:`pixelwise.postprocess.predict_probs`: ``unet_original`` is
always run by overlap-tile (it cannot take whole images of arbitrary size); other models
run whole images, or by sliding window with ``tile``/``overlap``; ``flip``/``scales`` add
test-time augmentation. With ``instance_f1`` the connected components of the predicted
foreground are matched to the ground-truth instance map (``SegmentationObject``) at IoU
0.5 (:func:`pixelwise.metrics.instance_f1.instance_f1`).
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from tqdm import tqdm

from pixelwise.data.transforms import build_transforms
from pixelwise.engine.checkpoint import load_checkpoint, model_from_checkpoint
from pixelwise.engine.common import make_loader, open_dataset, resolve_device, skipped_report, write_json
from pixelwise.errors import DataError
from pixelwise.metrics.instance_f1 import match_instances, summarize_counts
from pixelwise.metrics.semantic import ConfusionMatrix
from pixelwise.postprocess import connected_components, is_unpadded, labels_from_probs, predict_probs

__all__ = ["evaluate_model", "evaluate_checkpoint", "format_metrics", "predict_labels"]


def logits_of(output: Any) -> torch.Tensor:
    """Models may return a tensor or a dict with 'out' (training-time aux heads)."""
    return output["out"] if isinstance(output, dict) else output


@torch.inference_mode()
def predict_labels(model: nn.Module, images: torch.Tensor, tile: int | None = None, overlap: int | None = None,
                   flip: bool = False, scales: tuple[float, ...] | None = None) -> torch.Tensor:
    """(N, H, W) class ids for a batch of normalised images (model in eval mode). The plain
    case (no tiling, no TTA, a size-preserving model) is one forward pass and an argmax."""
    if tile is None and not flip and not (scales and tuple(scales) != (1.0,)) and not is_unpadded(model):
        logits = logits_of(model(images))
        return (logits[:, 0] > 0).long() if logits.shape[1] == 1 else logits.argmax(1)
    return labels_from_probs(predict_probs(model, images, tile=tile, overlap=overlap, flip=flip, scales=scales))


@torch.inference_mode()
def evaluate_model(model: nn.Module, loader, num_classes: int, device: torch.device | str = "cpu",
                   progress: bool = False, desc: str = "eval", *, tile: int | None = None, overlap: int | None = None,
                   flip: bool = False, scales: tuple[float, ...] | None = None,
                   instance_f1: bool = False, instance_iou: float = 0.5, min_size: int = 0) -> dict[str, Any]:
    """Run ``model`` over ``loader`` and return :meth:`ConfusionMatrix.compute` of the split,
    plus ``"instance"`` (instance F1 of the foreground's connected components, see module
    docstring; components under ``min_size`` pixels are dropped) when ``instance_f1``
    (batches must then hold ``instance_map``).

    Under torchrun, a loader whose sampler is a
    :class:`~pixelwise.engine.distributed.ShardSampler` holds this rank's block of the split:
    the confusion matrices and instance counts of all ranks are summed (every rank gets the
    metrics of the whole split, exactly those of one process). A padding sampler
    (``DistributedSampler``) would count samples twice and is refused."""
    from pixelwise.engine import distributed as dist

    sharded = dist.is_sharded_eval(loader, "evaluate_model")
    was_training = model.training
    model.eval()
    cm = ConfusionMatrix(num_classes, ignore_index=255)
    tp = fp = fn = 0
    ious: list[float] = []
    for batch in tqdm(loader, desc=desc, disable=not progress, leave=False, unit="batch"):
        pred = predict_labels(model, batch["image"].to(device), tile, overlap, flip, scales)
        cm.update(pred, batch["semantic"].to(device))
        if instance_f1:
            if "instance_map" not in batch:
                raise DataError(getattr(loader.dataset, "root", "dataset"), "no instance maps for instance F1",
                                "the dataset needs SegmentationObject/ PNGs")
            for p, g in zip(pred.cpu().numpy(), batch["instance_map"].numpy()):
                inst, _ = connected_components(p, min_size=min_size)
                r = match_instances(inst, g, instance_iou)
                tp, fp, fn = tp + r["tp"], fp + r["fp"], fn + r["fn"]
                ious.extend(r["ious"])
    model.train(was_training)
    if sharded:
        cm.load_state_dict({"matrix": dist.all_reduce_sum(cm.state_dict()["matrix"])})
        if instance_f1:
            tp, fp, fn = (int(v) for v in dist.all_reduce_sum(torch.tensor([tp, fp, fn], dtype=torch.int64)))
            ious = dist.gather_objects(ious)  # rank order = dataset order
    metrics = cm.compute()
    if instance_f1:
        metrics["instance"] = {**summarize_counts(tp, fp, fn, ious, instance_iou), "min_size": min_size}
    return metrics


def format_metrics(m: dict[str, Any], class_names: list[str] | None = None) -> str:
    """A short human-readable table: the four FCN metrics and per-class IoU."""
    lines = [
        f"pixel acc {m['pixel_accuracy']:.4f}   mean acc {m['mean_accuracy']:.4f}   "
        f"mIoU {m['miou']:.4f}   fwIoU {m['fwiou']:.4f}",
        f"{'class':<16}{'IoU':>8}{'acc':>8}{'dice':>8}",
    ]
    names = class_names or [str(i) for i in range(len(m["iou"]))]
    for name, iou, acc, dice in zip(names, m["iou"], m["accuracy"], m["dice"]):
        fmt = lambda v: "     n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:8.4f}"  # noqa: E731
        lines.append(f"{name:<16}{fmt(iou)}{fmt(acc)}{fmt(dice)}")
    inst = m.get("instance")
    if inst:
        lines.append(f"instances (connected components) at IoU {inst['threshold']}: F1 {inst['f1']:.4f}   "
                     f"precision {inst['precision']:.4f}   recall {inst['recall']:.4f}   "
                     f"(TP {inst['tp']}, FP {inst['fp']}, FN {inst['fn']})")
    return "\n".join(lines)


def evaluate_checkpoint(checkpoint: str | os.PathLike, data: str | os.PathLike, split: str = "val",
                        out: str | os.PathLike | None = None, batch_size: int = 4, num_workers: int | None = None,
                        device: str = "auto", progress: bool = True, *, tile: int | None = None,
                        overlap: int | None = None, flip: bool = False, scales: tuple[float, ...] | None = None,
                        instance_f1: bool = False, min_size: int = 0, fast: bool = False,
                        skip_bad_samples: bool = False) -> dict[str, Any]:
    """Evaluate a checkpoint on a dataset split; optionally write the metrics JSON to ``out``.

    ``tile``/``overlap``: sliding-window inference (``unet_original``: overlap-tile always,
    ``tile`` = its input tile); ``flip``/``scales``: test-time augmentation; ``instance_f1``:
    also score the connected components of the prediction (those of at least ``min_size``
    pixels) against the instance maps. ``skip_bad_samples``: leave out the samples whose
    files are unusable (a warning line; ``metrics["skipped_samples"]`` counts and lists them).
    """
    ckpt = load_checkpoint(checkpoint)
    if ckpt.get("task") == "instance":  # COCO mask/box AP: engine/instance.py
        from pixelwise.engine.instance import evaluate_instance_checkpoint

        return evaluate_instance_checkpoint(checkpoint, data, split, out, batch_size, num_workers, device, progress,
                                            ckpt=ckpt, skip_bad_samples=skip_bad_samples)
    if ckpt.get("task") == "panoptic":  # PQ / PQ^Th / PQ^St: engine/panoptic.py
        from pixelwise.engine.panoptic import evaluate_panoptic_checkpoint

        return evaluate_panoptic_checkpoint(checkpoint, data, split, out, batch_size, num_workers, device, progress,
                                            ckpt=ckpt, skip_bad_samples=skip_bad_samples)
    model = model_from_checkpoint(ckpt, checkpoint)
    dev = resolve_device(device)
    model.to(dev)
    if fast:  # conv+BN folding, channels_last, inference mode; same outputs within 1e-4
        from pixelwise.inference import optimize

        model = optimize(model, inplace=True)
    norm = ckpt["normalization"]
    ds = open_dataset(data, split, build_transforms(train=False, mean=norm["mean"], std=norm["std"]),
                      image_mode=norm.get("image_mode", "RGB"), with_instances=instance_f1, skip_bad=skip_bad_samples)
    ckpt_names = [c["name"] for c in ckpt["classes"]]
    ds_names = [c.name for c in ds.classes]
    if len(ds_names) != len(ckpt_names):
        raise DataError(data, f"dataset has {len(ds_names)} classes but the checkpoint was trained on "
                              f"{len(ckpt_names)} ({', '.join(ckpt_names)})")
    loader = make_loader(ds, batch_size, shuffle=False, num_workers=num_workers)
    metrics = evaluate_model(model, loader, len(ckpt_names), dev, progress=progress, desc=f"eval {split}",
                             tile=tile, overlap=overlap, flip=flip, scales=scales, instance_f1=instance_f1,
                             min_size=min_size)
    metrics["class_names"] = ckpt_names
    metrics["checkpoint"] = str(checkpoint)
    metrics["split"] = split
    metrics["inference"] = {"tile": tile, "overlap": overlap, "flip": flip, "scales": list(scales or (1.0,)),
                            "overlap_tile": is_unpadded(model)}
    if skip_bad_samples:
        metrics["skipped_samples"] = skipped_report(ds)
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        write_json(out, metrics)
    return metrics
