"""One registry of model builders: ``name -> builder(num_classes, **kwargs)``.

Every architecture module registers itself with :func:`register_model`; the CLI, configs
and checkpoints only ever go through :func:`build_model`, so a model that can be built
here can be trained, evaluated, predicted with and exported.

:func:`build_model` checks the options first: an unknown one (``widht=0.25``) raises
:class:`UnknownModelOptionError` naming the model and listing its valid options (see
:func:`model_options`), a bad value :class:`ModelOptionError`; both are one-line
:class:`~pixelwise.errors.PixelwiseError` s. Encoder weights are ``backbone_weights=`` for every
model; the old ``weights_path=`` still works with a deprecation warning.
"""
from __future__ import annotations

import difflib
import inspect
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch.nn as nn

from pixelwise.errors import PixelwiseError

__all__ = ["register_model", "build_model", "list_models", "model_info", "model_options", "keyword_options",
           "ModelInfo", "UnknownModelError", "ModelOptionError", "UnknownModelOptionError"]


class UnknownModelError(PixelwiseError, KeyError):
    """Raised for a model name that is not in the registry."""

    def __str__(self) -> str:  # KeyError quotes its message; we want plain text
        return str(self.args[0])


class ModelOptionError(PixelwiseError, ValueError):
    """A model option with a value the model cannot be built with (one line, naming the model)."""


class UnknownModelOptionError(ModelOptionError, TypeError):
    """A model option the model does not have; the message lists the valid ones."""


@dataclass(frozen=True)
class ModelInfo:
    name: str
    builder: Callable[..., nn.Module]
    task: str  # "semantic" | "instance" | "panoptic"
    paper: str
    defaults: dict[str, Any] = field(default_factory=dict)
    #: the builder's valid keyword options, or a callable giving them; None: found from its signature
    options: Iterable[str] | Callable[[], Iterable[str]] | None = None


_REGISTRY: dict[str, ModelInfo] = {}


def register_model(name: str, *, task: str = "semantic", paper: str = "",
                   options: Iterable[str] | Callable[[], Iterable[str]] | None = None, **defaults: Any):
    """Decorator: register ``builder(num_classes, **kwargs) -> nn.Module`` under ``name``.

    ``options``: the builder's keyword options (or a callable giving them) when its signature
    does not tell them (see :func:`model_options`)."""

    def deco(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} registered twice")
        _REGISTRY[name] = ModelInfo(name, builder, task, paper, dict(defaults), options)
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


def keyword_options(fn: Callable[..., Any], skip: Iterable[str] = ("self", "num_classes")) -> set[str]:
    """The parameters of ``fn`` that can be given by keyword, less ``skip``."""
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {p.name for p in inspect.signature(fn).parameters.values() if p.kind in kinds} - set(skip)


def _takes_kwargs(fn: Callable[..., Any]) -> bool:
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(fn).parameters.values())


def _class_options(cls: type) -> set[str]:
    """A model class's ``__init__`` options; a ``**encoder_kwargs`` goes to ``build_encoder``."""
    names = keyword_options(cls.__init__)
    if _takes_kwargs(cls.__init__):
        from pixelwise.models.backbones import build_encoder

        names |= keyword_options(build_encoder, skip=("name", "weights_path"))  # models say backbone_weights
    return names


def _introspect(builder: Callable[..., nn.Module]) -> set[str] | None:
    """Options of a builder that forwards ``**kw`` to the class it returns (``-> FCN``) or, when
    the annotation is not one class, to the model classes its body names (``unet``: UNet or
    EncoderUNet). None when they cannot be told."""
    names = keyword_options(builder)
    if not _takes_kwargs(builder):
        return names
    ret = getattr(builder, "__annotations__", {}).get("return")
    ret = builder.__globals__.get(ret) if isinstance(ret, str) else ret
    if isinstance(ret, type) and issubclass(ret, nn.Module) and ret is not nn.Module:
        classes = [ret]
    else:
        found = (builder.__globals__.get(n) for n in builder.__code__.co_names)
        classes = [c for c in found if isinstance(c, type) and issubclass(c, nn.Module) and c is not nn.Module]
    if not classes:
        return None
    # keywords the builder passes itself (``FCN(num_classes, stride=8, **kw)``) are not the user's
    consts = [n for c in builder.__code__.co_consts for n in (c if isinstance(c, tuple) else (c,))]
    fixed = {n for n in consts if isinstance(n, str) and n.isidentifier()}
    for cls in classes:
        names |= _class_options(cls) - fixed
    return names


def model_options(name: str) -> list[str] | None:
    """Sorted keyword options of model ``name`` (its registered defaults included), or None
    when its builder does not tell them (then only the builder itself can refuse one)."""
    info = model_info(name)
    opts = info.options() if callable(info.options) else info.options
    found = set(opts) if opts is not None else _introspect(info.builder)
    return None if found is None else sorted(found | set(info.defaults))


def _unknown(name: str, unknown: list[str], valid: list[str] | None) -> UnknownModelOptionError:
    what = ", ".join(repr(u) for u in unknown)
    msg = f"unknown {name} option{'s' if len(unknown) > 1 else ''} {what}"
    if valid is not None:
        close = difflib.get_close_matches(unknown[0], valid, n=1)
        if close:
            msg += f" (did you mean {close[0]!r}?)"
        msg += f"; valid options: {', '.join(valid)}"
    return UnknownModelOptionError(msg)


def _rename_old_options(name: str, kwargs: dict[str, Any], valid: list[str] | None) -> dict[str, Any]:
    """``weights_path`` -> ``backbone_weights`` (deprecated), for the models that have the latter."""
    if "weights_path" not in kwargs or (valid is not None and "backbone_weights" not in valid):
        return kwargs
    if valid is not None and "weights_path" in valid:  # a model whose own option has that name
        return kwargs
    kwargs = dict(kwargs)
    if "backbone_weights" in kwargs:
        raise ModelOptionError(f"model {name!r}: give backbone_weights, not also its old name weights_path")
    warnings.warn(f"model {name!r}: option weights_path is deprecated, use backbone_weights", FutureWarning,
                  stacklevel=3)
    kwargs["backbone_weights"] = kwargs.pop("weights_path")
    return kwargs


def build_model(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    """Build a registered model. ``kwargs`` override the model's registered defaults.

    The returned module carries ``pixelwise_spec = {"name", "num_classes", "kwargs"}`` so a
    checkpoint can rebuild it without any other information.

    Raises:
        UnknownModelError: ``name`` is not registered.
        UnknownModelOptionError: an option the model does not have (the valid ones listed).
        ModelOptionError: a value the model cannot be built with (``ValueError`` of the builder).
    """
    info = model_info(name)
    if num_classes < 1:
        raise ModelOptionError(f"model {name!r}: num_classes must be >= 1, got {num_classes}")
    valid = model_options(name)
    kwargs = _rename_old_options(name, kwargs, valid)
    if valid is not None:
        unknown = sorted(set(kwargs) - set(valid))
        if unknown:
            raise _unknown(name, unknown, valid)
    kw = {**info.defaults, **kwargs}
    try:
        model = info.builder(num_classes=num_classes, **kw)
    except PixelwiseError:
        raise
    except TypeError as e:  # an option the signature let through, refused deeper down
        m = re.search(r"unexpected keyword argument '(\w+)'", str(e))
        if m is None:
            raise
        raise _unknown(name, [m.group(1)], valid) from e
    except ValueError as e:
        raise ModelOptionError(f"model {name!r}: {e}") from e
    model.pixelwise_spec = {"name": name, "num_classes": int(num_classes), "kwargs": dict(kwargs)}
    model.pixelwise_task = info.task
    return model
