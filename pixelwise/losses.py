"""Segmentation losses: pixel-wise cross-entropy, U-Net's weighted cross-entropy, soft Dice.

Every loss built by :func:`build_loss` is an ``nn.Module`` called as
``loss(outputs, target, pixel_weights=None) -> scalar tensor`` where

- ``outputs`` is logits (N, C, H, W) or a dict ``{"out": logits, "aux": logits}``; the
  auxiliary term is added with weight ``aux_weight`` (PSPNet §3.4: 0.4). Logits whose size
  differs from the target's (e.g. an auxiliary head at stride 8) are upsampled bilinearly
  to the target size; labels are never downsampled (SPEC §5).
- ``target`` is an integer label map (N, H, W); pixels equal to ``ignore_index`` count in
  neither numerator nor denominator.
- ``pixel_weights`` is an optional float map (N, H, W), e.g. U-Net's w(x)
  (:mod:`pixelwise.data.weightmap`); required by "weighted_ce".

With ``num_classes == 1`` the model emits one foreground logit per pixel: labels are 0/1,
cross-entropy becomes binary cross-entropy on the sigmoid, and ``class_weights`` (if any)
has two entries (background, foreground).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "LOSSES",
    "build_loss",
    "SegmentationLoss",
    "CrossEntropyLoss",
    "WeightedCrossEntropyLoss",
    "DiceLoss",
    "CEDiceLoss",
]

LOSSES = ("ce", "weighted_ce", "dice", "ce_dice")

Outputs = torch.Tensor | Mapping[str, torch.Tensor]


def _resize_to(logits: torch.Tensor, size: torch.Size) -> torch.Tensor:
    if logits.shape[-2:] == size:
        return logits
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)


class SegmentationLoss(nn.Module):
    """Base class: unpacks ``{"out", "aux"}`` outputs, resizes logits, adds the aux term.

    Subclasses implement :meth:`term`, the loss of one logits tensor at target size.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255, aux_weight: float = 0.4) -> None:
        super().__init__()
        if int(num_classes) < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.aux_weight = float(aux_weight)

    def term(self, logits: torch.Tensor, target: torch.Tensor, pixel_weights: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def forward(
        self, outputs: Outputs, target: torch.Tensor, pixel_weights: torch.Tensor | None = None
    ) -> torch.Tensor:
        if isinstance(outputs, Mapping):
            if "out" not in outputs:
                raise ValueError(f"loss expects logits or a dict with key 'out', got keys {sorted(outputs)}")
            out, aux = outputs["out"], outputs.get("aux")
        else:
            out, aux = outputs, None
        if target.dim() != 3:
            raise ValueError(f"target must be a label map (N, H, W), got shape {tuple(target.shape)}")
        if out.dim() != 4 or out.shape[0] != target.shape[0] or out.shape[1] != self.num_classes:
            raise ValueError(
                f"logits of shape {tuple(out.shape)} do not fit target {tuple(target.shape)} "
                f"with num_classes = {self.num_classes}: expected (N, {self.num_classes}, h, w)"
            )
        if pixel_weights is not None and pixel_weights.shape != target.shape:
            raise ValueError(
                f"pixel_weights shape {tuple(pixel_weights.shape)} differs from target shape {tuple(target.shape)}"
            )
        target = target.long()
        size = target.shape[-2:]
        loss = self.term(_resize_to(out, size), target, pixel_weights)
        if aux is not None and self.aux_weight != 0:
            loss = loss + self.aux_weight * self.term(_resize_to(aux, size), target, pixel_weights)
        return loss

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, ignore_index={self.ignore_index}, aux_weight={self.aux_weight}"


class CrossEntropyLoss(SegmentationLoss):
    """Pixel-wise cross-entropy (FCN §4), optional per-class and per-pixel weights.

    E = sum_x w(x) * cw[l(x)] * (-log p_{l(x)}(x)) / sum_x w(x) * cw[l(x)], sums over the
    non-ignored pixels x of the batch; w = 1 without ``pixel_weights``. Without pixel
    weights this is exactly ``F.cross_entropy(logits, target, weight=cw, ignore_index=...)``.
    A batch with no counted pixel gives 0 (not NaN).
    """

    requires_pixel_weights = False

    def __init__(
        self,
        num_classes: int,
        ignore_index: int = 255,
        class_weights: Sequence[float] | torch.Tensor | None = None,
        aux_weight: float = 0.4,
    ) -> None:
        super().__init__(num_classes, ignore_index, aux_weight)
        self.register_buffer("class_weights", _check_class_weights(class_weights, self.num_classes), persistent=False)

    def term(self, logits: torch.Tensor, target: torch.Tensor, pixel_weights: torch.Tensor | None) -> torch.Tensor:
        if pixel_weights is None and self.requires_pixel_weights:
            raise ValueError(
                "weighted_ce needs a per-pixel weight map: call loss(outputs, target, pixel_weights) "
                "(see pixelwise.data.weightmap), or use 'ce'"
            )
        valid = target != self.ignore_index
        safe = torch.where(valid, target, torch.zeros_like(target))
        if self.num_classes == 1:
            nll = F.binary_cross_entropy_with_logits(logits[:, 0].float(), safe.float(), reduction="none")
        else:
            nll = F.cross_entropy(logits.float(), safe, reduction="none")
        w = valid.float()
        if self.class_weights is not None:
            w = w * self.class_weights.to(safe.device)[safe]
        if pixel_weights is not None:
            w = w * pixel_weights.float()
        denom = w.sum().clamp_min(torch.finfo(w.dtype).tiny)
        return (w * nll).sum() / denom


class WeightedCrossEntropyLoss(CrossEntropyLoss):
    """U-Net's weighted cross-entropy (Ronneberger et al. 2015, §3): E = sum_x w(x) (-log p_{l(x)}(x)).

    The weight map w(x) (class balance + border term) is passed at call time as
    ``pixel_weights`` and is required. Normalisation: E is divided by sum_x w(x) over the
    non-ignored pixels (times class weights, if given), so all-ones weights give plain CE
    and the loss scale does not depend on image size or on the weight map's magnitude.
    """

    requires_pixel_weights = True


class DiceLoss(SegmentationLoss):
    """Soft Dice loss, 1 - (2 sum p g + s) / (sum p + sum g + s), sums over the batch's pixels.

    Multi-class (C > 2): p = softmax probabilities, g = one-hot target; the loss is the mean
    over the classes present in the batch's target. Binary: C == 1 uses the sigmoid of the
    single logit, C == 2 the softmax probability of class 1; the loss is the foreground
    Dice only (the smoothing s keeps images without foreground well defined). Ignored pixels
    are left out of every sum. ``pixel_weights`` is accepted for a uniform call signature
    and not used: U-Net's weight map is a cross-entropy weighting.
    """

    def __init__(
        self, num_classes: int, ignore_index: int = 255, aux_weight: float = 0.4, smooth: float = 1.0
    ) -> None:
        super().__init__(num_classes, ignore_index, aux_weight)
        self.smooth = float(smooth)

    def term(self, logits: torch.Tensor, target: torch.Tensor, pixel_weights: torch.Tensor | None) -> torch.Tensor:
        valid = target != self.ignore_index
        safe = torch.where(valid, target, torch.zeros_like(target))
        mask = valid.unsqueeze(1).float()  # (N, 1, H, W)
        logits = logits.float()
        if self.num_classes == 1:
            probs = torch.sigmoid(logits)
            onehot = (safe == 1).unsqueeze(1).float()
        elif self.num_classes == 2:
            probs = torch.softmax(logits, dim=1)[:, 1:2]
            onehot = (safe == 1).unsqueeze(1).float()
        else:
            probs = torch.softmax(logits, dim=1)
            onehot = F.one_hot(safe, self.num_classes).permute(0, 3, 1, 2).float()
        probs, onehot = probs * mask, onehot * mask
        dims = (0, 2, 3)
        inter = (probs * onehot).sum(dims)
        gt = onehot.sum(dims)
        card = probs.sum(dims) + gt
        dice = (2 * inter + self.smooth) / (card + self.smooth).clamp_min(torch.finfo(card.dtype).tiny)
        loss = 1 - dice
        if self.num_classes <= 2:
            return loss[0]
        present = (gt > 0).float()
        # Mean over classes present in the target; a batch with no counted pixel gives 0.
        return (loss * present).sum() / present.sum().clamp_min(1.0)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", smooth={self.smooth}"


class CEDiceLoss(SegmentationLoss):
    """Cross-entropy + ``dice_weight`` x soft Dice; ``pixel_weights`` go to the CE term only."""

    def __init__(
        self,
        num_classes: int,
        ignore_index: int = 255,
        class_weights: Sequence[float] | torch.Tensor | None = None,
        aux_weight: float = 0.4,
        dice_weight: float = 1.0,
    ) -> None:
        super().__init__(num_classes, ignore_index, aux_weight)
        self.ce = CrossEntropyLoss(num_classes, ignore_index, class_weights, aux_weight=0.0)
        self.dice = DiceLoss(num_classes, ignore_index, aux_weight=0.0)
        self.dice_weight = float(dice_weight)

    def term(self, logits: torch.Tensor, target: torch.Tensor, pixel_weights: torch.Tensor | None) -> torch.Tensor:
        return self.ce.term(logits, target, pixel_weights) + self.dice_weight * self.dice.term(logits, target, None)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", dice_weight={self.dice_weight}"


def _check_class_weights(weights: Sequence[float] | torch.Tensor | None, num_classes: int) -> torch.Tensor | None:
    if weights is None:
        return None
    w = torch.as_tensor(weights, dtype=torch.float32).detach().flatten().cpu()
    expected = 2 if num_classes == 1 else num_classes
    if w.numel() != expected:
        what = "2 (background, foreground) for num_classes = 1" if num_classes == 1 else f"num_classes = {num_classes}"
        raise ValueError(f"class_weights has {w.numel()} entries, expected {what}")
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
        raise ValueError(f"class_weights must be finite and >= 0, got {w.tolist()}")
    return w


def build_loss(
    name: str = "ce",
    *,
    num_classes: int,
    ignore_index: int = 255,
    class_weights: Sequence[float] | torch.Tensor | None = None,
    aux_weight: float = 0.4,
    dice_weight: float = 1.0,
) -> SegmentationLoss:
    """Build a loss by name: "ce", "weighted_ce", "dice" or "ce_dice" (= ce + dice_weight x dice).

    ``class_weights`` (e.g. SegNet median-frequency weights from
    :func:`pixelwise.data.stats.median_frequency_weights`) apply to the cross-entropy terms.
    """
    key = name.lower().strip()
    if key == "ce":
        return CrossEntropyLoss(num_classes, ignore_index, class_weights, aux_weight)
    if key == "weighted_ce":
        return WeightedCrossEntropyLoss(num_classes, ignore_index, class_weights, aux_weight)
    if key == "dice":
        if class_weights is not None:
            raise ValueError("class_weights are not used by the 'dice' loss: use 'ce' or 'ce_dice'")
        return DiceLoss(num_classes, ignore_index, aux_weight)
    if key == "ce_dice":
        return CEDiceLoss(num_classes, ignore_index, class_weights, aux_weight, dice_weight)
    raise ValueError(f"unknown loss {name!r}; valid names: {', '.join(LOSSES)}")
