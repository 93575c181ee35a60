"""Joint transforms on sample dicts: the image and its label maps move together.

A sample is a dict with ``image`` (float tensor (C, H, W)) and any of the label keys
``semantic`` / ``instance_map`` / ``panoptic`` (integer tensors (H, W)) and ``instances``
({"boxes" (K, 4) xyxy, "labels" (K,), "masks" (K, H, W) bool, ...}), and optionally U-Net's
per-pixel loss weights ``weight_map`` (float32 (H, W), :mod:`pixelwise.data.weightmap`);
other keys (``meta``, ``segments``) are passed on unchanged. Every transform returns a new dict.

Geometric transforms move the image with bilinear interpolation and the labels with NEAREST
neighbour sampling only, so a label map never gains a value it did not have (apart from the
fill value of padded areas: 255 = ignore for ``semantic`` and ``instance_map``, 0 = void for
``panoptic``, False for instance masks). ``weight_map`` moves exactly like a label map
(nearest neighbour, fill 0), so every weight stays on the pixel whose label it weighs.
Instance boxes are recomputed from the transformed masks (x2, y2 exclusive, like a COCO box
[x, y, w, h] -> [x, y, x + w, y + h]) and instances left without pixels are dropped.

Randomness comes from torch's global generator (``torch.rand`` & co.), so
``torch.manual_seed`` makes a pipeline reproducible and DataLoader workers, which torch
seeds differently, draw different augmentations.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "normalize_image",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "LABEL_FILL",
    "MirrorPad",
    "ColorJitter",
    "Compose",
    "ElasticDeform",
    "Normalize",
    "RandomCrop",
    "RandomHorizontalFlip",
    "RandomScale",
    "Resize",
    "Transform",
    "build_transforms",
    "mirror_pad",
    "reflect_index",
]

Sample = dict[str, Any]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

LABEL_FILL: dict[str, int] = {"semantic": 255, "instance_map": 255, "panoptic": 0, "weight_map": 0}
"""The dense per-pixel keys that geometric transforms move by nearest neighbour, with the
value of padded pixels (``weight_map``: U-Net's loss weights, 0 = no weight)."""


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def _image_size(sample: Sample) -> tuple[int, int]:
    image = sample["image"]
    if not isinstance(image, torch.Tensor) or image.dim() != 3:
        raise TypeError(f"sample['image'] must be a (C, H, W) tensor, got {type(image).__name__} "
                        f"{tuple(getattr(image, 'shape', ()))}")
    return int(image.shape[-2]), int(image.shape[-1])


def _uniform(low: float, high: float) -> float:
    """A float drawn uniformly from [low, high) with torch's global generator."""
    return low + (high - low) * float(torch.rand(()))


def _boxes_from_masks(masks: torch.Tensor) -> torch.Tensor:
    """(K, H, W) bool -> (K, 4) float xyxy boxes with exclusive x2, y2 (masks must be non-empty)."""
    if masks.shape[0] == 0:
        return torch.zeros((0, 4), dtype=torch.float32)
    rows, cols = masks.any(dim=2), masks.any(dim=1)  # (K, H), (K, W)
    h, w = masks.shape[-2:]
    y = torch.arange(h, device=masks.device)
    x = torch.arange(w, device=masks.device)
    y1 = torch.where(rows, y, h).amin(1)
    y2 = torch.where(rows, y, -1).amax(1) + 1
    x1 = torch.where(cols, x, w).amin(1)
    x2 = torch.where(cols, x, -1).amax(1) + 1
    return torch.stack([x1, y1, x2, y2], dim=1).float()


def _map_geometry(sample: Sample, image_fn: Callable[[torch.Tensor], torch.Tensor],
                  label_fn: Callable[[torch.Tensor, int | bool], torch.Tensor],
                  fills: Mapping[str, int] | None = None) -> Sample:
    """Apply ``image_fn`` to the image and ``label_fn(tensor, fill)`` to every label; the fill
    values are :data:`LABEL_FILL` updated by ``fills`` (False for instance masks)."""
    out = dict(sample)
    out["image"] = image_fn(sample["image"])
    for key, fill in {**LABEL_FILL, **(fills or {})}.items():
        if sample.get(key) is not None:
            out[key] = label_fn(sample[key], fill)
    instances = sample.get("instances")
    if instances is not None and "masks" in instances:
        masks = label_fn(instances["masks"].bool(), False)
        keep = masks.flatten(1).any(dim=1)
        k = int(instances["masks"].shape[0])
        new = {key: (value[keep] if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == k
                     else value) for key, value in instances.items()}
        new["masks"] = masks[keep]
        new["boxes"] = _boxes_from_masks(new["masks"]).to(
            instances["boxes"].dtype if isinstance(instances.get("boxes"), torch.Tensor) else torch.float32)
        if "area" in new:
            new["area"] = new["masks"].flatten(1).sum(dim=1).to(new["area"].dtype)
        out["instances"] = new
    return out


# ---------------------------------------------------------------------------------------
# label-safe resampling primitives: nearest neighbour, crop and pad by indexing only
# ---------------------------------------------------------------------------------------


def _nearest_index(n_in: int, n_out: int, device: torch.device) -> torch.Tensor:
    """Source index of each output pixel for a nearest resize (pixel centres aligned, like
    ``mode="nearest-exact"`` and PIL's NEAREST)."""
    centres = (torch.arange(n_out, dtype=torch.float64, device=device) + 0.5) * (n_in / n_out)
    return centres.floor().long().clamp_(0, n_in - 1)


def _resize_nearest(t: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    h, w = t.shape[-2:]
    iy = _nearest_index(h, size[0], t.device)
    ix = _nearest_index(w, size[1], t.device)
    return t[..., iy[:, None], ix[None, :]]


def _resize_image(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(image.shape[-2:]) == size:
        return image
    downscale = size[0] < image.shape[-2] or size[1] < image.shape[-1]
    return F.interpolate(image[None].float(), size=size, mode="bilinear", align_corners=False,
                         antialias=downscale)[0].to(image.dtype)


def _crop(t: torch.Tensor, top: int, left: int, h: int, w: int, fill: float | int | bool) -> torch.Tensor:
    """Window (top, left, h, w) of the last two dims; parts outside ``t`` are ``fill``."""
    H, W = t.shape[-2:]
    if top >= 0 and left >= 0 and top + h <= H and left + w <= W:
        return t[..., top:top + h, left:left + w]
    out = torch.full((*t.shape[:-2], h, w), fill, dtype=t.dtype, device=t.device)
    y0, y1 = max(top, 0), min(top + h, H)
    x0, x1 = max(left, 0), min(left + w, W)
    if y0 < y1 and x0 < x1:
        out[..., y0 - top:y1 - top, x0 - left:x1 - left] = t[..., y0:y1, x0:x1]
    return out


# ---------------------------------------------------------------------------------------
# transforms
# ---------------------------------------------------------------------------------------


class Transform:
    """Base class: a callable on sample dicts with a readable ``repr``."""

    def __call__(self, sample: Sample) -> Sample:  # pragma: no cover - abstract
        raise NotImplementedError

    def _args(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in vars(self).items())

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._args()})"


class Compose(Transform):
    """Apply transforms in order."""

    def __init__(self, transforms: Sequence[Callable[[Sample], Sample]]) -> None:
        self.transforms = list(transforms)

    def __call__(self, sample: Sample) -> Sample:
        for t in self.transforms:
            sample = t(sample)
        return sample

    def __len__(self) -> int:
        return len(self.transforms)

    def __repr__(self) -> str:
        if not self.transforms:
            return "Compose([])"
        return "Compose([\n" + "".join(f"    {t!r},\n" for t in self.transforms) + "])"


class RandomScale(Transform):
    """Rescale by a factor drawn uniformly from [min_scale, max_scale] (image bilinear,
    antialiased when shrinking; labels nearest)."""

    def __init__(self, min_scale: float = 0.5, max_scale: float = 2.0) -> None:
        if not 0 < min_scale <= max_scale:
            raise ValueError(f"need 0 < min_scale <= max_scale, got {min_scale}, {max_scale}")
        self.min_scale = min_scale
        self.max_scale = max_scale

    def __call__(self, sample: Sample) -> Sample:
        h, w = _image_size(sample)
        s = _uniform(self.min_scale, self.max_scale)
        size = (max(1, round(h * s)), max(1, round(w * s)))
        return _map_geometry(sample, lambda im: _resize_image(im, size), lambda t, _: _resize_nearest(t, size))


class Resize(Transform):
    """Resize to ``size``: (h, w), or an int for the shorter side (aspect ratio kept).

    Labels are resized by nearest neighbour; with ``resize_labels=False`` they keep their
    size (evaluate at label resolution: upsample the logits instead).
    """

    def __init__(self, size: int | Sequence[int], resize_labels: bool = True) -> None:
        self.size = size if isinstance(size, int) else tuple(int(v) for v in size)
        self.resize_labels = resize_labels

    def target_size(self, h: int, w: int) -> tuple[int, int]:
        if isinstance(self.size, int):
            s = self.size / min(h, w)
            return max(1, round(h * s)), max(1, round(w * s))
        return _pair(self.size)

    def __call__(self, sample: Sample) -> Sample:
        size = self.target_size(*_image_size(sample))
        if self.resize_labels:
            return _map_geometry(sample, lambda im: _resize_image(im, size), lambda t, _: _resize_nearest(t, size))
        return {**sample, "image": _resize_image(sample["image"], size)}


class RandomCrop(Transform):
    """Crop a random ``size`` window; where the image is smaller, pad it.

    Padded pixels get ``fill`` in the image (0; note that padding after ``Normalize`` would
    mean "the mean colour"), ``label_fill`` (255 = ignore) in ``semantic`` and
    ``instance_map``, 0 (void) in ``panoptic`` and False in instance masks. A smaller image
    lands at a random place inside the window.
    """

    def __init__(self, size: int | Sequence[int], fill: float = 0.0, label_fill: int = 255) -> None:
        self.size = _pair(size)
        self.fill = fill
        self.label_fill = label_fill

    def __call__(self, sample: Sample) -> Sample:
        h, w = _image_size(sample)
        ch, cw = self.size
        # offsets range over [H - ch, 0] when the image is smaller, [0, H - ch] otherwise
        top = int(torch.randint(min(0, h - ch), max(0, h - ch) + 1, ()))
        left = int(torch.randint(min(0, w - cw), max(0, w - cw) + 1, ()))
        return _map_geometry(sample, lambda im: _crop(im, top, left, ch, cw, self.fill),
                             lambda t, fill: _crop(t, top, left, ch, cw, fill),
                             fills={"semantic": self.label_fill, "instance_map": self.label_fill})


class RandomHorizontalFlip(Transform):
    """Mirror left-right with probability ``p``."""

    def __init__(self, p: float = 0.5) -> None:
        self.p = p

    def __call__(self, sample: Sample) -> Sample:
        if float(torch.rand(())) >= self.p:
            return dict(sample)
        return _map_geometry(sample, lambda im: im.flip(-1), lambda t, _: t.flip(-1))


def reflect_index(idx: torch.Tensor, n: int) -> torch.Tensor:
    """Mirror coordinates (integer or float) into [0, n - 1] about the first and last pixel
    centres, as often as needed (numpy's ``"reflect"``: ... 2 1 | 0 1 2 ... n-1 | n-2 ...)."""
    if n == 1:
        return torch.zeros_like(idx)
    period = 2 * (n - 1)
    idx = idx.remainder(period)
    return torch.where(idx > n - 1, period - idx, idx)


def mirror_pad(t: torch.Tensor, top: int, bottom: int, left: int, right: int) -> torch.Tensor:
    """Pad the last two dims by mirroring (``"reflect"``), for ANY pad size (also larger than
    the map, where ``F.pad(mode="reflect")`` refuses)."""
    h, w = t.shape[-2:]
    if min(top, bottom, left, right) < 0:
        raise ValueError(f"pads must be >= 0, got {(top, bottom, left, right)}")
    iy = reflect_index(torch.arange(-top, h + bottom, device=t.device), h)
    ix = reflect_index(torch.arange(-left, w + right, device=t.device), w)
    return t[..., iy[:, None], ix[None, :]]


class MirrorPad(Transform):
    """Pad the image by mirroring ``pad`` pixels on every side (U-Net's border handling);
    label maps are padded with their fill value (255 = ignore, weight 0), so the mirrored
    context feeds the network but never counts in the loss.

    Used before :class:`RandomCrop` when training the unpadded ``unet_original``: its output
    is the valid centre of the input, so with ``pad`` = half the size loss every image pixel,
    border pixels included, can land in the output of some crop.
    """

    def __init__(self, pad: int) -> None:
        if pad < 0:
            raise ValueError(f"pad must be >= 0, got {pad}")
        self.pad = int(pad)

    def __call__(self, sample: Sample) -> Sample:
        p = self.pad
        if p == 0:
            return dict(sample)
        h, w = _image_size(sample)
        return _map_geometry(sample, lambda im: mirror_pad(im, p, p, p, p),
                             lambda t, fill: _crop(t, -p, -p, h + 2 * p, w + 2 * p, fill))


class ElasticDeform(Transform):
    """U-Net's elastic deformation (Ronneberger et al. 2015, §3.1; SPEC §3): random
    displacement vectors on a coarse ``grid`` x ``grid`` grid (3 x 3), each component drawn
    from a Gaussian with std ``sigma`` pixels (10), interpolated to a per-pixel displacement
    field by BICUBIC interpolation (the coarse points sit on the corners and centre of the
    image), then applied identically to the image and every label map.

    Output pixel (y, x) samples the input at (y + dy, x + dx). The image is resampled with
    ``interpolation`` ("bilinear" or "bicubic"; bicubic overshoot is clamped to the image's
    value range); label maps (``semantic``, ``instance_map``, ``panoptic``, instance masks)
    and ``weight_map`` are sampled by NEAREST neighbour (rounding the same positions), so
    they never gain a value. Positions outside the image are mirrored back inside
    (:func:`reflect_index`), so there is no padded border. Applied with probability ``p``.
    """

    def __init__(self, sigma: float = 10.0, grid: int = 3, p: float = 1.0, interpolation: str = "bilinear") -> None:
        if grid < 2:
            raise ValueError(f"grid must be >= 2, got {grid}")
        if sigma < 0:
            raise ValueError(f"sigma must be >= 0, got {sigma}")
        if interpolation not in ("bilinear", "bicubic"):
            raise ValueError(f"interpolation must be 'bilinear' or 'bicubic', got {interpolation!r}")
        self.sigma = sigma
        self.grid = grid
        self.p = p
        self.interpolation = interpolation

    def displacement(self, h: int, w: int) -> torch.Tensor:
        """A random field (2, h, w) of (dy, dx) pixel displacements: Gaussian coarse grid
        (std ``sigma``) upsampled bicubically."""
        coarse = torch.randn(1, 2, self.grid, self.grid) * self.sigma
        return F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=True)[0]

    def __call__(self, sample: Sample) -> Sample:
        if float(torch.rand(())) >= self.p:
            return dict(sample)
        h, w = _image_size(sample)
        image = sample["image"]
        field = self.displacement(h, w).to(image.device)
        ys = reflect_index(torch.arange(h, device=image.device, dtype=torch.float32)[:, None] + field[0], h)
        xs = reflect_index(torch.arange(w, device=image.device, dtype=torch.float32)[None, :] + field[1], w)
        grid = torch.stack([xs / max(w - 1, 1) * 2 - 1, ys / max(h - 1, 1) * 2 - 1], dim=-1)[None]
        iy, ix = ys.round().long().clamp_(0, h - 1), xs.round().long().clamp_(0, w - 1)
        mode = self.interpolation

        def warp_image(im: torch.Tensor) -> torch.Tensor:
            x = im[None].float()
            out = F.grid_sample(x, grid.to(torch.float32), mode=mode, padding_mode="border", align_corners=True)
            if mode == "bicubic":  # no overshoot beyond the input's range
                lo = x.amin(dim=(-2, -1), keepdim=True)
                hi = x.amax(dim=(-2, -1), keepdim=True)
                out = torch.maximum(torch.minimum(out, hi), lo)
            return out[0].to(im.dtype)

        return _map_geometry(sample, warp_image, lambda t, _: t[..., iy, ix])


class Normalize(Transform):
    """``(image - mean) / std`` per channel (image only).

    A 1-channel image with 3-value statistics uses their averages.
    """

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> None:
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        if len(self.mean) != len(self.std) or any(s <= 0 for s in self.std):
            raise ValueError(f"mean and std must have equal lengths and std > 0, got {mean}, {std}")

    def __call__(self, sample: Sample) -> Sample:
        image = sample["image"]
        c = image.shape[0]
        mean, std = self.mean, self.std
        if len(mean) != c:
            if c == 1:
                mean, std = (sum(mean) / len(mean),), (sum(std) / len(std),)
            elif len(mean) == 1:
                mean, std = mean * c, std * c
            else:
                raise ValueError(f"Normalize has {len(mean)} channel statistics but the image has {c} channels")
        m = torch.tensor(mean, dtype=image.dtype, device=image.device)[:, None, None]
        s = torch.tensor(std, dtype=image.dtype, device=image.device)[:, None, None]
        return {**sample, "image": (image - m) / s}


class ColorJitter(Transform):
    """Light photometric jitter of an image in [0, 1] (labels untouched).

    Brightness, contrast and saturation factors are drawn from [1 - x, 1 + x]; hue is
    shifted by up to ``hue`` turns (0..0.5). Apply before :class:`Normalize`.
    """

    def __init__(self, brightness: float = 0.2, contrast: float = 0.2, saturation: float = 0.2,
                 hue: float = 0.0) -> None:
        if not 0 <= hue <= 0.5:
            raise ValueError(f"hue must be in [0, 0.5], got {hue}")
        self.brightness = brightness
        self.contrast = contrast
        self.saturation = saturation
        self.hue = hue

    @staticmethod
    def _gray(image: torch.Tensor) -> torch.Tensor:
        if image.shape[0] == 3:
            r, g, b = image.unbind(0)
            return (0.299 * r + 0.587 * g + 0.114 * b)[None]
        return image.mean(0, keepdim=True)

    def __call__(self, sample: Sample) -> Sample:
        image = sample["image"]
        if self.brightness > 0:
            image = image * _uniform(max(0.0, 1 - self.brightness), 1 + self.brightness)
        if self.contrast > 0:
            f = _uniform(max(0.0, 1 - self.contrast), 1 + self.contrast)
            image = (image - image.mean()) * f + self._gray(image).mean()  # blend with mean gray
        if self.saturation > 0 and image.shape[0] == 3:
            f = _uniform(max(0.0, 1 - self.saturation), 1 + self.saturation)
            gray = self._gray(image)
            image = gray + (image - gray) * f
        image = image.clamp(0.0, 1.0)
        if self.hue > 0 and image.shape[0] == 3:
            from torchvision.transforms.functional import adjust_hue

            image = adjust_hue(image, _uniform(-self.hue, self.hue))
        return {**sample, "image": image}


def build_transforms(
    train: bool,
    crop_size: int | Sequence[int] | None = None,
    scale: tuple[float, float] | None = (0.5, 2.0),
    flip: bool = True,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    color_jitter: float = 0.0,
    elastic: bool | Mapping[str, Any] | None = None,
    mirror_pad: int = 0,
) -> Compose:
    """The standard pipelines.

    train: RandomScale(*scale) -> MirrorPad(mirror_pad) -> RandomCrop(crop_size) ->
    ElasticDeform(**elastic) -> RandomHorizontalFlip(0.5) -> ColorJitter(color_jitter) ->
    Normalize(mean, std), each step left out when disabled (``scale=None``,
    ``mirror_pad=0``, ``crop_size=None``, ``elastic=None/False``, ``flip=False``,
    ``color_jitter=0``). ``elastic=True`` means the paper's setting (3 x 3 grid, std 10 px);
    a mapping gives :class:`ElasticDeform`'s arguments (sigma, grid, p, interpolation).
    The deformation runs on the crop (cheap, and the crop's border is mirrored).
    eval: Normalize(mean, std) only (labels keep their full resolution).
    """
    steps: list[Transform] = []
    if train:
        if scale is not None and not (math.isclose(scale[0], 1.0) and math.isclose(scale[1], 1.0)):
            steps.append(RandomScale(*scale))
        if mirror_pad:
            steps.append(MirrorPad(mirror_pad))
        if crop_size is not None:
            steps.append(RandomCrop(crop_size))
        if elastic:
            kwargs = {} if elastic is True else dict(elastic)
            try:
                steps.append(ElasticDeform(**kwargs))
            except TypeError as e:
                raise ValueError(f"elastic: {e}; valid keys: sigma, grid, p, interpolation") from None
        if flip:
            steps.append(RandomHorizontalFlip(0.5))
        if color_jitter > 0:
            steps.append(ColorJitter(color_jitter, color_jitter, color_jitter))
    steps.append(Normalize(mean, std))
    return Compose(steps)


def normalize_image(image: np.ndarray, normalization: dict[str, Any]) -> torch.Tensor:
    """uint8 (H, W[, C]) image -> float (C, H, W) tensor on the CPU, scaled to [0, 1] and
    normalised with the checkpoint's ``mean``/``std`` (the model's input for one image)."""
    x = torch.from_numpy(np.ascontiguousarray(image)).float().div_(255)
    x = x[None] if x.dim() == 2 else x.permute(2, 0, 1)
    mean = torch.tensor(normalization["mean"]).view(-1, 1, 1)
    std = torch.tensor(normalization["std"]).view(-1, 1, 1)
    return (x - mean) / std
