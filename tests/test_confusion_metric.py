"""ConfusionMatrix's CPU fast path (an int16 key per pixel, one bincount into the joint
(target value, prediction) histogram) against a naive per-pixel count and against the
general path, for every integer dtype, the ignore index and out-of-range values."""
from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import torch

from pixelwise.metrics import semantic
from pixelwise.metrics.semantic import ConfusionMatrix


def naive_counts(pred, target, C: int, ignore: int | None) -> list[list[int]]:
    """Per-pixel Python loop: the definition of the matrix (rows = ground truth)."""
    n = [[0] * C for _ in range(C)]
    for p, t in zip(np.asarray(pred).ravel().tolist(), np.asarray(target).ravel().tolist()):
        if ignore is not None and t == ignore:
            continue
        if not 0 <= t < C:
            raise AssertionError(f"bad target {t}")
        if not 0 <= p < C:
            raise AssertionError(f"bad pred {p}")
        n[int(t)][int(p)] += 1
    return n


def update(pred, target, C: int, ignore: int | None = 255, general: bool = False) -> ConfusionMatrix:
    cm = ConfusionMatrix(C, ignore_index=ignore)
    if general:
        saved = semantic._joint_histogram
        semantic._joint_histogram = lambda *a: None
        try:
            cm.update(pred, target)
        finally:
            semantic._joint_histogram = saved
    else:
        cm.update(pred, target)
    return cm


def error_of(fn) -> str:
    with pytest.raises(ValueError) as e:
        fn()
    return str(e.value)


DTYPES = [np.uint8, np.int8, np.int16, np.uint16, np.int32, np.int64, np.uint64]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("C", [1, 3, 21, 130])  # 130 classes: int32 keys
def test_fast_path_equals_naive_count(dtype, C):
    if np.iinfo(dtype).max < C - 1:
        pytest.skip(f"{np.dtype(dtype)} cannot hold {C} classes")
    rng = np.random.default_rng(C)
    target = rng.integers(0, C, size=(3, 17, 19))
    pred = np.where(rng.random(target.shape) < 0.6, target, rng.integers(0, C, size=target.shape))
    if np.iinfo(dtype).max >= 255:
        target[rng.random(target.shape) < 0.15] = 255
    target, pred = target.astype(dtype), pred.astype(dtype)
    want = naive_counts(pred, target, C, 255)
    for p, t in ((pred, target), (torch.from_numpy(pred.astype(np.int64)), torch.from_numpy(target.astype(np.int64)))):
        assert update(p, t, C).matrix.tolist() == want
        assert update(p, t, C, general=True).matrix.tolist() == want


def test_fast_path_is_taken_and_counts_like_the_general_path():
    rng = np.random.default_rng(0)
    C = 21
    target = rng.integers(0, C, size=(4, 64, 64)).astype(np.uint8)
    pred = rng.integers(0, C, size=target.shape).astype(np.uint8)
    target[:, :3] = 255
    calls = []
    real = semantic._joint_histogram
    semantic_hist = lambda *a: calls.append(1) or real(*a)  # noqa: E731
    mp = pytest.MonkeyPatch()
    mp.setattr(semantic, "_joint_histogram", semantic_hist)
    try:
        fast = update(pred, target, C).matrix
    finally:
        mp.undo()
    assert calls == [1]
    assert torch.equal(fast, update(pred, target, C, general=True).matrix)
    assert fast.tolist() == naive_counts(pred, target, C, 255)


@pytest.mark.parametrize("ignore", [None, 0, 2, 255, 300, -1])
def test_ignore_index_anywhere(ignore):
    """An ignore index inside the classes (its row stays 0), above them, outside uint8
    (never hit by uint8 maps), negative (general path) or none at all."""
    rng = np.random.default_rng(5)
    C = 4
    target = rng.integers(0, C, size=(9, 11))
    pred = rng.integers(0, C, size=target.shape)
    if ignore is not None:
        target[rng.random(target.shape) < 0.2] = ignore
    want = naive_counts(pred, target, C, ignore)
    for dtype in (np.int64, np.int32, np.int16):
        t, p = target.astype(dtype), pred.astype(dtype)
        assert update(p, t, C, ignore).matrix.tolist() == want
        assert update(p, t, C, ignore, general=True).matrix.tolist() == want
    if ignore is not None and 0 <= ignore <= 255:
        assert update(pred.astype(np.uint8), target.astype(np.uint8), C, ignore).matrix.tolist() == want
    if ignore == 0:
        assert sum(want[0]) == 0


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.int64])
def test_out_of_range_values_give_the_same_error_on_both_paths(dtype):
    C = 5
    target = np.array([[0, 1, 7, 255], [9, 2, 3, 4]], dtype)
    pred = np.array([[0, 1, 2, 3], [4, 2, 3, 4]], dtype)
    fast = error_of(lambda: update(pred, target, C))
    assert fast == error_of(lambda: update(pred, target, C, general=True))
    assert fast == "target has values outside [0, 5) and not the ignore index 255: 7, 9"
    # predictions outside [0, C): an error at counted pixels, nothing at ignored ones
    p2 = np.array([[0, 1, 2, 3], [4, 2, 6, 4]], dtype)
    t2 = np.array([[0, 1, 2, 255], [1, 2, 3, 4]], dtype)
    msg = error_of(lambda: update(p2, t2, C))
    assert msg == error_of(lambda: update(p2, t2, C, general=True))
    assert msg.startswith("pred has values outside [0, 5) at counted pixels: 6")
    p3 = np.array([[0, 1, 2, 200], [4, 2, 3, 4]], dtype)  # 200 where the target is ignored
    assert update(p3, t2, C).matrix.tolist() == naive_counts(np.where(t2 == 255, 0, p3), t2, C, 255)
    if np.dtype(dtype).kind == "i":
        neg = np.array([[0, -3]], dtype)
        assert error_of(lambda: update(np.zeros_like(neg), neg, C)).endswith(": -3")
        assert "pred" in error_of(lambda: update(neg, np.zeros_like(neg), C))
    # int8 -1 is the byte 255 (the ignore index): still a bad target, not ignored
    i8 = np.array([[0, -1, 1]], np.int8)
    assert error_of(lambda: update(np.zeros_like(i8), i8, C)).endswith(": -1")
    # no ignore index: 255 is a bad target, listed like any other
    assert error_of(lambda: update(pred, target, C, None)) == "target has values outside [0, 5): 7, 9, 255"


def test_many_bad_values_are_summarised():
    C = 2
    target = np.arange(2, 40, dtype=np.uint8)
    msg = error_of(lambda: update(np.zeros_like(target), target, C, None))
    assert msg == error_of(lambda: update(np.zeros_like(target), target, C, None, general=True))
    assert msg.endswith("2, 3, 4, 5, 6, 7, 8, 9, 10, 11, ... (38 distinct)")


def test_bool_read_only_strided_and_logits_inputs():
    rng = np.random.default_rng(2)
    target = rng.integers(0, 2, size=(2, 30, 40)).astype(bool)
    pred = rng.integers(0, 2, size=target.shape).astype(bool)
    want = naive_counts(pred.astype(int), target.astype(int), 2, None)
    assert update(pred, target, 2, None).matrix.tolist() == want
    ro = target.astype(np.uint8)
    ro.flags.writeable = False  # e.g. straight from PIL
    assert update(pred.astype(np.uint8), ro, 2, None).matrix.tolist() == want
    t = torch.from_numpy(target.astype(np.int64)).transpose(1, 2)  # not contiguous
    p = torch.from_numpy(pred.astype(np.int64)).transpose(1, 2)
    assert update(p, t, 2, None).matrix.tolist() == want
    flat_t, flat_p = target.astype(np.int64).ravel()[::2], pred.astype(np.int64).ravel()[::2]  # 1-D, strided
    assert not flat_t.flags.c_contiguous
    assert update(flat_p, flat_t, 2, None).matrix.tolist() == naive_counts(flat_p, flat_t, 2, None)
    logits = torch.nn.functional.one_hot(p, 2).permute(0, 3, 1, 2).float()
    assert update(logits, t, 2, None).matrix.tolist() == want


def test_no_int64_copy_of_the_inputs():
    """uint8 maps: the only full-size array made is the int16 key (2 bytes per pixel); an
    int64 copy of either input (8 bytes per pixel, what np.bincount's cast or a
    ``.long()`` would make) breaks the budget. int64 maps: two int16 arrays at most."""
    rng = np.random.default_rng(3)
    C = 21
    target = rng.integers(0, C, size=(512, 512)).astype(np.uint8)
    pred = rng.integers(0, C, size=target.shape).astype(np.uint8)
    n = target.size
    for t, p, budget in ((target, pred, 3 * n), (target.astype(np.int64), pred.astype(np.int64), 5 * n)):
        cm = ConfusionMatrix(C)
        cm.update(p, t)  # warm up
        tracemalloc.start()
        try:
            cm.update(torch.from_numpy(p), torch.from_numpy(t))
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < budget, (t.dtype, peak, budget)
        assert cm.matrix.tolist() == [[2 * v for v in row] for row in naive_counts(p, t, C, 255)]
