"""Class statistics of label maps and SegNet's median-frequency class balancing.

SegNet (Badrinarayanan et al., PAMI 2017, §3.4 / §4, after Eigen & Fergus 2015): the
weight of class c is a_c = median(f) / f_c, where f_c = (pixels of class c) / (total
pixels of the images that contain c), and the median is taken over the classes that occur.
Frequent classes get a weight below 1, rare ones above 1; a class that never occurs gets
weight 0 (it cannot contribute to the loss anyway, and 0 makes that explicit). Ignored
pixels (``ignore_index``) count nowhere, not even in the image totals.
"""
from __future__ import annotations

from typing import Any, Iterable

import numpy as np
import torch

from pixelwise.errors import DataError

__all__ = ["class_pixel_counts", "median_frequency_weights", "dataset_class_stats"]


def _label_array(label: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(label, torch.Tensor):
        label = label.detach().cpu().numpy()
    a = np.asarray(label)
    if a.dtype.kind == "f":
        if not np.all(a == np.round(a)):
            raise ValueError("label map has non-integer values")
    elif a.dtype.kind not in "iub":
        raise ValueError(f"label map has dtype {a.dtype}, expected integers")
    return a.reshape(-1).astype(np.int64, copy=False)


def class_pixel_counts(
    label_maps: Iterable[np.ndarray | torch.Tensor], num_classes: int, ignore_index: int | None = 255
) -> tuple[np.ndarray, np.ndarray]:
    """Per-class pixel counts over many label maps, one ``bincount`` per map.

    Returns int64 arrays ``(pixel_count[C], image_pixel_count[C])``: ``pixel_count[c]`` is the
    number of pixels labelled c; ``image_pixel_count[c]`` is the total number of non-ignored
    pixels of the images that contain at least one pixel of c. Raises ValueError, naming the
    map's position and the values, for labels outside [0, C) that are not ``ignore_index``.
    """
    C = int(num_classes)
    pixel_count = np.zeros(C, dtype=np.int64)
    image_pixel_count = np.zeros(C, dtype=np.int64)
    for i, label in enumerate(label_maps):
        a = _label_array(label)
        if ignore_index is not None:
            a = a[a != ignore_index]
        if a.size == 0:
            continue
        lo, hi = int(a.min()), int(a.max())
        if lo < 0 or hi >= C:
            bad = np.unique(a[(a < 0) | (a >= C)])
            raise ValueError(f"label map {i} has values outside [0, {C}): {bad[:10].tolist()}")
        counts = np.bincount(a, minlength=C)
        pixel_count += counts
        image_pixel_count[counts > 0] += a.size
    return pixel_count, image_pixel_count


def median_frequency_weights(
    pixel_count: np.ndarray | torch.Tensor | Iterable[int], image_pixel_count: np.ndarray | torch.Tensor | Iterable[int]
) -> np.ndarray:
    """SegNet's median-frequency weights a_c = median(f) / f_c, f_c = pixel_count_c / image_pixel_count_c.

    The median runs over the classes with pixel_count_c > 0; absent classes get weight 0.
    Returns a float64 array of shape (C,). Raises ValueError when no class occurs at all.
    """
    pc = np.asarray(pixel_count, dtype=np.float64).reshape(-1)
    ipc = np.asarray(image_pixel_count, dtype=np.float64).reshape(-1)
    if pc.shape != ipc.shape:
        raise ValueError(f"pixel_count has {pc.size} classes but image_pixel_count has {ipc.size}")
    if (pc < 0).any() or (pc > ipc).any():
        raise ValueError("counts must satisfy 0 <= pixel_count <= image_pixel_count")
    present = pc > 0
    if not present.any():
        raise ValueError("no class occurs in the label maps: cannot compute median-frequency weights")
    f = np.zeros_like(pc)
    f[present] = pc[present] / ipc[present]
    weights = np.zeros_like(pc)
    weights[present] = np.median(f[present]) / f[present]
    return weights


def dataset_class_stats(dataset: Any, num_classes: int, ignore_index: int | None = 255) -> dict[str, Any]:
    """Class statistics of a dataset whose items are dicts with a "semantic" (H, W) label map.

    Returns a JSON-ready dict of lists: ``pixel_count``, ``image_pixel_count``,
    ``frequency`` (share of all counted pixels per class, sums to 1),
    ``median_frequency_weights`` (SegNet, see :func:`median_frequency_weights`; usable as
    ``build_loss(class_weights=...)``), plus ``num_images`` and ``num_pixels``.
    Note that every item is loaded, images included.
    """

    num_images = 0

    def labels() -> Iterable[np.ndarray | torch.Tensor]:
        nonlocal num_images
        items = (dataset[i] for i in range(len(dataset))) if hasattr(dataset, "__len__") else iter(dataset)
        for i, item in enumerate(items):
            if not isinstance(item, dict) or item.get("semantic") is None:
                meta = item.get("meta") if isinstance(item, dict) else None
                where = meta.get("file", f"item {i}") if isinstance(meta, dict) else f"item {i}"
                raise DataError(where, "has no 'semantic' label map", "class statistics need semantic labels")
            num_images += 1
            yield item["semantic"]

    pc, ipc = class_pixel_counts(labels(), num_classes, ignore_index)
    total = int(pc.sum())
    freq = pc / total if total > 0 else np.zeros(len(pc))
    weights = median_frequency_weights(pc, ipc) if total > 0 else np.zeros(len(pc))
    return {
        "pixel_count": pc.tolist(),
        "image_pixel_count": ipc.tolist(),
        "frequency": freq.tolist(),
        "median_frequency_weights": weights.tolist(),
        "num_images": num_images,
        "num_pixels": total,
    }
