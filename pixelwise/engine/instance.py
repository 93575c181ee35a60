"""Instance models (Mask R-CNN): the former engine entry points, kept for existing code. The
task itself lives in :mod:`pixelwise.tasks.instance`; training, evaluation and prediction go
through the shared engine (:mod:`pixelwise.engine.fit`, :mod:`pixelwise.engine.evaluate`,
:mod:`pixelwise.engine.predict`)."""
from __future__ import annotations

import os
from typing import Any, Iterable, Sequence

import torch
from torch.utils.data import DataLoader

from pixelwise.data.loading import instance_collate, make_loader  # noqa: F401  (re-exported)
from pixelwise.engine.config import TrainConfig
from pixelwise.engine.evaluate import evaluate_checkpoint, run_evaluation
from pixelwise.engine.fit import fit
from pixelwise.engine.predict import predict_files
from pixelwise.errors import DataError
from pixelwise.tasks.instance import CocoEvaluator, format_instance_metrics  # noqa: F401  (re-exported)
from pixelwise.viz import draw_instances, instance_colors  # noqa: F401  (re-exported)

__all__ = ["train_instance", "evaluate_instance_model", "evaluate_instance_checkpoint", "format_instance_metrics",
           "predict_instance_files", "draw_instances", "instance_collate", "instance_colors"]


def _loader(ds, batch_size: int, shuffle: bool, num_workers: int | None, seed: int = 0,
            drop_last: bool = False, sampler=None) -> DataLoader:
    """A DataLoader with :func:`instance_collate`."""
    if len(ds) == 0:
        raise DataError(getattr(ds, "annotation_file", "dataset"), "the split has no images")
    return make_loader(ds, batch_size, shuffle, num_workers, seed, drop_last, sampler, collate_fn=instance_collate)


def train_instance(cfg: TrainConfig) -> dict[str, Any]:
    """Train an instance model (``cfg.model``, e.g. ``maskrcnn``); same as :func:`pixelwise.engine.train.train`."""
    return fit(cfg)


def evaluate_instance_model(model: torch.nn.Module, loader: DataLoader, category_ids: Sequence[int],
                            gt_json: str | os.PathLike | dict, device: torch.device | str = "cpu",
                            results_path: str | os.PathLike | None = None, progress: bool = False,
                            desc: str = "eval") -> dict[str, Any]:
    """COCO mask and box metrics of ``model`` over ``loader`` (:class:`CocoEvaluator`)."""
    evaluator = CocoEvaluator(category_ids, gt_json, getattr(model, "mask_threshold", 0.5), results_path)
    return run_evaluation(model, loader, evaluator, device, progress, desc)


def evaluate_instance_checkpoint(checkpoint: str | os.PathLike, data: str | os.PathLike, split: str = "val",
                                 out: str | os.PathLike | None = None, batch_size: int = 4, num_workers: int = 0,
                                 device: str = "auto", progress: bool = True, **kwargs: Any) -> dict[str, Any]:
    return evaluate_checkpoint(checkpoint, data, split, out, batch_size, num_workers, device, progress, **kwargs)


def predict_instance_files(checkpoint: str | os.PathLike, inputs: Iterable[str | os.PathLike], out: str | os.PathLike,
                           device: str = "auto", alpha: float = 0.5, progress: bool = True, **kwargs: Any) -> list:
    return predict_files(checkpoint, inputs, out, device, alpha, progress, **kwargs)
