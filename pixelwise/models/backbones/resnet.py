"""ResNet encoder with atrous (dilated) output strides 8/16 and DeepLab multi-grid."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn as nn
import torchvision
from torchvision.models.resnet import BasicBlock, Bottleneck

from pixelwise.models.backbones.base import Encoder
from pixelwise.models.backbones.weights import adapt_input_conv_weight, load_state_dict_checked

__all__ = ["ResNetEncoder"]

_CONSTRUCTORS = {
    18: torchvision.models.resnet18,
    34: torchvision.models.resnet34,
    50: torchvision.models.resnet50,
    101: torchvision.models.resnet101,
}


class ResNetEncoder(Encoder):
    """ResNet-18/34/50/101 (He et al., "Deep Residual Learning for Image Recognition",
    CVPR 2016, Table 1) as a five-level encoder, optionally atrous.

    c1 = ReLU(BN(conv1(x))) (stride 2, before the max-pool), c2..c5 = layer1..layer4.
    Modules keep torchvision's names (``conv1``, ``bn1``, ``layer1``...), so a torchvision
    ImageNet state dict loads as it is (``fc.*`` dropped).

    Atrous output stride (Chen et al., DeepLab v3, arXiv:1706.05587, Sec. 3.2 / 4.1; PSPNet,
    Zhao et al., CVPR 2017, Sec. 3.2): for ``output_stride=16`` layer4 keeps stride 1 and
    every 3x3 conv of layer4 gets dilation 2; for ``output_stride=8`` layer3 gets dilation 2
    and layer4 dilation 4. Unlike torchvision's ``replace_stride_with_dilation`` (which keeps
    the previous rate in the first block of a dilated layer), the rate applies to ALL blocks
    of the layer, as in DeepLab's reference code; this also works for BasicBlock networks
    (resnet18/34), where torchvision refuses dilation. Parameters are unchanged, so the same
    ImageNet weights load at any output stride.

    Multi-grid (DeepLab v3, Sec. 3.2 / 4.1): ``multi_grid=(1, 2, 4)`` gives block i of layer4
    the rate ``layer4_rate * multi_grid[i]`` (OS 16: 2, 4, 8). It needs one entry per block.

    ``dilation_style="torchvision"`` reproduces torchvision's ``replace_stride_with_dilation``
    instead (needed to run torchvision's segmentation checkpoints unchanged): the FIRST block
    of a dilated layer keeps the previous layer's rate (OS 8: layer3 1, 2, 2, ...; layer4
    2, 4, 4), the others get the new one. :meth:`set_output_stride` changes the stride and
    style of a built encoder in place.

    ``in_channels != 3`` replaces conv1; loaded RGB weights are adapted (sum for 1 channel).
    All features are ceil(H / s) x ceil(W / s) for an H x W input.
    """

    def __init__(
        self,
        depth: int,
        in_channels: int = 3,
        output_stride: int = 32,
        multi_grid: Sequence[int] | None = None,
        dilation_style: str = "all",
    ):
        super().__init__()
        if depth not in _CONSTRUCTORS:
            raise ValueError(f"ResNet depth must be one of {sorted(_CONSTRUCTORS)}, got {depth}")
        if output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}")
        net = _CONSTRUCTORS[depth](weights=None)
        self.depth = depth
        self.in_channels = int(in_channels)
        self.output_stride = output_stride
        self.conv1 = net.conv1
        if in_channels != 3:
            self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
            nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")
        self.bn1, self.relu, self.maxpool = net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4

        self.set_output_stride(output_stride, multi_grid, dilation_style)
        block = type(self.layer1[0])
        expansion = block.expansion
        self.out_channels = (64, 64 * expansion, 128 * expansion, 256 * expansion, 512 * expansion)
        self.names = ("stem", "layer1", "layer2", "layer3", "layer4")

    def set_output_stride(
        self, output_stride: int, multi_grid: Sequence[int] | None = None, dilation_style: str = "all"
    ) -> None:
        """Set the strides and dilation rates of layer3/layer4 in place (parameters unchanged).

        ``dilation_style``: ``"all"`` (DeepLab reference: every block of a dilated layer gets
        its rate) or ``"torchvision"`` (``replace_stride_with_dilation``: the first block keeps
        the previous layer's rate; no multi-grid).
        """
        if output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
        if dilation_style not in ("all", "torchvision"):
            raise ValueError(f"dilation_style must be 'all' or 'torchvision', got {dilation_style!r}")
        n3, n4 = len(self.layer3), len(self.layer4)
        if multi_grid is not None:
            multi_grid = tuple(int(m) for m in multi_grid)
            if dilation_style == "torchvision":
                raise ValueError("multi_grid cannot be combined with dilation_style='torchvision'")
            if len(multi_grid) != n4 or min(multi_grid) < 1:
                raise ValueError(
                    f"multi_grid for resnet{self.depth} needs {n4} positive rates (one per layer4 block), "
                    f"got {multi_grid}"
                )
        rate3 = 2 if output_stride == 8 else 1
        rate4 = {32: 1, 16: 2, 8: 4}[output_stride]
        if dilation_style == "torchvision":
            rates3 = [1] + [rate3] * (n3 - 1)
            rates4 = [rate3] + [rate4] * (n4 - 1)
        else:
            rates3 = [rate3] * n3
            rates4 = [rate4 * m for m in (multi_grid or (1,) * n4)]
        self._set_rates(self.layer3, rates3, stride=2 if output_stride >= 16 else 1)
        self._set_rates(self.layer4, rates4, stride=2 if output_stride == 32 else 1)
        self.output_stride = output_stride
        self.multi_grid = multi_grid
        self.dilation_style = dilation_style
        self.output_strides = {
            32: (2, 4, 8, 16, 32), 16: (2, 4, 8, 16, 16), 8: (2, 4, 8, 8, 8)
        }[output_stride]

    @staticmethod
    def _set_rates(layer: nn.Sequential, rates: Sequence[int], stride: int) -> None:
        """Set the 3x3 convs of block i of ``layer`` to dilation (= padding) ``rates[i]`` and
        the layer's stride (first block's strided conv and shortcut) to ``stride``."""
        for i, (blk, rate) in enumerate(zip(layer, rates)):
            if isinstance(blk, Bottleneck):
                convs, strided = [blk.conv2], blk.conv2
            elif isinstance(blk, BasicBlock):
                convs, strided = [blk.conv1, blk.conv2], blk.conv1
            else:  # pragma: no cover - torchvision only builds these two
                raise TypeError(f"unsupported block {type(blk).__name__}")
            for conv in convs:
                conv.dilation = (rate, rate)
                conv.padding = (rate, rate)
            if i == 0:
                strided.stride = (stride, stride)
                if blk.downsample is not None:
                    blk.downsample[0].stride = (stride, stride)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        c1 = self.relu(self.bn1(self.conv1(x)))
        c2 = self.layer1(self.maxpool(c1))
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return [c1, c2, c3, c4, c5]

    def load_torchvision_state_dict(
        self, state_dict: Mapping[str, torch.Tensor], source: str = "state dict"
    ) -> None:
        """Load a torchvision ``resnet{depth}`` ImageNet state dict (e.g. ``resnet50-*.pth``).

        ``fc.*`` is dropped; everything else must match exactly, otherwise a
        :class:`~pixelwise.errors.CheckpointError` names ``source`` and the offending keys.
        """
        sd = dict(state_dict)
        w = sd.get("conv1.weight")
        if w is not None and self.in_channels != 3 and w.ndim == 4 and w.shape[1] == 3:
            sd["conv1.weight"] = adapt_input_conv_weight(w, self.in_channels)
        load_state_dict_checked(self, sd, source=source, ignore_prefixes=("fc.",))
