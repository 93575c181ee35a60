"""Semantic evaluation: the confusion matrix over a whole split (FCN §5 metrics)."""
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
from pixelwise.engine.common import make_loader, open_dataset, resolve_device, write_json
from pixelwise.errors import DataError
from pixelwise.metrics import ConfusionMatrix

__all__ = ["evaluate_model", "evaluate_checkpoint", "format_metrics"]


def logits_of(output: Any) -> torch.Tensor:
    """Models may return a tensor or a dict with 'out' (training-time aux heads)."""
    return output["out"] if isinstance(output, dict) else output


@torch.inference_mode()
def evaluate_model(model: nn.Module, loader, num_classes: int, device: torch.device | str = "cpu",
                   progress: bool = False, desc: str = "eval") -> dict[str, Any]:
    """Run ``model`` over ``loader`` and return :meth:`ConfusionMatrix.compute` of the split."""
    was_training = model.training
    model.eval()
    cm = ConfusionMatrix(num_classes, ignore_index=255)
    for batch in tqdm(loader, desc=desc, disable=not progress, leave=False, unit="batch"):
        logits = logits_of(model(batch["image"].to(device)))
        cm.update(logits.argmax(1), batch["semantic"].to(device))
    model.train(was_training)
    return cm.compute()


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
    return "\n".join(lines)


def evaluate_checkpoint(checkpoint: str | os.PathLike, data: str | os.PathLike, split: str = "val",
                        out: str | os.PathLike | None = None, batch_size: int = 4, num_workers: int = 0,
                        device: str = "auto", progress: bool = True) -> dict[str, Any]:
    """Evaluate a checkpoint on a dataset split; optionally write the metrics JSON to ``out``."""
    ckpt = load_checkpoint(checkpoint)
    model = model_from_checkpoint(ckpt, checkpoint)
    dev = resolve_device(device)
    model.to(dev)
    norm = ckpt["normalization"]
    ds = open_dataset(data, split, build_transforms(train=False, mean=norm["mean"], std=norm["std"]),
                      image_mode=norm.get("image_mode", "RGB"))
    ckpt_names = [c["name"] for c in ckpt["classes"]]
    ds_names = [c.name for c in ds.classes]
    if len(ds_names) != len(ckpt_names):
        raise DataError(data, f"dataset has {len(ds_names)} classes but the checkpoint was trained on "
                              f"{len(ckpt_names)} ({', '.join(ckpt_names)})")
    loader = make_loader(ds, batch_size, shuffle=False, num_workers=num_workers)
    metrics = evaluate_model(model, loader, len(ckpt_names), dev, progress=progress, desc=f"eval {split}")
    metrics["class_names"] = ckpt_names
    metrics["checkpoint"] = str(checkpoint)
    metrics["split"] = split
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        write_json(out, metrics)
    return metrics
