"""Your Dataset, your transforms: any map-style dataset of (image, mask) pairs as pixelwise samples.

:class:`UserSegmentation` wraps a ``torch.utils.data.Dataset`` (anything with ``__len__`` and
``__getitem__``) whose items are ``(image, mask)`` pairs or ``{"image", "mask"}`` dicts, each a
PIL image, a NumPy array (H x W or H x W x C; uint8 0..255 or float 0..1) or a tensor
(C x H x W float 0..1 or uint8; masks H x W), into the sample dicts every pixelwise model trains
on. Training through :func:`pixelwise.engine.train.train_on` (or ``fit(cfg, train_data=...)``).

Augmentation: by default pixelwise's own seeded transforms (random scale, crop, flip) run on
the samples, so a run stopped mid-epoch resumes exactly. Or bring a joint ``transform``:
``transform(image, mask) -> (image, mask)`` on the raw arrays, or a pipeline adapted by
:func:`albumentations_transform` (``A.Compose``: masks move by nearest neighbour) or
:func:`torchvision_transform` (``torchvision.transforms.v2``: the mask is a ``tv_tensors.Mask``,
so geometric ops use nearest neighbour). pixelwise's own augmentation is then off and the
images are only normalised; exact resume holds only if the pipeline draws from torch's
generator (torchvision v2 does, albumentations does not).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from pixelwise.data.classes import ClassInfo, palette
from pixelwise.data.transforms import Compose, Normalize
from pixelwise.errors import DataError

__all__ = ["UserSegmentation", "IndexSubset", "split_indices", "albumentations_transform", "torchvision_transform", "to_image_array",
           "to_mask_array"]

JointTransform = Callable[[np.ndarray, np.ndarray], tuple[Any, Any]]


def to_image_array(image: Any, where: str = "image") -> np.ndarray:
    """PIL / ndarray / tensor -> uint8 (H, W, C)."""
    if hasattr(image, "convert") and hasattr(image, "size"):  # PIL
        image = np.asarray(image)
    if isinstance(image, torch.Tensor):
        t = image.detach().cpu()
        if t.dim() == 3 and t.shape[0] in (1, 3, 4) and t.shape[-1] not in (1, 3, 4):
            t = t.permute(1, 2, 0)
        image = t.numpy()
    a = np.asarray(image)
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3:
        raise DataError(where, f"an image must be H x W or H x W x C, got shape {tuple(a.shape)}")
    if a.dtype == np.uint8:
        return a
    if np.issubdtype(a.dtype, np.floating):
        if a.size and (a.min() < -1e-6 or a.max() > 1 + 1e-6):
            raise DataError(where, f"float image values lie in [{a.min():.3g}, {a.max():.3g}], not [0, 1]",
                            "give uint8 images, or floats scaled to 0..1")
        return (a * 255 + 0.5).astype(np.uint8)
    if a.dtype == np.uint16:
        return (a // 257).astype(np.uint8)
    raise DataError(where, f"image dtype {a.dtype} is not supported (uint8, uint16 or float 0..1)")


def to_mask_array(mask: Any, where: str = "mask") -> np.ndarray:
    """PIL / ndarray / tensor -> int64 (H, W) class ids."""
    if hasattr(mask, "convert") and hasattr(mask, "size"):
        mask = np.asarray(mask)
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    m = np.asarray(mask)
    if m.ndim == 3 and 1 in (m.shape[0], m.shape[-1]):
        m = m.reshape(m.shape[1:] if m.shape[0] == 1 else m.shape[:2])
    if m.ndim != 2:
        raise DataError(where, f"a mask must be H x W class ids, got shape {tuple(m.shape)}",
                        "RGB colour masks: convert them with pixelwise.data.io.colors_to_label")
    if np.issubdtype(m.dtype, np.floating) and not np.all(m == np.round(m)):
        raise DataError(where, "mask values are not whole numbers (a probability map?)")
    return m.astype(np.int64)


class UserSegmentation(Dataset):
    """A map-style dataset of (image, mask) pairs as pixelwise samples (see the module docstring).

    Args:
        base: the dataset.
        classes: class names (index = mask value) or :class:`ClassInfo` entries; default:
            ``class_0 .. class_{K-1}`` with K from the first mask's largest value + 1.
        transform: a joint ``transform(image, mask) -> (image, mask)`` (or an adapted pipeline).
        image_mode: ``"RGB"`` (1-channel images repeated) or ``"L"`` (3-channel images to luma).
        ignore_index: the mask value that is not scored (255).
    """

    def __init__(self, base: Any, classes: Sequence[str | ClassInfo] | None = None,
                 transform: JointTransform | None = None, image_mode: str = "RGB", ignore_index: int = 255) -> None:
        if not hasattr(base, "__len__") or not hasattr(base, "__getitem__"):
            raise DataError(type(base).__name__, "not a map-style dataset (needs __len__ and __getitem__)")
        self.base, self.joint, self.image_mode, self.ignore_index = base, transform, image_mode, int(ignore_index)
        self.transforms: Any = None  # pixelwise's own (set by training); with ``transform`` only Normalize runs
        self.root = f"{type(base).__name__} dataset"
        if len(base) == 0:
            raise DataError(self.root, "the dataset is empty")
        if classes is None:
            k = int(max(v for v in np.unique(self._pair(0)[1]) if v != self.ignore_index)) + 1
            classes = [f"class_{i}" for i in range(max(k, 2))]
        colors = palette(len(classes))
        self.classes = [c if isinstance(c, ClassInfo) else ClassInfo(i, str(c), False, tuple(colors[i]))
                        for i, c in enumerate(classes)]

    def __len__(self) -> int:
        return len(self.base)

    def _pair(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        item = self.base[index]
        if isinstance(item, dict):
            image, mask = item.get("image"), item.get("mask", item.get("semantic"))
        elif isinstance(item, (tuple, list)) and len(item) >= 2:
            image, mask = item[0], item[1]
        else:
            raise DataError(f"{self.root}[{index}]", "an item must be (image, mask) or {'image', 'mask'}, "
                                                      f"got {type(item).__name__}")
        where = f"{self.root}[{index}]"
        return to_image_array(image, where + " image"), to_mask_array(mask, where + " mask")

    def _sample(self, index: int, image: np.ndarray, mask: np.ndarray) -> dict[str, Any]:
        where = f"{self.root}[{index}]"
        if image.shape[:2] != mask.shape:
            raise DataError(where, f"image {image.shape[1]}x{image.shape[0]} and mask {mask.shape[1]}x{mask.shape[0]} "
                                   "differ in size")
        bad = np.setdiff1d(np.unique(mask), [*range(len(self.classes)), self.ignore_index])
        if bad.size:
            raise DataError(where + " mask", f"values {bad[:8].tolist()} are not classes 0..{len(self.classes) - 1} "
                                             f"or {self.ignore_index} (ignore)", "pass classes=[...] naming every class")
        if self.image_mode == "L" and image.shape[2] >= 3:
            image = (image[..., :3] @ np.array([0.299, 0.587, 0.114]) + 0.5).astype(np.uint8)[..., None]
        elif self.image_mode == "RGB" and image.shape[2] == 1:
            image = np.repeat(image, 3, 2)
        elif image.shape[2] == 4:
            image = image[..., :3]
        image = np.ascontiguousarray(image)
        t = torch.from_numpy(image if image.flags.writeable else image.copy()).permute(2, 0, 1).float().div_(255)
        return {"image": t, "semantic": torch.from_numpy(np.array(mask, np.int64)), "meta": {"id": str(index), "size": mask.shape}}

    def load(self, index: int) -> dict[str, Any]:
        """Sample ``index`` as stored (no transform)."""
        image, mask = self._pair(index)
        return self._sample(index, image, mask)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image, mask = self._pair(index)
        if self.joint is not None:
            image, mask = self.joint(image, mask)
            image, mask = to_image_array(image, f"{self.root}[{index}] transformed image"), to_mask_array(mask)
        sample = self._sample(index, image, mask)
        tf = self.transforms
        if isinstance(tf, Compose) and self.joint is not None:  # the user's augmentation replaces ours
            tf = Compose([t for t in tf.transforms if isinstance(t, Normalize)])
        return tf(sample) if tf is not None else sample


class IndexSubset(Dataset):
    """Items ``indices`` of ``base`` (a held-out split of a user's dataset)."""

    def __init__(self, base: Any, indices: Sequence[int]) -> None:
        self.base, self.indices = base, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> Any:
        return self.base[self.indices[index]]


def split_indices(n: int, val_fraction: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """A seeded (train, val) split of ``range(n)``; at least one image each when ``n >= 2``."""
    if n < 2:
        raise DataError("dataset", f"{n} item(s): too few to hold any out for validation", "pass val_data")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed))).tolist()
    k = min(n - 1, max(1, round(n * float(val_fraction))))
    return sorted(order[k:]), sorted(order[:k])


def albumentations_transform(pipeline: Callable[..., dict[str, Any]]) -> JointTransform:
    """An albumentations pipeline (``A.Compose([...])``) as a joint transform: it is called with
    ``image=`` and ``mask=``; albumentations moves masks by nearest neighbour."""

    def joint(image: np.ndarray, mask: np.ndarray) -> tuple[Any, Any]:
        out = pipeline(image=image, mask=mask)
        return out["image"], out["mask"]

    return joint


def torchvision_transform(pipeline: Callable[..., Any]) -> JointTransform:
    """A ``torchvision.transforms.v2`` pipeline as a joint transform: the image goes in as a
    ``tv_tensors.Image`` (uint8 C x H x W) and the mask as a ``tv_tensors.Mask``, so resizes,
    crops and rotations move the mask by nearest neighbour."""
    from torchvision import tv_tensors

    def joint(image: np.ndarray, mask: np.ndarray) -> tuple[Any, Any]:
        img = tv_tensors.Image(torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1))
        out_img, out_mask = pipeline(img, tv_tensors.Mask(torch.from_numpy(mask)))
        return out_img.as_subclass(torch.Tensor), out_mask.as_subclass(torch.Tensor)

    return joint
