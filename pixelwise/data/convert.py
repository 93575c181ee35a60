"""``pixelwise data convert SRC --to voc|coco|coco-panoptic --out DST``.

Any semantic layout :func:`~pixelwise.data.formats.detect.open_semantic` reads becomes

- ``voc``: ``JPEGImages/`` (JPEG/PNG copied byte for byte, other formats written as PNG),
  ``SegmentationClass/`` palette PNGs of class ids (255 = ignore), ``SegmentationObject/``
  when the source has instance maps, ``ImageSets/Segmentation/{split}.txt`` and
  ``classes.json``: the encoding the source needed (binary 0/255, RGB colours, Cityscapes
  label ids, ADE20K's 1..150) is resolved once, here;
- ``coco``: that VOC folder plus ``annotations/instances_{split}.json`` (one annotation per
  instance of the instance maps, its category the most frequent thing class of its pixels);
- ``coco-panoptic``: that VOC folder plus ``annotations/panoptic_{split}.json`` and its PNGs
  (things: instances; stuff: the semantic classes with ``isthing`` false).

The output folder is built under a temporary name and renamed into place at the end: an
interrupted or failed conversion leaves nothing (and an existing ``DST`` is replaced only
with ``overwrite``).
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pixelwise.data.classes import save_classes
from pixelwise.data.io import atomic_directory, atomic_write_text, read_image, write_image, write_label_png
from pixelwise.errors import DataError

__all__ = ["ConvertSummary", "convert_dataset", "TARGETS"]

TARGETS = ("voc", "coco", "coco-panoptic")


@dataclass
class ConvertSummary:
    """What :func:`convert_dataset` wrote."""

    source_layout: str
    target: str
    out: Path
    splits: dict[str, int] = field(default_factory=dict)
    num_classes: int = 0
    instances: int = 0
    notes: list[str] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)

    def line(self) -> str:
        """One line for the user."""
        splits = ", ".join(f"{n} {s}" for s, n in self.splits.items())
        inst = f", {self.instances} instances" if self.target != "voc" else ""
        return (f"converted {self.source_layout} -> {self.target}: {splits} images, {self.num_classes} classes{inst}; "
                f"wrote {self.out}")


def _relabel(inst: np.ndarray, path: str) -> np.ndarray:
    """Instance ids 1..K in id order (0 = none, 255 = ignore kept) so they fit a palette PNG."""
    values = [v for v in np.unique(inst) if v not in (0, 255)]
    if len(values) > 254:
        raise DataError(path, f"{len(values)} instances in one image: more than a palette PNG holds (254)",
                        "convert to COCO from the original instance masks in smaller tiles")
    out = np.where(inst == 255, 255, 0).astype(np.int64)
    for k, v in enumerate(values, start=1):
        out[inst == v] = k
    return out


def convert_dataset(src: str | os.PathLike, to: str, out: str | os.PathLike, *, splits: list[str] | None = None,
                    val_fraction: float = 0.2, seed: int = 0, colors: str | os.PathLike | None = None,
                    image_mode: str = "RGB", overwrite: bool = False) -> ConvertSummary:
    """Convert the dataset ``src`` (any semantic layout) to ``to`` (:data:`TARGETS`) in ``out``.

    ``splits`` default: every split of the layout (``train`` and ``val`` of the automatic
    split where it has none, made with ``val_fraction`` and ``seed``).

    Raises:
        DataError: the source's own errors (one line each), no instance maps for ``coco`` /
            ``coco-panoptic``, an id in two splits, ``out`` not empty without ``overwrite``,
            ``out`` inside ``src``.
    """
    from pixelwise.data.formats.detect import detect_layout, layout_splits, open_semantic

    if to not in TARGETS:
        raise DataError(to, f"unknown target format {to!r}", f"use one of {', '.join(TARGETS)}")
    src, out = Path(src).resolve(), Path(out).resolve()
    if out == src or src in out.parents:
        raise DataError(out, "the output folder is inside the source dataset", "write the converted copy elsewhere")
    layout = detect_layout(src)
    splits = splits or layout_splits(src, layout)
    need_instances = to != "voc"
    summary = ConvertSummary(layout, to, out)
    with atomic_directory(out, overwrite=overwrite) as tmp:
        for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
            (tmp / d).mkdir(parents=True, exist_ok=True)
        seen: dict[str, str] = {}
        classes = None
        for split in splits:
            try:
                ds = open_semantic(src, split, image_mode=image_mode, with_instances=need_instances,
                                   val_fraction=val_fraction, seed=seed, colors=colors)
            except DataError as e:
                if need_instances and "instance" in e.problem:
                    raise DataError(src, f"{to} needs instance masks and this {layout} dataset has none ({e.problem})",
                                    "convert to voc, or add instance maps (SegmentationObject/)") from None
                raise
            if need_instances and not _has_instances(ds):
                raise DataError(src, f"{to} needs instance masks and this {layout} dataset has none",
                                "convert to voc, or add instance maps (SegmentationObject/)")
            classes = list(ds.classes)
            summary.notes += [n for n in getattr(ds, "notes", []) if n not in summary.notes]
            ids = []
            for i in range(len(ds)):
                sample = ds.load(i)
                sid = str(sample["meta"]["id"])
                if sid in seen and seen[sid] != split:
                    raise DataError(sample["meta"]["file"], f"id {sid!r} is in splits {seen[sid]!r} and {split!r}",
                                    "give the files distinct names")
                seen[sid] = split
                ids.append(sid)
                _write_image(Path(sample["meta"]["file"]), tmp / "JPEGImages", sid)
                write_label_png(tmp / "SegmentationClass" / f"{sid}.png", sample["semantic"].numpy(), classes,
                                fsync=False)
                if "instance_map" in sample:
                    (tmp / "SegmentationObject").mkdir(exist_ok=True)
                    inst = _relabel(sample["instance_map"].numpy(), sample["meta"]["file"])
                    summary.instances += len([v for v in np.unique(inst) if v not in (0, 255)])
                    write_label_png(tmp / "SegmentationObject" / f"{sid}.png", inst, fsync=False)
            atomic_write_text(tmp / "ImageSets" / "Segmentation" / f"{split}.txt", "\n".join(ids) + "\n", fsync=False)
            summary.splits[split] = len(ids)
        if classes is None:
            raise DataError(src, "no split to convert")
        save_classes(classes, tmp / "classes.json", getattr(ds, "ignore_index", 255))
        summary.num_classes = len(classes)
        if to == "coco":
            from pixelwise.data.formats.coco import voc_to_coco_instances

            summary.files = voc_to_coco_instances(tmp, list(summary.splits))
        elif to == "coco-panoptic":
            from pixelwise.data.formats.coco_panoptic import voc_to_coco_panoptic

            summary.files = voc_to_coco_panoptic(tmp, list(summary.splits))
        summary.files = [out / Path(f).relative_to(tmp) for f in summary.files]
    return summary


def _has_instances(ds: Any) -> bool:
    return bool(getattr(ds, "object_dir", None) is not None or getattr(ds, "with_instances", False))


def _write_image(path: Path, folder: Path, sid: str) -> None:
    ext = path.suffix.lower()
    if ext in (".jpg", ".jpeg", ".png"):
        shutil.copyfile(path, folder / f"{sid}{ext}")  # byte for byte: no re-encoding loss
    else:
        write_image(folder / f"{sid}.png", read_image(path, None), fsync=False)
