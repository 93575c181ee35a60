"""COCO panoptic format: semantic + instance maps <-> panoptic id maps, PNG and JSON files.

A panoptic segmentation gives every pixel one *segment*; a segment has one category. In
the COCO panoptic format (panopticapi) a split is::

    annotations/panoptic_{split}.json   {"images": [{id, file_name, height, width}],
                                         "annotations": [{image_id, file_name, segments_info}],
                                         "categories": [{id, name, isthing, color}]}
    annotations/panoptic_{split}/       one RGB PNG per image, pixel colour = segment id
                                         (id = R + 256 G + 256^2 B, 0 = VOID)

where ``segments_info`` lists ``{id, category_id, iscrowd, area, bbox [x, y, w, h]}``.
The folder is the JSON path without ``.json``, the default of
:func:`pixelwise.metrics.panoptic.pq_compute` (and panopticapi).

The codec of the format lives here too (the metrics import it): :func:`rgb2id` /
:func:`id2rgb`, :func:`decode_panoptic_png` / :func:`read_panoptic_png` (a fast PNG
decode), and the JSON tables :func:`load_panoptic_json`, :func:`category_table`,
:func:`json_category_table`, :func:`annotations_by_image` and :class:`SegmentsInfo`.

Conversion from the semantic (class id per pixel) + instance (instance id per pixel) maps of
a VOC-layout dataset (:func:`semantic_instance_to_panoptic`):

- ignore pixels (``semantic == ignore_index``) are VOID (id 0);
- every *stuff* class present is one segment (all its pixels);
- every *thing* instance (``instance_map`` value other than 0 and ``ignore_index``) is one
  segment made of its thing-class pixels; its category is the most frequent thing class
  among them (ties: the lowest class id). Thing-class pixels without an instance (0 or
  ``ignore_index`` in ``instance_map``) are VOID;
- segment ids are 1, 2, ...: the stuff segments in class id order, then the instances in
  instance id order.

:func:`panoptic_to_semantic_instance` is the inverse: VOID -> ``ignore_index`` in both maps,
stuff -> its class with instance 0, the k-th thing segment (in ``segments`` order) -> its
class with instance id k. Maps whose instances are numbered 1..K and whose thing pixels all
belong to one instance of a single class come back unchanged (e.g. VOC ``SegmentationClass`` +
``SegmentationObject`` with a shared ignore band, or the shapes dataset).

Reading for training and evaluation: :class:`CocoPanoptic` is a dataset over a panoptic
JSON, its PNG folder and the images, in the sample-dict contract of the transforms (thing
segments as Mask R-CNN ``instances``, stuff + one 'thing' class as a ``semantic`` map, and
the ``panoptic`` id map with its ``segments`` for PQ), with the class conventions of
:mod:`pixelwise.models.panoptic_fpn`.
"""
from __future__ import annotations

import ctypes
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFile

from pixelwise.data.classes import IGNORE_INDEX, ClassInfo, palette
from pixelwise.data.formats.coco import CocoImageDataset, read_coco_json
from pixelwise.data.io import atomic_directory, atomic_write_text, read_image, write_image
from pixelwise.errors import DataError

__all__ = [
    "ID_MASK",
    "MAX_ID",
    "VOID",
    "CocoPanoptic",
    "SegmentsInfo",
    "annotations_by_image",
    "categories_from_classes",
    "category_table",
    "decode_panoptic_png",
    "find_panoptic_annotations",
    "format_ids",
    "id2rgb",
    "json_category_table",
    "load_panoptic_json",
    "panoptic_to_semantic_instance",
    "read_panoptic_png",
    "rgb2id",
    "semantic_instance_to_panoptic",
    "unknown_ids_error",
    "voc_to_coco_panoptic",
    "write_coco_panoptic",
    "write_panoptic_png",
]

VOID = 0
MAX_ID = 256 ** 3  # ids of an RGB PNG are < 2^24
ID_MASK = np.uint32(0xFFFFFF)  # a decoded PNG pixel is R + 2^8 G + 2^16 B + 2^24 X: X is not the id


# ---------------------------------------------------------------------------------------
# the file format: id <-> colour, PNG decoding, JSON tables, segments_info
# ---------------------------------------------------------------------------------------


def rgb2id(arr: Any) -> Any:
    """Segment ids from COCO panoptic colours: ``id = R + 256 G + 256^2 B``.

    Args:
        arr: an array (..., 3) (or (..., 4): the 4th channel is dropped) of colours 0..255,
            or one colour ``(r, g, b)``.

    Returns:
        a uint32 array (...) of ids, or an ``int`` for one colour.
    """
    if not isinstance(arr, np.ndarray) and not hasattr(arr, "__array__"):
        r, g, b = (int(v) for v in arr)
        for v in (r, g, b):
            if not 0 <= v <= 255:
                raise ValueError(f"colour components must be 0..255, got {(r, g, b)}")
        return r + 256 * g + 256 * 256 * b
    a = np.asarray(arr)
    if a.ndim < 1 or a.shape[-1] not in (3, 4):
        raise ValueError(f"rgb2id expects an array (..., 3) of colours, got shape {a.shape}")
    if a.dtype != np.uint8:
        if a.dtype.kind not in "biu":
            raise ValueError(f"rgb2id expects integer colours, got dtype {a.dtype}")
        if a.size and (a.min() < 0 or a.max() > 255):
            raise ValueError("rgb2id expects colour components in 0..255")
    r = a[..., 0].astype(np.uint32)
    r |= a[..., 1].astype(np.uint32) << 8
    r |= a[..., 2].astype(np.uint32) << 16
    return r


def id2rgb(ids: Any) -> Any:
    """COCO panoptic colours from segment ids (the inverse of :func:`rgb2id`).

    Args:
        ids: an integer array (...) of ids in ``0 .. 2^24 - 1``, or one ``int``.

    Returns:
        a uint8 array (..., 3), or an ``(r, g, b)`` tuple for one id.
    """
    if isinstance(ids, (int, np.integer)):
        i = int(ids)
        if not 0 <= i < MAX_ID:
            raise ValueError(f"panoptic ids must be in 0..{MAX_ID - 1}, got {i}")
        return (i & 255, (i >> 8) & 255, (i >> 16) & 255)
    a = np.asarray(ids)
    if a.dtype.kind not in "biu":
        raise ValueError(f"id2rgb expects integer ids, got dtype {a.dtype}")
    if a.size and (a.min() < 0 or a.max() >= MAX_ID):
        raise ValueError(f"panoptic ids must be in 0..{MAX_ID - 1} to fit an RGB PNG, "
                         f"got {int(a.min())}..{int(a.max())}")
    a = a.astype(np.uint32, copy=False)
    out = np.empty(a.shape + (3,), np.uint8)
    out[..., 0] = a & 255
    out[..., 1] = (a >> 8) & 255
    out[..., 2] = (a >> 16) & 255
    return out


def category_table(categories: Any) -> dict[int, Mapping[str, Any]]:
    """``{id: info}`` from a ``{id: info}`` mapping, a list of ``{id, isthing, ...}`` dicts
    (the ``categories`` of a COCO panoptic JSON), or plain ids (then isthing is unknown)."""
    if isinstance(categories, Mapping):
        return {int(k): (v if isinstance(v, Mapping) else {}) for k, v in categories.items()}
    table: dict[int, Mapping[str, Any]] = {}
    for c in categories:
        if isinstance(c, Mapping):
            if "id" not in c:
                raise ValueError(f"category {dict(c)!r} has no 'id'")
            cid, info = int(c["id"]), c
        else:
            cid, info = int(c), {}
        if cid in table:
            raise ValueError(f"category id {cid} is listed twice")
        table[cid] = info
    return table


def json_category_table(doc: Mapping[str, Any], where: Any, fix: str) -> dict[int, Mapping[str, Any]]:
    """:func:`category_table` of a panoptic JSON's ``categories``; DataError (at ``where``,
    with ``fix`` when the list is missing or empty) if there is none or it is malformed.
    Whether every category has ``isthing`` is left to the caller."""
    cats = doc.get("categories")
    if not isinstance(cats, list) or not cats:
        raise DataError(where, "has no 'categories' list", fix)
    try:
        return category_table(cats)
    except ValueError as e:
        raise DataError(where, f"bad 'categories': {e}") from None


def format_ids(ids: Iterable[int], limit: int = 10) -> str:
    """``"3, 7, 9"``: the first ``limit`` ids for an error message, then how many in all."""
    ids = [int(i) for i in ids]
    s = ", ".join(str(i) for i in ids[:limit])
    return s + (f", ... ({len(ids)} in all)" if len(ids) > limit else "")


class SegmentsInfo:
    """The ``segments_info`` of one image, validated, as arrays in ascending id order.

    Attributes: ``ids`` (int64 segment ids), ``cats`` (their category ids), ``crowd``
    (bool), ``by_index`` (``[-1, VOID, *ids]``: the id of each counting index of PQ).

    Args:
        segments: the list of ``{id, category_id, iscrowd (default 0), ...}``.
        cat_ids: the known category ids.
        where, image: named in the DataError (the file, ``"image 7"``).

    Raises:
        DataError: not a list, a segment without id/category_id, a non-integer field,
            an id <= 0, a duplicate id, an unknown category.
    """

    __slots__ = ("by_index", "cats", "crowd", "ids")

    def __init__(self, segments: Any, cat_ids: set[int] | dict, where: str, image: str):
        if type(segments) is not list and (segments is None or isinstance(segments, (str, bytes, Mapping))):
            raise DataError(where, f"{image}: segments_info must be a list of segments, got {type(segments).__name__}")
        ids, cats, crowd = [], [], []
        seen: set[int] = set()
        for k, s in enumerate(segments):
            # type() first: an isinstance check against the Mapping ABC costs more than the rest of the loop
            if (type(s) is not dict and not isinstance(s, Mapping)) or "id" not in s or "category_id" not in s:
                raise DataError(where, f"{image}: segment #{k} must be a dict with 'id' and 'category_id', got {s!r}",
                                "each segment is {id, category_id, iscrowd, ...}")
            try:
                sid, cid, isc = int(s["id"]), int(s["category_id"]), int(s.get("iscrowd", 0))
            except (TypeError, ValueError):
                raise DataError(where, f"{image}: segment #{k} has a non-integer id, category_id "
                                f"or iscrowd: {s!r}") from None
            if sid <= 0:
                raise DataError(where, f"{image}: segment id {sid} is not allowed (0 is VOID, ids are positive)",
                                "number segments from 1")
            if sid in seen:
                raise DataError(where, f"{image}: segment id {sid} appears twice in segments_info",
                                "segment ids must be unique within an image")
            seen.add(sid)
            if cid not in cat_ids:
                raise DataError(where, f"{image}: segment id {sid} has unknown category_id {cid}",
                                "use a category id listed in the ground-truth categories")
            ids.append(sid)
            cats.append(cid)
            crowd.append(isc == 1)
        order = np.argsort(np.asarray(ids, np.int64), kind="stable")
        self.ids = np.asarray(ids, np.int64)[order]
        self.cats = np.asarray(cats, np.int64)[order]
        self.crowd = np.asarray(crowd, bool)[order]
        self.by_index = np.concatenate([[-1, VOID], self.ids])  # the id of each counting index


def unknown_ids_error(id_map: np.ndarray, segs: SegmentsInfo, where: str, image: str) -> DataError:
    """The DataError (to raise or collect) naming the ids of ``id_map`` that are neither VOID
    nor in ``segs``."""
    ids = np.unique(id_map)
    unknown = ids[(ids != VOID) & ~np.isin(ids, segs.ids)]
    return DataError(where, f"{image}: segment ids {format_ids(unknown)} are in the PNG but not in segments_info",
                     "every non-zero id of the PNG needs a segments_info entry (0 = VOID)")


class _ArrowSchema(ctypes.Structure):
    """``struct ArrowSchema`` of the Arrow C data interface (a stable ABI)."""


class _ArrowArray(ctypes.Structure):
    """``struct ArrowArray`` of the Arrow C data interface."""


_ArrowSchema._fields_ = [
    ("format", ctypes.c_char_p), ("name", ctypes.c_char_p), ("metadata", ctypes.c_char_p), ("flags", ctypes.c_int64),
    ("n_children", ctypes.c_int64), ("children", ctypes.POINTER(ctypes.POINTER(_ArrowSchema))),
    ("dictionary", ctypes.c_void_p), ("release", ctypes.c_void_p), ("private_data", ctypes.c_void_p)]
_ArrowArray._fields_ = [
    ("length", ctypes.c_int64), ("null_count", ctypes.c_int64), ("offset", ctypes.c_int64),
    ("n_buffers", ctypes.c_int64), ("n_children", ctypes.c_int64), ("buffers", ctypes.POINTER(ctypes.c_void_p)),
    ("children", ctypes.POINTER(ctypes.POINTER(_ArrowArray))), ("dictionary", ctypes.c_void_p),
    ("release", ctypes.c_void_p), ("private_data", ctypes.c_void_p)]
_capsule_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_capsule_pointer.restype = ctypes.c_void_p
_capsule_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]


def _pixels_u32(im: Image.Image) -> np.ndarray:
    """The decoded pixels of an RGB/RGBA image as uint32 (H, W), without copying them if
    Pillow exports the image through the Arrow C data interface (Pillow >= 11.2: a fixed
    size list of 4 uint8 per pixel over one block of image memory; the array keeps that
    memory alive), else one copy (``tobytes``)."""
    w, h = im.size
    try:
        schema_capsule, array_capsule = im.__arrow_c_array__()
        schema = _ArrowSchema.from_address(_capsule_pointer(schema_capsule, b"arrow_schema"))
        arr = _ArrowArray.from_address(_capsule_pointer(array_capsule, b"arrow_array"))
        if (schema.format == b"+w:4" and schema.n_children == 1 and schema.children[0].contents.format == b"C"
                and arr.length == w * h and arr.offset == 0 and arr.n_children == 1):
            child = arr.children[0].contents
            if child.n_buffers == 2 and child.offset == 0 and child.length == 4 * w * h and child.buffers[1]:
                memory = (ctypes.c_uint32 * (w * h)).from_address(child.buffers[1])
                memory._owner = array_capsule  # released (and the image memory with it) with the array
                return np.frombuffer(memory, "<u4").reshape(h, w)  # bytes R, G, B, X: little-endian
    except (AttributeError, ValueError, TypeError):  # older Pillow, memory in several blocks
        pass
    return np.frombuffer(im.tobytes("raw", "RGBX" if im.mode == "RGB" else "RGBA"), "<u4").reshape(h, w)


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_LIBPNG_COLOR_TYPES = (2, 6)  # RGB, RGBA at 8 bits; torchvision 0.29 returns wrong colours for palette PNGs
_libpng_decode: Any = None  # torchvision's decode_png once imported; False when unavailable


def _find_libpng_decoder() -> Any:
    """torchvision's ``image::decode_png`` operator asked for RGBA output, or False.

    The operator is called directly: ``torchvision.io.decode_png`` adds a DeprecationWarning
    and a usage log to every call (torchvision 0.29 deprecates its image codecs in favour of
    TorchCodec; the operator still ships, and without it the PIL path is used)."""
    try:
        from torchvision.io import image as tv_image

        if not tv_image._has_image_ops():
            return False
        op, rgba = torch.ops.image.decode_png, tv_image.ImageReadMode.RGB_ALPHA.value
    except (ImportError, OSError, RuntimeError, AttributeError):  # no torchvision, or one without libpng
        return False
    return lambda data: op(data, rgba, False)


def _decode_libpng(path: str | os.PathLike) -> np.ndarray | None:
    """The pixels of an 8-bit RGB or RGBA PNG decoded by libpng (torchvision's
    ``decode_png``, a dependency already) as uint32 (H, W), bytes R, G, B, A; None for any
    other file, or one libpng cannot decode, which the caller then reads through PIL.

    libpng decodes these maps with 10-20 % less CPU time than PIL's decoder (bench/RESULTS.md),
    without PIL's Python-level chunk parsing, and releases the GIL, so that threads decode in
    parallel. Interlaced files are left to PIL (not needed for speed, and not tested here). Asked for RGBA, it writes 4 bytes
    per pixel in (H, W, 4) memory order, which NumPy reads in place as one uint32 per pixel."""
    global _libpng_decode
    if _libpng_decode is None:
        _libpng_decode = _find_libpng_decoder()
    if _libpng_decode is False:
        return None
    try:
        with open(path, "rb") as f:
            data = bytearray(f.read())
    except OSError:
        return None
    if len(data) < 33 or data[:8] != _PNG_SIGNATURE or data[12:16] != b"IHDR":
        return None
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    if data[24] != 8 or data[25] not in _LIBPNG_COLOR_TYPES or data[28] != 0 \
            or width * height > (Image.MAX_IMAGE_PIXELS or 1 << 62):
        return None  # 16-bit, gray, palette, interlaced, huge (PIL's decompression-bomb rule): PIL decides
    try:
        chw = _libpng_decode(torch.frombuffer(data, dtype=torch.uint8))
    except RuntimeError:  # truncated or corrupt: PIL's path names the problem
        return None
    if chw.dtype != torch.uint8 or tuple(chw.shape) != (4, height, width):
        return None
    hwc = chw.numpy().transpose(1, 2, 0)  # NumPy views: a few microseconds less per image than torch's
    if not hwc.flags.c_contiguous:
        return None
    return hwc.view("<u4").reshape(height, width)


def decode_panoptic_png(path: str | os.PathLike) -> np.ndarray:
    """Decode a COCO panoptic PNG into a uint32 map (H, W) whose low 24 bits are the ids
    (``value & 0xFFFFFF``; the top byte is padding or alpha); DataError if it is not RGB.

    Fast paths: libpng (:func:`_decode_libpng`) for 8-bit RGB and RGBA PNGs, else
    PIL, which decodes an RGB PNG into 4 bytes per pixel that NumPy reads in place
    (:func:`_pixels_u32`). Either way one little-endian uint32 per pixel: no copy, no
    per-channel arithmetic, and the id bits are masked only where they are used. Anything
    unusual (a missing, truncated or corrupt file, another mode) goes through
    :func:`read_image`, which raises the library's DataError or decodes it the careful way."""
    if not ImageFile.LOAD_TRUNCATED_IMAGES:  # else a truncated file would decode (PIL fills it with grey)
        pixels = _decode_libpng(path)
        if pixels is not None:
            return pixels
    path = Path(path)
    if not ImageFile.LOAD_TRUNCATED_IMAGES:  # else PIL would fill a truncated file with grey
        try:
            with Image.open(path) as im:
                if im.format in ("JPEG", "MPO"):
                    raise DataError(path, "panoptic id map is a JPEG: lossy compression changes the ids",
                                    "save panoptic maps as RGB PNG files")
                if im.mode in ("RGB", "RGBA", "P"):
                    im.load()  # errors of the file surface here
                    return _pixels_u32(im.convert("RGB") if im.mode == "P" else im)
        except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError):
            pass
    rgb = read_image(path, mode=None)  # the whole file is decoded: truncation is an error
    if rgb.shape[2] not in (3, 4):
        raise DataError(path, f"panoptic PNG has {rgb.shape[2]} channel(s), not RGB: its ids cannot be read as "
                        "R + 256 G + 256^2 B",
                        "write panoptic PNGs as 8-bit RGB (pixelwise.data.formats.coco_panoptic.id2rgb)")
    return rgb2id(rgb)


def read_panoptic_png(path: str | os.PathLike) -> np.ndarray:
    """Read a COCO panoptic PNG as a uint32 id map (H, W).

    Raises:
        DataError: a missing, unreadable, truncated or non-RGB file.
    """
    return decode_panoptic_png(Path(path)) & ID_MASK


def load_panoptic_json(src: Any, what: str) -> tuple[dict, str, Path | None]:
    """``(the JSON dict, a label for error messages, the path or None)`` of a COCO panoptic
    JSON given as a path or an already loaded dict; ``what`` (``"ground-truth"``) names it
    in the DataError of a missing, unreadable or non-object file."""
    if isinstance(src, Mapping):
        return dict(src), f"<{what} JSON (dict)>", None
    path = Path(src)
    if not path.is_file():
        raise DataError(path, f"{what} JSON file not found")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(path, f"cannot read the {what} JSON file: {e}") from None
    except json.JSONDecodeError as e:
        raise DataError(path, f"{what} JSON file is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise DataError(path, f"{what} JSON must be an object with 'annotations', got a {type(data).__name__}")
    return data, str(path), path


def annotations_by_image(data: dict, where: str) -> dict[Any, dict]:
    """``{image_id: {image_id, file_name, segments_info}}`` from a panoptic JSON's
    ``annotations``; DataError (at ``where``) if the list is missing, an entry lacks a key or
    an image has two annotations."""
    anns = data.get("annotations")
    if not isinstance(anns, list):
        raise DataError(where, "has no 'annotations' list", "a COCO panoptic JSON lists one annotation per image "
                        "with image_id, file_name and segments_info")
    out: dict[Any, dict] = {}
    for k, a in enumerate(anns):
        if not isinstance(a, Mapping) or not all(key in a for key in ("image_id", "file_name", "segments_info")):
            raise DataError(where, f"annotation #{k} needs 'image_id', 'file_name' and 'segments_info'")
        iid = a["image_id"]
        if iid in out:
            raise DataError(where, f"image_id {iid!r} has two annotations", "keep one annotation per image")
        out[iid] = {"image_id": iid, "file_name": a["file_name"], "segments_info": a["segments_info"]}
    return out



# ---------------------------------------------------------------------------------------
# categories
# ---------------------------------------------------------------------------------------


def categories_from_classes(classes: Iterable[ClassInfo | Mapping[str, Any]]) -> list[dict[str, Any]]:
    """COCO panoptic ``categories`` (``{id, name, isthing 0/1, color}``) from a class list
    (:class:`~pixelwise.data.classes.ClassInfo` objects or dicts with ``id`` and ``isthing``)."""
    out = []
    seen = set()
    for c in classes:
        if isinstance(c, ClassInfo):
            d = {"id": int(c.id), "name": c.name, "isthing": int(bool(c.isthing)), "color": list(c.color)}
        elif isinstance(c, Mapping):
            if "id" not in c or "isthing" not in c:
                raise ValueError(f"category {dict(c)!r} needs 'id' and 'isthing'")
            d = {"id": int(c["id"]), "name": str(c.get("name", c["id"])), "isthing": int(bool(c["isthing"])),
                 "color": list(c.get("color", (0, 0, 0)))}
        else:
            raise TypeError(f"expected ClassInfo or a dict, got {type(c).__name__}")
        if d["id"] in seen:
            raise ValueError(f"category id {d['id']} is listed twice")
        seen.add(d["id"])
        out.append(d)
    return out


def _thing_table(classes: Iterable[ClassInfo | Mapping[str, Any]]) -> dict[int, bool]:
    return {c["id"]: bool(c["isthing"]) for c in categories_from_classes(classes)}


def _bbox(ys: np.ndarray, xs: np.ndarray) -> list[int]:
    x0, y0 = int(xs.min()), int(ys.min())
    return [x0, y0, int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1]


def _segments_of(id_map: np.ndarray, category: dict[int, int]) -> list[dict[str, Any]]:
    """``segments_info`` (area and bbox from the map) for the ids in ``category``, id order."""
    flat = id_map.ravel()
    order = np.argsort(flat, kind="stable")
    ids_sorted = flat[order]
    w = id_map.shape[1]
    segments = []
    for sid in sorted(category):
        lo, hi = np.searchsorted(ids_sorted, sid, "left"), np.searchsorted(ids_sorted, sid, "right")
        if hi == lo:
            continue
        pix = order[lo:hi]
        segments.append({"id": int(sid), "category_id": int(category[sid]), "iscrowd": 0, "area": int(hi - lo),
                         "bbox": _bbox(pix // w, pix % w)})
    return segments


# ---------------------------------------------------------------------------------------
# in memory
# ---------------------------------------------------------------------------------------


def semantic_instance_to_panoptic(semantic: Any, instance_map: Any, classes: Iterable[ClassInfo | Mapping[str, Any]],
                                  ignore_index: int = IGNORE_INDEX) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """A panoptic id map and its ``segments_info`` from a semantic and an instance map.

    Args:
        semantic: integer (H, W) class ids, ``ignore_index`` = ignore (numpy array or tensor).
        instance_map: integer (H, W) instance ids, 0 = none, ``ignore_index`` = ignore.
        classes: the class list (:class:`ClassInfo` or ``{id, isthing}`` dicts): which
            classes are things.
        ignore_index: the ignore value of both maps.

    Returns:
        ``(id_map, segments)``: uint32 (H, W) segment ids (0 = VOID) and one
        ``{id, category_id, iscrowd: 0, area, bbox: [x, y, w, h]}`` per segment, ids 1, 2, ...
        (stuff segments in class order, then the instances in instance id order).

    Raises:
        ValueError: maps of different shapes or not 2-D, class ids not in ``classes``.
    """
    sem = np.asarray(semantic).astype(np.int64, copy=False)
    inst = np.asarray(instance_map).astype(np.int64, copy=False)
    if sem.ndim != 2 or sem.shape != inst.shape:
        raise ValueError(f"semantic and instance_map must be 2-D arrays of one shape, got {sem.shape} and {inst.shape}")
    thing = _thing_table(classes)
    present = [int(v) for v in np.unique(sem) if int(v) != ignore_index]
    unknown = [c for c in present if c not in thing]
    if unknown:
        raise ValueError(f"class ids {unknown} in the semantic map are not in classes")

    id_map = np.zeros(sem.shape, np.uint32)
    category: dict[int, int] = {}
    next_id = 1
    for c in present:
        if not thing[c]:
            id_map[sem == c] = next_id
            category[next_id] = c
            next_id += 1
    thing_ids = np.array(sorted(c for c in present if thing[c]), np.int64)
    if thing_ids.size:
        is_thing_px = np.isin(sem, thing_ids) & (inst != 0) & (inst != ignore_index)
        inst_px, sem_px = inst[is_thing_px], sem[is_thing_px]
        flat_idx = np.flatnonzero(is_thing_px)
        for k in np.unique(inst_px):
            sel = inst_px == k
            counts = np.array([(sem_px[sel] == c).sum() for c in thing_ids])
            id_map.ravel()[flat_idx[sel]] = next_id
            category[next_id] = int(thing_ids[int(counts.argmax())])
            next_id += 1
    return id_map, _segments_of(id_map, category)


def panoptic_to_semantic_instance(id_map: Any, segments: Sequence[Mapping[str, Any]],
                                  classes: Iterable[ClassInfo | Mapping[str, Any]],
                                  ignore_index: int = IGNORE_INDEX) -> tuple[np.ndarray, np.ndarray]:
    """The inverse of :func:`semantic_instance_to_panoptic`.

    Args:
        id_map: integer (H, W) segment ids (0 = VOID), e.g. from :func:`read_panoptic_png`.
        segments: its ``segments_info`` (``id`` and ``category_id`` are used).
        classes: the class list (which categories are things).
        ignore_index: value of VOID pixels in both outputs.

    Returns:
        ``(semantic, instance_map)`` int64 (H, W): VOID -> ``ignore_index`` in both; a stuff
        segment -> its class, instance 0; the k-th thing segment in ``segments`` order -> its
        class, instance k (1-based).

    Raises:
        ValueError: a segment id repeated or 0, an unknown category, or an id in the map
            without a segment.
    """
    ids = np.asarray(id_map).astype(np.int64, copy=False)
    if ids.ndim != 2:
        raise ValueError(f"id_map must be 2-D, got shape {ids.shape}")
    thing = _thing_table(classes)
    seg_ids = [int(s["id"]) for s in segments]
    if len(set(seg_ids)) != len(seg_ids) or 0 in seg_ids:
        raise ValueError(f"segment ids must be unique and non-zero, got {seg_ids}")
    present = np.unique(ids)
    missing = sorted(set(int(v) for v in present) - set(seg_ids) - {0})
    if missing:
        raise ValueError(f"ids {missing} are in the id map but not in segments")
    n = len(segments)
    sem_of = np.full(n + 1, ignore_index, np.int64)  # index 0 = VOID
    inst_of = np.full(n + 1, ignore_index, np.int64)
    k = 0
    for i, s in enumerate(segments, start=1):
        cid = int(s["category_id"])
        if cid not in thing:
            raise ValueError(f"segment {s['id']} has category {cid}, which is not in classes")
        sem_of[i] = cid
        if thing[cid]:
            k += 1
            inst_of[i] = k
        else:
            inst_of[i] = 0
    # dense index of each pixel: 0 for VOID, 1 + position in segments otherwise
    dense = np.zeros(ids.shape, np.int64)
    if n:
        seg_arr = np.array(seg_ids, np.int64)
        order = np.argsort(seg_arr, kind="stable")
        pos = np.minimum(np.searchsorted(seg_arr[order], ids), n - 1)
        dense = np.where(ids == 0, 0, order[pos] + 1)
    return sem_of[dense], inst_of[dense]


# ---------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------


def write_panoptic_png(path: str | os.PathLike, id_map: Any, *, fsync: bool = True) -> Path:
    """Write a segment id map (H, W) as a COCO panoptic RGB PNG (``id2rgb``), atomically."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"{path}: panoptic maps must be written as .png")
    a = np.asarray(id_map)
    if a.ndim != 2:
        raise ValueError(f"{path}: id map must be 2-D (H, W), got shape {a.shape}")
    return write_image(path, id2rgb(a), fsync=fsync)


def write_coco_panoptic(root: str | os.PathLike, split: str, records: Iterable[Mapping[str, Any]],
                        categories: Iterable[ClassInfo | Mapping[str, Any]], *,
                        info: Mapping[str, Any] | None = None, fsync: bool = False) -> Path:
    """Write ``root/annotations/panoptic_{split}.json`` and the PNG folder
    ``root/annotations/panoptic_{split}/`` (panopticapi's layout).

    Args:
        root: the dataset folder.
        split: split name.
        records: one dict per image: ``image_id`` (int), ``file_name`` (the image file, e.g.
            ``JPEGImages/x.png``; the PNG is named after its stem), ``id_map`` (H, W) and
            ``segments`` (as from :func:`semantic_instance_to_panoptic`). May be a generator:
            one image at a time is held.
        categories: the class list (:class:`ClassInfo` or ``{id, name, isthing}`` dicts).
        info: the JSON ``info`` object.
        fsync: flush every file to disk.

    The PNG folder is built under a temporary name and renamed into place (replacing an old
    one); the JSON is written atomically after it. Returns the JSON path.

    Raises:
        ValueError: duplicate image ids or PNG names, a segment id missing from its map or a
            map id without segment, an unknown category.
    """
    root = Path(root)
    cats = categories_from_classes(categories)
    cat_ids = {c["id"] for c in cats}
    ann_dir = root / "annotations"
    ann_dir.mkdir(parents=True, exist_ok=True)
    json_path = ann_dir / f"panoptic_{split}.json"
    images, annotations = [], []
    seen_ids, seen_names = set(), set()
    with atomic_directory(ann_dir / f"panoptic_{split}", overwrite=True) as tmp:
        for r in records:
            image_id = r["image_id"]
            png_name = Path(str(r["file_name"])).stem + ".png"
            if image_id in seen_ids:
                raise ValueError(f"image_id {image_id!r} appears twice")
            if png_name in seen_names:
                raise ValueError(f"two images give the panoptic PNG name {png_name!r}")
            seen_ids.add(image_id)
            seen_names.add(png_name)
            id_map = np.asarray(r["id_map"])
            segments = [dict(s) for s in r["segments"]]
            seg_ids = {int(s["id"]) for s in segments}
            map_ids = {int(v) for v in np.unique(id_map)} - {0}
            if len(seg_ids) != len(segments) or 0 in seg_ids or seg_ids != map_ids:
                raise ValueError(f"image {image_id!r}: segment ids {sorted(seg_ids)} do not match the non-zero ids "
                                 f"of its map {sorted(map_ids)} (unique, non-zero, one segment per id)")
            bad = [s["category_id"] for s in segments if int(s["category_id"]) not in cat_ids]
            if bad:
                raise ValueError(f"image {image_id!r}: unknown category ids {bad}")
            for s in segments:
                s.setdefault("iscrowd", 0)
            h, w = id_map.shape
            write_panoptic_png(tmp / png_name, id_map, fsync=fsync)
            images.append({"id": image_id, "file_name": str(r["file_name"]),
                           "height": int(r.get("height", h)), "width": int(r.get("width", w))})
            annotations.append({"image_id": image_id, "file_name": png_name, "segments_info": segments})
    data = {"info": dict(info or {"description": f"panoptic {split}"}), "images": images,
            "annotations": annotations, "categories": cats}
    atomic_write_text(json_path, json.dumps(data) + "\n", fsync=fsync)
    return json_path


def voc_to_coco_panoptic(root: str | os.PathLike, splits: Sequence[str] = ("train", "val")) -> list[Path]:
    """Write ``root/annotations/panoptic_{split}.json`` (+ PNG folder) from a VOC-layout
    dataset's ``SegmentationClass`` + ``SegmentationObject`` maps and the ``isthing`` flags of
    its ``classes.json`` (see :func:`semantic_instance_to_panoptic`; ignore pixels are VOID).
    Image ids are 1, 2, ... in split-file order, as in
    :func:`~pixelwise.data.formats.coco.voc_to_coco_instances`. Splits without a split file
    are skipped. Returns the JSON files written.

    Raises:
        DataError: no ``SegmentationObject`` folder, or the dataset's own errors.
    """
    from pixelwise.data.formats.voc import iter_voc_splits

    root = Path(root)
    written = []
    for split, ds in iter_voc_splits(root, splits, with_instances=True):
        if getattr(ds, "object_dir", None) is None:
            raise DataError(root / "SegmentationObject", "instance maps not found",
                            "panoptic conversion needs SegmentationObject PNGs (instance ids per pixel)")
        classes, ignore = list(ds.classes), ds.ignore_index

        def records(ds=ds, classes=classes, ignore=ignore):
            for index in range(len(ds)):
                s = ds.load(index)
                id_map, segments = semantic_instance_to_panoptic(s["semantic"].numpy(), s["instance_map"].numpy(),
                                                                 classes, ignore)
                yield {"image_id": index + 1, "file_name": Path(s["meta"]["file"]).relative_to(root).as_posix(),
                       "id_map": id_map, "segments": segments}

        written.append(write_coco_panoptic(root, split, records(), classes,
                                           info={"description": f"panoptic {root.name} (from VOC layout)"}))
    return written


# ---------------------------------------------------------------------------------------
# reading: the dataset
# ---------------------------------------------------------------------------------------


def _list(doc: Any, key: str) -> list:
    value = doc.get(key) if isinstance(doc, Mapping) else None
    return value if isinstance(value, list) else []


def panoptic_field_problems(doc: dict[str, Any], path: str | os.PathLike
                            ) -> tuple[list[DataError], dict[Any, list[DataError]], set[tuple[str, int]]]:
    """Malformed fields of a COCO panoptic JSON, each a DataError naming the file, the entry
    and the field: image / annotation ids that are not integers, ``segments_info`` that is
    not a list, segments without an integer ``id`` or ``category_id``, ``iscrowd`` other
    than 0/1. Same return value as :func:`pixelwise.data.formats.coco.coco_field_problems`
    (``by_image`` keys: image ids, or ``("images", k)`` for a malformed image entry)."""
    from pixelwise.data.formats.coco import ID_FIX, crowd_problem, is_int, unwrap_id

    general: list[DataError] = []
    by_image: dict[Any, list[DataError]] = {}
    flagged: set[tuple[str, int]] = set()
    image_ids: set[int] = set()
    for k, im in enumerate(_list(doc, "images")):
        if isinstance(im, Mapping) and is_int(im.get("id")) and isinstance(im.get("file_name"), str):
            image_ids.add(im["id"])
            continue
        what = (f"images[{k}] ({im.get('file_name')!r}): field 'id' must be an integer, got {im.get('id')!r}"
                if isinstance(im, Mapping) and not is_int(im.get("id")) else
                f"images[{k}]: needs an integer 'id' and a string 'file_name', got {im!r}"[:200])
        by_image[("images", k)] = [DataError(path, what, ID_FIX)]
        flagged.add(("images", k))
        alias = unwrap_id(im.get("id")) if isinstance(im, Mapping) else None
        if alias is not None:
            flagged.add(("image_alias", alias))
    for k, a in enumerate(_list(doc, "annotations")):
        if not isinstance(a, Mapping):
            general.append(DataError(path, f"annotations[{k}] is not an object: {a!r}"[:200]))
            flagged.add(("annotations", k))
            continue
        iid = a.get("image_id")
        where = f"annotations[{k}] (image_id {iid!r})"
        problem = None
        if is_int(iid) and iid not in image_ids and ("image_alias", iid) in flagged:
            flagged.add(("annotations", k))  # the annotation of a malformed image entry: that image reports it
            continue
        if not is_int(iid):
            problem = f"field 'image_id' must be an integer, got {iid!r}"
            iid = int(iid) if isinstance(iid, str) and iid.strip().isdigit() else None
        elif not isinstance(a.get("segments_info"), list):
            problem = f"field 'segments_info' must be a list of segments, got {a.get('segments_info')!r}"[:200]
        else:
            for j, seg in enumerate(a["segments_info"]):
                if not isinstance(seg, Mapping):
                    problem = f"segments_info[{j}] is not an object: {seg!r}"[:200]
                    break
                for key in ("id", "category_id"):
                    if key not in seg:
                        problem = f"segments_info[{j}] (id {seg.get('id')!r}) has no field '{key}'"
                    elif not is_int(seg[key]):
                        problem = f"segments_info[{j}]: field '{key}' must be an integer, got {seg[key]!r}"
                    if problem:
                        break
                if not problem and crowd_problem(seg.get("iscrowd")):
                    problem = f"segments_info[{j}] (id {seg['id']}): {crowd_problem(seg.get('iscrowd'))}"
                if problem:
                    break
        if problem:
            e = DataError(path, f"{where}: {problem}", ID_FIX if "integer" in problem else "fix the segment")
            (by_image.setdefault(iid, []) if iid in image_ids else general).append(e)
            flagged.add(("annotations", k))
    return general, by_image, flagged


def find_panoptic_annotations(data: str | os.PathLike, split: str = "train") -> tuple[Path, Path, Path]:
    """(panoptic JSON, its PNG folder, image root) of a COCO panoptic dataset given as the
    JSON itself or as a folder with ``annotations/panoptic_{split}.json`` (``pixelwise data
    synth``), ``annotations/panoptic_{split}2017.json`` (COCO) or ``panoptic_{split}.json``.

    The PNG folder is the JSON path without ``.json``; the image root is the JSON's folder,
    or its parent for an ``annotations/`` folder.

    Raises:
        DataError: no such file, or no PNG folder next to it.
    """
    data = Path(data)
    if data.is_file():
        ann = data
    elif data.is_dir():
        candidates = [data / "annotations" / f"panoptic_{split}.json",
                      data / "annotations" / f"panoptic_{split}2017.json", data / f"panoptic_{split}.json"]
        found = [c for c in candidates if c.is_file()]
        if not found:
            raise DataError(data, f"no COCO panoptic annotation file for split {split!r}",
                            f"expected one of: {', '.join(str(c.relative_to(data)) for c in candidates)} "
                            "(`pixelwise data synth` writes them; `voc_to_coco_panoptic(DIR)` converts a VOC layout)")
        ann = found[0]
    else:
        raise DataError(data, "dataset not found", "create one with `pixelwise data synth --out DIR`")
    png_dir = ann.with_suffix("")
    if not png_dir.is_dir():
        raise DataError(png_dir, f"folder of the panoptic PNGs of {ann.name} not found",
                        "the PNGs go in a folder named like the JSON file without .json")
    root = ann.parent.parent if ann.parent.name == "annotations" else ann.parent
    return ann, png_dir, root


class CocoPanoptic(CocoImageDataset):
    """A COCO panoptic dataset (Kirillov et al., CVPR 2019; panopticapi's format) for
    Panoptic FPN (:mod:`pixelwise.models.panoptic_fpn`).

    Categories: the *things* (``isthing`` 1) sorted by id are ``thing_ids``, the *stuff*
    sorted by id are ``stuff_ids`` -- exactly the model's ``thing_ids`` / ``stuff_ids``, so
    its predictions carry the dataset's category ids. ``classes`` lists every category as a
    :class:`~pixelwise.data.classes.ClassInfo` whose ``id`` is the category id, sorted by id.

    A sample (before ``transforms``)::

        {"image": float (C, H, W) in [0, 1],
         "instances": {"boxes" (K, 4) float xyxy (x2, y2 exclusive), "labels" (K,) int64
                       1..T (thing i of thing_ids is label i + 1), "masks" (K, H, W) bool,
                       "iscrowd" (K,) bool, "category_ids" (K,) int64, "segment_ids" (K,)},
         "semantic": int64 (H, W): stuff j of stuff_ids -> j (0..S-1), every non-crowd
                     thing pixel -> S (the 'thing' class), VOID and crowd pixels -> 255,
         "panoptic": int64 (H, W) segment ids (0 = VOID), as in the PNG,
         "segments": [{"id", "category_id", "iscrowd", "isthing"}] of the image,
         "meta": {"id", "image_id", "file", "file_name" (the PNG), "size"}}

    Crowd thing segments stay in ``instances`` with ``iscrowd`` True (the training collate
    leaves them out; COCO evaluation ignores detections on them). Segments listed in
    ``segments_info`` but absent from the PNG are left out.

    Args:
        data: the panoptic JSON, or a dataset folder (:func:`find_panoptic_annotations`).
        split: used to find the JSON in a folder and as an image sub-folder.
        transforms: called on each sample dict (:mod:`pixelwise.data.transforms`).
        image_mode: ``"RGB"`` or ``"L"``.
        image_root: where the images' ``file_name`` is relative to (default: see
            :func:`find_panoptic_annotations`; ``{split}/``, ``{split}2017/``, ``images/``
            and ``JPEGImages/`` below it are tried too).

    Raises:
        DataError: files not found or unreadable, a JSON that is not COCO panoptic, an image
            without annotation, an unknown category, a PNG id without segment.
    """

    annotation_kind = "panoptic annotation file"

    def __init__(self, data: str | os.PathLike, split: str = "train", transforms: Any = None,
                 image_mode: str = "RGB", image_root: str | os.PathLike | None = None) -> None:
        self.annotation_file, self.png_dir, root = find_panoptic_annotations(data, split)
        self._setup(Path(image_root) if image_root is not None else root, split, transforms, image_mode)
        doc = read_coco_json(self.annotation_file, "the panoptic JSON", "COCO panoptic")
        try:
            cats = sorted(categories_from_classes(doc["categories"]), key=lambda c: c["id"])
        except (ValueError, TypeError) as e:
            raise DataError(self.annotation_file, f"bad 'categories': {e}") from None
        if not cats:
            raise DataError(self.annotation_file, "the 'categories' list is empty")
        given = {int(d["id"]): d.get("color") for d in doc["categories"]}
        colors = palette(len(cats) + 1)
        for i, c in enumerate(cats, start=1):  # categories without a valid colour get the VOC palette's
            col = given[c["id"]]
            ok = isinstance(col, list) and len(col) == 3 and all(isinstance(v, int) and 0 <= v <= 255 for v in col)
            c["color"] = list(col) if ok else list(colors[i])
        self.categories: list[dict[str, Any]] = cats
        self.classes = [ClassInfo(c["id"], c["name"], bool(c["isthing"]), tuple(c["color"])) for c in cats]
        self.thing_ids = [c["id"] for c in cats if c["isthing"]]
        self.stuff_ids = [c["id"] for c in cats if not c["isthing"]]
        self._label_of = {cid: i for i, cid in enumerate(self.thing_ids, start=1)}
        self._stuff_of = {cid: j for j, cid in enumerate(self.stuff_ids)}
        general, self._bad, flagged = panoptic_field_problems(doc, self.annotation_file)
        if general:
            raise general[0]
        anns = {}
        for k, a in enumerate(doc["annotations"]):
            if ("annotations", k) in flagged:
                continue  # its image raises the problem when loaded
            if not isinstance(a, Mapping) or not all(key in a for key in ("image_id", "file_name", "segments_info")):
                raise DataError(self.annotation_file,
                                f"annotation #{k} needs 'image_id', 'file_name' and 'segments_info'")
            if a["image_id"] in anns:
                raise DataError(self.annotation_file, f"image_id {a['image_id']!r} has two annotations",
                                "keep one annotation per image")
            anns[a["image_id"]] = a
        self._anns = anns
        images = self._listed_images(doc, flagged)
        missing = [im["id"] for im in images if im["id"] not in anns and im["id"] not in self._bad]
        if missing:
            raise DataError(self.annotation_file, f"images {missing[:10]} have no annotation (segments_info)",
                            "every image needs an entry in 'annotations'")
        self.images = images
        self.ids = [im["id"] for im in images]

    @property
    def num_things(self) -> int:
        """Thing categories plus the background: Panoptic FPN's ``num_things``."""
        return len(self.thing_ids) + 1

    @property
    def num_stuff(self) -> int:
        return len(self.stuff_ids)

    @property
    def thing_class(self) -> int:
        """The semantic map's 'thing' class (= the number of stuff categories)."""
        return len(self.stuff_ids)

    def load(self, index: int) -> dict[str, Any]:
        """The sample at ``index`` before ``transforms``."""
        info = self.images[index]
        if info["id"] in self._bad:
            raise self._bad[info["id"]][0]
        ann = self._anns[info["id"]]
        path = self.image_path(info["file_name"])
        image = read_image(path, self.image_mode)
        h, w = int(image.shape[0]), int(image.shape[1])
        png = self.png_dir / ann["file_name"]
        id_map = read_panoptic_png(png).astype(np.int64)
        if id_map.shape != (h, w):
            raise DataError(png, f"panoptic PNG is {id_map.shape[1]}x{id_map.shape[0]} but its image {path.name} "
                                 f"is {w}x{h}")
        uniq, inv = np.unique(id_map, return_inverse=True)
        inv = inv.reshape(h, w)
        pos = {int(v): i for i, v in enumerate(uniq.tolist())}
        sem_of = np.full(len(uniq), IGNORE_INDEX, np.int64)  # VOID and unknown ids stay 255
        segments, things = [], []
        for s in ann["segments_info"]:
            sid, cid, crowd = int(s["id"]), int(s["category_id"]), bool(s.get("iscrowd", 0))
            if cid in self._label_of:
                isthing = True
            elif cid in self._stuff_of:
                isthing = False
            else:
                raise DataError(self.annotation_file, f"image {info['id']}: segment {sid} has category {cid}, "
                                "which is not in 'categories'")
            if sid not in pos or sid == 0:
                continue  # listed but not painted: nothing to learn or score
            segments.append({"id": sid, "category_id": cid, "iscrowd": int(crowd), "isthing": isthing})
            if not crowd:
                sem_of[pos[sid]] = self.thing_class if isthing else self._stuff_of[cid]
            if isthing:
                things.append((pos[sid], sid, cid, crowd))
        unknown = sorted(set(pos) - {s["id"] for s in segments} - {0})
        if unknown:
            raise DataError(png, f"segment ids {unknown[:10]} are in the PNG but not in the segments_info of "
                                 f"image {info['id']}")
        masks = torch.from_numpy(np.stack([inv == p for p, *_ in things]) if things else np.zeros((0, h, w), bool))
        from pixelwise.data.transforms import _boxes_from_masks  # the same box rule as the transforms

        instances = {
            "boxes": _boxes_from_masks(masks),
            "labels": torch.tensor([self._label_of[cid] for _, _, cid, _ in things], dtype=torch.int64),
            "masks": masks,
            "iscrowd": torch.tensor([crowd for *_, crowd in things], dtype=torch.bool),
            "category_ids": torch.tensor([cid for _, _, cid, _ in things], dtype=torch.int64),
            "segment_ids": torch.tensor([sid for _, sid, _, _ in things], dtype=torch.int64),
        }
        chw = image[:, :, None] if image.ndim == 2 else image
        return {"image": torch.from_numpy(np.ascontiguousarray(chw.transpose(2, 0, 1))).float().div_(255.0),
                "instances": instances,
                "semantic": torch.from_numpy(sem_of[inv]),
                "panoptic": torch.from_numpy(id_map),
                "segments": segments,
                "meta": {"id": str(info["id"]), "image_id": info["id"], "file": str(path),
                         "file_name": ann["file_name"], "size": (h, w)}}

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({str(self.annotation_file)!r}, n={len(self)}, "
                f"things={len(self.thing_ids)}, stuff={len(self.stuff_ids)})")
