"""Post-processing as plain functions: tiled inference, test-time augmentation, instances
from a semantic prediction.

Inference on images of any size
-------------------------------
:func:`predict_probs` is the one entry point the engine uses. It returns class
probabilities (N, C, H, W) at the input size (softmax; sigmoid for a 1-logit model) and
chooses how to run the model:

- ``unet_original`` (the unpadded U-Net, anything with ``output_margin``) can only take
  "valid" tile sizes and returns the valid centre, so it ALWAYS goes through
  :func:`overlap_tile` (U-Net §2, Fig. 2): the image is mirror-padded by half the size loss,
  cut into valid input tiles whose valid outputs tile the image, and stitched. Tile offsets
  are multiples of 2^depth, so every tile sees the pooling grid of one big forward pass:
  the stitched map is the same as running the whole mirror-padded image at once (no seams,
  tested), whatever the image size (1500 x 1500 included).
- other models: one forward pass on the whole image, or with ``tile`` a sliding window
  (:func:`sliding_window`): tiles of ``tile`` pixels overlapping by ``overlap``, the image
  mirror-padded by ``overlap // 2`` for context at its borders, the tile probabilities
  blended with weights that ramp linearly to the tile edges across the overlap (tiles agree
  where they overlap; a pixel's value is the weighted mean of the tiles covering it).
- test-time augmentation: ``flip=True`` averages with the horizontally flipped prediction,
  ``scales=(0.75, 1, 1.25)`` averages predictions on bilinearly resized images, each
  resized back to the input size (probabilities averaged).

Instances
---------
:func:`connected_components` turns a semantic prediction into instances (connected
components of each foreground class), the simplest way to count touching nuclei that the
U-Net weight map teaches the network to separate; :mod:`pixelwise.metrics.instance_f1`
scores them.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from pixelwise.data.transforms import mirror_pad

__all__ = [
    "predict_probs",
    "sliding_window",
    "overlap_tile",
    "overlap_tile_plan",
    "is_unpadded",
    "probabilities",
    "labels_from_probs",
    "connected_components",
    "mirror_pad",
    "instance_id_map",
    "logits_of",
    "predict_labels",
]


def _logits(output: Any) -> torch.Tensor:
    return output["out"] if isinstance(output, dict) else output


def probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over classes; sigmoid for a single-logit (binary) model."""
    logits = logits.float()
    return torch.sigmoid(logits) if logits.shape[1] == 1 else torch.softmax(logits, dim=1)


def labels_from_probs(probs: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) probabilities -> (N, H, W) int64 labels (argmax; > 0.5 for C = 1)."""
    if probs.shape[1] == 1:
        return (probs[:, 0] > 0.5).long()
    return probs.argmax(1)


def is_unpadded(model: nn.Module) -> bool:
    """True for models whose output is the valid centre of the input (``unet_original``)."""
    return hasattr(model, "output_margin") and hasattr(model, "crop_target") and hasattr(model, "depth")


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(v, int):
        return int(v), int(v)
    a, b = v
    return int(a), int(b)


# ---------------------------------------------------------------------------------------
# sliding window for models that keep the input size
# ---------------------------------------------------------------------------------------


def _starts(n: int, t: int, stride: int) -> list[int]:
    if n <= t:
        return [0]
    starts = list(range(0, n - t, stride))
    starts.append(n - t)
    return starts


def _ramp(t: int, overlap: int) -> torch.Tensor:
    """1-D blending weights of a tile: rising linearly over ``overlap`` pixels at each end,
    1 in the middle, never 0."""
    i = torch.arange(t, dtype=torch.float32)
    if overlap <= 0:
        return torch.ones(t)
    up = (i + 1) / (overlap + 1)
    down = (t - i) / (overlap + 1)
    return torch.clamp(torch.minimum(up, down), max=1.0)


def sliding_window(model: nn.Module | Callable[[torch.Tensor], Any], images: torch.Tensor,
                   tile: int | Sequence[int], overlap: int | None = None) -> torch.Tensor:
    """Probabilities (N, C, H, W) of a size-preserving model, computed tile by tile.

    The image is mirror-padded by ``overlap // 2`` on every side, cut into ``tile``-sized
    windows with stride ``tile - overlap`` (the last window aligned with the far edge), and
    the windows' probabilities are blended with :func:`_ramp` weights. An image that fits in
    one tile is run whole. Memory holds one tile's activations at a time. Default overlap:
    a quarter of the tile, at most 32 px.
    """
    th, tw = _pair(tile)
    if overlap is None:
        overlap = min(32, min(th, tw) // 4)
    if overlap < 0 or overlap >= min(th, tw):
        raise ValueError(f"overlap must be in [0, tile), got overlap {overlap} for tile {th}x{tw}")
    n, _, h, w = images.shape
    if h <= th and w <= tw:
        return probabilities(_logits(model(images)))
    p = overlap // 2
    x = mirror_pad(images, p, p, p, p)
    hp, wp = x.shape[-2:]
    th, tw = min(th, hp), min(tw, wp)
    ys, xs = _starts(hp, th, th - overlap), _starts(wp, tw, tw - overlap)
    window = (_ramp(th, overlap)[:, None] * _ramp(tw, overlap)[None, :]).to(images.device)
    acc: torch.Tensor | None = None
    wsum = torch.zeros(hp, wp, device=images.device)
    for y in ys:
        for x0 in xs:
            prob = probabilities(_logits(model(x[..., y:y + th, x0:x0 + tw])))
            if prob.shape[-2:] != (th, tw):
                raise ValueError(f"the model returned {tuple(prob.shape[-2:])} for a {th}x{tw} tile: sliding-window "
                                 "inference needs a model whose output has the input size")
            if acc is None:
                acc = torch.zeros(n, prob.shape[1], hp, wp, device=images.device)
            acc[..., y:y + th, x0:x0 + tw] += prob * window
            wsum[y:y + th, x0:x0 + tw] += window
    assert acc is not None
    return (acc / wsum)[..., p:p + h, p:p + w]


# ---------------------------------------------------------------------------------------
# overlap-tile for the unpadded U-Net
# ---------------------------------------------------------------------------------------


def overlap_tile_plan(model: nn.Module, size: Sequence[int], tile: int | None = None) -> dict[str, int]:
    """The tiling :func:`overlap_tile` uses for an image of ``size = (H, W)``.

    Returns ``input`` (valid input tile side), ``output`` (its valid output side),
    ``stride`` (the output side rounded down to a multiple of 2^depth: tiles start on the
    pooling grid, so neighbours overlap by ``output - stride`` < 2^depth pixels),
    ``margin`` (mirror padding = half the size loss) and ``tiles_y``/``tiles_x``.

    ``tile``: the wanted input side; the largest valid size <= ``tile`` is used. Default:
    the smallest valid tile that covers the image in one piece, but at most the paper's 572.
    """
    q = 2 ** int(model.depth)
    loss = int(model.output_margin)
    h, w = int(size[0]), int(size[1])

    def stride_of(n: int) -> int:
        return ((n - loss) // q) * q

    smallest = next(n for n in range(loss + q, loss + 64 * q) if model.is_valid_input_size(n) and stride_of(n) >= q)
    if tile is not None:
        below = [n for n in range(int(tile), smallest - 1, -1) if model.is_valid_input_size(n)]
        if not below:
            from pixelwise.models.unet import InvalidTileSizeError

            raise InvalidTileSizeError(
                f"tile {tile} is too small for unet_original (depth {model.depth}): the smallest usable input "
                f"tile is {smallest} (output {smallest - loss})")
        n = below[0]
    else:
        cap = max(smallest, model.table_input_size(572))
        need = max(h, w)
        n = next((m for m in range(smallest, cap + 1) if model.is_valid_input_size(m) and stride_of(m) >= need), cap)
        while not model.is_valid_input_size(n):  # pragma: no cover - cap is valid
            n -= 1
    s = stride_of(n)
    return {"input": n, "output": n - loss, "stride": s, "margin": loss // 2,
            "tiles_y": math.ceil(h / s), "tiles_x": math.ceil(w / s)}


def overlap_tile(model: nn.Module, images: torch.Tensor, tile: int | None = None) -> torch.Tensor:
    """Probabilities (N, C, H, W) of the unpadded U-Net on images of any size (U-Net Fig. 2).

    The image is mirror-padded by ``margin`` (half the network's size loss) plus, at the
    bottom/right, whatever the last tile needs; tile (i, j) is the valid input window at
    (i * stride, j * stride) of the padded image and its valid output lands at the same
    place in the result. See :func:`overlap_tile_plan` for the sizes.
    """
    n, _, h, w = images.shape
    plan = overlap_tile_plan(model, (h, w), tile)
    t, o, s, m = plan["input"], plan["output"], plan["stride"], plan["margin"]
    ky, kx = plan["tiles_y"], plan["tiles_x"]
    bottom = (ky - 1) * s + o - h + m
    right = (kx - 1) * s + o - w + m
    x = mirror_pad(images, m, bottom, m, right)
    out: torch.Tensor | None = None
    for i in range(ky):
        for j in range(kx):
            logits = _logits(model(x[..., i * s:i * s + t, j * s:j * s + t]))
            if out is None:
                out = torch.empty(n, logits.shape[1], ky * s, kx * s, device=images.device)
            out[..., i * s:(i + 1) * s, j * s:(j + 1) * s] = probabilities(logits[..., :s, :s])
    assert out is not None
    return out[..., :h, :w]


# ---------------------------------------------------------------------------------------
# the entry point
# ---------------------------------------------------------------------------------------


def _single_scale(model: nn.Module, images: torch.Tensor, tile: int | Sequence[int] | None,
                  overlap: int | None) -> torch.Tensor:
    if is_unpadded(model):
        return overlap_tile(model, images, None if tile is None else _pair(tile)[0])
    if tile is not None:
        return sliding_window(model, images, tile, overlap)
    return probabilities(_logits(model(images)))


@torch.inference_mode()
def predict_probs(model: nn.Module, images: torch.Tensor, *, tile: int | Sequence[int] | None = None,
                  overlap: int | None = None, flip: bool = False,
                  scales: Sequence[float] | None = None) -> torch.Tensor:
    """Class probabilities (N, C, H, W) for normalised images (N, C_in, H, W) of any size.

    Args:
        model: a semantic model in eval mode (the caller sets ``model.eval()``).
        tile: sliding-window tile side (or (h, w)); for ``unet_original`` the wanted input
            tile side (default: chosen automatically; it is always tiled).
        overlap: sliding-window overlap in pixels (default: a quarter of the tile, at most
            32; ignored by ``unet_original``, whose overlap-tile needs none).
        flip: also predict the horizontally flipped image and average.
        scales: test-time scales, e.g. (0.75, 1.0, 1.25); default (1.0,).
    """
    h, w = images.shape[-2:]
    scales = tuple(scales) if scales else (1.0,)
    if any(s <= 0 for s in scales):
        raise ValueError(f"scales must be > 0, got {scales}")
    total: torch.Tensor | None = None
    count = 0
    for s in scales:
        x = images
        if s != 1.0:
            size = (max(1, round(h * s)), max(1, round(w * s)))
            x = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        views = [x, x.flip(-1)] if flip else [x]
        for k, v in enumerate(views):
            p = _single_scale(model, v, tile, overlap)
            if k == 1:
                p = p.flip(-1)
            if p.shape[-2:] != (h, w):
                p = F.interpolate(p, size=(h, w), mode="bilinear", align_corners=False)
            total = p if total is None else total + p
            count += 1
    assert total is not None
    return total / count


# ---------------------------------------------------------------------------------------
# instances from a semantic prediction
# ---------------------------------------------------------------------------------------


def connected_components(labels: np.ndarray | torch.Tensor, classes: Sequence[int] | None = None, *,
                         background: int = 0, ignore_index: int = 255, connectivity: int = 4,
                         min_size: int = 0) -> tuple[np.ndarray, list[int]]:
    """Instances of a semantic label map (H, W): the connected components of each class.

    Args:
        classes: the classes to split into instances (default: every value except
            ``background`` and ``ignore_index``).
        connectivity: 4 (edge neighbours, the default: a diagonal contact does not merge
            two objects) or 8.
        min_size: components with fewer pixels are dropped (left as 0).

    Returns:
        ``(instance_map, instance_classes)``: int32 (H, W) ids 1..K (0 = none) numbered class
        by class in raster order, and the class of each id (``instance_classes[k - 1]``).
    """
    from scipy import ndimage

    lab = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if lab.ndim != 2:
        raise ValueError(f"labels must be a (H, W) map, got shape {lab.shape}")
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")
    structure = ndimage.generate_binary_structure(2, 1 if connectivity == 4 else 2)
    if classes is None:
        classes = [int(c) for c in np.unique(lab) if c not in (background, ignore_index)]
    out = np.zeros(lab.shape, np.int32)
    owner: list[int] = []
    for c in classes:
        comp, k = ndimage.label(lab == c, structure=structure)
        if k == 0:
            continue
        if min_size > 0:
            sizes = np.bincount(comp.ravel(), minlength=k + 1)
            keep = sizes >= min_size
            keep[0] = False
            remap = np.zeros(k + 1, np.int64)
            remap[keep] = np.arange(1, int(keep.sum()) + 1)
            comp, k = remap[comp], int(keep.sum())
        mask = comp > 0
        out[mask] = comp[mask] + len(owner)
        owner.extend([int(c)] * k)
    return out, owner


def instance_id_map(masks: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """(H, W) uint8 map of (K, H, W) bool masks sorted by score: pixel = 1 + index of the
    best-scoring mask covering it (ids above 254 share 254), 0 = none - as
    instance predictions are written."""
    ids = np.zeros(tuple(shape[:2]), np.uint8)
    for k in range(len(masks) - 1, -1, -1):  # lowest score first, so the best ends on top
        ids[masks[k]] = min(k + 1, 254)
    return ids


def logits_of(output: Any) -> torch.Tensor:
    """Models may return a tensor or a dict with 'out' (training-time aux heads)."""
    return output["out"] if isinstance(output, dict) else output


@torch.inference_mode()
def predict_labels(model: nn.Module, images: torch.Tensor, tile: int | None = None, overlap: int | None = None,
                   flip: bool = False, scales: tuple[float, ...] | None = None) -> torch.Tensor:
    """(N, H, W) class ids for a batch of normalised images (model in eval mode). The plain
    case (no tiling, no TTA, a size-preserving model) is one forward pass and an argmax."""
    if tile is None and not flip and not (scales and tuple(scales) != (1.0,)) and not is_unpadded(model):
        logits = logits_of(model(images))
        return (logits[:, 0] > 0).long() if logits.shape[1] == 1 else logits.argmax(1)
    return labels_from_probs(predict_probs(model, images, tile=tile, overlap=overlap, flip=flip, scales=scales))
