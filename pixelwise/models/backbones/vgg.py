"""VGG16 convolutional encoder (the backbone of FCN and SegNet).

Also home of two small helpers shared by every backbone that loads foreign weights:
:func:`adapt_input_conv_weight` (RGB first-layer weights -> any number of input channels)
and :func:`load_state_dict_checked` (strict loading with errors that name the keys).
"""
from __future__ import annotations

import warnings
from collections.abc import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from pixelwise.errors import CheckpointError
from pixelwise.models.backbones.base import Encoder
from pixelwise.models.backbones.weights import adapt_input_conv_weight

__all__ = ["VGGEncoder", "VGG16_STAGES", "vgg_fc_as_conv", "load_fc6_fc7"]

#: Output channels of the 13 VGG16 convolutions, grouped by stage (configuration "D").
VGG16_STAGES: tuple[tuple[int, ...], ...] = (
    (64, 64),
    (128, 128),
    (256, 256, 256),
    (512, 512, 512),
    (512, 512, 512),
)


class VGGEncoder(Encoder):
    """The 13 convolutions of VGG16 in five stages, each followed by a 2x2/2 max-pool.

    Simonyan & Zisserman, "Very Deep Convolutional Networks for Large-Scale Image
    Recognition", ICLR 2015, Table 1 configuration D (3x3 convs, padding 1, ReLU; max-pool
    2x2 stride 2). ``batch_norm=True`` adds BatchNorm after every convolution, the SegNet
    encoder (Badrinarayanan et al., PAMI 2017, Sec. 3: "13 convolutional layers ... batch
    normalized", no fully connected layers, 14.7M parameters).

    ``forward`` returns the outputs of pool1..pool5 (strides 2, 4, 8, 16, 32).
    The pools use ``ceil_mode=True``: an odd-sized map keeps its last row/column (a feature of
    an H x W input has size ceil(H / s) x ceil(W / s)), so no input pixel is ever dropped
    and max-unpooling back to the pre-pool size is always possible. For inputs whose sides are
    multiples of 32 this is identical to torchvision's VGG (``ceil_mode=False``).

    ``width`` multiplies every channel count (``max(1, round(c * width))``) to make CPU-sized
    models; only ``width=1`` can load ImageNet weights.

    Attributes:
        stages: ``nn.ModuleList`` of five ``nn.Sequential`` conv[+BN]+ReLU stacks (no pools).
    """

    def __init__(self, batch_norm: bool = False, in_channels: int = 3, width: float = 1.0):
        super().__init__()
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}")
        if not width > 0:
            raise ValueError(f"width must be > 0, got {width}")
        self.batch_norm = bool(batch_norm)
        self.width = float(width)
        self.in_channels = int(in_channels)
        stages: list[nn.Sequential] = []
        ch = in_channels
        for stage in VGG16_STAGES:
            layers: list[nn.Module] = []
            for c in stage:
                out = max(1, int(round(c * width)))
                layers.append(nn.Conv2d(ch, out, kernel_size=3, padding=1))
                if batch_norm:
                    layers.append(nn.BatchNorm2d(out))
                layers.append(nn.ReLU(inplace=True))
                ch = out
            stages.append(nn.Sequential(*layers))
        self.stages = nn.ModuleList(stages)
        self.pool = nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True)
        self.out_channels = tuple(max(1, int(round(s[-1] * width))) for s in VGG16_STAGES)
        self.output_strides = (2, 4, 8, 16, 32)
        self.names = ("pool1", "pool2", "pool3", "pool4", "pool5")
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats: list[torch.Tensor] = []
        for stage in self.stages:
            x = self.pool(stage(x))
            feats.append(x)
        return feats

    def forward_with_indices(
        self, x: torch.Tensor
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Size]]:
        """Like ``forward`` but also return what SegNet's decoder needs for max-unpooling.

        Returns ``(features, indices, pre_pool_sizes)``: the five pooled maps, the argmax
        indices of each pool (as ``F.max_pool2d(return_indices=True)`` gives them, flat
        indices into each pre-pool H x W plane) and the pre-pool spatial sizes, to pass as
        ``output_size`` to ``F.max_unpool2d``.
        """
        feats: list[torch.Tensor] = []
        indices: list[torch.Tensor] = []
        sizes: list[torch.Size] = []
        for stage in self.stages:
            x = stage(x)
            sizes.append(x.shape[-2:])
            x, idx = F.max_pool2d(x, kernel_size=2, stride=2, ceil_mode=True, return_indices=True)
            feats.append(x)
            indices.append(idx)
        return feats, indices, sizes

    def load_torchvision_state_dict(
        self, state_dict: Mapping[str, torch.Tensor], source: str = "state dict"
    ) -> None:
        """Load a torchvision ``vgg16`` / ``vgg16_bn`` state dict (``features.N.*`` keys).

        The ``features.N`` layers are matched to ours by order (conv, [BN], conv, ...); the
        ``classifier.*`` keys are ignored here (FCN casts fc6/fc7 into convs with
        :func:`load_fc6_fc7`). With ``in_channels != 3`` the first conv's RGB
        weights are adapted by :func:`adapt_input_conv_weight`. Errors name ``source`` and the
        offending key.
        """
        groups: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in state_dict.items():
            parts = key.split(".")
            if parts[0] == "classifier":
                continue
            if parts[0] != "features" or len(parts) != 3 or not parts[1].isdigit():
                raise CheckpointError(f"{source}: unexpected key {key!r} for a torchvision VGG16")
            groups.setdefault(int(parts[1]), {})[parts[2]] = value
        theirs = [(f"features.{i}", groups[i]) for i in sorted(groups)]
        ours = [m for m in self.stages.modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))]
        kinds_theirs = ["bn" if "running_mean" in p else "conv" for _, p in theirs]
        kinds_ours = ["bn" if isinstance(m, nn.BatchNorm2d) else "conv" for m in ours]
        if kinds_theirs != kinds_ours:
            want = "vgg16_bn" if self.batch_norm else "vgg16"
            raise CheckpointError(
                f"{source}: layer layout does not match {want} "
                f"({kinds_theirs.count('conv')} convs/{kinds_theirs.count('bn')} BNs in the file, "
                f"{kinds_ours.count('conv')}/{kinds_ours.count('bn')} in the model)"
            )
        new_sd: dict[str, torch.Tensor] = {}
        names = {m: n for n, m in self.stages.named_modules()}
        first = True
        for (prefix, params), module in zip(theirs, ours):
            own = module.state_dict()
            if set(params) != set(own):
                raise CheckpointError(
                    f"{source}: {prefix} has keys {sorted(params)}, expected {sorted(own)}"
                )
            for pname, value in params.items():
                file_shape = tuple(value.shape)
                if first and isinstance(module, nn.Conv2d) and pname == "weight" and value.shape[1] == 3:
                    value = adapt_input_conv_weight(value, self.in_channels)
                if tuple(value.shape) != tuple(own[pname].shape):
                    raise CheckpointError(
                        f"{source}: {prefix}.{pname} has shape {file_shape}, the model's "
                        f"stages.{names[module]}.{pname} needs {tuple(own[pname].shape)}"
                        + ("" if self.width == 1 else f" (width={self.width} cannot load ImageNet weights)")
                    )
                new_sd[f"stages.{names[module]}.{pname}"] = value
            first = first and not isinstance(module, nn.Conv2d)
        self.load_state_dict(new_sd, strict=True)


#: torchvision VGG16 classifier keys of fc6 and fc7 (``classifier.0``, ``classifier.3``)
_FC_KEYS = {"fc6": "classifier.0", "fc7": "classifier.3"}


def vgg_fc_as_conv(state_dict: Mapping[str, torch.Tensor], source: str = "state dict",
                   pool5_channels: int = 512, pool5_size: int = 7) -> dict[str, torch.Tensor] | None:
    """VGG16's fully connected fc6/fc7 cast into convolutions, as FCN does (FCN §3.1).

    torchvision flattens pool5 (C, 7, 7) in C, H, W order before ``classifier.0``, so fc6's
    (4096, 25088) weight is exactly a (4096, 512, 7, 7) kernel and fc7's (4096, 4096) a 1x1
    kernel: on a 7 x 7 pool5 map the 7x7 conv (at its centre) equals the linear layer.

    Returns ``{"fc6.weight", "fc6.bias", "fc7.weight", "fc7.bias"}``, or ``None`` when the
    state dict has no classifier (e.g. a features-only file). Raises
    :class:`~pixelwise.errors.CheckpointError` naming ``source`` and the key when it has part
    of one or shapes that are not VGG16's.
    """
    keys = [f"{_FC_KEYS[n]}.{p}" for n in ("fc6", "fc7") for p in ("weight", "bias")]
    present = [k for k in keys if k in state_dict]
    if not present:
        return None
    if len(present) != len(keys):
        missing = sorted(set(keys) - set(present))
        raise CheckpointError(f"{source}: has {', '.join(present)} but not {', '.join(missing)}")
    w6, b6 = state_dict["classifier.0.weight"], state_dict["classifier.0.bias"]
    w7, b7 = state_dict["classifier.3.weight"], state_dict["classifier.3.bias"]
    n6 = int(w6.shape[0]) if w6.ndim == 2 else -1
    if w6.ndim != 2 or w6.shape[1] != pool5_channels * pool5_size ** 2 or tuple(b6.shape) != (n6,):
        raise CheckpointError(f"{source}: classifier.0 (fc6) has shape {tuple(w6.shape)}, expected "
                              f"(N, {pool5_channels * pool5_size ** 2}) = N x {pool5_channels} x {pool5_size} x "
                              f"{pool5_size}")
    if w7.ndim != 2 or w7.shape[1] != n6 or tuple(b7.shape) != (w7.shape[0],):
        raise CheckpointError(f"{source}: classifier.3 (fc7) has shape {tuple(w7.shape)}, expected (M, {n6})")
    return {"fc6.weight": w6.reshape(n6, pool5_channels, pool5_size, pool5_size), "fc6.bias": b6,
            "fc7.weight": w7.reshape(w7.shape[0], n6, 1, 1), "fc7.bias": b7}


def load_fc6_fc7(fc6: nn.Conv2d, fc7: nn.Conv2d, state_dict: Mapping[str, torch.Tensor],
                 source: str = "state dict") -> bool:
    """Copy VGG16's fc6/fc7 (:func:`vgg_fc_as_conv`) into the convolutions ``fc6`` (7x7) and
    ``fc7`` (1x1). Returns True when copied; False, with a one-line warning, when the file
    has no classifier or the convs are not the paper's widths (reduced width)."""
    convs = vgg_fc_as_conv(state_dict, source)
    if convs is None:
        warnings.warn(f"{source}: no classifier.0/classifier.3 (fc6/fc7) in the file: fc6/fc7 start random",
                      UserWarning, stacklevel=2)
        return False
    ours = {"fc6.weight": fc6.weight, "fc6.bias": fc6.bias, "fc7.weight": fc7.weight, "fc7.bias": fc7.bias}
    bad = [k for k, t in convs.items() if ours[k] is None or tuple(ours[k].shape) != tuple(t.shape)]
    if bad:
        warnings.warn(f"{source}: fc6/fc7 cannot be converted: the model's fc6/fc7 have {fc6.out_channels}/"
                      f"{fc7.out_channels} channels, ImageNet VGG16's {convs['fc6.weight'].shape[0]}/"
                      f"{convs['fc7.weight'].shape[0]} (reduced width): they start random",
                      UserWarning, stacklevel=2)
        return False
    with torch.no_grad():
        for k, t in convs.items():
            ours[k].copy_(t)
    return True
