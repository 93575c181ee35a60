"""torchvision checkpoints in: run torchvision's segmentation / Mask R-CNN weights as pixelwise models.

``from_torchvision(arch, weights)`` builds the pixelwise model that has torchvision's
architecture (through :func:`~pixelwise.models.registry.build_model`, so it trains,
evaluates, predicts and exports like any other and its ``pixelwise_spec`` rebuilds it),
renames the state dict's keys and loads it strictly. In eval mode its outputs equal
torchvision's forward on the same weights (``tests/test_torchvision_import.py``).

Architectures and the pixelwise model options that express them:

=============================  ==========  ==================================================
torchvision                    pixelwise   options
=============================  ==========  ==================================================
``fcn_resnet50/101``           ``fcn32s``  ``backbone=resnet50/101, head="torchvision",
                                           output_stride=8, dilation_style="torchvision",
                                           aux=<aux_classifier in the file>``
``deeplabv3_resnet50/101``     deeplabv3   ``backbone=resnet50/101, output_stride=8,
                                           dilation_style="torchvision", aux=<...>``
``maskrcnn_resnet50_fpn``      maskrcnn    ``aligned=False`` (torchvision's RoIAlign has no
                                           half-pixel offset); ``frozen_bn=True`` when the
                                           file's backbone BN has no ``num_batches_tracked``
                                           (torchvision's pretrained files: frozen BN);
                                           ``trainable_stages=3`` (torchvision's setting
                                           for fine-tuning pretrained weights)
``maskrcnn_resnet50_fpn_v2``   maskrcnn    as v1, plus ``fpn_norm=True, rpn_conv_depth=2,
                                           box_head_convs=4, head_norm=True``
=============================  ==========  ==================================================

Key table (first matching rule wins; ``<r>`` is a ResNet key such as ``layer3.0.conv2.weight``):

==========================================  ==========================================
torchvision key                             pixelwise key
==========================================  ==========================================
``backbone.<r>`` (semantic)                 ``encoder.<r>``
``aux_classifier.<i>``                      ``aux_head.<i>``
FCN ``classifier.<i>``                      ``head.<i>``
DeepLab ``classifier.0.convs.<b>.<j>`` b<4  ``head.0.branches.<b>.<j>``
DeepLab ``classifier.0.convs.4.1`` / ``.2`` ``head.0.branches.4.conv`` / ``.bn``
DeepLab ``classifier.0.project.0`` / ``.1`` ``head.0.project.0.0`` / ``.0.1``
DeepLab ``classifier.1`` / ``.2``           ``head.1.0`` / ``head.1.1``
DeepLab ``classifier.4``                    ``head.2``
``backbone.body.<r>`` (Mask R-CNN)          ``backbone.encoder.<r>``
``backbone.fpn.inner_blocks.<i>[.0]``       ``backbone.fpn.lateral.<i>`` (v2: ``.<i>.0/1``)
``backbone.fpn.layer_blocks.<i>[.0]``       ``backbone.fpn.output.<i>`` (v2: ``.<i>.0/1``)
``rpn.head.conv[.0.0]`` (old files)         ``rpn.head.conv.0.0``
``roi_heads.mask_head.mask_fcn<k>``         ``roi_heads.mask_head.<k-1>.0``
``rpn.*``, ``roi_heads.*``                  unchanged
==========================================  ==========================================

BatchNorm ``num_batches_tracked`` counters are optional on both sides (torchvision's
pretrained detection files use frozen BN, which has none).

Inputs: pixelwise normalises images in its data pipeline (ImageNet mean/std for these
models, returned in :attr:`TorchvisionConversion.normalization`). torchvision's semantic
models take the same normalised image; its Mask R-CNN takes the raw [0, 1] image and
normalises inside, so ``pixelwise_maskrcnn(normalize(x)) == torchvision_maskrcnn(x)``.

Two known differences of Mask R-CNN remain: pixelwise's RoI pooler derives a level's
stride by rounding UP (torchvision: to the nearest power of two), which differs only for
images padded by more than 41 % (never at torchvision's 800/1333 resizing; e.g.
``min_size=0`` on images under 76 px); and its FPN level rule adds the 1e-6 inside the log,
so a box whose sqrt(area) lies within 2e-6 (relative) below 112, 224 or 448 px may pool
from the neighbouring level.

Not supported: ``deeplabv3_mobilenet_v3_large`` and ``lraspp_mobilenet_v3_large`` (pixelwise
has no MobileNetV3 encoder, and LR-ASPP is no pixelwise architecture).
"""
from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from pixelwise.errors import CheckpointError
from pixelwise.models.registry import build_model

__all__ = [
    "TORCHVISION_ARCHS",
    "TorchvisionConversion",
    "convert_torchvision",
    "from_torchvision",
    "map_torchvision_keys",
]

_RESNET = r"(?:conv1|bn1|layer[1-4])\..+"
_Rules = list[tuple[str, "str | Callable[[re.Match[str]], str]"]]

_SEMANTIC_COMMON: _Rules = [
    (rf"^backbone\.({_RESNET})$", r"encoder.\1"),
    (r"^aux_classifier\.(.+)$", r"aux_head.\1"),
]
_FCN_RULES: _Rules = [*_SEMANTIC_COMMON, (r"^classifier\.(.+)$", r"head.\1")]
_DEEPLAB_RULES: _Rules = [
    *_SEMANTIC_COMMON,
    (r"^classifier\.0\.convs\.([0-3])\.(.+)$", r"head.0.branches.\1.\2"),
    (r"^classifier\.0\.convs\.4\.1\.(.+)$", r"head.0.branches.4.conv.\1"),
    (r"^classifier\.0\.convs\.4\.2\.(.+)$", r"head.0.branches.4.bn.\1"),
    (r"^classifier\.0\.project\.([01])\.(.+)$", r"head.0.project.0.\1.\2"),
    (r"^classifier\.([12])\.(.+)$", lambda m: f"head.1.{int(m.group(1)) - 1}.{m.group(2)}"),
    (r"^classifier\.4\.(.+)$", r"head.2.\1"),
]
_MASKRCNN_COMMON: _Rules = [
    (r"^rpn\.head\.conv\.(weight|bias)$", r"rpn.head.conv.0.0.\1"),
    (r"^roi_heads\.mask_head\.mask_fcn(\d+)\.(.+)$",
     lambda m: f"roi_heads.mask_head.{int(m.group(1)) - 1}.0.{m.group(2)}"),
    (r"^((?:rpn|roi_heads)\..+)$", r"\1"),
]
_MASKRCNN_RULES: _Rules = [
    (rf"^backbone\.body\.({_RESNET})$", r"backbone.encoder.\1"),
    (r"^backbone\.fpn\.inner_blocks\.(\d+)\.(?:0\.)?(weight|bias)$", r"backbone.fpn.lateral.\1.\2"),
    (r"^backbone\.fpn\.layer_blocks\.(\d+)\.(?:0\.)?(weight|bias)$", r"backbone.fpn.output.\1.\2"),
    *_MASKRCNN_COMMON,
]
_MASKRCNN_V2_RULES: _Rules = [
    (rf"^backbone\.body\.({_RESNET})$", r"backbone.encoder.\1"),
    (r"^backbone\.fpn\.inner_blocks\.(\d+)\.([01]\..+)$", r"backbone.fpn.lateral.\1.\2"),
    (r"^backbone\.fpn\.layer_blocks\.(\d+)\.([01]\..+)$", r"backbone.fpn.output.\1.\2"),
    *_MASKRCNN_COMMON,
]


@dataclass(frozen=True)
class _Arch:
    model: str
    task: str
    kwargs: dict[str, Any]
    rules: _Rules
    classifier_key: str  # its first dimension is num_classes

    @property
    def detection(self) -> bool:
        """torchvision's detection convention (class 0 = background, COCO names, frozen BN)."""
        return self.classifier_key == _DET_CLASSES
    class_layers: tuple[str, ...]  # torchvision prefixes of the layers whose shape depends on the classes
    aux: bool = False  # whether the presence of aux_classifier.* sets aux=True


_SEG_DILATED = {"output_stride": 8, "dilation_style": "torchvision"}
_SEG_CLASS_LAYERS = ("classifier.4.", "aux_classifier.4.")
_DET_CLASS_LAYERS = ("roi_heads.box_predictor.", "roi_heads.mask_predictor.mask_fcn_logits.")
_DET_CLASSES = "roi_heads.box_predictor.cls_score.weight"

TORCHVISION_ARCHS: dict[str, _Arch] = {
    "fcn_resnet50": _Arch("fcn32s", "semantic", {"backbone": "resnet50", "head": "torchvision", **_SEG_DILATED},
                          _FCN_RULES, "classifier.4.weight", _SEG_CLASS_LAYERS, aux=True),
    "fcn_resnet101": _Arch("fcn32s", "semantic", {"backbone": "resnet101", "head": "torchvision", **_SEG_DILATED},
                           _FCN_RULES, "classifier.4.weight", _SEG_CLASS_LAYERS, aux=True),
    "deeplabv3_resnet50": _Arch("deeplabv3", "semantic", {"backbone": "resnet50", **_SEG_DILATED},
                                _DEEPLAB_RULES, "classifier.4.weight", _SEG_CLASS_LAYERS, aux=True),
    "deeplabv3_resnet101": _Arch("deeplabv3", "semantic", {"backbone": "resnet101", **_SEG_DILATED},
                                 _DEEPLAB_RULES, "classifier.4.weight", _SEG_CLASS_LAYERS, aux=True),
    "maskrcnn_resnet50_fpn": _Arch("maskrcnn", "instance",
                                   {"backbone": "resnet50", "aligned": False},
                                   _MASKRCNN_RULES, _DET_CLASSES, _DET_CLASS_LAYERS),
    "maskrcnn_resnet50_fpn_v2": _Arch("maskrcnn", "instance",
                                      {"backbone": "resnet50", "aligned": False, "fpn_norm": True,
                                       "rpn_conv_depth": 2, "box_head_convs": 4, "head_norm": True},
                                      _MASKRCNN_V2_RULES, _DET_CLASSES, _DET_CLASS_LAYERS),
}
"""torchvision architecture name -> the pixelwise model and options that reproduce it."""


@dataclass
class TorchvisionConversion:
    """Everything a pixelwise checkpoint / pretrained folder needs for a converted model.

    ``model`` (eval mode, weights loaded), ``spec`` (= ``model.pixelwise_spec``: name,
    num_classes, kwargs), ``task``, ``classes`` (class dicts ``{id, name, isthing, color}``),
    ``normalization`` (``{mean, std, image_mode}``) and ``extras`` (instance models:
    ``category_ids``, label i is COCO category i as in torchvision).
    """

    model: nn.Module
    spec: dict[str, Any]
    task: str
    classes: list[dict[str, Any]]
    normalization: dict[str, Any]
    extras: dict[str, Any] = field(default_factory=dict)

    def info(self) -> dict[str, Any]:
        """The checkpoint entries that describe the model (no weights): ``model`` (spec),
        ``classes``, ``normalization``, ``task`` and the extras. A pretrained folder is
        ``pixelwise.api.Segmenter(conv.model, conv.info()).save_pretrained(dir)``."""
        return {"model": self.spec, "classes": self.classes, "normalization": self.normalization,
                "task": self.task, **self.extras}

    def checkpoint(self) -> dict[str, Any]:
        """A pixelwise checkpoint dict (:meth:`info` + ``state_dict``) for ``save_checkpoint``."""
        return {**self.info(), "state_dict": self.model.state_dict()}


def _arch(arch: str) -> _Arch:
    if arch not in TORCHVISION_ARCHS:
        raise CheckpointError(
            f"unknown torchvision architecture {arch!r}; supported: {', '.join(TORCHVISION_ARCHS)}"
        )
    return TORCHVISION_ARCHS[arch]


def _read_state_dict(weights: str | os.PathLike[str] | Mapping[str, torch.Tensor]) -> tuple[dict, str]:
    if isinstance(weights, Mapping):
        sd, source = dict(weights), "state dict"
    else:
        from pixelwise.models.backbones import load_weights_file

        source = os.fspath(weights)
        sd = load_weights_file(source)
    if not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{source}: not a state dict (expected a mapping of names to tensors)")
    if sd and all(k.startswith("module.") for k in sd):  # saved from DataParallel / DDP
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd, source


def _rename(rules: _Rules, key: str) -> str | None:
    for pattern, repl in rules:
        new, n = re.subn(pattern, repl, key)
        if n:
            return new
    return None


def map_torchvision_keys(arch: str, state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename torchvision ``arch`` keys to pixelwise's (module docstring table).

    Returns ``(renamed, unmatched)``: the renamed state dict and the keys no rule matched.
    """
    rules = _arch(arch).rules
    out: dict[str, torch.Tensor] = {}
    unmatched: list[str] = []
    for key, value in state_dict.items():
        new = _rename(rules, key)
        if new is None:
            unmatched.append(key)
        else:
            out[new] = value
    return out, unmatched


def _short(keys: list[str], limit: int = 8) -> str:
    return ", ".join(keys[:limit]) + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def _load_strict(model: nn.Module, sd: dict[str, torch.Tensor], unmatched: list[str], source: str,
                 arch: str, key_of: Callable[[str], str], keep: set[str] = frozenset()) -> None:
    """Strict load; one line naming every missing, unexpected and mis-shaped key (in
    torchvision's names where the key came from the file). Keys in ``keep`` keep the
    model's own (freshly initialised) values."""
    own = model.state_dict()
    optional = "num_batches_tracked"
    missing = [k for k in own if k not in sd and k not in keep and not k.endswith(optional)]
    unexpected = unmatched + [key_of(k) for k in sd if k not in own and not k.endswith(optional)]
    mismatched = [f"{key_of(k)} (file {tuple(sd[k].shape)}, model {tuple(own[k].shape)})"
                  for k in own if k in sd and sd[k].shape != own[k].shape]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys (pixelwise names): {_short(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys: {_short(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatch: {_short(mismatched)}")
    if problems:
        raise CheckpointError(f"{source}: not a torchvision {arch} state dict: " + "; ".join(problems))
    full = {k: sd.get(k, v) for k, v in own.items()}  # counters the file lacks keep the model's
    model.load_state_dict(full, strict=True)


def _class_dicts(arch: _Arch, num_classes: int) -> list[dict[str, Any]]:
    from torchvision.models import _meta

    from pixelwise.data.classes import palette

    names: list[str] = [f"class_{i}" for i in range(num_classes)]
    if not arch.detection and num_classes == len(_meta._VOC_CATEGORIES):
        names = list(_meta._VOC_CATEGORIES)
    elif arch.detection and num_classes == len(_meta._COCO_CATEGORIES):
        names = list(_meta._COCO_CATEGORIES)
    seen: set[str] = set()
    for i, n in enumerate(names):  # COCO's unused ids are all called "N/A"
        if n in seen:
            names[i] = f"{n} ({i})"
        seen.add(names[i])
    colors = palette(num_classes)
    return [{"id": i, "name": n, "isthing": arch.detection and i > 0, "color": list(colors[i])}
            for i, n in enumerate(names)]


def convert_torchvision(arch: str, weights: str | os.PathLike[str] | Mapping[str, torch.Tensor],
                        num_classes: int | None = None, **options: Any) -> TorchvisionConversion:
    """Build the pixelwise model for torchvision ``arch`` and load ``weights`` (a ``.pth``
    state dict file, read with ``weights_only=True``, or a state dict) into it.

    The class count comes from the file; classes get VOC (21) / COCO (91) names when the
    count matches torchvision's pretrained heads, else ``class_<i>``. ``num_classes`` (for
    fine-tuning on other classes; Mask R-CNN counts the background) different from the
    file's leaves the class-dependent last layers (semantic: the last 1x1 conv of the head
    and aux head; Mask R-CNN: the box predictor and the mask logits conv) at their fresh
    initialisation and loads everything else. ``options`` override
    model options (e.g. ``min_size=512`` or ``box_score_thresh=0.5`` for Mask R-CNN); they
    go into the spec like any other. For the CLI
    (``pixelwise convert torchvision ARCH WEIGHTS --out DIR``):
    ``Segmenter(conv.model, conv.info()).save_pretrained(DIR)`` writes the pretrained
    folder; :meth:`TorchvisionConversion.checkpoint` is the checkpoint dict.

    Raises:
        CheckpointError: unknown ``arch``, unreadable file, or a state dict that does not fit
            (one line listing the missing / unexpected / mis-shaped keys).
    """
    a = _arch(arch)
    sd, source = _read_state_dict(weights)
    w = sd.get(a.classifier_key)
    if w is None:
        raise CheckpointError(f"{source}: not a torchvision {arch} state dict: no {a.classifier_key!r} "
                              f"(keys start with {_short(sorted({k.split('.')[0] for k in sd}), 5) or 'nothing'})")
    file_classes = int(w.shape[0])
    num_classes = file_classes if num_classes is None else int(num_classes)
    dropped: dict[str, torch.Tensor] = {}
    if num_classes != file_classes:
        dropped = {k: v for k, v in sd.items() if k.startswith(a.class_layers)}
        sd = {k: v for k, v in sd.items() if k not in dropped}
    kwargs = dict(a.kwargs)
    if a.aux:
        kwargs["aux"] = any(k.startswith("aux_classifier.") for k in sd)
    if a.detection:
        # torchvision freezes BN (FrozenBatchNorm2d: no counters) exactly when it loads
        # pretrained weights; follow the file so the numerics are torchvision's
        frozen = not any(k.startswith("backbone.body.") and k.endswith("num_batches_tracked") for k in sd)
        kwargs.update(frozen_bn=frozen, trainable_stages=3)
    kwargs.update(options)
    try:
        model = build_model(a.model, num_classes, **kwargs)
    except ValueError as exc:  # e.g. a class count the model refuses
        raise CheckpointError(f"{source}: cannot build pixelwise {a.model} for {arch}: {exc}") from exc
    renamed, unmatched = map_torchvision_keys(arch, sd)
    back = {_rename(a.rules, k): k for k in sd}
    keep = set(map_torchvision_keys(arch, dropped)[0])
    _load_strict(model, renamed, unmatched, source, arch, lambda k: back.get(k, k), keep)
    model.eval()
    from pixelwise.data.transforms import IMAGENET_MEAN, IMAGENET_STD

    extras = {"category_ids": list(range(num_classes))} if a.detection else {}
    return TorchvisionConversion(
        model=model, spec=model.pixelwise_spec, task=a.task, classes=_class_dicts(a, num_classes),
        normalization={"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "image_mode": "RGB"},
        extras=extras,
    )


def from_torchvision(arch: str, weights: str | os.PathLike[str] | Mapping[str, torch.Tensor],
                     num_classes: int | None = None, **options: Any) -> nn.Module:
    """The pixelwise model (eval mode) equal to torchvision ``arch`` with ``weights`` (a
    state dict file or a state dict); ``num_classes`` to fine-tune on other classes (fresh
    last layers), ``options`` override model options. See :func:`convert_torchvision` and
    the module docstring for what is supported and how inputs are normalised."""
    return convert_torchvision(arch, weights, num_classes, **options).model
