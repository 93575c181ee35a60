"""``train(cfg)``: the public entry point of training, for every task (:mod:`pixelwise.engine.fit`
holds the loop; :mod:`pixelwise.tasks` what differs per task)."""
from __future__ import annotations

from typing import Any

from pixelwise.engine.config import TrainConfig
from pixelwise.engine.fit import (  # noqa: F401  (re-exported)
    TENSORBOARD_IMAGES, SeededSamples, build_optimizer, fit, make_deterministic, poly_lr_lambda, start_run,
)

__all__ = ["train", "poly_lr_lambda", "build_optimizer", "start_run", "make_deterministic", "SeededSamples"]


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train ``cfg.model`` on ``cfg.data``; returns the best and last validation records."""
    return fit(cfg)
