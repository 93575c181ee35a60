"""Fully Convolutional Networks: FCN-32s, FCN-16s, FCN-8s.

Long, Shelhamer, Darrell, "Fully Convolutional Networks for Semantic Segmentation",
CVPR 2015 (SPEC §1). The classifier's fully connected layers become convolutions
(fc6 = 7x7 conv 4096, fc7 = 1x1 conv 4096), a 1x1 ``score`` layer predicts C classes at
stride 32, and learned per-class transposed convolutions initialised to bilinear
interpolation bring the scores back to the input resolution, fusing (by SUM) the scores
of pool4 (FCN-16s) and pool3 (FCN-8s) on the way.

Any input size works: the encoder pools with ``ceil_mode`` so a feature cell ``j`` at
stride ``s`` covers pixels ``[s*j, s*j + s)``; every upsampler (kernel 2s, stride s,
padding s/2) then maps cell centres to pixel centres exactly as bilinear interpolation
with ``align_corners=False`` does, and the result is cropped at the bottom/right to the
skip (or input) size. The reference Caffe code's 100-pixel padding of conv1_1 and its
crop offsets are not needed for that (SPEC §1 allows it).

``head="torchvision"`` is torchvision's FCN variant (``fcn_resnet50/101``), needed to run
its checkpoints: no skips and no learned upsampling; a dilated ResNet (output stride 8),
:class:`TorchvisionFCNHead` (3x3 conv to in/4 + BN + ReLU + dropout 0.1 + 1x1 conv) on c5,
logits upsampled bilinearly to the input size. ``aux=True`` adds the same head on c4
(torchvision's ``aux_classifier``), returned in training as ``{"out", "aux"}``.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from pixelwise.models.backbones import build_encoder, load_weights_file, skipping_weight_files
from pixelwise.models.backbones.vgg import load_fc6_fc7
from pixelwise.models.registry import register_model

__all__ = ["FCN", "FCNHead", "TorchvisionFCNHead", "BilinearUpsampler", "bilinear_kernel"]


def bilinear_kernel(kernel_size: int) -> torch.Tensor:
    """The 2-D bilinear interpolation kernel of FCN (SPEC §1): f = ceil(k/2),
    c = f - 1 if k is odd else f - 0.5, w(x, y) = (1 - |x - c|/f)(1 - |y - c|/f)."""
    f = math.ceil(kernel_size / 2)
    c = f - 1 if kernel_size % 2 == 1 else f - 0.5
    og = torch.arange(kernel_size, dtype=torch.float64)
    w1 = 1 - (og - c).abs() / f
    return (w1[:, None] * w1[None, :]).float()


class BilinearUpsampler(nn.ConvTranspose2d):
    """Per-class transposed convolution (kernel 2s, stride s, no bias) initialised to
    bilinear interpolation; one kernel per class channel, no cross-class weights (FCN §3.3)."""

    def __init__(self, num_classes: int, factor: int, learnable: bool = True):
        super().__init__(
            num_classes, num_classes, kernel_size=2 * factor, stride=factor,
            padding=factor // 2, groups=num_classes, bias=False,
        )
        self.factor = factor
        with torch.no_grad():
            self.weight.copy_(bilinear_kernel(2 * factor).expand_as(self.weight))
        self.weight.requires_grad_(learnable)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:  # type: ignore[override]
        y = super().forward(x)
        return y[..., : size[0], : size[1]]


class FCNHead(nn.Sequential):
    """fc6 (7x7 conv, ReLU, dropout 0.5) -> fc7 (1x1 conv, ReLU, dropout 0.5) -> score_fr
    (1x1 conv to C, zero-initialised), FCN §3.1 / §4.1. ``padding=3`` keeps fc6 'same'."""

    def __init__(self, in_channels: int, num_classes: int, fc_channels: int = 4096, dropout: float = 0.5):
        score = nn.Conv2d(fc_channels, num_classes, 1)
        nn.init.zeros_(score.weight)
        nn.init.zeros_(score.bias)
        super().__init__(
            nn.Conv2d(in_channels, fc_channels, 7, padding=3), nn.ReLU(inplace=True), nn.Dropout2d(dropout),
            nn.Conv2d(fc_channels, fc_channels, 1), nn.ReLU(inplace=True), nn.Dropout2d(dropout),
            score,
        )


class TorchvisionFCNHead(nn.Sequential):
    """torchvision's ``FCNHead``: 3x3 conv (no bias) to ``in_channels // 4`` + BN + ReLU +
    dropout + 1x1 conv to C. Same layer order, so its state-dict keys are torchvision's."""

    def __init__(self, in_channels: int, num_classes: int, dropout: float = 0.1):
        inter = in_channels // 4
        super().__init__(
            nn.Conv2d(in_channels, inter, 3, padding=1, bias=False), nn.BatchNorm2d(inter), nn.ReLU(),
            nn.Dropout(dropout), nn.Conv2d(inter, num_classes, 1),
        )


def _zero_conv1x1(in_ch: int, out_ch: int) -> nn.Conv2d:
    conv = nn.Conv2d(in_ch, out_ch, 1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class FCN(nn.Module):
    """FCN-32s / 16s / 8s (FCN §4.2, Fig. 3) on any encoder of the backbone contract.

    Args:
        num_classes: C, background included.
        stride: 32, 16 or 8 - the finest skip that is fused (FCN-32s, -16s, -8s).
        backbone: encoder name (VGG16 as in the paper by default).
        width: channel multiplier of the VGG encoder AND of fc6/fc7 (1.0 = the paper's net);
            smaller widths train on a CPU.
        learn_final_upsampler: the paper keeps the last (x8/x16/x32) upsampler fixed to
            bilinear and learns the intermediate x2 ones; set True to learn it too.
        fc_channels: width of fc6/fc7; ``None`` = ``4096 * width`` (the paper's 4096).
        backbone_weights (in ``encoder_kwargs``; old name ``weights_path``): a torchvision
            ImageNet ``vgg16``/``vgg16_bn`` state dict file: its ``features`` go to the encoder and, as in the paper (§3.1),
            its fully connected fc6/fc7 are cast into the fc6 (7x7) and fc7 (1x1) convs
            (:func:`~pixelwise.models.backbones.vgg.load_fc6_fc7`; at a reduced fc width a
            one-line warning says they cannot be converted).
        dropout: of fc6/fc7 (paper head, default 0.5) or of the torchvision head (0.1).
        head: ``"paper"`` (fc6/fc7/score, skip fusion, learned upsampling) or
            ``"torchvision"`` (:class:`TorchvisionFCNHead` on c5, bilinear interpolation;
            only with ``stride=32``, i.e. ``fcn32s``: no skips).
        output_stride: encoder output stride; 32 for the paper head, 8 (default) or 16
            for the torchvision head (dilated ``resnet*``).
        dilation_style: how a ResNet is dilated (``"all"`` or ``"torchvision"``, see
            :class:`~pixelwise.models.backbones.resnet.ResNetEncoder`).
        aux: an auxiliary :class:`TorchvisionFCNHead` on c4, used in training (weight
            ``aux_weight`` in the loss) and by :meth:`forward_dict`.
    """

    def __init__(
        self,
        num_classes: int,
        stride: int = 8,
        backbone: str = "vgg16",
        width: float = 1.0,
        in_channels: int = 3,
        learn_final_upsampler: bool = False,
        dropout: float | None = None,
        fc_channels: int | None = None,
        head: str = "paper",
        output_stride: int | None = None,
        dilation_style: str = "all",
        aux: bool = False,
        **encoder_kwargs,
    ):
        super().__init__()
        if stride not in (8, 16, 32):
            raise ValueError(f"FCN stride must be 8, 16 or 32, got {stride}")
        if head not in ("paper", "torchvision"):
            raise ValueError(f"FCN head must be 'paper' or 'torchvision', got {head!r}")
        if head == "torchvision" and stride != 32:
            raise ValueError("FCN head='torchvision' fuses no skips: use fcn32s (stride=32)")
        if output_stride is None:
            output_stride = 8 if head == "torchvision" else 32
        if head == "paper" and output_stride != 32:
            raise ValueError("FCN's paper head needs output_stride=32 (features at strides 8, 16, 32)")
        vgg_weights = None
        if backbone.startswith("vgg"):
            encoder_kwargs["width"] = width
            # read once: features AND fc6/fc7 (``weights_path``: the old name, build_encoder's)
            vgg_weights = encoder_kwargs.pop("backbone_weights", None)
            vgg_weights = encoder_kwargs.pop("weights_path", None) or vgg_weights
        elif width != 1.0:
            raise ValueError("FCN 'width' applies to VGG backbones only")
        self.encoder = build_encoder(backbone, in_channels=in_channels, output_stride=output_stride,
                                     **encoder_kwargs)
        if dilation_style != "all":
            if not hasattr(self.encoder, "set_output_stride"):
                raise ValueError(f"dilation_style applies to resnet* backbones only, not {backbone}")
            self.encoder.set_output_stride(output_stride, dilation_style=dilation_style)
        if head == "paper" and tuple(self.encoder.output_strides[2:]) != (8, 16, 32):
            raise ValueError("FCN needs an encoder with output stride 32 (features at strides 8, 16, 32)")
        ch = self.encoder.out_channels
        self.stride = stride
        self.head_type = head
        if head == "torchvision":
            self.head = TorchvisionFCNHead(ch[4], num_classes, 0.1 if dropout is None else dropout)
        else:
            fc = max(1, int(round(4096 * width))) if fc_channels is None else int(fc_channels)
            self.head = FCNHead(ch[4], num_classes, fc, 0.5 if dropout is None else dropout)
            self._build_skips(ch, num_classes, stride, learn_final_upsampler)
        self.aux_head = TorchvisionFCNHead(ch[3], num_classes, 0.1 if dropout is None else dropout) if aux else None
        # after every layer is built: the random init draws as without weights; not when the
        # model is rebuilt for a checkpoint's state dict
        if vgg_weights is not None and not skipping_weight_files():
            state_dict = load_weights_file(vgg_weights)
            self.encoder.load_torchvision_state_dict(state_dict, source=str(vgg_weights))
            if head == "paper":
                load_fc6_fc7(self.head[0], self.head[3], state_dict, source=str(vgg_weights))

    def _build_skips(self, ch: tuple[int, ...], num_classes: int, stride: int, learn_final_upsampler: bool) -> None:
        if stride <= 16:
            self.score_pool4 = _zero_conv1x1(ch[3], num_classes)
            self.up_pool5 = BilinearUpsampler(num_classes, 2)
        if stride == 8:
            self.score_pool3 = _zero_conv1x1(ch[2], num_classes)
            self.up_pool4 = BilinearUpsampler(num_classes, 2)
        self.up_final = BilinearUpsampler(num_classes, stride, learnable=learn_final_upsampler)

    def forward_dict(self, x: torch.Tensor, with_aux: bool = True) -> dict[str, torch.Tensor]:
        """``{"out": logits}`` plus ``"aux"`` (c4 head, at input size) when the model has
        an auxiliary head and ``with_aux``, in any mode (torchvision's output)."""
        size = x.shape[-2:]
        _, _, pool3, pool4, pool5 = self.encoder(x)
        score = self.head(pool5)
        if self.head_type == "torchvision":
            out = {"out": F.interpolate(score, size=size, mode="bilinear", align_corners=False)}
        else:
            if self.stride <= 16:
                score = self.up_pool5(score, pool4.shape[-2:]) + self.score_pool4(pool4)
            if self.stride == 8:
                score = self.up_pool4(score, pool3.shape[-2:]) + self.score_pool3(pool3)
            out = {"out": self.up_final(score, size)}
        if with_aux and self.aux_head is not None:
            out["aux"] = F.interpolate(self.aux_head(pool4), size=size, mode="bilinear", align_corners=False)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        """Logits (N, C, H, W); in training with ``aux``, ``{"out", "aux"}`` for the loss."""
        if self.training and self.aux_head is not None:
            return self.forward_dict(x)
        return self.forward_dict(x, with_aux=False)["out"]


_PAPER = "Long et al., Fully Convolutional Networks for Semantic Segmentation, CVPR 2015"


@register_model("fcn32s", paper=_PAPER)
def fcn32s(num_classes: int, **kw) -> FCN:
    return FCN(num_classes, stride=32, **kw)


@register_model("fcn16s", paper=_PAPER)
def fcn16s(num_classes: int, **kw) -> FCN:
    return FCN(num_classes, stride=16, **kw)


@register_model("fcn8s", paper=_PAPER)
def fcn8s(num_classes: int, **kw) -> FCN:
    return FCN(num_classes, stride=8, **kw)
