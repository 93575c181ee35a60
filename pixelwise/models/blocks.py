"""Small named building blocks shared by the decoders and heads."""
from __future__ import annotations

import torch.nn as nn


class ConvBNReLU(nn.Sequential):
    """3x3 (or kxk) conv without bias + BatchNorm + ReLU, 'same' padding (times dilation)."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int = 3, dilation: int = 1, stride: int = 1):
        pad = dilation * (kernel_size - 1) // 2
        super().__init__(
            nn.Conv2d(in_ch, out_ch, kernel_size, stride=stride, padding=pad, dilation=dilation, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
        )


class ConvReLU(nn.Sequential):
    """Conv + ReLU without normalisation (FCN / original U-Net style); ``padding`` explicit."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int = 3, padding: int = 1):
        super().__init__(nn.Conv2d(in_ch, out_ch, kernel_size, padding=padding), nn.ReLU(inplace=True))
