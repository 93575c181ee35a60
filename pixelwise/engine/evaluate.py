"""The one evaluation driver, for every task, and ``pixelwise evaluate``'s checkpoint evaluation.

:func:`run_evaluation` runs a model over a loader with a task's evaluator
(:class:`~pixelwise.tasks.base.Evaluator`: ``reset / forward / process / evaluate``); the
training loop, :func:`evaluate_checkpoint` (``pixelwise evaluate``) and the run report all
go through it. Under torchrun a loader whose sampler is a
:class:`~pixelwise.engine.distributed.ShardSampler` holds this rank's block of the split: the
evaluator's states are gathered in dataset order and scored once on rank 0 (every rank gets
the metrics, exactly those of one process). A padding sampler (``DistributedSampler``) would
count samples twice and is refused.
"""
from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn as nn
from tqdm import tqdm

from pixelwise.data.loading import apply_skip_bad, make_loader, skipped_report, write_json
from pixelwise.data.transforms import build_transforms
from pixelwise.engine import distributed as dist
from pixelwise.engine.checkpoint import load_checkpoint, model_from_checkpoint
from pixelwise.engine.common import resolve_device
from pixelwise.postprocess import logits_of, predict_labels  # noqa: F401  (re-exported)
from pixelwise.tasks import Evaluator, task_of_checkpoint
from pixelwise.tasks.semantic import SemanticEvaluator, format_metrics  # noqa: F401  (re-exported)

__all__ = ["eval_mode", "run_evaluation", "evaluate_checkpoint", "evaluate_model", "format_metrics",
           "predict_labels"]


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode inside the block; its training mode restored after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def run_evaluation(model: nn.Module, loader, evaluator: Evaluator, device: torch.device | str = "cpu",
                   progress: bool = False, desc: str = "eval") -> dict[str, Any]:
    """Run ``model`` (in eval mode, without autograd) over ``loader`` and return
    ``evaluator.evaluate()`` of the whole split, plus ``seconds_per_image`` (this rank's)."""
    sharded = dist.is_sharded_eval(loader, "run_evaluation")
    device = torch.device(device)
    evaluator.reset()
    t0, n = time.time(), 0
    with eval_mode(model), torch.inference_mode():
        for batch in tqdm(loader, desc=desc, disable=not progress, leave=False, unit="batch"):
            evaluator.process(batch, evaluator.forward(model, batch, device))
            n += len(batch["meta"]) if "meta" in batch else len(batch["image"])
    seconds = (time.time() - t0) / max(1, n)
    if sharded:  # rank order = dataset order
        evaluator.load_state(dist.gather_objects(evaluator.state()))
        metrics = dist.run_on_main(evaluator.evaluate)
    else:
        metrics = evaluator.evaluate()
    return {**metrics, "seconds_per_image": seconds}


def evaluate_model(model: nn.Module, loader, num_classes: int, device: torch.device | str = "cpu",
                   progress: bool = False, desc: str = "eval", **options: Any) -> dict[str, Any]:
    """The semantic metrics of ``model`` over ``loader`` (:class:`SemanticEvaluator` options:
    ``tile``, ``overlap``, ``flip``, ``scales``, ``instance_f1``, ``instance_iou``, ``min_size``)."""
    m = run_evaluation(model, loader, SemanticEvaluator(num_classes, **options), device, progress, desc)
    m.pop("seconds_per_image")
    return m


def evaluate_checkpoint(checkpoint: str | os.PathLike, data: str | os.PathLike, split: str = "val",
                        out: str | os.PathLike | None = None, batch_size: int = 4, num_workers: int | None = None,
                        device: str = "auto", progress: bool = True, *, tile: int | None = None,
                        overlap: int | None = None, flip: bool = False, scales: tuple[float, ...] | None = None,
                        instance_f1: bool = False, min_size: int = 0, fast: bool = False,
                        skip_bad_samples: bool = False, ckpt: dict[str, Any] | None = None) -> dict[str, Any]:
    """Evaluate a checkpoint of any task on a dataset split; optionally write the metrics JSON to ``out``.

    Semantic options: ``tile``/``overlap`` (sliding-window inference; ``unet_original``:
    overlap-tile always), ``flip``/``scales`` (test-time augmentation), ``instance_f1`` (also
    score the connected components of at least ``min_size`` pixels against the instance maps),
    ``fast`` (:func:`pixelwise.optimize.optimize`). ``skip_bad_samples``: leave out the
    samples whose files are unusable (a warning line; ``metrics["skipped_samples"]`` lists them).
    """
    ckpt = ckpt if ckpt is not None else load_checkpoint(checkpoint)
    task = task_of_checkpoint(ckpt)
    model = model_from_checkpoint(ckpt, checkpoint)
    dev = resolve_device(device)
    model.to(dev)
    if fast and task.supports_optimize:  # conv+BN folding, channels_last, inference mode; same outputs within 1e-4
        from pixelwise.optimize import optimize

        model = optimize(model, inplace=True)
    norm = ckpt["normalization"]
    ds = task.open(str(data), split, build_transforms(train=False, mean=norm["mean"], std=norm["std"]),
                   norm.get("image_mode", "RGB"), with_instances=instance_f1,
                   **task.data_options(ckpt.get("config") or {}))
    ds = apply_skip_bad(ds, skip_bad_samples, split, data)
    task.check_data(ds, ckpt, data)
    options = {k: v for k, v in {"tile": tile, "overlap": overlap, "flip": flip, "scales": scales,
                                 "instance_f1": instance_f1, "min_size": min_size}.items() if v}
    task.check_eval_options(options)
    options.update(task.evaluation_files(Path(checkpoint), Path(out) if out is not None else None, split))
    loader = make_loader(ds, batch_size, shuffle=False, num_workers=num_workers, collate_fn=task.collate())
    metrics = run_evaluation(model, loader, task.evaluator(ds, ckpt, model, **options), dev, progress,
                             f"eval {split}")
    metrics.update({"task": task.name, **task.naming(ckpt), "checkpoint": str(checkpoint), "split": split,
                    **task.evaluation_summary(model, options)})
    if skip_bad_samples:
        metrics["skipped_samples"] = skipped_report(ds)
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        write_json(out, metrics)
    return metrics
