"""THE training loop, for every task: poly LR, per-epoch evaluation, atomic checkpoints, resume.

The loop knows nothing of semantic, instance or panoptic work: the model's task
(:mod:`pixelwise.tasks`) opens the data, prepares the training set and returns the step,
``step(model, batch, device) -> {name: loss}`` (detectron2's ``run_step``: the loop sums the
terms, calls ``backward`` once, clips and steps); evaluation goes through the one driver
(:func:`pixelwise.engine.evaluate.run_evaluation`) with the task's evaluator. Everything it
needs is in :class:`~pixelwise.engine.config.TrainConfig`.

Many processes (``torchrun``, :mod:`pixelwise.engine.distributed`): each rank trains on its
share of every epoch's permutation under DistributedDataParallel, evaluates its own block of
the validation split, and the evaluator's states are gathered, so the metrics are those of
one process. Only rank 0 prints, logs and writes files; checkpoints hold the bare model.

Never lose work (:mod:`pixelwise.engine.checkpoint`): besides the end of every epoch, a
checkpoint is written every ``checkpoint_every`` steps (``step_{N}.pt``, the last
``keep_last`` kept, ``last.pt`` the newest), atomically. ``resume`` continues from the newest
one, in the middle of an epoch if need be: the epoch's sample order depends only on
``(seed, epoch)`` and sample i's augmentation only on ``(seed, epoch, i)``
(:class:`SeededSamples`), so the batches already trained are skipped and the others come
exactly as they would have. With ``deterministic``, an interrupted and resumed run ends with
the weights and metrics of an uninterrupted one.

``tensorboard``: rank 0 also logs every epoch's record as scalars and, at each evaluation,
the first :data:`TENSORBOARD_IMAGES` val images with their prediction (``RUN/tensorboard``).
"""
from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from pixelwise.data.loading import RepeatDataset, apply_skip_bad, make_loader, normalization_for, write_json
from pixelwise.data.transforms import build_transforms
from pixelwise.engine import distributed as dist
from pixelwise.engine.checkpoint import RunState, restore_run, rng_state, save_epoch, save_step, step_checkpoints
from pixelwise.engine.common import resolve_device
from pixelwise.engine.config import TrainConfig
from pixelwise.engine.evaluate import eval_mode, run_evaluation
from pixelwise.errors import DataError, PixelwiseError
from pixelwise.models.registry import build_model
from pixelwise.tasks import Task, task_for_model

__all__ = ["fit", "optimizer_step", "poly_lr_lambda", "build_optimizer", "start_run", "make_deterministic", "SeededSamples",
           "TENSORBOARD_IMAGES"]

#: how many val images (the first ones) TensorBoard shows with their predictions per evaluation
TENSORBOARD_IMAGES = 4


def poly_lr_lambda(total_steps: int, power: float = 0.9, warmup_steps: int = 0,
                   time_fraction: Callable[[], float] | None = None):
    """LR factor of the 'poly' schedule (DeepLab/PSPNet): (1 - progress)^power, with optional
    linear warmup. progress = step / total_steps, or the share of the time limit spent when
    ``time_fraction`` says more: a run stopped by its time limit ends with the LR near zero
    (annealed) instead of being cut at full LR, whatever the machine's speed."""

    def f(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = step / max(1, total_steps)
        if time_fraction is not None:
            progress = max(progress, time_fraction())
        return max(0.0, 1.0 - progress) ** power

    return f


class ScheduleClock:
    """The share of the time limit spent, as last agreed by all ranks (0 before the first step).
    The loop sets ``fraction`` once per step from the synchronised elapsed time, so every rank
    follows the same learning rate."""

    def __init__(self) -> None:
        self.fraction = 0.0

    def __call__(self) -> float:
        return self.fraction


def build_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise PixelwiseError(f"unknown optimizer {cfg.optimizer!r}; use 'sgd' or 'adamw'")


def make_deterministic() -> None:
    """Deterministic kernels where PyTorch has them (a warning names any op without one),
    no cuDNN autotuning, and cuBLAS's deterministic workspace. For this process, from now on."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


def start_run(cfg: TrainConfig, distributed: bool = False) -> tuple[torch.device, Path, dict[str, Any]]:
    """What training does first: CPU threads, seeds, device, the run folder, and the image
    normalisation that goes into the checkpoint. ``distributed``: the caller supports torchrun,
    so join its process group (the device is then this rank's); a caller that does not must
    not run as several processes that all write the same files."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if distributed:
        device = dist.init_distributed(cfg.device)
    elif dist.launched_by_torchrun():
        raise PixelwiseError(f"model {cfg.model!r}: this training runs as one process; start it without "
                             f"torchrun (WORLD_SIZE={os.environ.get('WORLD_SIZE')})")
    else:
        device = resolve_device(cfg.device)
    if getattr(cfg, "deterministic", False):
        make_deterministic()
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    return device, out, normalization_for(cfg.image_mode, cfg.mean, cfg.std)


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


def optimizer_step(model: torch.nn.Module, loss: torch.Tensor, optimizer: torch.optim.Optimizer,
                   grad_clip: float | None = None) -> None:
    """The one backward pass of pixelwise: gradients of ``loss``, clipped to ``grad_clip``
    (total norm), then one optimizer step."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()


def _pictures(task: Task, model: torch.nn.Module, ds: Any, device: torch.device) -> list[np.ndarray]:
    with eval_mode(model), torch.inference_mode():
        return [task.picture(model, ds, i, device) for i in range(min(TENSORBOARD_IMAGES, len(ds)))]


#: the files that say a folder holds a training run
RUN_FILES = ("last.pt", "best.pt", "metrics.jsonl")


def check_run_folder(cfg: TrainConfig) -> None:
    """Refuse to start a fresh run in a folder that holds another one, unless told to (``overwrite``)."""
    out = Path(cfg.out)
    if cfg.resume or cfg.overwrite or not out.is_dir():
        return
    found = [n for n in RUN_FILES if (out / n).exists()] + [p.name for _, p in step_checkpoints(out)][:1]
    if found:
        raise PixelwiseError(f"{out}: holds a training run ({', '.join(found)}); pass --resume to continue it, "
                             f"--overwrite to replace it, or choose another --out")


def initial_model(cfg: TrainConfig, num_classes: int) -> torch.nn.Module:
    """The model of ``cfg.init_from`` (``torchvision:ARCH:WEIGHTS.pth``: torchvision's weights
    converted, :mod:`pixelwise.models.torchvision`), its class layers fresh when the data has
    another number of classes; its options are the conversion's."""
    from pixelwise.models.torchvision import convert_torchvision

    kind, _, rest = str(cfg.init_from).partition(":")
    arch, _, path = rest.partition(":")
    if kind != "torchvision" or not arch or not path:
        raise PixelwiseError(f"init_from {cfg.init_from!r}: give torchvision:ARCH:WEIGHTS.pth, e.g. "
                             "torchvision:deeplabv3_resnet50:deeplabv3_resnet50_coco.pth")
    conv = convert_torchvision(arch, path, num_classes=num_classes)
    if conv.spec["name"] != cfg.model:
        raise PixelwiseError(f"init_from {cfg.init_from!r} gives a {conv.spec['name']!r} model, not {cfg.model!r}: "
                             f"pass --model {conv.spec['name']}")
    return conv.model.train()


def fit(cfg: TrainConfig, train_data: Any = None, val_data: Any = None, classes: Any = None,
        transform: Any = None) -> dict[str, Any]:
    """Train ``cfg.model`` on ``cfg.data``; returns the best and last validation records.

    Or on your own map-style datasets of (image, mask) pairs (semantic models,
    :mod:`pixelwise.data.user`): ``train_data`` and ``val_data`` (default: ``cfg.val_fraction``
    of ``train_data`` held out, seeded), ``classes`` (names, index = mask value) and an optional
    joint ``transform`` that replaces pixelwise's own augmentation."""
    task = task_for_model(cfg.model)
    task.check_config(cfg, TrainConfig())
    check_run_folder(cfg)
    device, out, norm = start_run(cfg, distributed=True)
    main = dist.is_main()  # rank 0: the one process that prints and writes files
    report_to = out / "skipped_samples.json" if main else None  # bad samples left out, listed per split

    def opened(split: str, transforms: Any, **options: Any) -> Any:
        ds = task.open(cfg.data, split, transforms, cfg.image_mode, quiet=not main, **options,
                       **task.data_options(cfg.to_dict()))
        return apply_skip_bad(ds, cfg.skip_bad_samples, split, cfg.data, report_to, quiet=not main)

    eval_tf = build_transforms(train=False, mean=norm["mean"], std=norm["std"])
    if train_data is None:
        train_base = opened(cfg.train_split, None, **task.open_training(cfg))
        val_ds = opened(cfg.val_split, eval_tf)
    else:  # the user's own datasets
        from pixelwise.data.user import split_indices

        if val_data is None:
            train_idx, val_idx = split_indices(len(train_data), cfg.val_fraction)
            train_base, val_ds = (task.wrap_dataset(train_data, classes, transform, cfg.image_mode, train_idx),
                                  task.wrap_dataset(train_data, classes, None, cfg.image_mode, val_idx))
        else:
            train_base = task.wrap_dataset(train_data, classes, transform, cfg.image_mode)
            val_ds = task.wrap_dataset(val_data, classes or train_base.classes, None, cfg.image_mode)
        val_ds.transforms = eval_tf
    classes, extras = train_base.classes, task.checkpoint_extras(train_base)
    if task.checkpoint_extras(val_ds) != extras:
        raise DataError(getattr(val_ds, "annotation_file", cfg.data),
                        "the validation split has other categories than the training split")
    num_classes, task_kwargs = task.model_args(train_base)
    model_kwargs = {**task_kwargs, **cfg.model_kwargs}
    if cfg.image_mode == "L":
        model_kwargs.setdefault("in_channels", 1)
    model = (build_model(cfg.model, num_classes, **model_kwargs) if not cfg.init_from
             else initial_model(cfg, num_classes)).to(device)
    spec = model.pixelwise_spec
    setup = task.training(cfg, model, train_base, norm, out, main)
    train_set = SeededSamples(RepeatDataset(setup.dataset, cfg.repeat) if cfg.repeat > 1 else setup.dataset, cfg.seed)
    optimizer = build_optimizer(model.parameters(), cfg)
    sampler = dist.distributed_sampler(train_set, shuffle=True, seed=cfg.seed)  # this rank's share, per epoch
    collate = {"collate_fn": task.collate()}
    if len(train_set) == 0 or len(val_ds) == 0:
        raise DataError(getattr(train_base, "annotation_file", cfg.data), "the split has no images")
    train_loader = make_loader(train_set, cfg.batch_size, False, cfg.num_workers, cfg.seed, drop_last=True,
                               sampler=sampler, **collate)
    val_loader = make_loader(val_ds, max(1, cfg.batch_size), False, cfg.num_workers,
                             sampler=dist.shard_sampler(val_ds) if dist.is_distributed() else None, **collate)
    steps_per_epoch = len(train_loader)
    # a time limit also paces the schedule, except where runs must not depend on the clock
    clock = ScheduleClock() if cfg.time_limit and cfg.time_schedule and not cfg.deterministic else None
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, poly_lr_lambda(cfg.epochs * steps_per_epoch, cfg.poly_power, cfg.warmup_steps, clock))
    grad_clip = task.default_grad_clip if cfg.grad_clip is None else (cfg.grad_clip or None)

    state = RunState()
    if cfg.resume:
        state = restore_run(out, spec, num_classes, model, optimizer, scheduler, task.best_key)
    elif main:  # a fresh run: step checkpoints of an older run here must not look newer than ours
        for _, old in step_checkpoints(out):
            old.unlink()
    step, best, history = state.step, state.best, state.history
    ddp = dist.wrap_model(model, device, find_unused_parameters=task.find_unused_parameters)
    resolved = {**cfg.to_dict(), "crop_size": setup.crop_size}
    if main:
        write_json(out / "config.json", resolved)
    class_dicts = [c.to_dict() if hasattr(c, "to_dict") else dict(c.__dict__) for c in classes]
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
            with dist.autocast(device, cfg.amp):  # bf16 on CUDA; nothing on the CPU
                losses = setup.step(ddp, batch, device)
            loss = sum(losses.values())
            # the step's one host sync: every term averaged over ranks, NaN check, time limit (all ranks agree)
            elapsed = time.time() - t0
            timed_out = bool(cfg.time_limit and elapsed > cfg.time_limit)
            values, stop = dist.step_sync_values(torch.stack([*(v.detach().float() for v in losses.values()),
                                                              loss.detach().float(), loss.new_tensor(elapsed).float()]),
                                                 timed_out)
            loss_value = values[-2]
            if clock is not None:
                clock.fraction = min(1.0, values[-1] / cfg.time_limit)
            if not math.isfinite(loss_value):
                raise PixelwiseError(f"loss became {loss_value} at epoch {epoch + 1}, step {step}; lower --lr. "
                                     f"The last good checkpoint is kept in {out / 'last.pt'}")
            optimizer_step(model, loss, optimizer, grad_clip)
            scheduler.step()
            step += 1
            batches += 1
            n += 1
            terms = {k: v for k, v in zip(losses, values) if k != "loss"}
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v
            sums["loss"] = sums.get("loss", 0.0) + loss_value
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
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
            metrics = run_evaluation(model, val_loader, task.evaluator(val_ds, {"classes": class_dicts, **extras},
                                                                         model),
                                     device, progress=cfg.progress and main, desc="eval")
            record.update(task.record(metrics, val_ds))
            if record[task.best_metric] > best:
                best = record[task.best_metric]
                record["best"] = True
        history.append(record)
        if main:
            save_epoch(out, history, checkpoint(epoch, record), bool(record.get("best")))
        if tb is not None:
            tb.log_epoch(record, step)
            if evaluated:
                tb.log_images("val/predictions", _pictures(task, model, val_ds, device), step)
        if cfg.progress and main:
            msg = f"epoch {epoch + 1}/{cfg.epochs}  loss {record['train_loss']:.4f}"
            if evaluated:
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
            "time": time.time() - t0, "out": str(out), "steps_run": step - state.step}
