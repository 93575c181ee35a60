"""Importers of real data sets that Python packages carry, into the VOC layout.

``pixelwise data import NAME --out DIR``; each importer finds the package's files with
``importlib.util.find_spec`` (never importing the package), or reads them from ``source``,
and writes the dataset atomically (all or nothing).

- ``stardist``: 1 real fluorescence image of nuclei, binary semantic + instances, grayscale
  (:func:`~pixelwise.data.importers.stardist.import_stardist`).
- ``histolytics``: 1 real H&E image, 4 nucleus classes + instances, RGB crops
  (:func:`~pixelwise.data.importers.histolytics.import_histolytics`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from pixelwise.data.importers._common import MissingPackageError

__all__ = ["IMPORTERS", "MissingPackageError", "run_importer"]

IMPORTERS = ("stardist", "histolytics")


def run_importer(name: str, out: str | Path, **kwargs: Any) -> Path:
    """Run the importer ``name`` (one of :data:`IMPORTERS`) with its keyword arguments."""
    if name == "stardist":
        from pixelwise.data.importers.stardist import import_stardist

        return import_stardist(out, **kwargs)
    if name == "histolytics":
        from pixelwise.data.importers.histolytics import import_histolytics

        return import_histolytics(out, **kwargs)
    raise ValueError(f"unknown importer {name!r}; available: {', '.join(IMPORTERS)}")
