"""Semantic segmentation metrics from one confusion matrix (FCN paper, Long et al. 2015, §5).

``n[i, j]`` counts the pixels of ground-truth class ``i`` predicted as class ``j`` over the
whole dataset (rows = ground truth, columns = prediction); ``t_i = sum_j n[i, j]``. Every
metric is a function of this matrix alone, so evaluating in pieces (batches, processes)
and SUMMING the matrices gives exactly the numbers of one pass over everything:

- pixel accuracy          = sum_i n_ii / sum_i t_i
- mean accuracy           = (1/n_cl) sum_i n_ii / t_i
- mean IoU                = (1/n_cl) sum_i n_ii / (t_i + sum_j n_ji - n_ii)
- frequency-weighted IoU  = (sum_k t_k)^-1 sum_i t_i n_ii / (t_i + sum_j n_ji - n_ii)
- Dice / F1 per class     = 2 n_ii / (t_i + sum_j n_ji)

Absent-class policy (SPEC §9): a class absent from both prediction and ground truth has
IoU = Dice = 0/0 = NaN and is left out of the means (n_cl counts only the others). A class
present only in the prediction has IoU 0 and DOES count in mean IoU. Per-class accuracy is
NaN wherever t_i = 0, and mean accuracy averages the classes with t_i > 0. With no pixels
at all every scalar is NaN.

Speed (CPU inputs): :meth:`ConfusionMatrix.update` makes one small integer key per pixel,
``target * C + pred`` in int16 (int32 above 128 classes) -- never an int64 copy of the
inputs -- and counts the keys with ``torch.bincount`` (in serial chunks) into the *joint
histogram* of (target value 0..255, prediction 0..C-1). The matrix is its first C rows; the ignore index
and every invalid target value have their own row, so the range checks are read off the
256 x C histogram instead of costing passes over the pixels. Inputs outside what that key
can hold (a prediction outside [0, C), a target outside [0, 256), floating class ids, GPU
tensors) take the general path, which gives the same counts and errors.
"""
from __future__ import annotations

import math
import sys
from typing import Any

import numpy as np
import torch

__all__ = ["ConfusionMatrix"]

ArrayLike = torch.Tensor | np.ndarray


def _to_tensor(x: ArrayLike, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach()
    if isinstance(x, np.ndarray):
        if not x.flags.writeable:  # torch.from_numpy warns on read-only arrays (e.g. from PIL)
            x = x.copy()
        return torch.from_numpy(x)
    raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(x).__name__}")


def _as_class_ids(x: torch.Tensor, name: str) -> torch.Tensor:
    """int64 class ids; floating input is accepted only when every value is a whole number."""
    if x.is_floating_point():
        if not bool(torch.all(x == torch.round(x))):
            raise ValueError(
                f"{name} is floating point with non-integer values: pass class ids, "
                "or logits of shape (N, C, ...) together with a target of shape (N, ...)"
            )
    return x.to(torch.int64)


def _bad_values(x: torch.Tensor, mask: torch.Tensor, limit: int = 10) -> str:
    return _fmt_values(torch.unique(x[mask]).tolist(), limit)


def _fmt_values(vals: list[int], limit: int = 10) -> str:
    shown = ", ".join(str(v) for v in vals[:limit])
    return shown + (f", ... ({len(vals)} distinct)" if len(vals) > limit else "")


_TARGET_VALUES = 256  # rows of the joint histogram: every target value a uint8 map can hold
# bincount's range check (a min and a max) is an OpenMP region from torch's grain size of
# 32768 elements on: on a busy machine its threads wait for each other far longer than the
# counting takes (measured 20x slower at load 7 on 2 cores), so keys are counted in serial chunks.
_SERIAL_CHUNK = 32767
_BLOCK = 4 * _SERIAL_CHUNK  # pixels per block: 1 MiB of int64 input, 256 KiB of int16 keys


def _unsigned(a: np.ndarray) -> np.ndarray:
    """The same memory as unsigned integers: negative values become huge, so one ``max``
    checks both ends of a range."""
    if a.dtype == np.bool_:
        return a.view(np.uint8)
    return a.view(f"u{a.itemsize}") if a.dtype.kind == "i" else a


def _below(a: np.ndarray, bound: int) -> bool:
    """Whether every value of the integer array ``a`` is in [0, bound): one ``max`` over its
    unsigned view, or nothing when the dtype cannot hold other values."""
    if a.dtype.kind != "i" and 1 << (8 * a.itemsize) <= bound:
        return True
    top = 1 << (8 * a.itemsize - 1) if a.dtype.kind == "i" else bound  # unsigned views of negatives are >= top
    return a.size == 0 or int(_unsigned(a).max()) < min(bound, top)


def _low_bytes(a: np.ndarray) -> np.ndarray:
    """The values of a 1-D integer array known to be in [0, 256) as uint8, without a pass:
    the low byte of each little-endian element (a strided view), or ``a`` itself for 1-byte
    dtypes. Reading it costs the same memory traffic as a cast, and no conversion work."""
    if a.itemsize == 1:
        return a
    if not a.dtype.isnative or sys.byteorder != "little" or not a.flags.c_contiguous:
        return a.astype(np.uint8)
    return a.view(np.uint8)[::a.itemsize]


def _joint_histogram(pred: np.ndarray, target: np.ndarray, num_classes: int) -> torch.Tensor | None:
    """int64 (256, C) counts of (target value, prediction) over all pixels, or None when
    some value does not fit the key (prediction outside [0, C), target outside [0, 256),
    non-integer dtypes): the caller then takes the general path.

    The maps are walked in blocks of a few hundred KiB: each block is range-checked, turned
    into keys and counted while it is in the CPU cache, so that wide inputs (int64) are
    read from memory once."""
    C = num_classes
    if pred.dtype.kind not in "biu" or target.dtype.kind not in "biu" or _TARGET_VALUES * C >= 1 << 31:
        return None
    p, t = pred.reshape(-1), target.reshape(-1)
    if not p.flags.c_contiguous:
        p = np.ascontiguousarray(p)
    if not t.flags.c_contiguous:
        t = np.ascontiguousarray(t)
    kd = np.int16 if _TARGET_VALUES * C <= 1 << 15 else np.int32
    bins = _TARGET_VALUES * C
    n = t.size
    key = np.empty(min(n, _BLOCK), kd)  # the only array written: 2 bytes per pixel of one block
    key_t = torch.from_numpy(key)
    hist = torch.zeros(bins, dtype=torch.int64)
    for lo in range(0, n, _BLOCK):
        pb, tb = p[lo:lo + _BLOCK], t[lo:lo + _BLOCK]
        if not _below(pb, C) or not _below(tb, _TARGET_VALUES):
            return None
        k = key[:tb.size]
        k[...] = _low_bytes(tb)
        k *= kd(C)
        k += _low_bytes(pb) if C <= 256 else pb.astype(kd)  # values checked: the narrowing is exact
        for c in range(0, k.size, _SERIAL_CHUNK):
            hist += torch.bincount(key_t[c:min(c + _SERIAL_CHUNK, k.size)], minlength=bins)
    return hist.view(_TARGET_VALUES, C)


class ConfusionMatrix:
    """Accumulates an int64 (C, C) confusion matrix on the CPU; rows = ground truth.

    Args:
        num_classes: C, the number of classes (background included where there is one).
        ignore_index: target value whose pixels are skipped (``None``: no ignore value).

    ``update`` is one pass over the pixels: on CPU a bincount of an int16 key per pixel (see
    the module docstring), on GPU a bincount on the inputs' device (only the (C, C) result is
    copied back). To combine workers, sum the matrices: ``merge``/``+=`` locally, or
    all-reduce ``state_dict()["matrix"]`` and load it.
    """

    def __init__(self, num_classes: int, ignore_index: int | None = 255) -> None:
        if int(num_classes) < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = None if ignore_index is None else int(ignore_index)
        self._matrix = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)

    # ------------------------------------------------------------------ accumulation
    @property
    def matrix(self) -> torch.Tensor:
        """The accumulated (C, C) int64 CPU tensor, n[i, j] = ground truth i predicted as j."""
        return self._matrix

    def reset(self) -> None:
        """Zero the matrix."""
        self._matrix.zero_()

    @torch.no_grad()
    def update(self, pred: ArrayLike, target: ArrayLike) -> None:
        """Add one batch.

        ``pred`` and ``target`` are tensors or arrays of the same (any) shape holding class
        ids; or ``pred`` is floating-point logits/scores (N, C, ...) with ``target`` (N, ...),
        reduced by argmax over dim 1. Pixels where ``target == ignore_index`` are skipped.
        Raises ValueError, naming the offending values, for a target outside [0, C) that is
        not the ignore index, or for a prediction outside [0, C) at a counted pixel.
        """
        p = _to_tensor(pred, "pred")
        t = _to_tensor(target, "target")
        if p.device != t.device:
            p = p.to(t.device)
        C = self.num_classes
        if p.is_floating_point() and p.dim() == t.dim() + 1 and p.dim() >= 2:
            if p.shape[0] != t.shape[0] or p.shape[2:] != t.shape[1:]:
                raise ValueError(
                    f"logits of shape {tuple(p.shape)} do not fit a target of shape {tuple(t.shape)}: "
                    "expected logits (N, C, ...) with target (N, ...)"
                )
            if p.shape[1] != C:
                raise ValueError(f"logits have {p.shape[1]} channels but num_classes = {C}")
            p = p.argmax(dim=1)
        if p.shape != t.shape:
            raise ValueError(f"pred shape {tuple(p.shape)} differs from target shape {tuple(t.shape)}")
        if p.device.type == "cpu" and t.device.type == "cpu" and p.layout == t.layout == torch.strided:
            hist = _joint_histogram(p.numpy(), t.numpy(), C)
            if hist is not None:
                self._add_histogram(hist)
                return
        p = _as_class_ids(p, "pred").reshape(-1)
        t = _as_class_ids(t, "target").reshape(-1)
        if t.numel() == 0:
            return

        valid = torch.ones_like(t, dtype=torch.bool) if self.ignore_index is None else t != self.ignore_index
        bad_t = valid & ((t < 0) | (t >= C))
        bad_p = valid & ((p < 0) | (p >= C))
        if bool((bad_t | bad_p).any()):  # the one host sync of an update
            ign = "" if self.ignore_index is None else f" and not the ignore index {self.ignore_index}"
            if bool(bad_t.any()):
                raise ValueError(f"target has values outside [0, {C}){ign}: {_bad_values(t, bad_t)}")
            raise ValueError(f"pred has values outside [0, {C}) at counted pixels: {_bad_values(p, bad_p)}")

        # Ignored pixels go to an extra overflow bin C*C that is dropped afterwards.
        key = torch.where(valid, t * C + p, torch.full_like(t, C * C))
        counts = torch.bincount(key, minlength=C * C + 1)[: C * C]
        self._matrix += counts.reshape(C, C).to(device="cpu", dtype=torch.int64)

    def _add_histogram(self, hist: torch.Tensor) -> None:
        """Add the first C rows of a (256, C) joint histogram; ValueError naming the target
        values that are neither a class nor the ignore index (their rows are not empty)."""
        C, ign = self.num_classes, self.ignore_index
        used = torch.nonzero(hist.sum(dim=1)).flatten().tolist()
        bad = [v for v in used if v >= C and v != ign]
        if bad:
            extra = "" if ign is None else f" and not the ignore index {ign}"
            raise ValueError(f"target has values outside [0, {C}){extra}: {_fmt_values(bad)}")
        rows = hist[:C]
        if ign is not None and 0 <= ign < C:
            rows[ign] = 0
        self._matrix += rows

    def merge(self, other: "ConfusionMatrix") -> "ConfusionMatrix":
        """Add another matrix of the same classes in place (e.g. from another worker); returns self."""
        if not isinstance(other, ConfusionMatrix):
            raise TypeError(f"can only merge a ConfusionMatrix, got {type(other).__name__}")
        if other.num_classes != self.num_classes or other.ignore_index != self.ignore_index:
            raise ValueError(
                f"cannot merge ConfusionMatrix(num_classes={other.num_classes}, ignore_index={other.ignore_index}) "
                f"into ConfusionMatrix(num_classes={self.num_classes}, ignore_index={self.ignore_index})"
            )
        self._matrix += other._matrix
        return self

    def __iadd__(self, other: "ConfusionMatrix") -> "ConfusionMatrix":
        return self.merge(other)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """``{"num_classes", "ignore_index", "matrix"}``; summing ``matrix`` over workers is a full merge."""
        return {"num_classes": self.num_classes, "ignore_index": self.ignore_index, "matrix": self._matrix.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replace the matrix by ``state["matrix"]`` (any device/integer dtype, shape (C, C))."""
        if "num_classes" in state and int(state["num_classes"]) != self.num_classes:
            raise ValueError(f"state is for {state['num_classes']} classes, this matrix has {self.num_classes}")
        m = torch.as_tensor(state["matrix"])
        if m.shape != (self.num_classes, self.num_classes):
            raise ValueError(f"matrix of shape {tuple(m.shape)}, expected ({self.num_classes}, {self.num_classes})")
        self._matrix = m.detach().to(device="cpu", dtype=torch.int64).clone()

    # ------------------------------------------------------------------ metrics
    def compute(self) -> dict[str, Any]:
        """All metrics as plain Python numbers (float64 arithmetic), FCN §5 / SPEC §9.

        Keys: ``pixel_accuracy``, ``mean_accuracy``, ``miou``, ``fwiou``, ``mean_dice``
        (scalars); ``iou``, ``dice``, ``accuracy`` (per-class lists, NaN as described in
        the module docstring); ``confusion`` (list of lists, rows = ground truth);
        ``num_pixels`` (counted pixels).
        """
        n = self._matrix.to(torch.float64)
        tp = n.diagonal()
        t = n.sum(dim=1)  # ground-truth pixels per class
        p = n.sum(dim=0)  # predicted pixels per class
        union = t + p - tp
        total = t.sum()
        nan = torch.tensor(math.nan, dtype=torch.float64)

        iou = torch.where(union > 0, tp / union, nan)
        dice = torch.where(t + p > 0, 2 * tp / (t + p), nan)
        acc = torch.where(t > 0, tp / t, nan)

        def mean(x: torch.Tensor, keep: torch.Tensor) -> float:
            return float(x[keep].mean()) if bool(keep.any()) else math.nan

        if total > 0:
            pixel_accuracy = float(tp.sum() / total)
            fwiou = float((t * torch.nan_to_num(iou, nan=0.0)).sum() / total)
        else:
            pixel_accuracy = fwiou = math.nan
        return {
            "pixel_accuracy": pixel_accuracy,
            "mean_accuracy": mean(acc, t > 0),
            "miou": mean(iou, union > 0),
            "fwiou": fwiou,
            "mean_dice": mean(dice, union > 0),
            "iou": iou.tolist(),
            "dice": dice.tolist(),
            "accuracy": acc.tolist(),
            "confusion": self._matrix.tolist(),
            "num_pixels": int(self._matrix.sum()),
        }

    def __repr__(self) -> str:
        return (
            f"ConfusionMatrix(num_classes={self.num_classes}, ignore_index={self.ignore_index}, "
            f"num_pixels={int(self._matrix.sum())})"
        )
