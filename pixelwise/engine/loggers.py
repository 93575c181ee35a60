"""Optional experiment loggers: TensorBoard (``--tensorboard`` / ``tensorboard: true``).

:class:`TensorBoardLogger` writes event files under ``RUN/tensorboard/`` with
``torch.utils.tensorboard`` (which needs the ``tensorboard`` package: ``pip install
'pixelwise[tensorboard]'``). A training loop calls :meth:`~TensorBoardLogger.log_epoch` with
each ``metrics.jsonl`` record and :meth:`~TensorBoardLogger.log_images` with a few pictures
(e.g. image | ground truth | prediction panels), then :meth:`~TensorBoardLogger.close`.
View with ``tensorboard --logdir RUN/tensorboard``.

Scalar tags: ``train_*`` keys become ``train/*`` (``train_loss`` -> ``train/loss``), ``lr``
becomes ``train/lr``, ``time`` -> ``time/seconds``, every other number ``val/<key>``; a list
of per-class values (``iou``) becomes ``val_iou/<class name>`` (NaN entries are skipped).
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from pixelwise.errors import PixelwiseError

__all__ = ["TensorBoardLogger", "scalar_tags"]

_NOT_LOGGED = {"epoch", "step", "best"}


def scalar_tags(record: dict[str, Any], class_names: Sequence[str] | None = None) -> dict[str, float]:
    """The ``{tag: value}`` scalars of one ``metrics.jsonl`` record (see the module docstring)."""
    out: dict[str, float] = {}
    for key, v in record.items():
        if key in _NOT_LOGGED:
            continue
        if isinstance(v, (list, tuple)):
            for i, x in enumerate(v):
                if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x):
                    name = class_names[i] if class_names is not None and i < len(class_names) else str(i)
                    out[f"val_{key}/{name}"] = float(x)
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            continue
        if key.startswith("train_"):
            tag = "train/" + key[len("train_"):]
        elif key == "lr":
            tag = "train/lr"
        elif key == "time":
            tag = "time/seconds"
        else:
            tag = f"val/{key}"
        out[tag] = float(v)
    return out


class TensorBoardLogger:
    """TensorBoard event files for one run, in ``run_dir/tensorboard`` (``subdir``).

    Args:
        run_dir: the run folder.
        class_names: names for the entries of per-class lists (``iou``) in tags.
        subdir: folder under ``run_dir`` for the event files.

    Raises:
        PixelwiseError: the ``tensorboard`` package is not installed (says how to install it).
    """

    def __init__(self, run_dir: str | os.PathLike, class_names: Sequence[str] | None = None,
                 subdir: str = "tensorboard") -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise PixelwiseError("--tensorboard needs the tensorboard package: pip install 'pixelwise[tensorboard]' "
                                 "(or pip install tensorboard)") from None
        self.log_dir = Path(run_dir) / subdir
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.class_names = list(class_names) if class_names is not None else None
        self._writer = SummaryWriter(log_dir=str(self.log_dir))

    def log_epoch(self, record: dict[str, Any], step: int) -> dict[str, float]:
        """Log the numbers of one ``metrics.jsonl`` record at global ``step``; returns what was logged."""
        tags = scalar_tags(record, self.class_names)
        for tag, v in tags.items():
            self._writer.add_scalar(tag, v, global_step=int(step))
        self._writer.flush()
        return tags

    def log_images(self, tag: str, images: Sequence[np.ndarray | torch.Tensor] | np.ndarray | torch.Tensor,
                   step: int) -> None:
        """Log one picture or several under ``tag`` (``tag/0``, ``tag/1``, ... for several).
        Each is a uint8 (H, W, 3) / (H, W) array, or a float tensor (3|1, H, W) in [0, 1]."""
        if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim in (2, 3):
            images = [images]
        for i, im in enumerate(images):
            hwc = _to_hwc_uint8(im)
            self._writer.add_image(tag if len(images) == 1 else f"{tag}/{i}", hwc, global_step=int(step),
                                   dataformats="HWC")
        self._writer.flush()

    def close(self) -> None:
        """Flush and close the event file."""
        self._writer.close()

    def __enter__(self) -> "TensorBoardLogger":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _to_hwc_uint8(im: np.ndarray | torch.Tensor) -> np.ndarray:
    """(H, W) / (H, W, C) uint8 arrays, or (C, H, W) float tensors in [0, 1] -> (H, W, 3) uint8."""
    if isinstance(im, torch.Tensor):
        t = im.detach().cpu()
        if t.is_floating_point():
            t = (t.clamp(0, 1) * 255 + 0.5).to(torch.uint8)
        a = t.numpy()
        if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[2] not in (1, 3):
            a = a.transpose(1, 2, 0)
    else:
        a = np.asarray(im)
        if a.dtype != np.uint8:
            a = np.clip(a, 0, 255).astype(np.uint8)
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[2] not in (1, 3, 4):
        raise ValueError(f"expected an (H, W), (H, W, 3) or (3, H, W) image, got shape {tuple(np.shape(im))}")
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    return np.ascontiguousarray(a[:, :, :3])
