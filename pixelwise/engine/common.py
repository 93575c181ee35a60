"""Plumbing shared by train / evaluate / predict: datasets, loaders, devices, JSON output."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from pixelwise.data.io import atomic_write_text
from pixelwise.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from pixelwise.errors import DataError

__all__ = ["open_dataset", "pad_collate", "make_loader", "resolve_device", "normalization_for", "write_json",
           "json_clean", "RepeatDataset", "has_instance_maps"]

# Fill value of padded pixels per batch key (pad_collate); every other per-pixel key gets 255 = ignore.
PAD_FILL = {"image": 0, "weight_map": 0}


def normalization_for(image_mode: str, mean: Sequence[float] | None, std: Sequence[float] | None) -> dict[str, Any]:
    """Per-channel mean/std; ImageNet's for RGB, 0.5/0.25 for single-channel images."""
    if mean is None:
        mean = list(IMAGENET_MEAN) if image_mode == "RGB" else [0.5]
    if std is None:
        std = list(IMAGENET_STD) if image_mode == "RGB" else [0.25]
    return {"mean": [float(m) for m in mean], "std": [float(s) for s in std], "image_mode": image_mode}


def open_dataset(root: str | os.PathLike, split: str, transforms=None, image_mode: str = "RGB",
                 with_instances: bool = False) -> Dataset:
    """Open a semantic dataset on disk. Today: the VOC layout (ours, PASCAL VOC, labelme).
    ``with_instances`` also loads the instance maps (``instance_map``)."""
    from pixelwise.data.formats.voc import VOCSegmentation

    root = Path(root)
    if not root.is_dir():
        raise DataError(root, "dataset folder not found", "create one with `pixelwise data synth --out DIR`")
    return VOCSegmentation(root, split=split, transforms=transforms, image_mode=image_mode,
                           with_instances=with_instances)


def has_instance_maps(root: str | os.PathLike) -> bool:
    """True when a VOC-layout folder has instance maps (``SegmentationObject[PNG]/*.png``)."""
    from pixelwise.data.formats.voc import OBJECT_DIRS

    return any(Path(root, d).is_dir() and any(Path(root, d).glob("*.png")) for d in OBJECT_DIRS)


class RepeatDataset(Dataset):
    """Each item of ``base`` ``times`` times per epoch (a dataset of a few large images,
    sampled by random crops, then makes epochs of useful length). Attributes such as
    ``classes`` and ``root`` are those of ``base``."""

    def __init__(self, base: Dataset, times: int) -> None:
        if int(times) < 1:
            raise ValueError(f"repeat must be >= 1, got {times}")
        self.base = base
        self.times = int(times)

    def __len__(self) -> int:
        return len(self.base) * self.times

    def __getitem__(self, index: int):
        return self.base[index % len(self.base)]

    def __getattr__(self, name: str):
        if name == "base":
            raise AttributeError(name)
        return getattr(self.base, name)


def pad_collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Batch sample dicts; images of different sizes are padded at the bottom/right
    (image and ``weight_map`` with 0, label maps with 255 = ignore, so padding never counts
    in loss or metric)."""
    h = max(s["image"].shape[-2] for s in samples)
    w = max(s["image"].shape[-1] for s in samples)
    batch: dict[str, Any] = {}
    for key in samples[0]:
        if key == "meta":
            batch["meta"] = [s["meta"] for s in samples]
            continue
        vals = [s[key] for s in samples]
        if isinstance(vals[0], torch.Tensor) and vals[0].dim() >= 2:
            fill = PAD_FILL.get(key, 255)
            vals = [F.pad(v, (0, w - v.shape[-1], 0, h - v.shape[-2]), value=fill) for v in vals]
            batch[key] = torch.stack(vals)
        else:
            batch[key] = vals
    return batch


def make_loader(ds: Dataset, batch_size: int, shuffle: bool, num_workers: int, seed: int = 0,
                drop_last: bool = False) -> DataLoader:
    if len(ds) == 0:
        raise DataError(getattr(ds, "root", "dataset"), "the split is empty")
    g = torch.Generator()
    g.manual_seed(seed)
    return DataLoader(
        ds, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers, collate_fn=pad_collate,
        generator=g, drop_last=drop_last and len(ds) > batch_size, persistent_workers=False,
    )


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomically write ``obj`` as strict JSON (NaN -> null)."""
    atomic_write_text(Path(path), json.dumps(json_clean(obj), indent=2, default=_json_default) + "\n")


def json_clean(obj: Any) -> Any:
    """Replace float NaN/inf (not valid JSON) by None, recursively."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_clean(v) for v in obj]
    return obj


def _json_default(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
