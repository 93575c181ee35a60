"""``train(cfg)``: the public entry point of training, for every task (:mod:`pixelwise.engine.fit`
holds the loop; :mod:`pixelwise.tasks` what differs per task)."""
from __future__ import annotations

from typing import Any

from pixelwise.engine.config import TrainConfig
from pixelwise.engine.fit import (  # noqa: F401  (re-exported)
    TENSORBOARD_IMAGES, SeededSamples, build_optimizer, fit, make_deterministic, poly_lr_lambda, start_run,
)

__all__ = ["train", "train_on", "poly_lr_lambda", "build_optimizer", "start_run", "make_deterministic", "SeededSamples"]


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train ``cfg.model`` on ``cfg.data``; returns the best and last validation records."""
    return fit(cfg)


def train_on(model: str, train_data: Any, val_data: Any = None, *, classes: Any = None, transform: Any = None,
             out: str = "runs/train", **config: Any) -> dict[str, Any]:
    """Train a semantic ``model`` on your own map-style dataset(s) of (image, mask) pairs (PIL,
    NumPy or tensors; see :mod:`pixelwise.data.user`), in three lines::

        import pixelwise
        result = pixelwise.train("unet", my_dataset, classes=["background", "cell"], out="runs/cells",
                                 epochs=20, crop_size=128, model_kwargs={"width": 0.25})

    ``val_data``: default ``val_fraction`` (0.2) of ``train_data`` held out (seeded).
    ``transform``: a joint ``(image, mask) -> (image, mask)`` callable, or an albumentations /
    torchvision v2 pipeline adapted by :func:`pixelwise.data.user.albumentations_transform` /
    :func:`~pixelwise.data.user.torchvision_transform`; without it pixelwise's seeded
    augmentation (scale, crop, flip) runs. ``config``: any :class:`TrainConfig` key. Returns
    what :func:`train` returns; the run folder ``out`` holds the checkpoints as usual."""
    cfg = TrainConfig(model=model, out=str(out), **config)
    return fit(cfg, train_data, val_data, classes, transform)
