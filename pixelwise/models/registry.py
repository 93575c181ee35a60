"""One registry of model builders: ``name -> builder(num_classes, **kwargs)``.

Every architecture module registers itself with :func:`register_model`; the CLI, configs
and checkpoints only ever go through :func:`build_model`, so a model that can be built
here can be trained, evaluated, predicted with and exported.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch.nn as nn

from pixelwise.errors import PixelwiseError

__all__ = ["register_model", "build_model", "list_models", "model_info", "ModelInfo", "UnknownModelError"]


class UnknownModelError(PixelwiseError, KeyError):
    """Raised for a model name that is not in the registry."""

    def __str__(self) -> str:  # KeyError quotes its message; we want plain text
        return str(self.args[0])


@dataclass(frozen=True)
class ModelInfo:
    name: str
    builder: Callable[..., nn.Module]
    task: str  # "semantic" | "instance" | "panoptic"
    paper: str
    defaults: dict[str, Any] = field(default_factory=dict)


_REGISTRY: dict[str, ModelInfo] = {}


def register_model(name: str, *, task: str = "semantic", paper: str = "", **defaults: Any):
    """Decorator: register ``builder(num_classes, **kwargs) -> nn.Module`` under ``name``."""

    def deco(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} registered twice")
        _REGISTRY[name] = ModelInfo(name, builder, task, paper, dict(defaults))
        return builder

    return deco


def _ensure_loaded() -> None:
    # Importing the package imports every architecture module, which registers itself.
    import pixelwise.models  # noqa: F401


def list_models(task: str | None = None) -> list[str]:
    """Sorted registered model names, optionally only those of one task."""
    _ensure_loaded()
    return sorted(n for n, i in _REGISTRY.items() if task is None or i.task == task)


def model_info(name: str) -> ModelInfo:
    _ensure_loaded()
    if name not in _REGISTRY:
        raise UnknownModelError(
            f"unknown model {name!r}; available: {', '.join(list_models())}"
        )
    return _REGISTRY[name]


def build_model(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    """Build a registered model. ``kwargs`` override the model's registered defaults.

    The returned module carries ``pixelwise_spec = {"name", "num_classes", "kwargs"}`` so a
    checkpoint can rebuild it without any other information.
    """
    info = model_info(name)
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    kw = {**info.defaults, **kwargs}
    model = info.builder(num_classes=num_classes, **kw)
    model.pixelwise_spec = {"name": name, "num_classes": int(num_classes), "kwargs": dict(kwargs)}
    model.pixelwise_task = info.task
    return model
