"""U-Net's boundary weight map (Ronneberger, Fischer, Brox, MICCAI 2015, §3, eq. 2; SPEC §3).

    w(x) = w_c(x) + w0 * exp(-(d1(x) + d2(x))^2 / (2 sigma^2))

- ``w_c`` balances the class frequencies: with ``class_balance="balanced"`` class c gets
  ``N / (K * N_c)`` (N counted pixels, K classes present, N_c pixels of class c), so every
  class carries the same total weight.
- ``d1``, ``d2``: distances to the nearest and to the second-nearest object. Objects are
  the instances of the instance label map, restricted to the pixels that the semantic
  target calls foreground (so the 1 px background lines that separate touching objects in
  a target belong to no object). The border term is added on BACKGROUND pixels only, as
  in the paper's Fig. 3d: it is large in the narrow gaps between touching cells and
  vanishes away from them. Defaults w0 = 10, sigma = 5 px.
- Ignored pixels (``ignore_index`` in the semantic map, or in the instance map when no
  semantic map is given) get weight 0.

Speed: one Euclidean distance transform per object (``scipy.ndimage.distance_transform_edt``)
restricted to the object's bounding box grown by the distance R beyond which the border
term is below ``tolerance`` (``R = sigma * sqrt(2 ln(w0 / tolerance))``, 24 px for the
defaults). Pixels farther than R from an object cannot receive a term above ``tolerance``
through it, so the map is exact up to ``tolerance`` (1e-4) and costs O(objects x window),
e.g. ~20 ms for the 125 nuclei of a 512 x 512 image. No per-pixel Python.

:class:`WeightMapDataset` computes the map of every training image once (in memory, at
construction, so DataLoader workers inherit it) and adds it to each sample as
``weight_map`` (float32 (H, W)) BEFORE the joint transforms, which move it like a label
map (nearest neighbour, fill 0): each weight stays on its pixel. :func:`save_weight_map_image`
writes a picture of a map for people to look at.
"""
from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = [
    "boundary_weight_map",
    "class_balance_weights",
    "border_distances",
    "weight_map_for_sample",
    "WeightMapDataset",
    "save_weight_map_image",
]

DEFAULT_W0 = 10.0
DEFAULT_SIGMA = 5.0


def _scipy_ndimage():
    try:
        from scipy import ndimage
    except ImportError:  # pragma: no cover - scipy is in the 'extra' and 'test' extras
        from pixelwise.errors import PixelwiseError

        raise PixelwiseError("the U-Net weight map needs scipy: pip install scipy (or pip install 'pixelwise[extra]')")
    return ndimage


def class_balance_weights(classes: np.ndarray, valid: np.ndarray | None = None,
                          num_classes: int | None = None) -> np.ndarray:
    """Per-class weights ``N / (K * N_c)`` for the classes present in ``classes[valid]``
    (0 for absent ones), as a float64 array indexed by class id."""
    values = classes[valid] if valid is not None else classes.ravel()
    n = int(values.max()) + 1 if values.size else 1
    counts = np.bincount(values.astype(np.int64).ravel(), minlength=max(n, num_classes or 0))
    present = counts > 0
    out = np.zeros(counts.shape, np.float64)
    if present.any():
        out[present] = counts.sum() / (present.sum() * counts[present])
    return out


def border_distances(objects: np.ndarray, cutoff: float = math.inf) -> tuple[np.ndarray, np.ndarray]:
    """d1, d2 (float32 (H, W)): Euclidean distance of every pixel to the nearest and to the
    second-nearest object of the id map ``objects`` (0 = no object). Inside an object d1 is 0.

    Distances above ``cutoff`` are not computed and read as ``inf`` (a window of ``cutoff``
    pixels around each object's bounding box is searched); ``inf`` (the default) is exact.
    With fewer than two objects in reach, d2 (and d1) is ``inf``.
    """
    ndimage = _scipy_ndimage()
    objects = np.asarray(objects)
    h, w = objects.shape
    d1 = np.full((h, w), np.inf, np.float32)
    d2 = np.full((h, w), np.inf, np.float32)
    ids, inverse = np.unique(objects, return_inverse=True)
    inverse = inverse.reshape(h, w)
    if ids.size and ids[0] == 0:
        labels = inverse  # 0 stays 0, objects become 1..K
    else:
        labels = inverse + 1
    r = h + w if not math.isfinite(cutoff) else int(math.ceil(cutoff))
    for k, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:
            continue
        ys, xs = box
        win = (slice(max(0, ys.start - r), min(h, ys.stop + r)), slice(max(0, xs.start - r), min(w, xs.stop + r)))
        d = ndimage.distance_transform_edt(labels[win] != k).astype(np.float32)
        a, b = d1[win], d2[win]  # views: updated in place
        np.minimum(b, np.maximum(a, d), out=b)
        np.minimum(a, d, out=a)
    return d1, d2


def boundary_weight_map(
    instances: np.ndarray | torch.Tensor,
    semantic: np.ndarray | torch.Tensor | None = None,
    *,
    w0: float = DEFAULT_W0,
    sigma: float = DEFAULT_SIGMA,
    class_balance: str | Sequence[float] | None = "balanced",
    background: int = 0,
    ignore_index: int = 255,
    tolerance: float = 1e-4,
) -> np.ndarray:
    """U-Net's weight map w(x) = w_c(x) + w0 exp(-(d1 + d2)^2 / (2 sigma^2)) (module docstring).

    Args:
        instances: (H, W) instance ids, 0 = no object; ``ignore_index`` = ignored.
        semantic: optional (H, W) class ids of the training target; objects are the instance
            pixels it calls foreground (``!= background``), the border term goes on its
            background pixels and w_c on its classes. Without it, class = (instance > 0).
        w0, sigma: the border term's height and width (pixels).
        class_balance: ``"balanced"`` (N / (K N_c)), ``None`` (w_c = 1) or one weight per class.
        tolerance: largest error allowed in the border term (sets the search window).

    Returns:
        float32 (H, W): the weights, 0 on ignored pixels.
    """
    inst = _as_numpy(instances).astype(np.int64, copy=False)
    if inst.ndim != 2:
        raise ValueError(f"instances must be a (H, W) map, got shape {inst.shape}")
    if semantic is None:
        ignored = inst == ignore_index
        classes = (inst > 0) & ~ignored
        classes = classes.astype(np.int64)
        fg = classes == 1
    else:
        sem = _as_numpy(semantic).astype(np.int64, copy=False)
        if sem.shape != inst.shape:
            raise ValueError(f"semantic map {sem.shape} and instance map {inst.shape} differ in size")
        ignored = sem == ignore_index
        classes = np.where(ignored, 0, sem)
        fg = (sem != background) & ~ignored
    if w0 < 0 or sigma <= 0:
        raise ValueError(f"need w0 >= 0 and sigma > 0, got w0={w0}, sigma={sigma}")
    valid = ~ignored

    if class_balance is None:
        wc = np.ones(inst.shape, np.float64)
    elif isinstance(class_balance, str):
        if class_balance != "balanced":
            raise ValueError(f"class_balance must be 'balanced', None or a list of weights, got {class_balance!r}")
        wc = class_balance_weights(classes, valid)[classes]
    else:
        table = np.asarray(class_balance, np.float64)
        if classes.size and classes.max() >= table.size:
            raise ValueError(f"class_balance has {table.size} weights but the map has class {int(classes.max())}")
        wc = table[classes]

    weights = wc.astype(np.float32)
    objects = np.where(fg & (inst > 0) & (inst != ignore_index), inst, 0)
    if w0 > 0 and objects.any():
        cutoff = sigma * math.sqrt(2.0 * math.log(max(w0 / tolerance, 1.0 + 1e-12)))
        d1, d2 = border_distances(objects, cutoff)
        s = d1 + d2  # inf where fewer than two objects are in reach
        term = np.zeros(inst.shape, np.float32)
        bg = ~fg & valid & np.isfinite(s)
        term[bg] = w0 * np.exp(-(s[bg] ** 2) / (2.0 * sigma * sigma))
        weights += term
    weights[~valid] = 0.0
    return weights


def weight_map_for_sample(sample: dict[str, Any], **kwargs: Any) -> torch.Tensor:
    """The weight map (float32 tensor (H, W)) of a sample dict with ``semantic`` and, if
    present, ``instance_map``; without an instance map the objects are the connected
    components of each foreground class."""
    semantic = _as_numpy(sample["semantic"])
    inst = sample.get("instance_map")
    if inst is None:
        inst = _components_of_classes(semantic, kwargs.get("background", 0), kwargs.get("ignore_index", 255))
    return torch.from_numpy(boundary_weight_map(_as_numpy(inst), semantic, **kwargs))


def _components_of_classes(semantic: np.ndarray, background: int, ignore_index: int) -> np.ndarray:
    ndimage = _scipy_ndimage()
    out = np.zeros(semantic.shape, np.int64)
    offset = 0
    for c in np.unique(semantic):
        if c in (background, ignore_index):
            continue
        lab, n = ndimage.label(semantic == c)
        out[lab > 0] = lab[lab > 0] + offset
        offset += n
    return out


def _as_numpy(a: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().numpy()
    return np.asarray(a)


class WeightMapDataset(Dataset):
    """Adds U-Net's ``weight_map`` to the samples of a dataset, then applies ``transforms``.

    ``base`` yields UNtransformed sample dicts (``semantic`` and ideally ``instance_map``;
    e.g. :class:`~pixelwise.data.formats.voc.VOCSegmentation` with ``transforms=None`` and
    ``with_instances=True``). Every map is computed once, here at construction (the cache
    lives in memory and is shared with DataLoader workers); the transforms then move the
    map with the image like a label map. ``instance_map`` is dropped from the output unless
    ``keep_instances``.
    """

    def __init__(self, base: Dataset, transforms: Callable[[dict], dict] | None = None, *,
                 w0: float = DEFAULT_W0, sigma: float = DEFAULT_SIGMA,
                 class_balance: str | Sequence[float] | None = "balanced", keep_instances: bool = False) -> None:
        self.base = base
        self.transforms = transforms
        self.keep_instances = keep_instances
        self.params = {"w0": float(w0), "sigma": float(sigma), "class_balance": class_balance}
        self.maps: list[torch.Tensor] = [weight_map_for_sample(base[i], **self.params) for i in range(len(base))]

    def __len__(self) -> int:
        return len(self.base)

    def __getattr__(self, name: str) -> Any:  # classes, root, ids, ... of the wrapped dataset
        if name == "base":
            raise AttributeError(name)
        return getattr(self.base, name)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = dict(self.base[index])
        sample["weight_map"] = self.maps[index]
        if not self.keep_instances:
            sample.pop("instance_map", None)
        if self.transforms is not None:
            sample = self.transforms(sample)
        return sample


def _colormap(values: np.ndarray) -> np.ndarray:
    """[0, 1] floats -> uint8 RGB with matplotlib's 'magma' if available, else gray."""
    try:
        from matplotlib import colormaps

        return (colormaps["magma"](values)[..., :3] * 255 + 0.5).astype(np.uint8)
    except Exception:  # pragma: no cover - matplotlib is optional
        g = (values * 255 + 0.5).astype(np.uint8)
        return np.repeat(g[..., None], 3, axis=2)


def save_weight_map_image(path: str | os.PathLike, weight_map: np.ndarray | torch.Tensor,
                          image: np.ndarray | torch.Tensor | None = None, vmax: float | None = None) -> Path:
    """Write a weight map as a colour PNG (magma: dark = low, bright = high weight), scaled
    to [0, ``vmax``] (default: its maximum); with ``image`` (uint8 (H, W[, C]) or a float
    (C, H, W) tensor in [0, 1]), the image and the map side by side. Returns the path."""
    from pixelwise.data.io import write_image
    from pixelwise.viz import comparison_grid

    w = _as_numpy(weight_map).astype(np.float32)
    top = float(vmax if vmax is not None else (w.max() if w.size else 1.0)) or 1.0
    panel = _colormap(np.clip(w / top, 0.0, 1.0))
    if image is not None:
        im = _as_numpy(image)
        if im.ndim == 3 and im.shape[0] in (1, 3) and im.shape[-1] not in (1, 3):  # (C, H, W)
            im = im.transpose(1, 2, 0)
        if im.dtype != np.uint8:
            lo, hi = float(im.min()), float(im.max())
            im = ((im - lo) / (hi - lo or 1.0) * 255 + 0.5).astype(np.uint8)
        if im.ndim == 2:
            im = im[..., None]
        if im.shape[2] == 1:
            im = np.repeat(im, 3, axis=2)
        panel = comparison_grid([[im[..., :3], panel]])
    return write_image(Path(path), panel)
