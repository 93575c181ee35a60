"""Training defaults that work on a laptop CPU: :func:`plan_training` sizes a run from the device,
the data and a memory budget, and says the plan in one line.

Used by ``pixelwise train`` when no ``--config`` is given and the device is the CPU (on a GPU
the built-in defaults stay the papers' recipes; ``configs/paper/`` has them in full). What it
chooses, each only where the user set nothing:

- the model's CPU size: the options of its ready ``configs/{model}_shapes.yaml``
  (:data:`CPU_MODEL_OPTIONS`: 1/4 width, a ResNet-18 encoder, ...; U-Net at 1/8: 8 channels first);
- AdamW at 2e-3 (small data, from scratch), flips, scale jitter 0.75-1.25;
- the crop: the largest multiple of 32 up to 128 that fits the smallest training image;
- the batch: the largest (up to 4) whose measured peak memory stays within the budget
  (default half the available RAM, ``--max-memory``): one forward/backward pass of a batch of 2
  at the crop size, peak RSS from the kernel (``VmHWM``);
- the length: about :data:`CPU_MINUTES` minutes of steps at the measured step time, in 3 to 10
  epochs (random crops of repeated images); ``time_limit`` stops it at 1.5x that.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any

import torch

from pixelwise.engine.common import resolve_device
from pixelwise.engine.config import TrainConfig
from pixelwise.errors import PixelwiseError
from pixelwise.tasks import task_for_model

__all__ = ["plan_training", "CPU_MODEL_OPTIONS", "CPU_MINUTES", "SIZING_KEYS", "available_memory", "parse_memory"]

#: config keys that steer a run's size: giving any of them (or a --model-arg) turns the plan off
SIZING_KEYS = frozenset({"epochs", "batch_size", "crop_size", "repeat", "lr", "optimizer", "time_limit", "init_from"})

#: CPU-sized options per model (those of configs/{model}_shapes.yaml)
CPU_MODEL_OPTIONS: dict[str, dict[str, Any]] = {
    "unet": {"width": 0.125},
    "unet_original": {"width": 0.25, "depth": 3, "dropout": 0.1},
    "fcn8s": {"backbone": "vgg16_bn", "width": 0.25},
    "fcn16s": {"backbone": "vgg16_bn", "width": 0.25},
    "fcn32s": {"backbone": "vgg16_bn", "width": 0.25},
    "segnet": {"width": 0.25},
    "segnet_basic": {"channels": 32},
    "deeplabv3": {"backbone": "resnet18", "atrous_rates": [2, 4, 6], "aspp_channels": 128},
    "deeplabv3plus": {"backbone": "resnet18", "aspp_channels": 128, "decoder_channels": 128},
    "pspnet": {"backbone": "resnet18", "ppm_channels": 64, "head_channels": 128, "aux_channels": 64},
}

#: how long a planned CPU run trains
CPU_MINUTES = 1.5
#: steps per epoch a planned run aims at (few large images: random crops, repeated)
STEPS_PER_EPOCH = 40
#: larger batches cost step time on 2-8 cores; more steps in the same minutes learn more
MAX_BATCH = 4


def _proc_kb(field: str, path: str = "/proc/self/status") -> int | None:
    try:
        with open(path, encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def available_memory() -> int | None:
    """Bytes of RAM available to new allocations (``MemAvailable``), None where unknown."""
    kb = _proc_kb("MemAvailable", "/proc/meminfo")
    return None if kb is None else kb * 1024


def parse_memory(text: str | float | int | None) -> int | None:
    """``"4GB"``, ``"512M"``, ``"2.5G"`` or a number of bytes -> bytes (None stays None)."""
    if text is None or isinstance(text, (int, float)):
        return None if text is None else int(text)
    t = str(text).strip().upper().removesuffix("B").removesuffix("I")
    units = {"K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}
    try:
        return int(float(t[:-1]) * units[t[-1]]) if t and t[-1] in units else int(float(t))
    except (ValueError, KeyError):
        raise PixelwiseError(f"--max-memory {text!r}: give a size such as 4GB, 1500MB or 2.5G") from None


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS counter of this process (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _measure_step(cfg: TrainConfig, model_kwargs: dict[str, Any], num_classes: int, in_channels: int,
                  crop: int, batch: int = 2) -> tuple[int, float]:
    """(peak bytes above the RSS before, seconds) of one training step of ``batch`` random
    images at ``crop`` px, after one warm-up step."""
    from pixelwise.engine.fit import optimizer_step
    from pixelwise.losses import build_loss
    from pixelwise.models.registry import build_model

    torch.manual_seed(0)
    model = build_model(cfg.model, num_classes, **model_kwargs).train()
    loss_fn = build_loss("ce", num_classes=num_classes, ignore_index=255)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-9)
    x = torch.randn(batch, in_channels, crop, crop)
    y = torch.randint(0, num_classes, (batch, crop, crop))
    if hasattr(model, "crop_target"):
        y = model.crop_target(y)

    def step() -> None:
        optimizer_step(model, loss_fn(model(x), y), opt)

    step()
    base_kb = _proc_kb("VmRSS") or 0
    reset = _reset_peak()
    t0 = time.perf_counter()
    step()
    seconds = time.perf_counter() - t0
    peak_kb = _proc_kb("VmHWM") if reset else None
    grown = max(0, (peak_kb or base_kb) - base_kb) * 1024
    return grown, seconds


def _crop_for(ds: Any, cap: int = 128) -> int:
    """The largest multiple of 32 up to ``cap`` that fits the smallest of the first images."""
    sides = []
    for i in range(min(len(ds), 16)):
        h, w = ds.load(i)["image"].shape[-2:]
        sides.append(min(int(h), int(w)))
    side = min(sides) if sides else cap
    return max(64, min(cap, side // 32 * 32))


def plan_training(cfg: TrainConfig, explicit: set[str], max_memory: int | None = None,
                  ) -> tuple[TrainConfig, str | None]:
    """``cfg`` sized for this machine's CPU where the user set nothing (``explicit``: the config
    keys and ``model_kwargs.*`` keys they gave), and the one-line plan; unchanged (and None) on a
    GPU or for models without a CPU plan (detection models: their ``*_cpu`` presets)."""
    device = resolve_device(cfg.device)
    if device.type != "cpu" or cfg.model not in CPU_MODEL_OPTIONS:
        return cfg, None
    task = task_for_model(cfg.model)
    ds = task.open(cfg.data, cfg.train_split, None, cfg.image_mode, quiet=True, **task.data_options(cfg.to_dict()))
    changes: dict[str, Any] = {}
    model_kwargs = dict(cfg.model_kwargs)
    for k, v in CPU_MODEL_OPTIONS[cfg.model].items():
        if f"model_kwargs.{k}" not in explicit and k not in model_kwargs:
            model_kwargs[k] = v
    changes["model_kwargs"] = model_kwargs
    for key, value in (("optimizer", "adamw"), ("lr", 2e-3), ("scale_min", 0.75), ("scale_max", 1.25)):
        if key not in explicit:
            changes[key] = value
    crop = cfg.crop_size if "crop_size" in explicit else _crop_for(ds)
    changes["crop_size"] = crop

    budget = max_memory or max(512 * 2 ** 20, (available_memory() or 8 * 2 ** 30) // 2)
    in_channels = 1 if cfg.image_mode == "L" else 3
    if cfg.image_mode == "L":
        model_kwargs.setdefault("in_channels", 1)
    base_rss = (_proc_kb("VmRSS") or 0) * 1024
    grown, seconds = _measure_step(cfg, model_kwargs, len(ds.classes), in_channels, crop)
    per_image, sec_per_image = grown / 2, seconds / 2
    workers = cfg.num_workers if cfg.num_workers is not None else min(2, max(0, (os.cpu_count() or 1) - 1))
    worker_bytes = 300 * 2 ** 20 * workers  # a DataLoader worker: its own interpreter and torch

    def peak(b: int) -> float:
        return base_rss + worker_bytes + per_image * b

    if "batch_size" in explicit:
        batch = cfg.batch_size
    else:
        batch = max([b for b in range(1, MAX_BATCH + 1) if peak(b) <= budget] or [1])
        if peak(batch) > budget:
            raise PixelwiseError(
                f"even a batch of 1 at crop {crop} needs ~{peak(1) / 2 ** 30:.1f} GB, over the memory budget of "
                f"{budget / 2 ** 30:.1f} GB: pass a smaller --crop-size, --max-memory or --model-arg width=...")
    changes["batch_size"] = batch
    step_s = sec_per_image * batch
    # the run's length: about CPU_MINUTES of steps, in 3..10 epochs (an evaluation and a checkpoint each)
    total = max(30, int(CPU_MINUTES * 60 / max(step_s, 1e-3)))
    if "epochs" not in explicit:
        changes["epochs"] = max(3, min(10, round(total / STEPS_PER_EPOCH)))
    epochs = changes.get("epochs", cfg.epochs)
    if "repeat" not in explicit:
        changes["repeat"] = max(1, math.ceil(max(1, total // epochs) * batch / max(1, len(ds))))
    steps_per_epoch = max(1, len(ds) * changes.get("repeat", cfg.repeat) // batch)
    if "time_limit" not in explicit:
        changes["time_limit"] = CPU_MINUTES * 60 * 1.5
    cfg = dataclasses.replace(cfg, **changes)
    opts = ", ".join(f"{k} {v}" for k, v in model_kwargs.items() if k != "in_channels")
    line = (f"plan: {cfg.model} ({opts}), crop {crop}, batch {batch}, {cfg.epochs} epochs x {steps_per_epoch} steps, "
            f"~{step_s:.2f} s/step (~{cfg.epochs * steps_per_epoch * step_s / 60:.1f} min), peak ~"
            f"{peak(batch) / 2 ** 30:.1f} GB of a {budget / 2 ** 30:.1f} GB budget on this CPU "
            f"({torch.get_num_threads()} threads, {workers} loader workers). A config (--config) replaces the plan.")
    return cfg, line
