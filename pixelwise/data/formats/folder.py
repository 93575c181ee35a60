"""Plain folders of images and masks, and what every semantic layout shares: class tables,
mask encodings and the seeded automatic train/val split.

Layouts::

    root/                               root/
      images/a.jpg  b.tif ...             train/images/...  train/masks/...
      masks/a.png   b.tif ...             val/images/...    val/masks/...
      classes.json | classes.txt          test/images/...   test/masks/...   (optional)
      (optional)                          classes.json | classes.txt         (optional)

Images and masks pair by file stem (``a.jpg`` + ``a.png``; ``a_mask.png`` too). Masks are
PNG or TIFF, in one of these encodings (:func:`resolve_codec` decides, for the whole dataset):

- **class index** (8 or 16 bit grayscale, or palette PNG): pixel value = class id, 255 = ignore
  (or the ``ignore_index`` of ``classes.json``);
- **binary** 0/255 or 0/1 without a class table: classes ``background`` (0) and ``foreground``
  (255 or 1); said in one line;
- **RGB colour masks** with a colour table (``colors`` = a JSON class table or a CVAT
  ``labelmap.txt``, or the colours of ``classes.json``); VOC's ignore colour (224, 224, 192)
  is ignore.

Nothing is read silently: a mask value (or colour) the table does not explain, and a dataset
whose pixels are more than half ignore, are :class:`~pixelwise.errors.DataError`\\ s with the
likely fix.

Without split folders, ``train`` and ``val`` are a seeded split (:func:`auto_split`): the same
``val_fraction`` and ``seed`` give the same split on any machine, so evaluation sees the images
training held out.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from pixelwise.data.classes import (
    IGNORE_COLOR,
    IGNORE_INDEX,
    ClassInfo,
    classes_from_names,
    load_class_file,
    palette,
)
from pixelwise.data.formats.base import SampleDataset
from pixelwise.data.io import _open_fully, read_image, read_label
from pixelwise.errors import DataError

__all__ = [
    "FolderSegmentation", "MaskCodec", "Pair", "auto_split", "find_class_table", "load_colors", "pair_folder",
    "resolve_codec",
]

Sample = dict[str, Any]
Color = tuple[int, int, int]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")
MASK_EXTENSIONS = (".png", ".tif", ".tiff")
MASK_SUFFIXES = ("", "_mask", "_masks", "_label", "_labels", "_gt", "-mask", "_seg")
SCAN_LIMIT = 300  # masks read (spread over the dataset) to decide the encoding; every loaded mask is checked in full
MAX_IGNORE_SHARE = 0.5


@dataclass(frozen=True)
class Pair:
    """One sample on disk: its id, image file, mask file and (optional) instance map file."""

    id: str
    image: Path
    mask: Path
    instances: Path | None = None


# ---------------------------------------------------------------------------------------
# automatic split
# ---------------------------------------------------------------------------------------


def auto_split(ids: Sequence[str], split: str, val_fraction: float = 0.2, seed: int = 0) -> list[str]:
    """The ids of ``split`` (``"train"``, ``"val"`` or ``"all"``) of a dataset without split files.

    Ids are ordered by ``sha256(f"{seed}:{id}")``; the first ``round(n * val_fraction)``
    (at least 1 when ``val_fraction > 0`` and n >= 2) form ``val``, the rest ``train``. The
    result depends only on the ids, ``val_fraction`` and ``seed`` (not on file order or
    library versions); both splits are returned in sorted id order.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise DataError("val_fraction", f"must be in [0, 1), got {val_fraction}", "e.g. --val-fraction 0.2")
    ids = sorted(ids)
    if split == "all":
        return ids
    n_val = int(round(len(ids) * val_fraction))
    if val_fraction > 0 and len(ids) >= 2:
        n_val = min(max(n_val, 1), len(ids) - 1)
    order = sorted(ids, key=lambda i: hashlib.sha256(f"{seed}:{i}".encode()).hexdigest())
    val = set(order[:n_val])
    if split == "val":
        return sorted(val)
    if split == "train":
        return [i for i in ids if i not in val]
    raise DataError(split, f"split {split!r} does not exist in a dataset without split folders or files",
                    "use 'train' or 'val' (the automatic split, see --val-fraction) or 'all'")


# ---------------------------------------------------------------------------------------
# class tables and colours
# ---------------------------------------------------------------------------------------


def _names_txt(path: Path) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(path, f"cannot read class names: {e}") from None
    names = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    names = ["background" if n == "_background_" else n for n in names if n != "__ignore__"]
    if not names:
        raise DataError(path, "no class names", "write one class name a line, class 0 first")
    return names


def load_colors(path: str | os.PathLike) -> tuple[list[ClassInfo], int]:
    """A colour table: ``(classes with colours, ignore_index)``.

    ``path`` is a CVAT ``labelmap.txt`` (``name:r,g,b:parts:actions`` a line, class ids in
    file order) or JSON: a ``classes.json`` table, ``{"name": [r, g, b], ...}`` or
    ``[{"name": ..., "color": [r, g, b]}, ...]``.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "colour table not found", "pass a JSON class table or a CVAT labelmap.txt")
    if path.suffix.lower() != ".json":
        return _labelmap_txt(path), IGNORE_INDEX
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(path, f"cannot read the colour table: {e}") from None
    if isinstance(data, dict) and "classes" in data:
        return load_class_file(path)
    if isinstance(data, dict):
        data = [{"name": k, "color": v} for k, v in data.items()]
    if not isinstance(data, list) or not data:
        raise DataError(path, "a colour table must list classes with colours",
                        'e.g. {"background": [0, 0, 0], "cell": [255, 0, 0]}')
    return load_class_file_from(path, {"classes": data})


def load_class_file_from(path: Path, data: dict) -> tuple[list[ClassInfo], int]:
    """``classes.json`` semantics for an already-parsed document (ids default to list order)."""
    from pixelwise.data.classes import _parse_classes

    for k, entry in enumerate(data["classes"]):
        if not isinstance(entry, dict):
            raise DataError(path, f"class entry {k} is not an object: {entry!r}")
        if "color" not in entry:
            raise DataError(path, f"class {entry.get('name', k)!r} has no 'color'", "give every class [r, g, b]")
    return _parse_classes(data, path)


def _labelmap_txt(path: Path) -> list[ClassInfo]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(path, f"cannot read the label map: {e}") from None
    classes: list[ClassInfo] = []
    for n, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.split(":")
        try:
            rgb = tuple(int(v) for v in parts[1].split(","))
            if len(rgb) != 3 or not all(0 <= v <= 255 for v in rgb):
                raise ValueError
        except (IndexError, ValueError):
            raise DataError(path, f"line {n} {line!r}: expected name:r,g,b:parts:actions",
                            "CVAT writes e.g. 'background:0,0,0::'") from None
        classes.append(ClassInfo(len(classes), parts[0].strip(), isthing=len(classes) > 0, color=rgb))  # type: ignore[arg-type]
    if not classes:
        raise DataError(path, "no labels", "CVAT writes one 'name:r,g,b::' line per label")
    colors = [c.color for c in classes]
    if len(set(colors)) != len(colors):
        dup = next(c for c in colors if colors.count(c) > 1)
        raise DataError(path, f"colour {dup} is given to two labels", "every label needs its own colour")
    return classes


def find_class_table(root: Path, colors: str | os.PathLike | None = None,
                     names: Sequence[str] = ("classes.json", "classes.txt", "class_names.txt", "labelmap.txt")
                     ) -> tuple[list[ClassInfo], int, Path] | None:
    """``(classes, ignore_index, file)`` from ``colors``, else the first of ``names`` in ``root``."""
    if colors is not None:
        classes, ignore = load_colors(colors)
        return classes, ignore, Path(colors)
    for name in names:
        path = root / name
        if not path.is_file():
            continue
        if name.endswith(".json"):
            classes, ignore = load_class_file(path)
        elif name == "labelmap.txt":
            classes, ignore = _labelmap_txt(path), IGNORE_INDEX
        else:
            classes, ignore = classes_from_names(_names_txt(path)), IGNORE_INDEX
        return classes, ignore, path
    return None


# ---------------------------------------------------------------------------------------
# mask encodings
# ---------------------------------------------------------------------------------------


def _fmt(values: Sequence[Any], limit: int = 10) -> str:
    values = list(values)
    return ", ".join(str(v) for v in values[:limit]) + (", ..." if len(values) > limit else "")


def read_mask_raw(path: Path) -> np.ndarray:
    """A mask as stored: (H, W) int64 for index/palette/grayscale files, (H, W, 3) uint8 for colour ones."""
    img = _open_fully(path, "mask")
    if img.mode in ("RGB", "RGBA") and img.format not in ("JPEG", "MPO"):
        return np.asarray(img.convert("RGB"))
    return read_label(path)


@dataclass
class MaskCodec:
    """How a dataset's mask files become class ids.

    ``kind`` is ``"index"`` (values are class ids; ``lut`` maps raw values when the stored
    values are not the class ids, e.g. binary 255 -> 1, Cityscapes label ids -> train ids),
    or ``"rgb"`` (``colors[i]`` is class ``i``). ``note`` is the one line to tell the user
    about a guessed encoding.
    """

    kind: Literal["index", "rgb"]
    num_classes: int
    ignore_index: int = IGNORE_INDEX
    lut: dict[int, int] | None = None
    colors: list[Color] = field(default_factory=list)
    note: str | None = None
    table: str = "the class table"

    def decode(self, path: Path, raw: np.ndarray | None = None) -> np.ndarray:
        """Class ids (H, W) int64 of the mask file ``path``; a value or colour the table does
        not explain is a DataError naming the file, the values and the fix."""
        raw = read_mask_raw(path) if raw is None else raw
        if self.kind == "rgb":
            if raw.ndim != 3:
                raise DataError(path, f"mask is single-channel but {self.table} gives colours (RGB masks expected)",
                                "use one mask encoding for the whole dataset")
            return self._decode_rgb(path, raw)
        if raw.ndim == 3:
            raise DataError(path, "mask is an RGB colour image but the other masks are class-index images",
                            "pass the colour table (--colors FILE: JSON or CVAT labelmap.txt), or save it as an "
                            "index PNG")
        if self.lut is not None:
            values = np.unique(raw)
            unknown = [int(v) for v in values if int(v) not in self.lut]
            if unknown:
                raise DataError(path, f"mask values {_fmt(unknown)} are not explained by {self.table} "
                                f"(known: {_fmt(sorted(self.lut))})", "fix the mask or the class table")
            lut = np.full(int(values.max()) + 1, self.ignore_index, np.int64)
            for k, v in self.lut.items():
                if 0 <= k < lut.size:
                    lut[k] = v
            return lut[raw]
        bad = (raw < 0) | ((raw >= self.num_classes) & (raw != self.ignore_index))
        if bad.any():
            raise DataError(path, f"mask values {_fmt(np.unique(raw[bad]).tolist())} are not explained by {self.table} "
                            f"(classes 0..{self.num_classes - 1}, {self.ignore_index} = ignore)",
                            "fix the mask, or list every class in classes.json / classes.txt")
        return raw.astype(np.int64, copy=False)

    def _decode_rgb(self, path: Path, rgb: np.ndarray) -> np.ndarray:
        code = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2]
        table = {(r << 16) | (g << 8) | b: i for i, (r, g, b) in enumerate(self.colors)}
        ir, ig, ib = IGNORE_COLOR
        table.setdefault((ir << 16) | (ig << 8) | ib, self.ignore_index)
        values, inverse = np.unique(code, return_inverse=True)
        unknown = [int(v) for v in values if int(v) not in table]
        if unknown:
            shown = [((v >> 16) & 255, (v >> 8) & 255, v & 255) for v in unknown]
            raise DataError(path, f"mask colours {_fmt(shown, 5)} are not in {self.table}",
                            "add them to the colour table (--colors FILE) or fix the mask")
        return np.array([table[int(v)] for v in values], np.int64)[inverse.reshape(code.shape)]


@dataclass
class _Scan:
    values: set[int] = field(default_factory=set)
    colors: set[Color] = field(default_factory=set)
    rgb_files: int = 0
    index_files: int = 0
    first_rgb: Path | None = None
    first_index: Path | None = None
    per_file: dict[Path, frozenset[int]] = field(default_factory=dict)


_scan_cache: dict[tuple, _Scan] = {}


def _sample(files: Sequence[Path], limit: int = SCAN_LIMIT) -> list[Path]:
    files = list(files)
    if len(files) <= limit:
        return files
    step = len(files) / limit
    return [files[int(k * step)] for k in range(limit)]


def _scan(files: Sequence[Path]) -> _Scan:
    """Values / colours used by (a spread sample of) the masks; unreadable masks are skipped
    here: loading that sample reports them."""
    key = tuple((str(p), _mtime(p)) for p in files)
    if key in _scan_cache:
        return _scan_cache[key]
    scan = _Scan()
    for path in _sample(files):
        try:
            raw = read_mask_raw(path)
        except DataError:
            continue
        if raw.ndim == 3:
            scan.rgb_files += 1
            scan.first_rgb = scan.first_rgb or path
            code = np.unique((raw[..., 0].astype(np.int64) << 16) | (raw[..., 1].astype(np.int64) << 8) | raw[..., 2])
            scan.colors.update(((int(v) >> 16) & 255, (int(v) >> 8) & 255, int(v) & 255) for v in code)
        else:
            scan.index_files += 1
            scan.first_index = scan.first_index or path
            values = frozenset(int(v) for v in np.unique(raw))
            scan.values.update(values)
            scan.per_file[path] = values
    if len(_scan_cache) > 64:
        _scan_cache.clear()
    _scan_cache[key] = scan
    return scan


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return -1.0


def resolve_codec(root: Path, mask_files: Sequence[Path], table: tuple[list[ClassInfo], int, Path] | None,
                  default_classes: Sequence[ClassInfo] | None = None
                  ) -> tuple[list[ClassInfo], MaskCodec]:
    """The class list and mask encoding of a dataset from its masks (all splits) and class table.

    With a table: colour masks decode by its colours, index masks by its ids. Without:
    0/255 or 0/1 masks are binary (background / foreground), other index masks give classes
    0..max (255 = ignore), or ``default_classes`` (VOC's 21) when given; colour masks are an
    error that asks for the colour table. Then the ignore share is checked
    (:func:`check_ignore_share`).
    """
    scan = _scan(mask_files)
    if scan.rgb_files and scan.index_files:
        raise DataError(scan.first_rgb or root, f"{scan.rgb_files} masks are RGB colour images and "
                        f"{scan.index_files} are class-index images (e.g. {scan.first_index})",
                        "use one mask encoding for the whole dataset")
    if table is not None:
        classes, ignore, file = table
        what = f"the class table {file.name}"
        if scan.rgb_files:
            return classes, MaskCodec("rgb", len(classes), ignore, colors=[c.color for c in classes], table=what)
        if scan.values and scan.values <= {0, ignore} and ignore in scan.values and len(classes) > 1:
            raise DataError(scan.first_index or root, f"masks look binary 0/{ignore}: under {what} {ignore} is "
                            "ignore, so only class 0 would be learned",
                            f"remove {file.name} to read them as background/foreground, or store the foreground "
                            "as 1 (`pixelwise data convert`)")
        return classes, MaskCodec("index", len(classes), ignore, table=what)
    if scan.rgb_files:
        raise DataError(scan.first_rgb or root, "masks are RGB colour images and there is no colour table",
                        "pass --colors FILE (JSON {\"name\": [r, g, b]} or CVAT labelmap.txt), or add classes.json "
                        "with a colour per class")
    values = sorted(scan.values)
    if values and set(values) <= {0, 255} and 255 in values:
        note = "masks are binary 0/255: read as classes background (0) and foreground (255)"
        return _binary_classes(), MaskCodec("index", 2, IGNORE_INDEX, lut={0: 0, 255: 1}, note=note,
                                            table="binary masks (0/255)")
    if values and set(values) <= {0, 1} and 1 in values:
        note = "masks are binary 0/1: read as classes background (0) and foreground (1)"
        return _binary_classes(), MaskCodec("index", 2, IGNORE_INDEX, note=note, table="binary masks (0/1)")
    for low in (255, 1):  # binary masks but for a few files: those files are wrong, not the table
        odd = {p: v - {0, low} for p, v in scan.per_file.items() if not v <= {0, low}}
        binary = sum(1 for v in scan.per_file.values() if v <= {0, low} and low in v)
        if odd and binary > len(scan.per_file) / 2:
            path, extra = next(iter(odd.items()))
            raise DataError(path, f"mask values {_fmt(sorted(extra))} are not explained by binary masks (0/{low}) "
                            f"like {binary} of the {len(scan.per_file)} masks" + (f" (and {len(odd) - 1} more masks)"
                                                                                 if len(odd) > 1 else ""),
                            f"make every mask 0/{low}, or name the classes in classes.txt")
    if default_classes is not None:
        return list(default_classes), MaskCodec("index", len(default_classes), IGNORE_INDEX,
                                                table="the default VOC classes (no classes.json)")
    ids = [v for v in values if v != IGNORE_INDEX]
    if not ids:
        raise DataError(root, "masks hold no class ids (every pixel is 0 or 255 = ignore)" if values else
                        "no readable mask", "check the masks")
    n = max(ids) + 1
    missing = sorted(set(range(n)) - set(ids))
    if missing and len(missing) > n // 2:
        raise DataError(scan.first_index or root, f"mask values {_fmt(ids)} leave most ids 0..{n - 1} unused: "
                        "they look like grey levels, not class ids",
                        "name the classes in classes.json / classes.txt, or renumber the masks 0..C-1 "
                        "(`pixelwise data convert`)")
    names = ["background"] + [f"class_{k}" for k in range(1, n)]
    note = (f"no class table: {n} classes 0..{n - 1} read from the masks"
            + (", 255 = ignore" if IGNORE_INDEX in values else "") + "; name them in classes.txt")
    return classes_from_names(names), MaskCodec("index", n, IGNORE_INDEX, note=note, table="the classes found")


def _binary_classes() -> list[ClassInfo]:
    colors = palette(2)
    return [ClassInfo(0, "background", False, colors[0]), ClassInfo(1, "foreground", True, (255, 255, 255))]


def check_ignore_share(root: Path, mask_files: Sequence[Path], codec: MaskCodec) -> None:
    """DataError when more than half of the (sampled) mask pixels are ignore: the masks are
    almost surely misread, e.g. binary 0/255 masks under a table that calls 255 ignore."""
    key = (tuple((str(p), _mtime(p)) for p in mask_files), codec.kind, codec.ignore_index, codec.num_classes,
           tuple(sorted(codec.lut.items())) if codec.lut else None, tuple(codec.colors))
    if key in _share_cache:
        problem = _share_cache[key]
        if problem is not None:
            raise problem
        return
    try:
        _check_ignore_share(root, mask_files, codec)
    except DataError as e:
        _share_cache[key] = e
        raise
    _share_cache[key] = None


_share_cache: dict[tuple, DataError | None] = {}


def _check_ignore_share(root: Path, mask_files: Sequence[Path], codec: MaskCodec) -> None:
    total = ignored = 0
    first_ignored: Path | None = None
    for path in _sample(mask_files, 200):
        try:
            ids = codec.decode(path)
        except DataError:
            continue  # loading that sample reports it
        total += ids.size
        k = int(np.count_nonzero(ids == codec.ignore_index))
        ignored += k
        if k and first_ignored is None:
            first_ignored = path
    if total and ignored / total > MAX_IGNORE_SHARE:
        share = 100.0 * ignored / total
        if codec.lut is None and codec.kind == "index" and codec.ignore_index == 255:
            fix = (f"masks look binary 0/255: 255 is ignore under {codec.table}; remove the class table to read them "
                   "as background/foreground, or give 2 classes in classes.json")
        else:
            fix = "check the ignore value and the class table (classes.json)"
        raise DataError(first_ignored or root, f"{share:.0f}% of the mask pixels are ignore ({codec.ignore_index}): "
                        "training would learn from almost nothing", fix)


# ---------------------------------------------------------------------------------------
# pairing files
# ---------------------------------------------------------------------------------------


def _index(folder: Path, extensions: Sequence[str], what: str) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        stem, ext = os.path.splitext(entry.name)
        if ext.lower() not in extensions or entry.name.startswith(".") or not entry.is_file():
            continue
        if stem in found:
            raise DataError(entry.path, f"two {what} files for {stem!r}: {found[stem].name} and {entry.name}",
                            "keep one file per name")
        found[stem] = Path(entry.path)
    return found


def pair_folder(images_dir: Path, masks_dir: Path) -> list[Pair]:
    """Image/mask pairs of two folders, matched by stem (a mask may add ``_mask``, ``_label``, ...).

    Raises:
        DataError: a missing folder, an image without mask, a mask without image, no pairs.
    """
    for d in (images_dir, masks_dir):
        if not d.is_dir():
            raise DataError(d, "folder not found", "images/ and masks/ hold one image and one mask per sample")
    images = _index(images_dir, IMAGE_EXTENSIONS, "image")
    masks = _index(masks_dir, MASK_EXTENSIONS, "mask")
    by_image: dict[str, Path] = {}
    for stem, path in masks.items():
        base = stem
        for suffix in MASK_SUFFIXES[1:]:
            if stem.endswith(suffix) and stem[: -len(suffix)] in images and stem not in images:
                base = stem[: -len(suffix)]
                break
        if base not in images:
            raise DataError(path, f"mask without image: no {base}.* in {images_dir}",
                            "add the image or remove the mask")
        if base in by_image:
            raise DataError(path, f"two masks for image {images[base].name}: {by_image[base].name} and {path.name}",
                            "keep one mask per image")
        by_image[base] = path
    for stem, path in images.items():
        if stem not in by_image:
            raise DataError(path, f"image without mask: no {stem}.png / .tif in {masks_dir}",
                            "add its mask or move the image out of the dataset")
    if not images:
        raise DataError(images_dir, "no images", f"put images ({', '.join(IMAGE_EXTENSIONS)}) there")
    return [Pair(stem, images[stem], by_image[stem]) for stem in sorted(images)]


# ---------------------------------------------------------------------------------------
# the dataset
# ---------------------------------------------------------------------------------------


class FolderSegmentation(SampleDataset):
    """Semantic segmentation samples from a list of :class:`Pair`\\ s and a :class:`MaskCodec`.

    A sample is the VOC one (:class:`~pixelwise.data.formats.voc.VOCSegmentation`): ``image``
    float32 (C, H, W) in [0, 1], ``semantic`` int64 (H, W) class ids with ``ignore_index``,
    ``instance_map`` when the pairs have instance files, ``meta`` = {"id", "file", "size"}.
    """

    def __init__(self, root: str | Path, split: str, pairs: Sequence[Pair], classes: Sequence[ClassInfo],
                 codec: MaskCodec, transforms: Callable[[Sample], Sample] | None = None,
                 image_mode: Literal["RGB", "L"] = "RGB", layout: str = "folder",
                 notes: Sequence[str] = ()) -> None:
        if image_mode not in ("RGB", "L"):
            raise ValueError(f"image_mode must be 'RGB' or 'L', got {image_mode!r}")
        self.root = Path(root)
        self.split = split
        self.pairs = list(pairs)
        self.classes = list(classes)
        self.codec = codec
        self.ignore_index = codec.ignore_index
        self.transforms = transforms
        self.image_mode = image_mode
        self.layout = layout
        self.notes = [n for n in notes if n]
        self.with_instances = any(p.instances is not None for p in self.pairs)
        if not self.pairs:
            raise DataError(self.root, f"split {split!r} is empty", "check the split (and --val-fraction)")

    @property
    def ids(self) -> list[str]:
        return [p.id for p in self.pairs]

    def __len__(self) -> int:
        return len(self.pairs)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(root={str(self.root)!r}, layout={self.layout!r}, split={self.split!r}, "
                f"n={len(self)}, classes={self.num_classes})")

    def load(self, index: int) -> Sample:
        """The sample at ``index`` before ``transforms``."""
        from pixelwise.data.formats.voc import image_to_tensor, label_map_problem

        pair = self.pairs[index]
        image = read_image(pair.image, self.image_mode)
        hw = (int(image.shape[0]), int(image.shape[1]))
        semantic = self.codec.decode(pair.mask)
        problem = label_map_problem(semantic, pair.mask, hw, None)
        if problem is not None:
            raise problem
        sample: Sample = {"image": image_to_tensor(image), "semantic": torch.from_numpy(semantic)}
        if pair.instances is not None:
            inst = _read_instances(pair.instances)
            problem = label_map_problem(inst, pair.instances, hw, None)
            if problem is not None:
                raise problem
            sample["instance_map"] = torch.from_numpy(inst)
        sample["meta"] = {"id": pair.id, "file": str(pair.image), "size": hw}
        return sample


def _read_instances(path: Path) -> np.ndarray:
    """An instance map: index PNG/TIFF as stored, or an RGB one (CVAT) with one colour per
    instance, black = none, numbered 1.. in colour order."""
    raw = read_mask_raw(path)
    if raw.ndim == 2:
        return raw
    code = (raw[..., 0].astype(np.int64) << 16) | (raw[..., 1].astype(np.int64) << 8) | raw[..., 2]
    values, inverse = np.unique(code, return_inverse=True)
    ids = np.arange(len(values), dtype=np.int64) + (0 if values[0] == 0 else 1)
    return ids[inverse.reshape(code.shape)]


def split_folders(root: Path) -> list[str]:
    """The split folders (``train``, ``val``, ``test``, ...) of a ``SPLIT/{images,masks}`` layout."""
    return sorted(d.name for d in root.iterdir() if d.is_dir() and (d / "images").is_dir() and (d / "masks").is_dir())


def open_folder(root: Path, split: str, *, transforms=None, image_mode: str = "RGB", val_fraction: float = 0.2,
                seed: int = 0, colors: str | os.PathLike | None = None) -> FolderSegmentation:
    """``images/`` + ``masks/`` (automatic split) or ``SPLIT/{images,masks}`` folders."""
    splits = split_folders(root)
    if splits:
        by_split = {s: pair_folder(root / s / "images", root / s / "masks") for s in splits}
        if split == "all":
            pairs = [p for s in splits for p in by_split[s]]
        elif split not in by_split:
            raise DataError(root / split, f"split {split!r} not found",
                            f"available splits: {', '.join(splits)} (folders with images/ and masks/), or 'all'")
        else:
            pairs = by_split[split]
        all_masks = [p.mask for s in splits for p in by_split[s]]
        layout = "folder-splits"
    else:
        every = pair_folder(root / "images", root / "masks")
        keep = set(auto_split([p.id for p in every], split, val_fraction, seed))
        pairs = [p for p in every if p.id in keep]
        all_masks = [p.mask for p in every]
        layout = "folder"
    table = find_class_table(root, colors)
    classes, codec = resolve_codec(root, all_masks, table)
    check_ignore_share(root, all_masks, codec)
    return FolderSegmentation(root, split, pairs, classes, codec, transforms, image_mode, layout, [codec.note or ""])


def print_notes(ds: Any, seen: set[str] | None = None) -> None:
    """Print a dataset's notes (guessed encodings) to stderr, each once per dataset folder and process."""
    seen = _printed if seen is None else seen
    for note in getattr(ds, "notes", ()):
        line = f"note: {ds.root}: {note}"
        if line not in seen:
            seen.add(line)
            print(line, file=sys.stderr)


_printed: set[str] = set()
