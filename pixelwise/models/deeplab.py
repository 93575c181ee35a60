"""DeepLab v3 and DeepLab v3+: atrous ResNet + atrous spatial pyramid pooling (ASPP).

- DeepLab v3: Chen, Papandreou, Schroff, Adam, "Rethinking Atrous Convolution for Semantic
  Image Segmentation", arXiv:1706.05587, 2017 (SPEC §5). An atrous ResNet at output
  stride 16 (layer4 dilation 2) or 8 (layer3 dilation 2, layer4 dilation 4), optionally
  with multi-grid unit rates in layer4 (§3.2), feeds ASPP (§3.3): a 1x1 conv, three 3x3
  atrous convs with rates (6, 12, 18) at OS 16 (doubled at OS 8) and image-level features
  (global average pool -> 1x1 conv -> BN -> ReLU -> bilinear upsample), every branch 256
  channels + BN + ReLU, concatenated and fused by a 1x1 conv 256 + BN + ReLU.
- DeepLab v3+: Chen, Zhu, Papandreou, Schroff, Adam, "Encoder-Decoder with Atrous
  Separable Convolution for Semantic Image Segmentation", ECCV 2018 (SPEC §5). The ASPP
  output is upsampled x4 to the low-level feature (end of ResNet layer1, stride 4), whose
  channels a 1x1 conv reduces to 48; two 3x3 convs of 256 refine the concatenation and a
  1x1 conv predicts C classes (§3.1 "Proposed decoder", §4.1 Tables 1-2).

Logits are always upsampled bilinearly to the input size (labels are never downsampled),
for any input size; every intermediate resize goes to the actual size of the map it joins.

Encoders without an atrous mode (``efficientnet_lite0``, ``vgg16``) run at output stride 32
only: ``output_stride=None`` (the default) picks 16 for ``resnet*`` and 32 for them, and
the default ASPP rates scale with the stride (``rate * 16 / output_stride``: (3, 6, 9) at
OS 32), so the branches cover the same image area.

torchvision's ``deeplabv3_resnet50/101`` are DeepLab v3 with ``output_stride=8``,
``dilation_style="torchvision"`` (the first block of a dilated ResNet layer keeps the
previous rate) and ``aux=True`` (torchvision's ``FCNHead`` on c4); ASPP and head are the
same modules in the same order (see :mod:`pixelwise.models.torchvision` for the key table).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from pixelwise.models.backbones import build_encoder, dilatable
from pixelwise.models.blocks import ConvBNReLU, PooledBatchNorm2d, resolve_output_stride
from pixelwise.models.fcn import TorchvisionFCNHead
from pixelwise.models.registry import register_model

__all__ = [
    "DeepLabV3",
    "DeepLabV3Plus",
    "ASPP",
    "ASPPConv",
    "ASPPPooling",
    "DeepLabV3Head",
    "DeepLabV3PlusDecoder",
    "default_atrous_rates",
]

#: ASPP rates of the paper at output stride 16 (DeepLab v3 §3.3).
ASPP_RATES_OS16 = (6, 12, 18)


def default_atrous_rates(output_stride: int) -> tuple[int, ...]:
    """ASPP rates for ``output_stride``: (6, 12, 18) at 16, doubled (12, 24, 36) at 8
    (DeepLab v3 §3.3), halved (3, 6, 9) at 32 (for encoders without atrous mode)."""
    if output_stride not in (8, 16, 32):
        raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
    return tuple(r * 16 // output_stride for r in ASPP_RATES_OS16)


class ASPPConv(ConvBNReLU):
    """One atrous ASPP branch: 3x3 conv with dilation (= padding) ``rate``, no bias, + BN +
    ReLU (DeepLab v3 §3.3)."""

    def __init__(self, in_channels: int, out_channels: int, rate: int):
        super().__init__(in_channels, out_channels, 3, dilation=rate)
        self.rate = rate


class ASPPPooling(nn.Module):
    """Image-level features (DeepLab v3 §3.3, after ParseNet): global average pool -> 1x1
    conv (no bias) -> BN -> ReLU -> bilinear upsample to the feature size.

    BN is :class:`~pixelwise.models.pspnet.PooledBatchNorm2d`: in training with a batch of
    one, the pooled map has a single value per channel, so the branch normalises with the
    running statistics instead of failing (or collapsing to a constant); with two or more
    images it is plain batch norm, as in the paper.
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.bn = PooledBatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn(self.conv(self.pool(x))))
        # a 1x1 map: bilinear upsampling is a broadcast (kept as interpolate for clarity)
        return F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling (DeepLab v3 §3.3, Fig. 5): branches [1x1 conv,
    3x3 atrous convs at ``rates``, image pooling], each ``channels`` + BN + ReLU; concat;
    1x1 conv ``channels`` + BN + ReLU; dropout (torchvision 0.5; v3+ reference code 0.1)."""

    def __init__(self, in_channels: int, rates: Sequence[int], channels: int = 256, dropout: float = 0.5):
        super().__init__()
        self.rates = tuple(int(r) for r in rates)
        if min(self.rates, default=1) < 1:
            raise ValueError(f"atrous rates must be positive, got {self.rates}")
        self.in_channels = in_channels
        self.out_channels = channels
        self.branches = nn.ModuleList(
            [
                ConvBNReLU(in_channels, channels, 1),
                *(ASPPConv(in_channels, channels, r) for r in self.rates),
                ASPPPooling(in_channels, channels),
            ]
        )
        self.project = nn.Sequential(
            ConvBNReLU(len(self.branches) * channels, channels, 1),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(torch.cat([b(x) for b in self.branches], dim=1))


class DeepLabV3Head(nn.Sequential):
    """ASPP -> [3x3 conv ``channels`` + BN + ReLU] -> 1x1 conv to C.

    The paper (§3.3) goes from the ASPP fusion straight to the 1x1 classifier
    (``head_conv=False``); torchvision's ``DeepLabHead`` adds the 3x3 conv, which is
    followed by default (``head_conv=True``) so that parameter counts match torchvision.
    """

    def __init__(self, aspp: ASPP, num_classes: int, head_conv: bool = True):
        layers: list[nn.Module] = [aspp]
        if head_conv:
            layers.append(ConvBNReLU(aspp.out_channels, aspp.out_channels, 3))
        layers.append(nn.Conv2d(aspp.out_channels, num_classes, 1))
        super().__init__(*layers)


class DeepLabV3PlusDecoder(nn.Module):
    """DeepLab v3+ decoder (v3+ §3.1 "Proposed decoder", §4.1): project the low-level
    feature (stride 4) to ``low_level_channels`` (48) by 1x1 conv + BN + ReLU, upsample the
    encoder output (ASPP) bilinearly to its size (x4 at OS 16), concatenate, refine with
    two 3x3 convs of ``channels`` (256) + BN + ReLU. (The reference code can use separable
    convs here; SPEC §5 prescribes plain ones.) Returns features; the classifier is separate.
    """

    def __init__(self, low_level_in: int, aspp_channels: int, low_level_channels: int = 48, channels: int = 256):
        super().__init__()
        self.low_level_project = ConvBNReLU(low_level_in, low_level_channels, 1)
        self.fuse = nn.Sequential(
            ConvBNReLU(aspp_channels + low_level_channels, channels, 3),
            ConvBNReLU(channels, channels, 3),
        )
        self.out_channels = channels

    def forward(self, high: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        low = self.low_level_project(low)
        high = F.interpolate(high, size=low.shape[-2:], mode="bilinear", align_corners=False)
        return self.fuse(torch.cat([high, low], dim=1))


def _build_atrous_encoder(
    backbone: str, in_channels: int, output_stride: int | None, multi_grid: Sequence[int] | None,
    pretrained: str | None, backbone_weights: str | None, dilation_style: str = "all",
):
    os_ = resolve_output_stride(backbone, output_stride, 16)
    if os_ != 32 and not dilatable(backbone):
        raise ValueError(
            f"{backbone} has no atrous (dilated) mode: DeepLab runs it at output_stride=32 only "
            f"(got output_stride={output_stride}); leave output_stride unset or use a resnet* or timm:* backbone"
        )
    encoder = build_encoder(
        backbone, in_channels=in_channels, output_stride=os_,
        multi_grid=tuple(multi_grid) if multi_grid is not None else None,
        pretrained=pretrained, weights_path=backbone_weights,
    )
    if dilation_style != "all":
        if not hasattr(encoder, "set_output_stride"):
            raise ValueError(f"dilation_style applies to resnet* backbones only, not {backbone}")
        encoder.set_output_stride(os_, encoder.multi_grid, dilation_style)
    return encoder, os_


class DeepLabV3(nn.Module):
    """DeepLab v3 (Chen et al. 2017; SPEC §5): atrous encoder + :class:`ASPP` +
    :class:`DeepLabV3Head`, logits upsampled bilinearly to the input size.

    Args:
        num_classes: C, background included.
        backbone: encoder name (``resnet50`` default; ``resnet18/34/101``,
            ``efficientnet_lite0`` at OS 32).
        output_stride: 16 (layer4 dilation 2) or 8 (layer3 2, layer4 4); ``None`` = 16 for
            ``resnet*``, 32 for encoders without atrous mode.
        multi_grid: layer4 unit rates, e.g. ``(1, 2, 4)`` (§3.2; one per layer4 block, so
            two entries for resnet18/34). ``None`` = all 1, as torchvision.
        atrous_rates: ASPP rates; ``None`` = :func:`default_atrous_rates` of the stride.
        aspp_channels: width of every ASPP branch and of the fusion (256).
        dropout: after the ASPP fusion (0.5, as torchvision).
        head_conv: the extra 3x3 conv before the classifier (torchvision) or not (paper).
        in_channels, pretrained, backbone_weights: see ``build_encoder``.
        dilation_style: ``"all"`` (DeepLab reference) or ``"torchvision"`` (first block of
            a dilated layer keeps the previous rate), see ``ResNetEncoder``.
        aux: an auxiliary head on c4 (torchvision's ``FCNHead``), used in training (loss
            weight ``aux_weight``) and by :meth:`forward_dict`.
    """

    def __init__(
        self,
        num_classes: int,
        backbone: str = "resnet50",
        output_stride: int | None = None,
        multi_grid: Sequence[int] | None = None,
        atrous_rates: Sequence[int] | None = None,
        aspp_channels: int = 256,
        dropout: float = 0.5,
        head_conv: bool = True,
        in_channels: int = 3,
        pretrained: str | None = None,
        backbone_weights: str | None = None,
        dilation_style: str = "all",
        aux: bool = False,
    ):
        super().__init__()
        self.encoder, self.output_stride = _build_atrous_encoder(
            backbone, in_channels, output_stride, multi_grid, pretrained, backbone_weights, dilation_style
        )
        rates = tuple(atrous_rates) if atrous_rates is not None else default_atrous_rates(self.output_stride)
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.head = DeepLabV3Head(
            ASPP(self.encoder.out_channels[4], rates, aspp_channels, dropout), num_classes, head_conv
        )
        self.aux_head = TorchvisionFCNHead(self.encoder.out_channels[3], num_classes) if aux else None

    @property
    def aspp(self) -> ASPP:
        return self.head[0]

    def forward_dict(self, x: torch.Tensor, with_aux: bool = True) -> dict[str, torch.Tensor]:
        """``{"out": logits}`` plus ``"aux"`` (c4 head, at input size) when the model has an
        auxiliary head and ``with_aux``, in any mode (torchvision's output)."""
        feats = self.encoder(x)
        size = x.shape[-2:]
        out = {"out": F.interpolate(self.head(feats[4]), size=size, mode="bilinear", align_corners=False)}
        if with_aux and self.aux_head is not None:
            out["aux"] = F.interpolate(self.aux_head(feats[3]), size=size, mode="bilinear", align_corners=False)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        """Logits (N, C, H, W); in training with ``aux``, ``{"out", "aux"}`` for the loss."""
        if self.training and self.aux_head is not None:
            return self.forward_dict(x)
        return self.forward_dict(x, with_aux=False)["out"]


class DeepLabV3Plus(nn.Module):
    """DeepLab v3+ (Chen et al., ECCV 2018; SPEC §5): atrous encoder + :class:`ASPP` +
    :class:`DeepLabV3PlusDecoder` on the stride-4 feature c2 (ResNet layer1) + 1x1
    classifier, logits upsampled bilinearly (x4) to the input size.

    Args: as :class:`DeepLabV3`, plus
        decoder_channels: width of the decoder's two 3x3 convs (256).
        low_level_channels: channels of the projected low-level feature (48).
        dropout: after the ASPP fusion (0.1, the v3+ reference code's keep_prob 0.9).
    """

    def __init__(
        self,
        num_classes: int,
        backbone: str = "resnet50",
        output_stride: int | None = None,
        multi_grid: Sequence[int] | None = None,
        atrous_rates: Sequence[int] | None = None,
        aspp_channels: int = 256,
        decoder_channels: int = 256,
        low_level_channels: int = 48,
        dropout: float = 0.1,
        in_channels: int = 3,
        pretrained: str | None = None,
        backbone_weights: str | None = None,
    ):
        super().__init__()
        self.encoder, self.output_stride = _build_atrous_encoder(
            backbone, in_channels, output_stride, multi_grid, pretrained, backbone_weights
        )
        rates = tuple(atrous_rates) if atrous_rates is not None else default_atrous_rates(self.output_stride)
        ch = self.encoder.out_channels
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.aspp = ASPP(ch[4], rates, aspp_channels, dropout)
        self.decoder = DeepLabV3PlusDecoder(ch[1], aspp_channels, low_level_channels, decoder_channels)
        self.classifier = nn.Conv2d(decoder_channels, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, c2, _, _, c5 = self.encoder(x)
        y = self.classifier(self.decoder(self.aspp(c5), c2))
        return F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)


_PAPER_V3 = "Chen et al., Rethinking Atrous Convolution for Semantic Image Segmentation, arXiv:1706.05587, 2017"
_PAPER_V3PLUS = (
    "Chen et al., Encoder-Decoder with Atrous Separable Convolution for Semantic Image Segmentation, ECCV 2018"
)


@register_model("deeplabv3", paper=_PAPER_V3)
def deeplabv3(num_classes: int, **kw) -> DeepLabV3:
    return DeepLabV3(num_classes, **kw)


@register_model("deeplabv3plus", paper=_PAPER_V3PLUS)
def deeplabv3plus(num_classes: int, **kw) -> DeepLabV3Plus:
    return DeepLabV3Plus(num_classes, **kw)
