"""What every on-disk dataset format shares: samples are dicts, loaded then transformed."""
from __future__ import annotations

from typing import Any

from torch.utils.data import Dataset

__all__ = ["SampleDataset"]


class SampleDataset(Dataset):
    """Map-style dataset of sample dicts (DESIGN.md contract). Subclasses implement
    ``__len__`` and ``load(index)`` (the sample as stored); indexing applies ``self.transforms``."""

    transforms: Any = None

    def load(self, index: int) -> dict[str, Any]:  # pragma: no cover - interface
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        sample = self.load(index % len(self))
        if self.transforms is not None:
            sample = self.transforms(sample)
        return sample
