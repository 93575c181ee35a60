"""PSPNet: a dilated ResNet and a pyramid pooling module.

Zhao, Shi, Qi, Wang, Jia, "Pyramid Scene Parsing Network", CVPR 2017 (SPEC §4). A dilated
ResNet (output stride 8: layer3 dilation 2, layer4 dilation 4) gives a stride-8 feature map;
the pyramid pooling module (§3.2, Fig. 3) average-pools it to 1x1, 2x2, 3x3 and 6x6 bins,
reduces each level with a 1x1 conv to 1/N of the channels (N = 4 levels: 2048 -> 512),
upsamples every level bilinearly back to the feature size and concatenates it with the
input (2048 + 4 x 512 = 4096 channels). A 3x3 conv head predicts C classes, upsampled
bilinearly to the input size. During training an auxiliary head on layer3 adds a deeply
supervised loss (§3.4, weight 0.4 in :mod:`pixelwise.losses`).

Any input size works: pooling is adaptive (PyTorch's ``AdaptiveAvgPool2d`` splits a map
whose size is not a multiple of the bin count into slightly overlapping cells; the
reference Caffe code uses fixed kernels for its 473 px crops) and every resize goes to the
actual size of the map it joins. Upsampling uses ``align_corners=False`` throughout, like
torchvision and the rest of pixelwise (the Caffe ``Interp`` layer aligns corners).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from pixelwise.models.backbones import build_encoder
from pixelwise.models.blocks import ConvBNReLU, PooledBatchNorm2d, resolve_output_stride
from pixelwise.models.registry import register_model

__all__ = [
    "PSPNet",
    "PyramidPoolingModule",
    "PyramidPoolingBranch",
    "PSPHead",
    "PooledBatchNorm2d",
    "resolve_output_stride",
]


class PyramidPoolingBranch(nn.Sequential):
    """One pyramid level (PSPNet §3.2): adaptive average pool to ``bins x bins``, 1x1 conv
    (no bias) + BN + ReLU. BN is :class:`PooledBatchNorm2d`, so the 1x1 bin trains with a
    batch of one."""

    def __init__(self, in_channels: int, out_channels: int, bins: int):
        super().__init__(
            nn.AdaptiveAvgPool2d(bins),
            nn.Conv2d(in_channels, out_channels, 1, bias=False),
            PooledBatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )
        self.bins = bins


class PyramidPoolingModule(nn.Module):
    """Pyramid pooling module (PSPNet §3.2, Fig. 3(c)).

    Each of the ``len(bins)`` levels reduces the ``in_channels``-channel map to
    ``channels`` (default ``in_channels // len(bins)``, the paper's 1/N: 2048 -> 512) at
    ``b x b`` resolution; the levels are upsampled bilinearly to the input's size and
    concatenated AFTER the input map: ``out_channels = in_channels + len(bins) * channels``.
    """

    def __init__(self, in_channels: int, bins: Sequence[int] = (1, 2, 3, 6), channels: int | None = None):
        super().__init__()
        bins = tuple(int(b) for b in bins)
        if not bins or min(bins) < 1:
            raise ValueError(f"bins must be positive ints, got {bins}")
        channels = int(channels) if channels is not None else in_channels // len(bins)
        if channels < 1:
            raise ValueError(f"pyramid pooling channels must be >= 1, got {channels}")
        self.bins = bins
        self.in_channels = in_channels
        self.channels = channels
        self.out_channels = in_channels + len(bins) * channels
        self.stages = nn.ModuleList(PyramidPoolingBranch(in_channels, channels, b) for b in bins)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        levels = [F.interpolate(stage(x), size=size, mode="bilinear", align_corners=False) for stage in self.stages]
        return torch.cat([x, *levels], dim=1)


class PSPHead(nn.Sequential):
    """3x3 conv (no bias) + BN + ReLU + Dropout2d + 1x1 conv to C (PSPNet §3.3 / reference
    code): the main head (4096 -> 512 -> C) and the auxiliary head (layer3: 1024 -> 256 -> C)."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, dropout: float = 0.1):
        super().__init__(
            ConvBNReLU(in_channels, channels, 3),
            nn.Dropout2d(dropout),
            nn.Conv2d(channels, num_classes, 1),
        )


class PSPNet(nn.Module):
    """PSPNet (Zhao et al., CVPR 2017; SPEC §4) on any encoder of the backbone contract.

    ``forward`` returns logits (N, C, H, W) at the input size; in training mode with
    ``aux=True`` it returns ``{"out": logits, "aux": aux_logits}`` (both at input size),
    which :mod:`pixelwise.losses` weighs 1 : ``aux_weight`` (0.4, PSPNet §3.4).

    Args:
        num_classes: C, background included.
        backbone: encoder name; the paper's dilated ResNet (``resnet50`` here, 101/152/269
            in the paper) by default.
        output_stride: 8 (paper: layer3 dilation 2, layer4 dilation 4), 16 or 32. ``None``
            means 8 for ``resnet*`` and 32 for encoders without atrous mode
            (``efficientnet_lite0``, ``vgg16``), which support 32 only.
        aux: build the auxiliary head on c4 (ResNet layer3), used only in training.
        bins: pyramid levels (1, 2, 3, 6).
        ppm_channels: channels of each pyramid level (default c5 / len(bins): 512 for r50).
        head_channels: width of the main head's 3x3 conv (512).
        aux_channels: width of the auxiliary head's 3x3 conv (256).
        dropout: Dropout2d rate of both heads (0.1).
        in_channels: image channels.
        pretrained: packaged encoder weights (see ``build_encoder``).
        backbone_weights: a state-dict file for the encoder (torchvision ImageNet ResNet).
    """

    def __init__(
        self,
        num_classes: int,
        backbone: str = "resnet50",
        output_stride: int | None = None,
        aux: bool = True,
        bins: Sequence[int] = (1, 2, 3, 6),
        ppm_channels: int | None = None,
        head_channels: int = 512,
        aux_channels: int = 256,
        dropout: float = 0.1,
        in_channels: int = 3,
        pretrained: str | None = None,
        backbone_weights: str | None = None,
    ):
        super().__init__()
        output_stride = resolve_output_stride(backbone, output_stride, 8)
        self.encoder = build_encoder(
            backbone, in_channels=in_channels, output_stride=output_stride,
            pretrained=pretrained, weights_path=backbone_weights,
        )
        ch = self.encoder.out_channels
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.output_stride = output_stride
        self.ppm = PyramidPoolingModule(ch[4], bins, ppm_channels)
        self.head = PSPHead(self.ppm.out_channels, head_channels, num_classes, dropout)
        self.aux_head = PSPHead(ch[3], aux_channels, num_classes, dropout) if aux else None

    def forward(self, x: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        size = x.shape[-2:]
        _, _, _, c4, c5 = self.encoder(x)
        out = F.interpolate(self.head(self.ppm(c5)), size=size, mode="bilinear", align_corners=False)
        if self.training and self.aux_head is not None:
            aux = F.interpolate(self.aux_head(c4), size=size, mode="bilinear", align_corners=False)
            return {"out": out, "aux": aux}
        return out


_PAPER = "Zhao et al., Pyramid Scene Parsing Network, CVPR 2017"


@register_model("pspnet", paper=_PAPER)
def pspnet(num_classes: int, **kw) -> PSPNet:
    return PSPNet(num_classes, **kw)
