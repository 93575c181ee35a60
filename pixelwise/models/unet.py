"""U-Net: the original unpadded network, the padded variant, and U-Net decoders on encoders.

Ronneberger, Fischer, Brox, "U-Net: Convolutional Networks for Biomedical Image
Segmentation", MICCAI 2015 (SPEC §3).

Three models, all registered:

* ``unet_original`` (:class:`UNetOriginal`) - the paper's network exactly (§2, Fig. 1):
  unpadded 3x3 convs + ReLU, no normalisation, channels 64..1024, 2x2 max-pools, 2x2
  transposed convs ("up-convolutions") that halve the channels, concatenation with the
  CENTRE-CROPPED contracting map, a final 1x1 conv; 23 conv layers, dropout at the end of the
  contracting path, init N(0, sqrt(2/N)). Only "valid" tile sizes are accepted and the
  output is the valid centre: for depth 4 it is 184 px smaller than the input
  (572 -> 388). Use :meth:`UNetOriginal.valid_input_sizes`, :meth:`~UNetOriginal.output_size`
  and :meth:`~UNetOriginal.input_size_for` to plan tiles (overlap-tile inference).
* ``unet`` (:class:`UNet`) - the padded U-Net most users want: 'same' 3x3 convs with
  BatchNorm + ReLU, output = input size for ANY input size (odd sizes included).
* ``unet`` with ``backbone=...`` (:class:`EncoderUNet`) - a U-Net decoder (upsample x2,
  concatenate the skip, two 3x3 conv + BN + ReLU per stage) on the five features c1..c5 of
  any encoder of :func:`~pixelwise.models.backbones.build_encoder` (ResNet, EfficientNet-Lite0,
  VGG), optionally with ImageNet weights.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from pixelwise.errors import PixelwiseError
from pixelwise.models.backbones import build_encoder
from pixelwise.models.blocks import ConvBNReLU, ConvReLU
from pixelwise.models.registry import register_model

__all__ = [
    "UNet",
    "UNetOriginal",
    "EncoderUNet",
    "UNetDoubleConv",
    "UNetDown",
    "UNetUp",
    "UNetDecoderStage",
    "InvalidTileSizeError",
    "center_crop",
]


class InvalidTileSizeError(PixelwiseError, ValueError):
    """An input size the unpadded U-Net cannot take; the message names the nearest valid ones."""


def _scaled(c: float, width: float) -> int:
    return max(1, int(round(c * width)))


def center_crop(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """The centre ``size = (h, w)`` window of the last two dimensions of ``x``.

    With an odd margin the extra row/column is dropped at the bottom/right (the offset is
    ``(H - h) // 2``). Works for feature maps (N, C, H, W) and label maps (N, H, W) alike.
    """
    h, w = size[0], size[1]  # not int(): traced sizes stay symbolic in an exported graph
    H, W = x.shape[-2:]
    if not (torch.jit.is_tracing() or torch.compiler.is_compiling()) and (h > H or w > W):
        raise ValueError(f"cannot centre-crop a {H}x{W} map to {h}x{w}")
    top, left = (H - h) // 2, (W - w) // 2
    return x[..., top:top + h, left:left + w]


def _he_normal_init(module: nn.Module) -> None:
    """U-Net §3: weights ~ N(0, sqrt(2/N)), N = incoming nodes of one neuron (k*k*C_in for a
    kxk conv; C_in for the 2x2/2 up-convolution, whose output pixels each see one input
    pixel); biases 0; BatchNorm to identity."""
    for m in module.modules():
        if isinstance(m, nn.ConvTranspose2d):
            taps = (m.kernel_size[0] // m.stride[0]) * (m.kernel_size[1] // m.stride[1])
            n = m.in_channels // m.groups * max(1, taps)
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / n))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d):
            n = m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / n))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


# --- blocks ----------------------------------------------------------------------------------


class UNetDoubleConv(nn.Sequential):
    """[3x3 conv + (BN +) ReLU] x 2, the unit of every U-Net level (U-Net §2).

    ``padded=False``: unpadded convs with bias + ReLU (the paper; each conv trims 1 px per
    side). ``padded=True``: 'same' convs, with BN (:class:`ConvBNReLU`) unless
    ``batch_norm=False`` (then :class:`ConvReLU` with padding 1).
    """

    def __init__(self, in_ch: int, out_ch: int, padded: bool = True, batch_norm: bool = True):
        if padded and batch_norm:
            layers = [ConvBNReLU(in_ch, out_ch), ConvBNReLU(out_ch, out_ch)]
        else:
            pad = 1 if padded else 0
            layers = [ConvReLU(in_ch, out_ch, 3, padding=pad), ConvReLU(out_ch, out_ch, 3, padding=pad)]
        super().__init__(*layers)


class UNetDown(nn.Sequential):
    """Contracting step: 2x2/2 max-pool, then :class:`UNetDoubleConv` (doubling channels).

    The padded network pools with ``ceil_mode`` (an odd row/column is kept, never dropped);
    the unpadded one only ever sees even sizes here (that is what makes a tile size valid).
    """

    def __init__(self, in_ch: int, out_ch: int, padded: bool = True, batch_norm: bool = True):
        super().__init__(
            nn.MaxPool2d(2, 2, ceil_mode=padded),
            UNetDoubleConv(in_ch, out_ch, padded, batch_norm),
        )


class UNetUp(nn.Module):
    """Expanding step: 2x2 up-convolution (transposed conv, stride 2) to ``out_ch`` (= half
    the input channels), concatenation with the skip map, :class:`UNetDoubleConv`.

    Alignment of the two maps:
    * unpadded (``padded=False``, the paper): the skip is larger; its CENTRE is cropped to the
      upsampled size ("cropping is necessary due to the loss of border pixels in every
      convolution", U-Net §2).
    * padded: the upsampled map (2 x ceil(h/2)) is at most one row/column larger than the
      skip; its bottom/right excess is trimmed. With ceil-mode pooling a pooled cell j covers
      skip pixels [2j, 2j+2), which is exactly where the up-convolution writes it, so this
      is aligned for any size.

    ``last_crop`` holds ``(skip_size, cropped_size)`` of the latest forward (a (h, w) pair
    each), to inspect the paper's crop sizes.
    """

    def __init__(self, in_ch: int, out_ch: int, skip_ch: int | None = None, padded: bool = True,
                 batch_norm: bool = True):
        super().__init__()
        skip_ch = out_ch if skip_ch is None else skip_ch
        self.padded = padded
        self.up = nn.ConvTranspose2d(in_ch, out_ch, kernel_size=2, stride=2)
        self.conv = UNetDoubleConv(out_ch + skip_ch, out_ch, padded, batch_norm)
        self.last_crop: tuple[tuple[int, int], tuple[int, int]] | None = None

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.up(x)
        skip_size = skip.shape[-2:]  # sizes stay symbolic when traced (ONNX export with free H, W)
        if self.padded:
            x = x[..., : skip_size[0], : skip_size[1]]
        else:
            skip = center_crop(skip, x.shape[-2:])
        if not (torch.jit.is_tracing() or torch.compiler.is_compiling()):  # int() would freeze an exported size
            self.last_crop = ((int(skip_size[0]), int(skip_size[1])), (int(skip.shape[-2]), int(skip.shape[-1])))
        return self.conv(torch.cat([skip, x], dim=1))


# --- the paper's network ---------------------------------------------------------------------


class UNetOriginal(nn.Module):
    """The original, unpadded U-Net (Ronneberger et al., MICCAI 2015, §2 and Fig. 1; SPEC §3).

    Contracting path: ``depth`` + 1 levels of [3x3 unpadded conv + ReLU] x 2 with 64, 128,
    256, 512, 1024 channels (times ``width``), a 2x2/2 max-pool between levels, dropout after
    the last level ("drop-out layers at the end of the contracting path", §3.1). Expanding
    path: per level a 2x2 up-convolution halving the channels, concatenation with the
    centre-cropped contracting map, [3x3 conv + ReLU] x 2; a final 1x1 conv to C.
    23 conv layers at depth 4; 31.03M parameters for 1 input channel and 2 classes.

    Tiling: a tile size is valid when every map before a pool has an even size. The output
    is the valid centre of the input, smaller by ``output_margin`` pixels (184 for depth 4):
    572 -> 388, with skips cropped 568->392, 280->200, 136->104, 64->56. Any other size
    raises :class:`InvalidTileSizeError` (a ``ValueError``) naming the nearest valid sizes.
    Labels must be cropped the same way: :meth:`crop_target`.

    Args:
        num_classes: C (the paper: 2).
        in_channels: 1 for grey microscopy (the paper), 3 (the default) for RGB.
        width: channel multiplier (1.0 = the paper's network).
        depth: number of pools (4 in the paper).
        dropout: drop probability at the end of the contracting path (0.5).
    """

    def __init__(self, num_classes: int, in_channels: int = 3, width: float = 1.0, depth: int = 4,
                 dropout: float = 0.5):
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.in_channels = int(in_channels)
        self.width = float(width)
        self.depth = int(depth)
        ch = [_scaled(64 * 2**i, width) for i in range(depth + 1)]
        self.channels = tuple(ch)
        self.inc = UNetDoubleConv(in_channels, ch[0], padded=False)
        self.downs = nn.ModuleList(UNetDown(ch[i], ch[i + 1], padded=False) for i in range(depth))
        self.dropout = nn.Dropout(dropout)  # element-wise, as the reference Caffe model
        self.ups = nn.ModuleList(UNetUp(ch[i + 1], ch[i], padded=False) for i in reversed(range(depth)))
        self.classifier = nn.Conv2d(ch[0], num_classes, 1)
        _he_normal_init(self)

    # -- size arithmetic -------------------------------------------------------------------

    @property
    def output_margin(self) -> int:
        """Input size minus output size for every valid input (184 for depth 4)."""
        return 4 * (3 * 2**self.depth - 2)

    def _trace(self, n: int) -> tuple[int, list[tuple[int, int]]] | None:
        """Output size and the (skip, cropped) sizes of the expanding path for a side of
        ``n`` pixels, or ``None`` when ``n`` is not a valid tile size."""
        s = int(n)
        skips: list[int] = []
        for level in range(self.depth + 1):
            s -= 4  # two unpadded 3x3 convs
            if s < 1:
                return None
            if level < self.depth:
                if s % 2:
                    return None
                skips.append(s)
                s //= 2
        crops: list[tuple[int, int]] = []
        for skip in reversed(skips):
            s *= 2
            crops.append((skip, s))
            s -= 4
            if s < 1:
                return None
        return s, crops

    def is_valid_input_size(self, n: int) -> bool:
        return self._trace(n) is not None

    def valid_input_sizes(self, min_size: int = 1, max_size: int = 1024) -> list[int]:
        """All valid tile sides in [min_size, max_size] (depth 4: 188, 204, ..., 572, ...)."""
        return [n for n in range(max(1, int(min_size)), int(max_size) + 1) if self._trace(n) is not None]

    def _nearest_valid(self, n: int) -> tuple[int | None, int]:
        """The largest valid size <= n (None if there is none) and the smallest valid > n."""
        step = 2**self.depth
        below = next((m for m in range(int(n), max(0, int(n) - step), -1) if self._trace(m)), None)
        above = next(m for m in range(int(n) + 1, int(n) + 2 * step + 400) if self._trace(m))
        return below, above

    def table_input_size(self, size: int) -> int:
        """The valid tile size nearest to ``size`` (ties: the smaller), e.g. 512 -> 508."""
        below, above = self._nearest_valid(size)
        if below is None or (above - size) < (size - below):
            return above
        return below

    def _size_error(self, what: str, n: int) -> InvalidTileSizeError:
        below, above = self._nearest_valid(n)
        near = [m for m in (below, above) if m is not None]
        opts = ", ".join(f"{m} (output {self._trace(m)[0]})" for m in near)  # type: ignore[index]
        return InvalidTileSizeError(
            f"unet_original (unpadded, depth {self.depth}) cannot take input {what} {n}: every map before "
            f"a 2x2 pool must have an even size and the output is the valid centre, "
            f"{self.output_margin} px smaller than the input; nearest valid input sizes: {opts} "
            f"(use the padded 'unet' for arbitrary sizes)"
        )

    def output_size(self, input_size: int | Sequence[int]) -> int | tuple[int, ...]:
        """Output side(s) for a valid input side (or (H, W)): 572 -> 388 at depth 4."""
        if isinstance(input_size, int):
            t = self._trace(input_size)
            if t is None:
                raise self._size_error("size", input_size)
            return t[0]
        return tuple(self.output_size(int(s)) for s in input_size)  # type: ignore[misc]

    def input_size_for(self, output_size: int | Sequence[int]) -> int | tuple[int, ...]:
        """The input side(s) whose valid output is exactly ``output_size`` (388 -> 572)."""
        if not isinstance(output_size, int):
            return tuple(self.input_size_for(int(s)) for s in output_size)  # type: ignore[misc]
        n = output_size + self.output_margin
        if output_size >= 1 and self._trace(n) is not None:
            return n
        lo = next((m for m in range(n - 1, 0, -1) if self._trace(m)), None)
        hi = next(m for m in range(max(n + 1, 1), n + 2 * 2**self.depth + 400) if self._trace(m))
        outs = [self._trace(m)[0] for m in (lo, hi) if m is not None]  # type: ignore[index]
        raise InvalidTileSizeError(
            f"unet_original (unpadded, depth {self.depth}) cannot produce an output of {output_size} px; "
            f"nearest possible outputs: {', '.join(map(str, outs))} "
            f"(inputs {', '.join(str(o + self.output_margin) for o in outs)})"
        )

    def crop_sizes(self, input_size: int) -> list[tuple[int, int]]:
        """The paper's crops for a valid input side, deepest first: 572 -> [(64, 56),
        (136, 104), (280, 200), (568, 392)] (skip size -> cropped size)."""
        t = self._trace(input_size)
        if t is None:
            raise self._size_error("size", input_size)
        return t[1]

    def crop_target(self, target: torch.Tensor) -> torch.Tensor:
        """Centre-crop a label / weight map (..., H, W) of the INPUT size to the output size."""
        h, w = target.shape[-2:]
        return center_crop(target, (self.output_size(int(h)), self.output_size(int(w))))

    # -- forward ---------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if self._trace(int(h)) is None:
            raise self._size_error("height", int(h))
        if self._trace(int(w)) is None:
            raise self._size_error("width", int(w))
        skips = [self.inc(x)]
        for down in self.downs:
            skips.append(down(skips[-1]))
        x = self.dropout(skips.pop())
        for up in self.ups:
            x = up(x, skips.pop())
        return self.classifier(x)


# --- the padded U-Net ------------------------------------------------------------------------


class UNet(nn.Module):
    """The padded U-Net: the paper's topology (U-Net §2) with 'same' 3x3 convs, so the
    output has the input's size, for ANY input size (97 x 131 included: pools use
    ``ceil_mode`` and each up-convolution's output is trimmed to its skip, see :class:`UNetUp`).

    Args:
        num_classes: C.
        in_channels: input channels (3 RGB, 1 grey).
        base_channels: channels of the first level (64 in the paper); level i has
            ``base_channels * 2**i``.
        width: a further channel multiplier (kept for symmetry with the other models;
            channels are ``round(base_channels * 2**i * width)``).
        depth: number of pools (4).
        batch_norm: BN after every conv (default; ``False`` gives conv + ReLU as the paper).
        dropout: Dropout2d probability at the end of the contracting path (0 = none).
    """

    def __init__(self, num_classes: int, in_channels: int = 3, width: float = 1.0, base_channels: int = 64,
                 depth: int = 4, batch_norm: bool = True, dropout: float = 0.0):
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.in_channels = int(in_channels)
        self.depth = int(depth)
        ch = [_scaled(base_channels * 2**i, width) for i in range(depth + 1)]
        self.channels = tuple(ch)
        self.inc = UNetDoubleConv(in_channels, ch[0], True, batch_norm)
        self.downs = nn.ModuleList(UNetDown(ch[i], ch[i + 1], True, batch_norm) for i in range(depth))
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.ups = nn.ModuleList(UNetUp(ch[i + 1], ch[i], None, True, batch_norm) for i in reversed(range(depth)))
        self.classifier = nn.Conv2d(ch[0], num_classes, 1)
        _he_normal_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = [self.inc(x)]
        for down in self.downs:
            skips.append(down(skips[-1]))
        x = self.dropout(skips.pop())
        for up in self.ups:
            x = up(x, skips.pop())
        return self.classifier(x)


# --- U-Net decoder on an encoder ------------------------------------------------------------


def _upsample_to(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bring ``x`` to ``size``: nothing if equal; bilinear x2 then a bottom/right trim when
    ``x`` is the ceil-halved map (what every encoder here produces: feature cell j covers
    pixels [2j, 2j+2) of the finer map); plain bilinear resize otherwise."""
    H, W = size[0], size[1]  # used symbolically (traced export); the branch is decided on ints
    h, w, iH, iW = int(x.shape[-2]), int(x.shape[-1]), int(H), int(W)
    if (h, w) == (iH, iW):
        return x
    if (h, w) == ((iH + 1) // 2, (iW + 1) // 2):
        return F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)[..., :H, :W]
    return F.interpolate(x, size=(H, W), mode="bilinear", align_corners=False)


class UNetDecoderStage(nn.Module):
    """Upsample x2 (bilinear) to the skip's size, concatenate the skip (if any), then two
    3x3 conv + BN + ReLU."""

    def __init__(self, in_ch: int, skip_ch: int, out_ch: int):
        super().__init__()
        self.conv = nn.Sequential(ConvBNReLU(in_ch + skip_ch, out_ch), ConvBNReLU(out_ch, out_ch))

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None,
                size: Sequence[int] | None = None) -> torch.Tensor:
        target = skip.shape[-2:] if skip is not None else size
        x = _upsample_to(x, target)  # type: ignore[arg-type]
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.conv(x)


class EncoderUNet(nn.Module):
    """A U-Net decoder on an encoder's features c1..c5 (strides 2..32): four
    :class:`UNetDecoderStage` s with the skips c4, c3, c2, c1, a fifth one without skip that
    goes x2 to the input size, and a 1x1 conv to C. The usual "U-Net with a pretrained
    encoder" (as in the U-Net paper's topology, with the contracting path replaced).

    Args:
        num_classes: C.
        backbone: an encoder name of :func:`~pixelwise.models.backbones.list_encoders`
            (``resnet18``, ``resnet34``, ``resnet50``, ``efficientnet_lite0``, ``vgg16_bn``...).
        in_channels: input channels; pretrained RGB weights are adapted.
        pretrained: packaged weights name (``"efficientnet-lite0"`` / ``"imagenet"``, or True
            for the latter) - only EfficientNet-Lite0 ships them.
        backbone_weights: path of a torchvision (ResNet/VGG) or EfficientNet-PyTorch state dict.
        decoder_channels: output channels of the five decoder stages.
        width: VGG encoders only, their channel multiplier.
        **encoder_kwargs: further :func:`build_encoder` options (e.g. ``output_stride``).
    """

    def __init__(self, num_classes: int, backbone: str = "resnet34", in_channels: int = 3,
                 pretrained: str | bool | None = None, backbone_weights: str | None = None,
                 decoder_channels: Sequence[int] = (256, 128, 64, 32, 16), width: float = 1.0,
                 **encoder_kwargs):
        super().__init__()
        if len(decoder_channels) != 5:
            raise ValueError(f"decoder_channels needs 5 entries, got {tuple(decoder_channels)}")
        if pretrained is True:
            pretrained = "imagenet"
        elif pretrained is False:
            pretrained = None
        if width != 1.0:
            encoder_kwargs["width"] = width
        self.in_channels = int(in_channels)
        self.backbone = backbone
        self.encoder = build_encoder(backbone, in_channels=in_channels, pretrained=pretrained,
                                     weights_path=backbone_weights, **encoder_kwargs)
        enc = list(self.encoder.out_channels)
        skips = [enc[3], enc[2], enc[1], enc[0], 0]
        stages = []
        ch = enc[4]
        for skip_ch, out_ch in zip(skips, decoder_channels):
            stages.append(UNetDecoderStage(ch, skip_ch, out_ch))
            ch = out_ch
        self.decoder = nn.ModuleList(stages)
        self.classifier = nn.Conv2d(ch, num_classes, 1)
        _he_normal_init(self.decoder)
        _he_normal_init(self.classifier)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        c1, c2, c3, c4, c5 = self.encoder(x)
        y = c5
        for stage, skip in zip(self.decoder[:4], (c4, c3, c2, c1)):
            y = stage(y, skip)
        y = self.decoder[4](y, None, size)
        return self.classifier(y)


_PAPER = "Ronneberger, Fischer, Brox, U-Net: Convolutional Networks for Biomedical Image Segmentation, MICCAI 2015"


@register_model("unet_original", paper=_PAPER)
def unet_original(num_classes: int, **kw) -> UNetOriginal:
    return UNetOriginal(num_classes, **kw)


@register_model("unet", paper=_PAPER + " (padded; optional encoder)")
def unet(num_classes: int, backbone: str | None = None, **kw) -> nn.Module:
    if backbone is None:
        return UNet(num_classes, **kw)
    return EncoderUNet(num_classes, backbone=backbone, **kw)
