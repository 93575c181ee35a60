"""Box IoU for axis-aligned boxes in (x1, y1, x2, y2) format.

Coordinates are continuous: a box covers [x1, x2) x [y1, y2) and its area is
(x2 - x1) * (y2 - y1), with no "+1" pixel convention. The lecture's exercise: a 2x2 box
[0, 0, 2, 2] and a 2x3 box [1, 1, 3, 4] overlap in 1x1, so IoU = 1 / (4 + 6 - 1) = 1/9.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torchvision.ops import box_iou as _tv_box_iou

__all__ = ["box_iou"]

BoxesLike = torch.Tensor | np.ndarray | Sequence[float] | Sequence[Sequence[float]]


def _as_boxes(x: BoxesLike, name: str) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x, dtype=np.float64))
    if not t.is_floating_point():
        t = t.to(torch.float64)
    if t.dim() == 1:
        t = t.unsqueeze(0)
    if t.dim() != 2 or t.shape[1] != 4:
        raise ValueError(f"{name} must be boxes of shape (N, 4) or (4,) in xyxy format, got shape {tuple(t.shape)}")
    if bool(((t[:, 2] < t[:, 0]) | (t[:, 3] < t[:, 1])).any()):
        raise ValueError(f"{name} has boxes with x2 < x1 or y2 < y1: expected xyxy format")
    return t


def box_iou(a: BoxesLike, b: BoxesLike) -> torch.Tensor:
    """IoU of every box of ``a`` (N, 4) with every box of ``b`` (M, 4): an (N, M) tensor.

    A thin wrapper over :func:`torchvision.ops.box_iou` that also accepts lists and numpy
    arrays and a single box of shape (4,). Lists, arrays and integer tensors are computed
    in float64; floating tensors keep their (common) dtype; ``b`` is moved to ``a``'s
    device. Two zero-area boxes that do not overlap give 0/0 = NaN, as in torchvision.
    """
    ta, tb = _as_boxes(a, "a"), _as_boxes(b, "b")
    dtype = torch.promote_types(ta.dtype, tb.dtype)
    return _tv_box_iou(ta.to(dtype), tb.to(device=ta.device, dtype=dtype))
