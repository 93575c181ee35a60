"""Panoptic models (Panoptic FPN): the former engine entry points, kept for existing code. The
task itself lives in :mod:`pixelwise.tasks.panoptic`; training, evaluation and prediction go
through the shared engine."""
from __future__ import annotations

import os
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch.utils.data import DataLoader

from pixelwise.engine.config import TrainConfig
from pixelwise.engine.evaluate import evaluate_checkpoint, run_evaluation
from pixelwise.engine.fit import fit
from pixelwise.engine.predict import predict_files
from pixelwise.tasks.panoptic import (  # noqa: F401  (re-exported)
    PREDICTIONS_JSON, PanopticEvaluator, format_panoptic_metrics, segments_info, write_panoptic_predictions,
)
from pixelwise.viz import draw_panoptic, segment_colors  # noqa: F401  (re-exported)

__all__ = ["PREDICTIONS_JSON", "draw_panoptic", "evaluate_panoptic_checkpoint", "evaluate_panoptic_model",
           "format_panoptic_metrics", "predict_panoptic_files", "segment_colors", "segments_info", "train_panoptic",
           "write_panoptic_predictions"]


def train_panoptic(cfg: TrainConfig) -> dict[str, Any]:
    """Train a panoptic model (e.g. ``panoptic_fpn``); same as :func:`pixelwise.engine.train.train`."""
    return fit(cfg)


def evaluate_panoptic_model(model: torch.nn.Module, loader: DataLoader, categories: Sequence[Mapping[str, Any]],
                            device: torch.device | str = "cpu", progress: bool = False, desc: str = "eval",
                            mask_ap: bool = True) -> dict[str, Any]:
    """PQ (and the things' mask AP) of ``model`` over ``loader`` (:class:`PanopticEvaluator`)."""
    evaluator = PanopticEvaluator(categories, getattr(model, "mask_threshold", 0.5), mask_ap)
    return run_evaluation(model, loader, evaluator, device, progress, desc)


def evaluate_panoptic_checkpoint(checkpoint: str | os.PathLike, data: str | os.PathLike, split: str = "val",
                                 out: str | os.PathLike | None = None, batch_size: int = 4, num_workers: int = 0,
                                 device: str = "auto", progress: bool = True, **kwargs: Any) -> dict[str, Any]:
    kwargs.pop("mask_ap", None)
    return evaluate_checkpoint(checkpoint, data, split, out, batch_size, num_workers, device, progress, **kwargs)


def predict_panoptic_files(checkpoint: str | os.PathLike, inputs: Iterable[str | os.PathLike], out: str | os.PathLike,
                           device: str = "auto", alpha: float = 0.5, progress: bool = True, **kwargs: Any) -> list:
    return predict_files(checkpoint, inputs, out, device, alpha, progress, **kwargs)
