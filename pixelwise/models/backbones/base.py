"""The encoder contract every backbone follows, so that decoders are written once.

An encoder is an ``nn.Module`` whose ``forward(x)`` returns a list of FIVE feature maps
``[c1, c2, c3, c4, c5]`` at nominal strides 2, 4, 8, 16, 32 with respect to the input
(for ResNet: stem conv, layer1, layer2, layer3, layer4; for VGG: after pool1..pool5; for
EfficientNet-Lite0: after blocks 0, 2, 4, 10, 15).

Attributes:
    in_channels:    input channels (3 for RGB, 1 for grayscale microscopy).
    out_channels:   tuple of 5 ints, channels of c1..c5.
    output_strides: tuple of 5 ints, the ACTUAL strides of c1..c5 (a dilated ResNet with
                    output stride 8 has (2, 4, 8, 8, 8)).
    names:          tuple of 5 str, human-readable names of the stages (e.g. "layer1").

Feature maps of inputs whose size is not a multiple of the stride are ceil- or
floor-sized depending on the network; decoders must resize to the skip feature's size,
never assume exact multiples.
"""
from __future__ import annotations

import torch
import torch.nn as nn


class Encoder(nn.Module):
    in_channels: int = 3
    out_channels: tuple[int, ...] = ()
    output_strides: tuple[int, ...] = ()
    names: tuple[str, ...] = ()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:  # pragma: no cover - interface
        raise NotImplementedError
