"""Losses (CE, U-Net weighted CE, Dice, aux term) and SegNet median-frequency weights."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pixelwise.data.stats import class_pixel_counts, dataset_class_stats, median_frequency_weights
from pixelwise.errors import DataError
from pixelwise.losses import LOSSES, build_loss

I = 255


def _batch(seed: int = 0, C: int = 3, n: int = 2, h: int = 6, w: int = 7):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, C, h, w, generator=g)
    target = torch.randint(0, C, (n, h, w), generator=g)
    target[0, :2, :3] = I
    return logits, target


def test_ce_equals_torch_cross_entropy_with_ignore():
    logits, target = _batch()
    ref = F.cross_entropy(logits, target, ignore_index=I)
    assert build_loss("ce", num_classes=3)(logits, target).item() == pytest.approx(ref.item(), rel=1e-6)


def test_class_weights_change_ce_as_expected():
    logits, target = _batch()
    w = [0.2, 1.0, 3.0]
    ref = F.cross_entropy(logits, target, weight=torch.tensor(w), ignore_index=I)
    got = build_loss("ce", num_classes=3, class_weights=w)(logits, target)
    assert got.item() == pytest.approx(ref.item(), rel=1e-6)
    # weighting only class 2 = mean CE over the pixels of class 2
    only2 = build_loss("ce", num_classes=3, class_weights=[0, 0, 1])(logits, target)
    nll = F.cross_entropy(logits, torch.where(target == I, 0, target), reduction="none")
    assert only2.item() == pytest.approx(nll[target == 2].mean().item(), rel=1e-6)
    with pytest.raises(ValueError, match="entries"):
        build_loss("ce", num_classes=3, class_weights=[1, 2])


def test_weighted_ce_ones_equals_ce_and_normalisation():
    logits, target = _batch(1)
    ce = build_loss("ce", num_classes=3)(logits, target)
    wce = build_loss("weighted_ce", num_classes=3)
    assert wce(logits, target, torch.ones(target.shape)).item() == pytest.approx(ce.item(), rel=1e-6)
    # scaling the weight map does not change the loss (normalised by sum of weights)
    w = torch.rand(target.shape, generator=torch.Generator().manual_seed(2)) + 0.5
    assert wce(logits, target, 10 * w).item() == pytest.approx(wce(logits, target, w).item(), rel=1e-5)
    # explicit formula: sum w * nll / sum of w over non-ignored pixels
    nll = F.cross_entropy(logits, torch.where(target == I, 0, target), reduction="none")
    valid = target != I
    expected = (w * nll)[valid].sum() / w[valid].sum()
    assert wce(logits, target, w).item() == pytest.approx(expected.item(), rel=1e-6)
    with pytest.raises(ValueError, match="weight map"):
        wce(logits, target)


def test_dice_perfect_and_wrong():
    C = 3
    target = torch.randint(0, C, (2, 16, 16), generator=torch.Generator().manual_seed(3))
    onehot = F.one_hot(target, C).permute(0, 3, 1, 2).float()
    dice = build_loss("dice", num_classes=C)
    assert dice(onehot * 50, target).item() == pytest.approx(0.0, abs=1e-5)
    wrong = F.one_hot((target + 1) % C, C).permute(0, 3, 1, 2).float()
    assert dice(wrong * 50, target).item() > 0.99
    # binary: 1 sigmoid channel, and 2 softmax channels
    fg = (target == 1).long()
    bin1 = build_loss("dice", num_classes=1)
    assert bin1((fg[:, None].float() * 2 - 1) * 50, fg).item() == pytest.approx(0.0, abs=1e-5)
    assert bin1((1 - fg[:, None].float() * 2) * 50, fg).item() > 0.99
    bin2 = build_loss("dice", num_classes=2)
    logits2 = F.one_hot(fg, 2).permute(0, 3, 1, 2).float() * 50
    assert bin2(logits2, fg).item() == pytest.approx(0.0, abs=1e-5)
    # ignored pixels are excluded: a wrong prediction there changes nothing
    t_ign = target.clone()
    t_ign[:, :4] = I
    mixed = onehot.clone()
    mixed[:, :, :4] = wrong[:, :, :4]
    assert dice(mixed * 50, t_ign).item() == pytest.approx(0.0, abs=1e-5)


def test_ce_dice_is_sum():
    logits, target = _batch(4)
    ce = build_loss("ce", num_classes=3)(logits, target)
    dice = build_loss("dice", num_classes=3)(logits, target)
    both = build_loss("ce_dice", num_classes=3, dice_weight=0.5)(logits, target)
    assert both.item() == pytest.approx(ce.item() + 0.5 * dice.item(), rel=1e-6)


def test_aux_dict_adds_point_four_aux_loss_upsampled():
    logits, target = _batch(5, h=8, w=8)
    aux = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(6))
    loss = build_loss("ce", num_classes=3)
    aux_up = F.interpolate(aux, size=(8, 8), mode="bilinear", align_corners=False)
    expected = loss(logits, target) + 0.4 * loss(aux_up, target)
    assert loss({"out": logits, "aux": aux}, target).item() == pytest.approx(expected.item(), rel=1e-6)
    assert loss({"out": logits}, target).item() == pytest.approx(loss(logits, target).item())


def test_gradients_flow():
    for name in LOSSES:
        logits, target = _batch(7)
        logits.requires_grad_(True)
        aux = torch.randn(2, 3, 3, 4, requires_grad=True)
        loss = build_loss(name, num_classes=3)({"out": logits, "aux": aux}, target, torch.ones(target.shape))
        loss.backward()
        assert torch.isfinite(loss)
        assert logits.grad is not None and logits.grad.abs().sum() > 0, name
        assert aux.grad is not None and aux.grad.abs().sum() > 0, name
        assert logits.grad[0, :, :2, :3].abs().sum() == 0, name  # ignored pixels get no gradient


def test_all_ignored_gives_zero_and_unknown_name():
    logits, target = _batch()
    for name in ("ce", "dice"):
        assert build_loss(name, num_classes=3)(logits, torch.full_like(target, I)).item() == 0.0
    with pytest.raises(ValueError, match="ce, weighted_ce, dice, ce_dice"):
        build_loss("focal", num_classes=3)


# ---------------------------------------------------------------- SegNet median frequency
LABELS = [
    np.array([[0, 0], [0, 1]]),  # 4 px: class 0 x3, class 1 x1
    np.array([[0, 0], [2, 2]]),  # 4 px: class 0 x2, class 2 x2
    torch.tensor([[1, 1, 1], [1, 2, I]]),  # 5 counted px: class 1 x4, class 2 x1
]


def test_median_frequency_weights_by_hand():
    pc, ipc = class_pixel_counts(LABELS, num_classes=4)
    assert pc.tolist() == [5, 5, 3, 0]
    assert ipc.tolist() == [8, 9, 9, 0]  # images containing c: 4+4, 4+5, 4+5
    # f = 5/8, 5/9, 3/9; median 5/9; a = (5/9)/(5/8) = 8/9, 1, (5/9)/(1/3) = 5/3; absent -> 0
    assert median_frequency_weights(pc, ipc) == pytest.approx([8 / 9, 1.0, 5 / 3, 0.0])
    stats = dataset_class_stats([{"semantic": torch.as_tensor(x)} for x in LABELS], num_classes=4)
    assert stats["frequency"] == pytest.approx([5 / 13, 5 / 13, 3 / 13, 0.0])
    assert stats["median_frequency_weights"] == pytest.approx([8 / 9, 1.0, 5 / 3, 0.0])
    assert stats["num_images"] == 3 and stats["num_pixels"] == 13
    with pytest.raises(ValueError, match=r"label map 1 .*\[9\]"):
        class_pixel_counts([LABELS[0], np.array([[9]])], num_classes=4)
    with pytest.raises(DataError, match="item 0"):
        dataset_class_stats([{"image": torch.zeros(3, 2, 2)}], num_classes=4)
