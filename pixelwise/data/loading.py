"""Loading plumbing shared by training, evaluation and prediction of every task: DataLoaders
and their workers, batch collation, bad-sample skipping, image normalisation settings, and
the atomic JSON writer."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from pixelwise.data.io import atomic_write_text
from pixelwise.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from pixelwise.errors import DataError

__all__ = ["normalization_for", "apply_skip_bad", "skipped_report", "record_skipped", "uint8_image",
           "RepeatDataset", "pad_collate", "instance_collate", "make_loader", "write_json", "json_clean",
           "default_num_workers", "resolve_num_workers"]

# Fill value of padded pixels per batch key (pad_collate); every other per-pixel key gets 255 = ignore.
PAD_FILL = {"image": 0, "weight_map": 0}


def normalization_for(image_mode: str, mean: Sequence[float] | None, std: Sequence[float] | None) -> dict[str, Any]:
    """Per-channel mean/std; ImageNet's for RGB, 0.5/0.25 for single-channel images."""
    if mean is None:
        mean = list(IMAGENET_MEAN) if image_mode == "RGB" else [0.5]
    if std is None:
        std = list(IMAGENET_STD) if image_mode == "RGB" else [0.25]
    return {"mean": [float(m) for m in mean], "std": [float(s) for s in std], "image_mode": image_mode}


def apply_skip_bad(ds: Dataset, skip_bad: bool, split: str, root: str | os.PathLike,
                   report_to: str | os.PathLike | None = None, *, quiet: bool = False) -> Dataset:
    """``ds`` without its bad samples when ``skip_bad`` (see :func:`open_dataset`); any
    task's dataset (VOC, COCO instances, COCO panoptic)."""
    from pixelwise.data.formats.base import skip_bad_samples

    ds = skip_bad_samples(ds, skip_bad, f"split {split!r} of {root}", quiet=quiet)
    if skip_bad and report_to is not None:
        record_skipped(report_to, split, ds)
    return ds


def skipped_report(ds: Dataset) -> dict[str, Any] | None:
    """``{"count", "total", "samples": [{file, problem, fix}]}`` of a dataset opened with
    ``skip_bad`` (None for one opened without)."""
    from pixelwise.data.formats.base import SkipBadSamples

    while not isinstance(ds, SkipBadSamples) and hasattr(ds, "__dict__") and "base" in vars(ds):
        ds = vars(ds)["base"]  # through RepeatDataset, WeightMapDataset, ...
    return ds.report() if isinstance(ds, SkipBadSamples) else None


def record_skipped(path: str | os.PathLike, split: str, ds: Dataset) -> None:
    """Add the skipped samples of ``split`` to the JSON file ``path`` (``{split: report}``,
    written atomically; e.g. ``RUN/skipped_samples.json`` of a training run)."""
    report = skipped_report(ds)
    if report is None:
        return
    path = Path(path)
    data: dict[str, Any] = {}
    if path.is_file():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            data = {}
    data[split] = report
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, data)


def uint8_image(image: torch.Tensor) -> np.ndarray:
    """(C, H, W) float in [0, 1] -> (H, W, 3) uint8 (one channel repeated; a 4th dropped), for pictures."""
    a = (image.clamp(0, 1) * 255 + 0.5).to(torch.uint8).permute(1, 2, 0).numpy()
    return np.repeat(a, 3, axis=2) if a.shape[2] == 1 else np.ascontiguousarray(a[..., :3])


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


def make_loader(ds: Dataset, batch_size: int, shuffle: bool, num_workers: int | None = None, seed: int = 0,
                drop_last: bool = False, sampler=None, collate_fn=pad_collate) -> DataLoader:
    """``sampler`` (e.g. a rank's share under torchrun, engine/distributed.py) replaces ``shuffle``;
    ``num_workers=None``: auto (:func:`default_num_workers`)."""
    if len(ds) == 0:
        raise DataError(getattr(ds, "root", "dataset"), "the split is empty")
    g = torch.Generator()
    g.manual_seed(seed)
    n = len(ds) if sampler is None else len(sampler)
    return DataLoader(
        ds, batch_size=batch_size, shuffle=shuffle if sampler is None else None, sampler=sampler,
        num_workers=resolve_num_workers(num_workers), collate_fn=collate_fn,
        generator=g, drop_last=drop_last and n > batch_size, persistent_workers=False,
    )


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


def default_num_workers(cpu_count: int | None = None) -> int:
    """DataLoader workers for CPU training: enough to keep 2 cores busy decoding while the main
    process computes, never more than the cores (``min(2, cores - 1)``, at least 0)."""
    n = cpu_count if cpu_count is not None else (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                                 else (os.cpu_count() or 1))
    return max(0, min(2, n - 1)) if n > 1 else 0


def resolve_num_workers(num_workers: int | None, cpu_count: int | None = None) -> int:
    """DataLoader workers of a ``num_workers`` setting: ``None`` (the default of
    ``TrainConfig.num_workers`` and of the evaluation loaders) means auto,
    :func:`default_num_workers`; an integer >= 0 is taken as it is (0 = load in the main process)."""
    import numbers

    from pixelwise.errors import PixelwiseError

    if num_workers is None:
        return default_num_workers(cpu_count)
    if isinstance(num_workers, bool) or not isinstance(num_workers, numbers.Integral) or num_workers < 0:
        raise PixelwiseError(f"num_workers must be null (auto) or a whole number >= 0, got {num_workers!r}")
    return int(num_workers)


# --- probe input ------------------------------------------------------------------------------


def instance_collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Images stay a list (sizes may differ; the model batches them); targets are
    torchvision-style dicts without crowd regions, plus the ``semantic`` map when samples
    have one (Panoptic FPN). Panoptic ground truth (``panoptic``, ``segments``) and the
    full ``instances`` (crowd included) are kept as lists for evaluation."""
    images, targets, meta = [], [], []
    extra: dict[str, list] = {k: [] for k in ("instances", "panoptic", "segments") if k in samples[0]}
    for s in samples:
        images.append(s["image"])
        inst = s["instances"]
        keep = ~inst["iscrowd"] if "iscrowd" in inst else torch.ones(len(inst["labels"]), dtype=torch.bool)
        t = {"boxes": inst["boxes"][keep].float(), "labels": inst["labels"][keep].long(),
             "masks": inst["masks"][keep].to(torch.uint8)}
        if "semantic" in s:
            t["semantic"] = s["semantic"].long()
        targets.append(t)
        meta.append(s["meta"])
        for k, v in extra.items():
            v.append(s[k])
    return {"images": images, "targets": targets, "meta": meta, **extra}
