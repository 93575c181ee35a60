"""Class lists: names, thing/stuff flags and display colours of a dataset's classes.

A dataset folder describes its classes in ``classes.json``::

    {"classes": [{"id": 0, "name": "sky", "isthing": false, "color": [70, 130, 180]}, ...],
     "ignore_index": 255}

Class ids are the values stored in semantic label maps, so they must be exactly
``0 .. C-1``; ``ignore_index`` (default 255) marks pixels that count in neither loss nor metric.

Colours follow PASCAL VOC: :func:`palette` is VOC's bit-interleaving palette (class 0 black,
1 dark red, 2 dark green, ...; index 255 comes out as VOC's light "ignore" colour
(224, 224, 192)), and :func:`palette_bytes` turns a class list into the 768-byte palette
that ``PIL.Image.putpalette`` takes for palette ("P") PNG label files.
"""
from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pixelwise.errors import DataError

__all__ = [
    "ClassInfo",
    "IGNORE_COLOR",
    "IGNORE_INDEX",
    "VOC_CLASSES",
    "VOC_CLASS_NAMES",
    "classes_from_names",
    "load_class_file",
    "load_class_names_txt",
    "load_classes",
    "palette",
    "palette_bytes",
    "save_classes",
]

Color = tuple[int, int, int]

IGNORE_INDEX = 255
"""Label value of pixels that count in neither loss nor metric."""

IGNORE_COLOR: Color = (224, 224, 192)
"""Display colour of ``IGNORE_INDEX`` (VOC's palette entry 255)."""


@dataclass(frozen=True)
class ClassInfo:
    """One class of a dataset.

    Attributes:
        id: value of the class in semantic label maps (``0 .. C-1``).
        name: human-readable name.
        isthing: True for countable objects (instances, COCO "things"), False for amorphous
            regions (COCO "stuff", background).
        color: display colour (r, g, b), each 0..255.
    """

    id: int
    name: str
    isthing: bool = False
    color: Color = (0, 0, 0)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form used in ``classes.json``."""
        return {"id": self.id, "name": self.name, "isthing": self.isthing, "color": list(self.color)}


def palette(n: int) -> list[Color]:
    """The first ``n`` colours of the PASCAL VOC palette.

    Colour ``i`` is built by spreading the bits of ``i`` over the three channels, most
    significant bit first: bit 0 of ``i`` -> bit 7 of red, bit 1 -> bit 7 of green, bit 2 ->
    bit 7 of blue, bit 3 -> bit 6 of red, and so on. It is defined for any ``n``; colours are
    distinct for ``n <= 2**24``.
    """
    if n < 0:
        raise ValueError(f"palette size must be >= 0, got {n}")
    return [(int(r), int(g), int(b)) for r, g, b in _palette_array(n).tolist()]


@functools.lru_cache(maxsize=8)
def _palette_array(n: int) -> np.ndarray:
    index = np.arange(n, dtype=np.int64)
    rgb = np.zeros((n, 3), np.int64)
    for shift in range(7, -1, -1):
        for channel in range(3):
            rgb[:, channel] |= ((index >> channel) & 1) << shift
        index >>= 3
    rgb.flags.writeable = False
    return rgb


def palette_bytes(classes: Sequence[ClassInfo] | None = None, ignore_index: int = IGNORE_INDEX) -> bytes:
    """A 768-byte palette for ``PIL.Image.putpalette``.

    Entry ``c.id`` is ``c.color`` for every class; ``ignore_index`` is (224, 224, 192) as in
    VOC; every other entry is the VOC palette colour of that index. With ``classes=None`` this
    is exactly the VOC palette (useful for instance-id maps).
    """
    colors = _palette_array(256).astype(np.uint8)  # a fresh copy
    for c in classes or ():
        if 0 <= c.id < 256:
            colors[c.id] = c.color
    if 0 <= ignore_index < 256:
        colors[ignore_index] = IGNORE_COLOR
    return colors.tobytes()


VOC_CLASS_NAMES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
    "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
    "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip


def classes_from_names(names: Sequence[str], background: bool = True) -> list[ClassInfo]:
    """Classes with ids 0.. in the given order and VOC palette colours.

    With ``background=True`` class 0 is stuff (isthing=False) and all others are things;
    with ``background=False`` every class is a thing.
    """
    colors = palette(len(names))
    return [
        ClassInfo(i, name, isthing=not (background and i == 0), color=colors[i])
        for i, name in enumerate(names)
    ]


VOC_CLASSES: tuple[ClassInfo, ...] = tuple(classes_from_names(VOC_CLASS_NAMES))
"""The 21 PASCAL VOC classes: 0 background (stuff) and 20 object classes (things)."""


# ---------------------------------------------------------------------------------------
# classes.json
# ---------------------------------------------------------------------------------------


def _parse_color(value: Any, default: Color) -> Color | None:
    if value is None:
        return default
    if (
        isinstance(value, (list, tuple))
        and len(value) == 3
        and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in value)
    ):
        return (int(value[0]), int(value[1]), int(value[2]))
    return None


def _parse_classes(data: Any, path: Path) -> tuple[list[ClassInfo], int]:
    fix = 'expected {"classes": [{"id": 0, "name": ..., "isthing": ..., "color": [r, g, b]}, ...], "ignore_index": 255}'
    if not isinstance(data, dict) or not isinstance(data.get("classes"), list):
        raise DataError(path, "no 'classes' list", fix)
    entries = data["classes"]
    if not entries:
        raise DataError(path, "the 'classes' list is empty", fix)
    ignore_index = data.get("ignore_index", IGNORE_INDEX)
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise DataError(path, f"ignore_index must be an integer, got {ignore_index!r}", fix)
    defaults = palette(len(entries))
    classes: list[ClassInfo] = []
    for k, entry in enumerate(entries):
        if not isinstance(entry, dict) or "name" not in entry:
            raise DataError(path, f"class entry {k} has no 'name': {entry!r}", fix)
        cid = entry.get("id", k)
        if not isinstance(cid, int) or isinstance(cid, bool):
            raise DataError(path, f"class {entry['name']!r} has a non-integer id {cid!r}", fix)
        color = _parse_color(entry.get("color"), defaults[k])
        if color is None:
            raise DataError(path, f"class {entry['name']!r} has an invalid color {entry.get('color')!r}",
                            "use a list of three integers 0..255")
        classes.append(ClassInfo(cid, str(entry["name"]), bool(entry.get("isthing", False)), color))
    classes.sort(key=lambda c: c.id)
    ids = [c.id for c in classes]
    if ids != list(range(len(classes))):
        raise DataError(path, f"class ids must be 0..{len(classes) - 1} without gaps or repeats, got {ids}",
                        "renumber the classes: ids are the values stored in the label maps")
    if 0 <= ignore_index < len(classes):
        raise DataError(path, f"ignore_index {ignore_index} is also the id of class {classes[ignore_index].name!r}",
                        "use an ignore_index outside the class ids, e.g. 255")
    return classes, ignore_index


def load_class_file(path: str | Path) -> tuple[list[ClassInfo], int]:
    """Read ``classes.json``; returns ``(classes sorted by id, ignore_index)``.

    Raises:
        DataError: the file is missing, is not valid JSON, or its class list is invalid
            (ids not exactly ``0 .. C-1``, bad colours, ignore_index clashing with a class id).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(path, "class file not found", "write one with pixelwise.data.classes.save_classes") from None
    except OSError as e:
        raise DataError(path, f"cannot read class file: {e.strerror or e}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(path, f"invalid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    return _parse_classes(data, path)


def load_classes(path: str | Path) -> list[ClassInfo]:
    """Read the class list of ``classes.json`` (see :func:`load_class_file` for errors)."""
    return load_class_file(path)[0]


def save_classes(classes: Sequence[ClassInfo], path: str | Path, ignore_index: int = IGNORE_INDEX) -> Path:
    """Write ``classes.json`` atomically; returns the path written."""
    from pixelwise.fs import atomic_write_text

    data = {"classes": [c.to_dict() for c in sorted(classes, key=lambda c: c.id)], "ignore_index": ignore_index}
    _parse_classes(json.loads(json.dumps(data)), Path(path))  # refuse to write a file we could not read back
    path = Path(path)
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")
    return path


def load_class_names_txt(path: str | Path) -> list[ClassInfo]:
    """Read labelme's ``class_names.txt`` (one name a line, class 0 first).

    labelme calls the background ``_background_``; it becomes ``background``. Class 0 is
    stuff, the others are things; colours are the VOC palette.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise DataError(path, f"cannot read class names: {e.strerror or e}") from None
    names = [line.strip() for line in lines if line.strip()]
    names = [n for n in names if n != "__ignore__"]
    if not names:
        raise DataError(path, "no class names", "write one class name a line, background first")
    names = ["background" if n == "_background_" else n for n in names]
    return classes_from_names(names)
