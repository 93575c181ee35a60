"""SegNet and SegNet-Basic: encoder-decoder networks that upsample with pooling indices.

Badrinarayanan, Kendall, Cipolla, "SegNet: A Deep Convolutional Encoder-Decoder
Architecture for Image Segmentation", IEEE TPAMI 2017 (SPEC §2).

The encoder is the 13 convolutions of VGG16, each followed by BatchNorm and ReLU, with five
2x2/2 max-pools that *return the argmax indices*; the fully connected layers are dropped
(134M -> 14.7M parameters, paper §3). Each decoder stage mirrors one encoder stage: it
max-unpools its input with the indices stored by the matching encoder pool - a sparse map
that is zero except at the positions the maxima came from - and densifies it with 3x3
conv + BN + ReLU layers. There is no transposed convolution anywhere and no encoder
feature map is handed to the decoder: only the indices (paper §3, the memory argument
against U-Net/FCN-style skip connections; 2 bits per 2x2 window would suffice).

Any input size works: the encoder pools with ``ceil_mode`` and every unpooling restores
the exact pre-pool size (``output_size``), so an H x W input gives H x W logits.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from pixelwise.models.backbones import build_encoder
from pixelwise.models.blocks import ConvBNReLU
from pixelwise.models.registry import register_model

__all__ = [
    "SegNet",
    "SegNetBasic",
    "SegNetDecoder",
    "SegNetDecoderStage",
    "IndexUnpool",
    "SEGNET_DECODER_CHANNELS",
]

#: Output channels of the decoder's 3x3 conv + BN + ReLU layers, deepest stage first (SPEC §2):
#: 512,512,512 | 512,512,256 | 256,256,128 | 128,64 | 64, then the classifier conv to C.
SEGNET_DECODER_CHANNELS: tuple[tuple[int, ...], ...] = (
    (512, 512, 512),
    (512, 512, 256),
    (256, 256, 128),
    (128, 64),
    (64,),
)


def _scaled(c: int, width: float) -> int:
    """The channel rule of the VGG encoder (``max(1, round(c * width))``), so both sides agree."""
    return max(1, int(round(c * width)))


class IndexUnpool(nn.Module):
    """Max-unpooling 2x2/2 with the indices of the matching max-pool (SegNet §3, Fig. 3).

    Each input value is written to the position its maximum was taken from; every other
    position of the (pre-pool sized) output is zero. ``size`` is the pre-pool spatial size,
    so odd sizes (pools with ``ceil_mode``) come back exactly.
    """

    def forward(self, x: torch.Tensor, indices: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        return F.max_unpool2d(x, indices, kernel_size=2, stride=2, output_size=tuple(size)[-2:])


class SegNetDecoderStage(nn.Module):
    """One decoder stage: :class:`IndexUnpool` then kxk conv + BN (+ ReLU) layers.

    Args:
        in_channels: channels of the input (= of the matching encoder stage's output).
        channels: output channels of the conv layers, in order.
        kernel_size: 3 for SegNet, 7 for SegNet-Basic.
        relu: SegNet-Basic's decoder has no ReLU (paper §4, "no ReLU non-linearity is
            present in the decoder network").
    """

    def __init__(self, in_channels: int, channels: Sequence[int], kernel_size: int = 3, relu: bool = True):
        super().__init__()
        self.unpool = IndexUnpool()
        layers: list[nn.Module] = []
        ch = in_channels
        for out in channels:
            if relu:
                layers.append(ConvBNReLU(ch, out, kernel_size))
            else:
                layers.append(nn.Sequential(
                    nn.Conv2d(ch, out, kernel_size, padding=kernel_size // 2, bias=False), nn.BatchNorm2d(out)
                ))
            ch = out
        self.convs = nn.Sequential(*layers)
        self.out_channels = ch

    def forward(self, x: torch.Tensor, indices: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        return self.convs(self.unpool(x, indices, size))


class SegNetDecoder(nn.Module):
    """The stack of :class:`SegNetDecoderStage` s, deepest first.

    ``forward(x, indices, sizes)`` takes ONLY the deepest encoder output and, per encoder
    pool (shallowest first, as the encoder produces them), the argmax indices and the
    pre-pool size. No other encoder feature map ever reaches the decoder.
    """

    def __init__(self, stages: Sequence[SegNetDecoderStage]):
        super().__init__()
        self.stages = nn.ModuleList(stages)

    def forward(
        self, x: torch.Tensor, indices: Sequence[torch.Tensor], sizes: Sequence[Sequence[int]]
    ) -> torch.Tensor:
        if len(indices) != len(self.stages) or len(sizes) != len(self.stages):
            raise ValueError(
                f"SegNet decoder has {len(self.stages)} stages, got {len(indices)} indices / {len(sizes)} sizes"
            )
        for stage, idx, size in zip(self.stages, reversed(indices), reversed(sizes)):
            x = stage(x, idx, size)
        return x


def _init_decoder(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class SegNet(nn.Module):
    """SegNet (Badrinarayanan et al., TPAMI 2017, §3 and Fig. 2; SPEC §2).

    Encoder: VGG16-BN convolutions (:class:`~pixelwise.models.backbones.vgg.VGGEncoder`,
    13 x [3x3 conv + BN + ReLU], five 2x2/2 max-pools returning indices; 14.7M parameters
    at ``width=1``). Decoder: five :class:`SegNetDecoderStage` s mirroring it, with 3x3
    conv + BN + ReLU layers of 512,512,512 | 512,512,256 | 256,256,128 | 128,64 | 64
    channels, then a final conv to ``num_classes`` (no BN/ReLU: these are the logits that
    the softmax / cross-entropy takes).

    Args:
        num_classes: C.
        width: channel multiplier of encoder AND decoder (1.0 = the paper's network);
            smaller widths train on a CPU. ImageNet weights need ``width=1``.
        in_channels: input channels (3 RGB, 1 grey).
        backbone_weights: path of a torchvision ``vgg16_bn`` state dict (ImageNet) for the
            encoder, as the paper initialises it.
        final_kernel_size: 3 as the reference Caffe model (``conv1_1_D``), or 1.
    """

    def __init__(
        self,
        num_classes: int,
        width: float = 1.0,
        in_channels: int = 3,
        backbone_weights: str | None = None,
        final_kernel_size: int = 3,
    ):
        super().__init__()
        if final_kernel_size not in (1, 3):
            raise ValueError(f"final_kernel_size must be 1 or 3, got {final_kernel_size}")
        self.in_channels = int(in_channels)
        self.width = float(width)
        self.encoder = build_encoder("vgg16_bn", in_channels=in_channels, width=width, weights_path=backbone_weights)
        enc_out = list(self.encoder.out_channels)  # c1..c5
        stages = []
        for in_ch, chans in zip(reversed(enc_out), SEGNET_DECODER_CHANNELS):
            stages.append(SegNetDecoderStage(in_ch, [_scaled(c, width) for c in chans]))
        self.decoder = SegNetDecoder(stages)
        self.classifier = nn.Conv2d(stages[-1].out_channels, num_classes, final_kernel_size,
                                    padding=final_kernel_size // 2)
        _init_decoder(self.decoder)
        _init_decoder(self.classifier)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats, indices, sizes = self.encoder.forward_with_indices(x)
        bottom = feats[-1]
        del feats  # only the indices (and the deepest map) go on to the decoder
        return self.classifier(self.decoder(bottom, indices, sizes))


class SegNetBasic(nn.Module):
    """SegNet-Basic, the smaller network of the paper's analysis (TPAMI 2017, §4.1).

    Four encoder stages of [7x7 conv 64 (no bias) + BN + ReLU + 2x2/2 max-pool with
    indices]; four decoder stages of [unpool with the matching indices + 7x7 conv 64 (no
    bias) + BN] - no ReLU in the decoder, as the paper states; a 1x1 conv to C classes.
    (The reference Caffe model also normalises the input with LRN; left out here.)
    """

    def __init__(self, num_classes: int, in_channels: int = 3, channels: int = 64, kernel_size: int = 7,
                 depth: int = 4):
        super().__init__()
        self.in_channels = int(in_channels)
        enc = []
        ch = in_channels
        for _ in range(depth):
            enc.append(nn.Sequential(
                nn.Conv2d(ch, channels, kernel_size, padding=kernel_size // 2, bias=False),
                nn.BatchNorm2d(channels),
                nn.ReLU(inplace=True),
            ))
            ch = channels
        self.encoder = nn.ModuleList(enc)
        self.decoder = SegNetDecoder(
            [SegNetDecoderStage(channels, [channels], kernel_size, relu=False) for _ in range(depth)]
        )
        self.classifier = nn.Conv2d(channels, num_classes, 1)
        _init_decoder(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        indices: list[torch.Tensor] = []
        sizes: list[torch.Size] = []
        for stage in self.encoder:
            x = stage(x)
            sizes.append(x.shape[-2:])
            x, idx = F.max_pool2d(x, 2, 2, ceil_mode=True, return_indices=True)
            indices.append(idx)
        return self.classifier(self.decoder(x, indices, sizes))


_PAPER = ("Badrinarayanan, Kendall, Cipolla, SegNet: A Deep Convolutional Encoder-Decoder "
          "Architecture for Image Segmentation, TPAMI 2017")


@register_model("segnet", paper=_PAPER)
def segnet(num_classes: int, **kw) -> SegNet:
    return SegNet(num_classes, **kw)


@register_model("segnet_basic", paper=_PAPER + " (SegNet-Basic)")
def segnet_basic(num_classes: int, **kw) -> SegNetBasic:
    return SegNetBasic(num_classes, **kw)
