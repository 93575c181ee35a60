"""Training loop for semantic models: poly LR, per-epoch evaluation, atomic checkpoints, resume.

The loop is deliberately plain: build data -> model -> loss -> optimizer -> for each epoch
(train with a progress bar, evaluate, log one JSON line, save ``last.pt`` and ``best.pt``).
Everything it needs is in :class:`~pixelwise.engine.config.TrainConfig`.

U-Net specifics (SPEC §3):

- ``loss: weighted_ce`` (or any ``weight_map: {w0, sigma, class_balance}``): the training
  set is wrapped in :class:`~pixelwise.data.weightmap.WeightMapDataset`, which computes each
  image's border weight map once, from its instance map (``SegmentationObject``; without
  one, from the connected components of the classes), and the transforms move it with the
  image. A picture of the first map is saved as ``OUT/weight_map_{id}.png``.
- ``elastic: true`` adds the elastic deformation to the training transforms.
- ``unet_original``: the crop must be a valid input size (the largest valid size <=
  ``crop_size`` is used), images are mirror-padded by half the size loss before cropping,
  and the target and weight map are centre-cropped to the output (``model.crop_target``).
  Validation uses overlap-tile inference.
"""
from __future__ import annotations

import dataclasses
import math
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from pixelwise.data.transforms import build_transforms
from pixelwise.engine.checkpoint import (
    resume_run, rng_state, save_epoch,
)
from pixelwise.engine.common import (
    RepeatDataset, has_instance_maps, make_loader, normalization_for, open_dataset, resolve_device,
    write_json,
)
from pixelwise.engine.config import TrainConfig
from pixelwise.engine.evaluate import evaluate_model
from pixelwise.errors import PixelwiseError
from pixelwise.losses import build_loss
from pixelwise.models.registry import build_model
from pixelwise.postprocess import is_unpadded

__all__ = ["train", "poly_lr_lambda", "build_optimizer"]


def poly_lr_lambda(total_steps: int, power: float = 0.9, warmup_steps: int = 0):
    """LR factor of the 'poly' schedule (DeepLab/PSPNet): (1 - step/total)^power, with optional linear warmup."""

    def f(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, 1.0 - step / max(1, total_steps)) ** power

    return f


def build_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise PixelwiseError(f"unknown optimizer {cfg.optimizer!r}; use 'sgd' or 'adamw'")


def start_run(cfg: TrainConfig) -> tuple[torch.device, Path, dict[str, Any]]:
    """What every task's training does first: CPU threads, seeds, device, the run folder,
    and the image normalisation that goes into the checkpoint."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    _seed_everything(cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    return resolve_device(cfg.device), out, normalization_for(cfg.image_mode, cfg.mean, cfg.std)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _class_weights(cfg: TrainConfig, ds, num_classes: int) -> list[float] | None:
    if cfg.class_weights in (None, "none"):
        return None
    if cfg.class_weights in ("median_frequency", "median_freq"):
        from pixelwise.data.stats import dataset_class_stats

        raw = open_dataset(cfg.data, cfg.train_split, None, cfg.image_mode)
        return [float(w) for w in dataset_class_stats(raw, num_classes)["median_frequency_weights"]]
    if isinstance(cfg.class_weights, (list, tuple)) and len(cfg.class_weights) == num_classes:
        return [float(w) for w in cfg.class_weights]
    raise PixelwiseError(
        f"class_weights must be null, 'median_frequency' or a list of {num_classes} numbers, got {cfg.class_weights!r}"
    )


def _weight_map_params(cfg: TrainConfig) -> dict[str, Any] | None:
    """The weight map settings, or None when the loss uses no weight map."""
    if cfg.weight_map is None and cfg.loss != "weighted_ce":
        return None
    params = dict(cfg.weight_map or {})
    unknown = sorted(set(params) - {"w0", "sigma", "class_balance"})
    if unknown:
        raise PixelwiseError(f"weight_map: unknown key(s) {', '.join(unknown)}; valid keys: w0, sigma, class_balance")
    if cfg.loss not in ("ce", "weighted_ce", "ce_dice"):
        raise PixelwiseError(f"weight_map weights the cross-entropy; loss {cfg.loss!r} has none: use "
                             "'weighted_ce' or 'ce_dice'")
    return params


def _valid_crop_size(model, crop_size: int | None) -> int:
    """The largest valid input size of the unpadded U-Net that is <= ``crop_size``."""
    if crop_size is None:
        sizes = model.valid_input_sizes(model.output_margin, model.output_margin + 400)
        raise PixelwiseError(
            f"unet_original needs crop_size: a valid input tile size (output = input - {model.output_margin}), "
            f"e.g. one of {', '.join(map(str, sizes[1:8]))}")
    n = next((m for m in range(int(crop_size), 0, -1) if model.is_valid_input_size(m)), None)
    if n is None:
        smallest = model.valid_input_sizes(1, int(crop_size) + 2 ** model.depth * 40)[0]
        raise PixelwiseError(f"crop_size {crop_size} is smaller than the smallest input unet_original "
                             f"(depth {model.depth}) can take: {smallest}")
    return n


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train ``cfg.model`` on ``cfg.data``; returns the best validation metrics."""
    from pixelwise.models.registry import model_info

    if model_info(cfg.model).task == "instance":  # Mask R-CNN & co: COCO data, engine/instance.py
        from pixelwise.engine.instance import train_instance

        return train_instance(cfg)
    device, out, norm = start_run(cfg)
    wmap_params = _weight_map_params(cfg)
    eval_tf = build_transforms(train=False, mean=norm["mean"], std=norm["std"])
    train_base = open_dataset(cfg.data, cfg.train_split, None, cfg.image_mode,
                              with_instances=wmap_params is not None and has_instance_maps(cfg.data))
    val_ds = open_dataset(cfg.data, cfg.val_split, eval_tf, cfg.image_mode)
    classes = train_base.classes
    num_classes = len(classes)

    model_kwargs = dict(cfg.model_kwargs)
    if cfg.image_mode == "L":
        model_kwargs.setdefault("in_channels", 1)
    model = build_model(cfg.model, num_classes, **model_kwargs).to(device)
    spec = model.pixelwise_spec
    unpadded = is_unpadded(model)
    if unpadded:
        crop = _valid_crop_size(model, cfg.crop_size)
        if crop != cfg.crop_size and cfg.progress:
            tqdm.write(f"unet_original: crop_size {cfg.crop_size} -> {crop} (valid input size; output "
                       f"{model.output_size(crop)} px)")
        cfg = dataclasses.replace(cfg, crop_size=crop)

    train_tf = build_transforms(train=True, crop_size=cfg.crop_size, scale=(cfg.scale_min, cfg.scale_max),
                                flip=cfg.flip, mean=norm["mean"], std=norm["std"], elastic=cfg.elastic,
                                mirror_pad=model.output_margin // 2 if unpadded else 0)
    if wmap_params is not None:
        from pixelwise.data.weightmap import WeightMapDataset, save_weight_map_image

        train_ds = WeightMapDataset(train_base, train_tf, **wmap_params)
        first = train_base[0]
        save_weight_map_image(out / f"weight_map_{first['meta']['id']}.png", train_ds.maps[0], first["image"])
    else:
        train_base.transforms = train_tf
        train_ds = train_base
    if cfg.repeat > 1:
        train_ds = RepeatDataset(train_ds, cfg.repeat)

    weights = _class_weights(cfg, train_ds, num_classes)
    criterion = build_loss(cfg.loss, num_classes=num_classes, ignore_index=255, class_weights=weights,
                           aux_weight=cfg.aux_weight).to(device)
    optimizer = build_optimizer(model.parameters(), cfg)

    train_loader = make_loader(train_ds, cfg.batch_size, shuffle=True, num_workers=cfg.num_workers,
                               seed=cfg.seed, drop_last=True)
    val_loader = make_loader(val_ds, max(1, cfg.batch_size), shuffle=False, num_workers=cfg.num_workers)
    total_steps = cfg.epochs * len(train_loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, poly_lr_lambda(total_steps, cfg.poly_power, cfg.warmup_steps))

    start_epoch, step, best, history = 0, 0, -1.0, []
    last_path = out / "last.pt"
    if cfg.resume:
        start_epoch, step, best, history = resume_run(out, spec, num_classes, model, optimizer, scheduler,
                                                      "best_miou")

    resolved = cfg.to_dict()
    write_json(out / "config.json", resolved)
    class_dicts = [c.to_dict() if hasattr(c, "to_dict") else dict(c.__dict__) for c in classes]

    def checkpoint(epoch: int, metrics: dict[str, Any]) -> dict[str, Any]:
        return {
            "model": spec, "state_dict": model.state_dict(), "classes": class_dicts, "normalization": norm,
            "config": resolved, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "epoch": epoch, "step": step, "rng": rng_state(), "metrics": metrics, "best_miou": best,
            "task": "semantic",
        }

    t0 = time.time()
    stop = False
    model.train()
    for epoch in range(start_epoch, cfg.epochs):
        train_loader.generator.manual_seed(cfg.seed * 100_003 + epoch)  # same order when resumed
        bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not cfg.progress,
                   unit="it", dynamic_ncols=True, leave=False)
        loss_sum, n = 0.0, 0
        for batch in bar:
            images = batch["image"].to(device, non_blocking=True)
            target = batch["semantic"].to(device, non_blocking=True)
            pixel_w = batch.get("weight_map")
            if unpadded:  # the output is the valid centre of the input
                target = model.crop_target(target)
                pixel_w = None if pixel_w is None else model.crop_target(pixel_w)
            outputs = model(images)
            loss = criterion(outputs, target, pixel_weights=None if pixel_w is None else pixel_w.to(device))
            loss_value = loss.item()  # the step's one host sync: NaN check, running mean, progress bar
            if not math.isfinite(loss_value):
                raise PixelwiseError(
                    f"loss became {loss_value} at epoch {epoch + 1}, step {step}; lower --lr. "
                    f"The last good checkpoint is kept in {last_path}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            loss_sum += loss_value
            n += 1
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
            if cfg.time_limit and time.time() - t0 > cfg.time_limit:
                stop = True
                break
        bar.close()
        is_last = stop or epoch == cfg.epochs - 1
        record: dict[str, Any] = {"epoch": epoch, "step": step, "train_loss": loss_sum / max(1, n),
                                  "lr": scheduler.get_last_lr()[0], "time": round(time.time() - t0, 2)}
        if (epoch + 1) % cfg.eval_every == 0 or is_last:
            m = evaluate_model(model, val_loader, num_classes, device, progress=cfg.progress, desc="eval")
            record.update({k: m[k] for k in ("pixel_accuracy", "mean_accuracy", "miou", "fwiou")})
            record["iou"] = m["iou"]
            if m["miou"] > best:
                best = m["miou"]
                record["best"] = True
        history.append(record)
        save_epoch(out, history, checkpoint(epoch, record), bool(record.get("best")))
        if cfg.progress:
            msg = f"epoch {epoch + 1}/{cfg.epochs}  loss {record['train_loss']:.4f}"
            if "miou" in record:
                msg += f"  val mIoU {record['miou']:.4f}  pixel acc {record['pixel_accuracy']:.4f}"
            tqdm.write(msg + f"  ({record['time']:.0f}s)")
        if stop:
            if cfg.progress:
                tqdm.write(f"time limit of {cfg.time_limit:.0f}s reached: stopping after {step} steps")
            break
    evaluated = [h for h in history if "miou" in h]
    best_rec = max(evaluated, key=lambda h: h["miou"]) if evaluated else {}
    return {"best": best_rec, "last": history[-1] if history else {}, "steps": step,
            "time": time.time() - t0, "out": str(out)}
