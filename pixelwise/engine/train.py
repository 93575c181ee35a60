"""Training loop for semantic models: poly LR, per-epoch evaluation, atomic checkpoints, resume.

The loop is deliberately plain: build data -> model -> loss -> optimizer -> for each epoch
(train with a progress bar, evaluate, log one JSON line, save ``last.pt`` and ``best.pt``).
Everything it needs is in :class:`~pixelwise.engine.config.TrainConfig`.

Many processes (``torchrun``, :mod:`pixelwise.engine.distributed`): each rank trains on its
share of every epoch's permutation under DistributedDataParallel, evaluates its own block of
the validation split, and the confusion matrices are summed, so the metrics are those of one
process. Only rank 0 prints, logs and writes files; checkpoints hold the bare model's weights.

Never lose work (:mod:`pixelwise.engine.checkpoint`): besides the end of every epoch, a
checkpoint is written every ``checkpoint_every`` steps (``step_{N}.pt``, the last
``keep_last`` kept, ``last.pt`` the newest), atomically. ``resume`` continues from the newest
one, in the middle of an epoch if need be: the epoch's sample order depends only on
``(seed, epoch)`` and sample i's augmentation only on ``(seed, epoch, i)``
(:class:`SeededSamples`), so the batches already trained are skipped and the others come
exactly as they would have. With ``deterministic`` (deterministic kernels too), an
interrupted and resumed run ends with the weights and metrics of an uninterrupted one.

``tensorboard``: rank 0 also logs every epoch's record as scalars and, at each evaluation,
the first :data:`TENSORBOARD_IMAGES` val images with their prediction overlaid
(:class:`~pixelwise.engine.loggers.TensorBoardLogger`, ``RUN/tensorboard``).

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
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from pixelwise.data.transforms import build_transforms
from pixelwise.engine import distributed as dist
from pixelwise.engine.checkpoint import (
    RunState, restore_run, rng_state, save_epoch, save_step, step_checkpoints,
)
from pixelwise.engine.common import (
    RepeatDataset, has_instance_maps, make_loader, normalization_for, open_dataset, resolve_device,
    uint8_image, write_json,
)
from pixelwise.engine.config import TrainConfig
from pixelwise.engine.evaluate import evaluate_model
from pixelwise.errors import PixelwiseError
from pixelwise.losses import build_loss
from pixelwise.models.registry import build_model
from pixelwise.postprocess import is_unpadded

__all__ = ["train", "poly_lr_lambda", "build_optimizer", "start_run", "make_deterministic", "SeededSamples",
           "val_pictures"]

#: how many val images (the first ones) TensorBoard shows with their predictions per evaluation
TENSORBOARD_IMAGES = 4


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


def start_run(cfg: TrainConfig, distributed: bool = False) -> tuple[torch.device, Path, dict[str, Any]]:
    """What every task's training does first: CPU threads, seeds, device, the run folder,
    and the image normalisation that goes into the checkpoint.

    ``distributed``: the loop supports torchrun, so join its process group
    (:func:`pixelwise.engine.distributed.init_distributed`; the device is then this rank's).
    A loop that does not must not run as several processes that all write the same files."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if distributed:
        device = dist.init_distributed(cfg.device)
    elif dist.launched_by_torchrun():
        raise PixelwiseError(f"model {cfg.model!r}: this task's training runs as one process; start it without "
                             f"torchrun (WORLD_SIZE={os.environ.get('WORLD_SIZE')})")
    else:
        device = resolve_device(cfg.device)
    if getattr(cfg, "deterministic", False):
        make_deterministic()
    _seed_everything(cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    return device, out, normalization_for(cfg.image_mode, cfg.mean, cfg.std)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_deterministic() -> None:
    """Deterministic kernels where PyTorch has them (a warning names any op without one),
    no cuDNN autotuning, and cuBLAS's deterministic workspace. For this process, from now on."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


class SeededSamples(Dataset):
    """``base`` whose item ``i`` in epoch ``epoch`` is drawn with torch's generator seeded
    from ``(seed, epoch, i)`` (the transforms' randomness comes from it), so a sample's
    augmentation does not depend on which DataLoader worker or rank loads it, nor on the
    batches before it: what makes a run resumed mid-epoch see the same data. The caller's
    generator state is left as it was. Attributes such as ``classes`` are those of ``base``."""

    def __init__(self, base: Dataset, seed: int) -> None:
        self.base = base
        self.seed = int(seed)
        self.epoch = 0  # set before each epoch; workers get a copy when the loader starts

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(((self.seed * 1_000_003 + self.epoch) * 10_000_019 + int(index)) % 2 ** 63)
            return self.base[index]

    def __getattr__(self, name: str):
        if name == "base":
            raise AttributeError(name)
        return getattr(self.base, name)


@torch.inference_mode()
def val_pictures(model: torch.nn.Module, ds, colors, device: torch.device,
                 count: int = TENSORBOARD_IMAGES) -> list[np.ndarray]:
    """"image | prediction overlay" panels (uint8 (H, W, 3)) of the first ``count`` images of
    ``ds`` (a dataset with ``load``, its transforms normalising only), one forward pass each."""
    from pixelwise.engine.evaluate import predict_labels
    from pixelwise.viz import comparison_grid, overlay

    was_training = model.training
    model.eval()
    panels = []
    for i in range(min(count, len(ds))):
        raw = ds.load(i)["image"]
        image = uint8_image(raw)
        pred = predict_labels(model, ds[i]["image"][None].to(device))[0].cpu().numpy()
        panels.append(comparison_grid([[image, overlay(image, pred, colors)]]))
    model.train(was_training)
    return panels


def _class_weights(cfg: TrainConfig, ds, num_classes: int) -> list[float] | None:
    if cfg.class_weights in (None, "none"):
        return None
    if cfg.class_weights in ("median_frequency", "median_freq"):
        from pixelwise.data.stats import dataset_class_stats

        raw = open_dataset(cfg.data, cfg.train_split, None, cfg.image_mode, skip_bad=cfg.skip_bad_samples, quiet=True)
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
    if model_info(cfg.model).task == "panoptic":  # Panoptic FPN: COCO panoptic data, engine/panoptic.py
        from pixelwise.engine.panoptic import train_panoptic

        return train_panoptic(cfg)
    device, out, norm = start_run(cfg, distributed=True)
    main = dist.is_main()  # rank 0: the one process that prints and writes files
    wmap_params = _weight_map_params(cfg)
    eval_tf = build_transforms(train=False, mean=norm["mean"], std=norm["std"])
    bad_samples = {"skip_bad": cfg.skip_bad_samples, "quiet": not main,  # left out, listed per split
                   "report_to": out / "skipped_samples.json" if main else None}
    train_base = open_dataset(cfg.data, cfg.train_split, None, cfg.image_mode,
                              with_instances=wmap_params is not None and has_instance_maps(cfg.data),
                              **bad_samples)
    val_ds = open_dataset(cfg.data, cfg.val_split, eval_tf, cfg.image_mode, **bad_samples)
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
        if crop != cfg.crop_size and cfg.progress and main:
            tqdm.write(f"unet_original: crop_size {cfg.crop_size} -> {crop} (valid input size; output "
                       f"{model.output_size(crop)} px)")
        cfg = dataclasses.replace(cfg, crop_size=crop)

    train_tf = build_transforms(train=True, crop_size=cfg.crop_size, scale=(cfg.scale_min, cfg.scale_max),
                                flip=cfg.flip, mean=norm["mean"], std=norm["std"], elastic=cfg.elastic,
                                mirror_pad=model.output_margin // 2 if unpadded else 0)
    if wmap_params is not None:
        from pixelwise.data.weightmap import WeightMapDataset, save_weight_map_image

        train_ds = WeightMapDataset(train_base, train_tf, **wmap_params)
        if main:
            first = train_base[0]
            save_weight_map_image(out / f"weight_map_{first['meta']['id']}.png", train_ds.maps[0], first["image"])
    else:
        train_base.transforms = train_tf
        train_ds = train_base
    if cfg.repeat > 1:
        train_ds = RepeatDataset(train_ds, cfg.repeat)
    train_ds = SeededSamples(train_ds, cfg.seed)

    weights = _class_weights(cfg, train_ds, num_classes)
    criterion = build_loss(cfg.loss, num_classes=num_classes, ignore_index=255, class_weights=weights,
                           aux_weight=cfg.aux_weight).to(device)
    optimizer = build_optimizer(model.parameters(), cfg)

    sampler = dist.distributed_sampler(train_ds, shuffle=True, seed=cfg.seed)  # this rank's share, per epoch
    train_loader = make_loader(train_ds, cfg.batch_size, shuffle=False, num_workers=cfg.num_workers,
                               seed=cfg.seed, drop_last=True, sampler=sampler)
    val_loader = make_loader(val_ds, max(1, cfg.batch_size), shuffle=False, num_workers=cfg.num_workers,
                             sampler=dist.shard_sampler(val_ds) if dist.is_distributed() else None)
    steps_per_epoch = len(train_loader)
    total_steps = cfg.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, poly_lr_lambda(total_steps, cfg.poly_power, cfg.warmup_steps))

    state = RunState()
    last_path = out / "last.pt"
    if cfg.resume:
        state = restore_run(out, spec, num_classes, model, optimizer, scheduler, "best_miou")
    elif main:  # a fresh run: step checkpoints of an older run here must not look newer than ours
        for _, old in step_checkpoints(out):
            old.unlink()
    step, best, history = state.step, state.best, state.history
    ddp = dist.wrap_model(model, device)  # DistributedDataParallel under torchrun, else the model itself

    resolved = cfg.to_dict()
    if main:
        write_json(out / "config.json", resolved)
    class_dicts = [c.to_dict() if hasattr(c, "to_dict") else dict(c.__dict__) for c in classes]
    tb = None
    if cfg.tensorboard and main:
        from pixelwise.engine.loggers import TensorBoardLogger

        tb = TensorBoardLogger(out, [c.name for c in classes])

    def checkpoint(epoch: int, metrics: dict[str, Any], progress: dict[str, Any] | None = None) -> dict[str, Any]:
        ck = {
            "model": spec, "state_dict": model.state_dict(), "classes": class_dicts, "normalization": norm,
            "config": resolved, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "epoch": epoch, "step": step, "rng": rng_state(), "metrics": metrics, "best_miou": best,
            "task": "semantic",
        }
        if progress is not None:  # written mid-epoch: where to continue
            ck["epoch_progress"] = progress
        return ck

    t0 = time.time()
    stop = False
    ddp.train()
    for epoch in range(state.epoch, cfg.epochs):
        skip = state.batches if epoch == state.epoch else 0  # batches of this epoch already trained
        sums = state.sums if epoch == state.epoch else {}
        # the epoch's order, as in an uninterrupted run, without the batches already trained
        sampler.set_epoch(epoch, skip=min(skip * cfg.batch_size, sampler.num_samples))
        train_ds.epoch = epoch
        bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not (cfg.progress and main),
                   unit="it", dynamic_ncols=True, leave=False, initial=skip, total=steps_per_epoch)
        loss_sum, n = float(sums.get("loss", 0.0)), int(sums.get("n", 0))
        batches = skip
        for batch in bar:
            images = batch["image"].to(device, non_blocking=True)
            target = batch["semantic"].to(device, non_blocking=True)
            pixel_w = batch.get("weight_map")
            if unpadded:  # the output is the valid centre of the input
                target = model.crop_target(target)
                pixel_w = None if pixel_w is None else model.crop_target(pixel_w)
            with dist.autocast(device, cfg.amp):
                outputs = ddp(images)
                loss = criterion(outputs, target, pixel_weights=None if pixel_w is None else pixel_w.to(device))
            # the step's one host sync: NaN check, running mean, progress bar, time limit (all ranks agree)
            timed_out = bool(cfg.time_limit and time.time() - t0 > cfg.time_limit)
            loss_value, stop = dist.step_sync(loss, timed_out)
            if not math.isfinite(loss_value):
                raise PixelwiseError(
                    f"loss became {loss_value} at epoch {epoch + 1}, step {step}; lower --lr. "
                    f"The last good checkpoint is kept in {last_path}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            batches += 1
            loss_sum += loss_value
            n += 1
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and main:
                save_step(out, checkpoint(epoch, {}, {"batches": batches, "sums": {"loss": loss_sum, "n": n}}),
                          cfg.keep_last)
            if stop:
                break
        bar.close()
        is_last = stop or epoch == cfg.epochs - 1
        record: dict[str, Any] = {"epoch": epoch, "step": step, "train_loss": loss_sum / max(1, n),
                                  "lr": scheduler.get_last_lr()[0], "time": round(time.time() - t0, 2)}
        if (epoch + 1) % cfg.eval_every == 0 or is_last:
            dist.sync_buffers(model)  # every rank evaluates rank 0's model: the one saved
            m = evaluate_model(model, val_loader, num_classes, device, progress=cfg.progress and main, desc="eval")
            record.update({k: m[k] for k in ("pixel_accuracy", "mean_accuracy", "miou", "fwiou")})
            record["iou"] = m["iou"]
            if m["miou"] > best:
                best = m["miou"]
                record["best"] = True
        history.append(record)
        if main:
            save_epoch(out, history, checkpoint(epoch, record), bool(record.get("best")))
        if tb is not None:
            tb.log_epoch(record, step)
            if "miou" in record:
                tb.log_images("val/predictions", val_pictures(model, val_ds, [c.color for c in classes], device), step)
        if cfg.progress and main:
            msg = f"epoch {epoch + 1}/{cfg.epochs}  loss {record['train_loss']:.4f}"
            if "miou" in record:
                msg += f"  val mIoU {record['miou']:.4f}  pixel acc {record['pixel_accuracy']:.4f}"
            tqdm.write(msg + f"  ({record['time']:.0f}s)")
        if stop:
            if cfg.progress and main:
                tqdm.write(f"time limit of {cfg.time_limit:.0f}s reached: stopping after {step} steps")
            break
    if tb is not None:
        tb.close()
    evaluated = [h for h in history if "miou" in h]
    best_rec = max(evaluated, key=lambda h: h["miou"]) if evaluated else {}
    return {"best": best_rec, "last": history[-1] if history else {}, "steps": step,
            "time": time.time() - t0, "out": str(out)}
