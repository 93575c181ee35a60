"""Feature Pyramid Network (Lin et al., CVPR 2017) over any pixelwise encoder.

The encoder contract (:mod:`pixelwise.models.backbones.base`) gives c1..c5 at strides
2..32; the FPN uses c2..c5 (strides 4, 8, 16, 32):

- lateral: a 1x1 conv of each c_i to ``out_channels``;
- top-down: P5 = lateral(c5); P_i = lateral(c_i) + nearest-upsample(P_{i+1}) to c_i's size
  (sizes are taken from the feature, never assumed to be exact halves);
- output: a 3x3 conv (``out_channels``) on each merged map gives P2..P5;
- P6 = max-pool 1x1 / stride 2 of P5 (FPN §4.1: an extra, coarser level for the RPN's
  largest anchors; RoI pooling uses P2..P5 only).

:class:`EncoderFPN` bundles encoder + FPN into the backbone object torchvision's detection
models expect: ``forward(images) -> OrderedDict`` of named maps and an ``out_channels``
attribute.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F

from pixelwise.models.backbones.base import Encoder

__all__ = ["FPN", "EncoderFPN", "FPN_LEVELS"]

FPN_LEVELS = ("p2", "p3", "p4", "p5", "p6")
"""Names of the maps :class:`EncoderFPN` returns, finest first (strides 4, 8, 16, 32, 64)."""


class FPN(nn.Module):
    """Top-down pyramid with lateral connections: (c2, c3, c4, c5) -> (P2, P3, P4, P5, P6).

    Args:
        in_channels: channels of c2..c5 (4 ints).
        out_channels: channels of every pyramid level (paper: 256).
        extra_p6: add P6 = maxpool(P5, 1, stride 2).
    """

    def __init__(self, in_channels: tuple[int, ...] | list[int], out_channels: int = 256, extra_p6: bool = True):
        super().__init__()
        if len(in_channels) != 4:
            raise ValueError(f"FPN takes 4 input levels (c2..c5), got channels {tuple(in_channels)}")
        if out_channels < 1:
            raise ValueError(f"out_channels must be >= 1, got {out_channels}")
        self.in_channels = tuple(int(c) for c in in_channels)
        self.out_channels = int(out_channels)
        self.extra_p6 = bool(extra_p6)
        self.lateral = nn.ModuleList(nn.Conv2d(c, out_channels, 1) for c in self.in_channels)
        self.output = nn.ModuleList(nn.Conv2d(out_channels, out_channels, 3, padding=1) for _ in self.in_channels)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):  # the FPN reference init (Detectron "caffe2_xavier")
                nn.init.kaiming_uniform_(m.weight, a=1)
                nn.init.zeros_(m.bias)

    def forward(self, feats: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        if len(feats) != 4:
            raise ValueError(f"FPN expects 4 maps (c2..c5), got {len(feats)}")
        laterals = [conv(f) for conv, f in zip(self.lateral, feats)]
        merged = [laterals[-1]]
        for lat in reversed(laterals[:-1]):
            merged.insert(0, lat + F.interpolate(merged[0], size=lat.shape[-2:], mode="nearest"))
        outs = [conv(m) for conv, m in zip(self.output, merged)]
        if self.extra_p6:
            outs.append(F.max_pool2d(outs[-1], kernel_size=1, stride=2))
        return outs


class EncoderFPN(nn.Module):
    """An :class:`~pixelwise.models.backbones.base.Encoder` followed by an :class:`FPN`.

    ``forward(x)`` returns ``OrderedDict(p2=..., p3=..., p4=..., p5=..., p6=...)``, each with
    ``out_channels`` channels (the interface of torchvision's ``BackboneWithFPN``).
    """

    def __init__(self, encoder: Encoder, out_channels: int = 256, extra_p6: bool = True):
        super().__init__()
        if len(encoder.out_channels) != 5:
            raise ValueError("the encoder must follow the 5-feature contract (c1..c5)")
        self.encoder = encoder
        self.fpn = FPN(encoder.out_channels[1:], out_channels, extra_p6)
        self.out_channels = int(out_channels)
        self.level_names = FPN_LEVELS if extra_p6 else FPN_LEVELS[:4]

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        feats = self.encoder(x)
        return OrderedDict(zip(self.level_names, self.fpn(feats[1:])))
