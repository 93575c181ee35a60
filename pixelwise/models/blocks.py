"""Small named building blocks shared by the decoders and heads."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


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


def resolve_output_stride(backbone: str, output_stride: int | None, preferred: int) -> int:
    """``output_stride`` or, when None, ``preferred`` for the dilatable encoders (``resnet*``,
    ``timm:*``) and 32 for the others (VGG, EfficientNet-Lite0 have no atrous mode)."""
    from pixelwise.models.backbones import dilatable

    if output_stride is not None:
        return int(output_stride)
    return preferred if dilatable(backbone) else 32


class PooledBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` for the branches that see a globally pooled (1x1) map.

    In training, a 1x1 map of a batch of one holds ONE value per channel: it has no batch
    variance, ``nn.BatchNorm2d`` raises ("Expected more than 1 value per channel"), and
    even if it did not, normalising a single value with its own statistics would output
    the constant ``bias`` and erase the branch. In exactly that case (``N * H * W == 1``)
    this layer normalises with its running statistics, as in eval mode, and leaves them
    unchanged; the affine weight and bias still learn. With two or more values per channel
    it IS ``nn.BatchNorm2d`` (batch statistics, running-average update), so the papers'
    setting (batch 16) is unaffected. Parameters, buffers and state-dict keys are those of
    ``nn.BatchNorm2d``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        single_value = x.dim() == 4 and x.shape[0] * x.shape[2] * x.shape[3] == 1
        if self.training and single_value and self.track_running_stats:
            return F.batch_norm(
                x, self.running_mean, self.running_var, self.weight, self.bias,
                training=False, momentum=0.0, eps=self.eps,
            )
        return super().forward(x)
