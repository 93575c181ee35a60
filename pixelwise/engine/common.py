"""Engine plumbing: the device. The loading helpers that every task shares live in
:mod:`pixelwise.data.loading` (re-exported here for existing imports)."""
from __future__ import annotations

import torch

from pixelwise.data.loading import (  # noqa: F401  (re-exported)
    PAD_FILL, RepeatDataset, apply_skip_bad, json_clean, make_loader, normalization_for, pad_collate, record_skipped,
    skipped_report, uint8_image, write_json,
)
from pixelwise.tasks.semantic import has_instance_maps, open_dataset  # noqa: F401  (re-exported)

__all__ = ["open_dataset", "pad_collate", "make_loader", "resolve_device", "normalization_for", "write_json",
           "json_clean", "RepeatDataset", "has_instance_maps", "apply_skip_bad", "record_skipped",
           "skipped_report", "uint8_image"]


def resolve_device(device: str = "auto") -> torch.device:
    """``"auto"``: CUDA when available, else the CPU; otherwise the named device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
