"""COCO instance annotations: read (polygons, RLE, ``iscrowd``) and write (polygons or RLE).

Reading: :class:`CocoInstances` is a dataset over an annotation JSON and its images. A
sample is ``{"image": float (C, H, W) in [0, 1], "instances": {"boxes" (K, 4) float xyxy
(x2, y2 exclusive, from the masks), "labels" (K,) int64 contiguous 1..N (0 = background),
"masks" (K, H, W) bool, "iscrowd" (K,) bool, "category_ids" (K,) int64, "ann_ids" (K,)},
"meta": {"id", "image_id", "file", "size"}}``. Label ``i`` is ``dataset.category_ids[i]``;
``dataset.classes`` is ``[background, *categories]`` (:class:`~pixelwise.data.classes.ClassInfo`).
A category called ``_background_`` / ``background`` (labelme writes one) is not a class.

Where the files are (:func:`find_coco_annotations`): ``data`` is the JSON itself, or a folder
with ``annotations/instances_{split}.json`` (COCO, and ``pixelwise data synth``),
``annotations/instances_{split}2017.json``, ``{split}.json`` or ``annotations.json``
(labelme). Image ``file_name`` is looked up relative to the image root (the JSON's folder,
or its parent for an ``annotations/`` folder), then under ``{split}/``, ``{split}2017/``,
``images/`` and ``JPEGImages/``.

Writing: :func:`annotation_from_mask` turns a bool mask into an annotation; with
``encoding="auto"`` a mask that is one simply-connected region gets an exact polygon along
the pixel edges (verified by rasterising it back), any other mask compressed RLE.
:func:`write_coco_instances` writes the JSON atomically.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pixelwise.data.formats.base import SampleDataset
from pixelwise.data.classes import ClassInfo, palette
from pixelwise.data.io import atomic_write_text, read_image
from pixelwise.errors import DataError

__all__ = [
    "CocoImageDataset",
    "CocoInstances",
    "annotation_from_mask",
    "coco_field_problems",
    "decode_segmentation",
    "encode_rle",
    "find_coco_annotations",
    "find_coco_image",
    "is_coco_dataset",
    "mask_api",
    "mask_to_polygon",
    "segmentation_problem",
    "voc_to_coco_instances",
    "write_coco_instances",
]

BACKGROUND_NAMES = {"_background_", "background", "__background__", "__ignore__"}


def mask_api():
    """``pycocotools.mask`` (or faster-coco-eval's identical ``mask`` module)."""
    try:
        import pycocotools.mask as m
    except ImportError:
        try:
            import faster_coco_eval.core.mask as m  # type: ignore[no-redef]
        except ImportError:
            raise DataError("COCO", "reading/writing COCO masks needs pycocotools or faster-coco-eval",
                            "pip install 'pixelwise[coco]'") from None
    return m


# ---------------------------------------------------------------------------------------
# masks <-> segmentation
# ---------------------------------------------------------------------------------------


def _have_mask_api() -> bool:
    try:
        mask_api()
    except DataError:
        return False
    return True


def rle_counts(mask: np.ndarray) -> list[int]:
    """Uncompressed COCO RLE counts of a bool (H, W) mask: run lengths in column-major
    order, starting with a (possibly empty) run of zeros."""
    flat = np.asarray(mask, bool).flatten(order="F")
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        runs = [0] + runs
    return [int(r) for r in runs]


def compress_counts(counts: list[int]) -> str:
    """COCO's compressed RLE string of run lengths (maskApi's rleToString: each count, minus
    the count two before it from the third on, in 5-bit groups with a continuation bit, + 48)."""
    out = []
    for i, x in enumerate(counts):
        if i > 2:
            x -= counts[i - 2]
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = (x != -1) if (c & 0x10) else (x != 0)
            if more:
                c |= 0x20
            out.append(chr(c + 48))
    return "".join(out)


def encode_rle(mask: np.ndarray) -> dict[str, Any]:
    """bool (H, W) -> compressed RLE ``{"size": [H, W], "counts": str}`` (JSON-ready; the
    same string pycocotools writes, computed without it)."""
    mask = np.asarray(mask, bool)
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": compress_counts(rle_counts(mask))}


def decode_segmentation(segm: Any, height: int, width: int) -> np.ndarray:
    """A COCO ``segmentation`` (polygon list, uncompressed or compressed RLE) -> bool (H, W)."""
    m = mask_api()
    if isinstance(segm, list):
        if not segm:
            return np.zeros((height, width), bool)
        polys = [p for p in segm if len(p) >= 6]
        if not polys:
            return np.zeros((height, width), bool)
        rle = m.merge(m.frPyObjects(polys, height, width))
    elif isinstance(segm, dict):
        if isinstance(segm.get("counts"), list):  # uncompressed RLE
            rle = m.frPyObjects(segm, *segm["size"])
        else:
            counts = segm["counts"]
            rle = {"size": segm["size"], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    else:
        raise ValueError(f"unknown segmentation type {type(segm).__name__}")
    out = m.decode(rle).astype(bool)
    if out.shape != (height, width):
        raise ValueError(f"segmentation of size {out.shape[1]}x{out.shape[0]} in an image of {width}x{height}")
    return out


POLYGON_TOLERANCE = 1.0  # pixels a polygon vertex may lie outside the image (edge coordinates, rounding)


def segmentation_problem(segm: Any, height: int, width: int) -> str | None:
    """What is wrong with a COCO ``segmentation`` for an image of ``width`` x ``height``, or
    None: a polygon that is not a flat list of numeric (x, y) pairs, vertices outside the
    image (by more than :data:`POLYGON_TOLERANCE` px: the mask would be clipped silently), or
    an RLE of another size. Polygons of fewer than 3 points are not an error here (they have
    no area and :func:`decode_segmentation` leaves them out)."""
    if isinstance(segm, list):
        for k, poly in enumerate(segm):
            if not isinstance(poly, (list, tuple)) or not all(isinstance(v, (int, float)) for v in poly):
                return f"polygon {k} is not a flat list of numbers [x0, y0, x1, y1, ...]"
            if len(poly) % 2:
                return f"polygon {k} has an odd number of coordinates ({len(poly)}): it needs (x, y) pairs"
            if len(poly) < 6:  # fewer than 3 points: no area, left out by decode_segmentation
                continue
            xs, ys = np.asarray(poly[0::2], float), np.asarray(poly[1::2], float)
            if not (np.isfinite(xs).all() and np.isfinite(ys).all()):
                return f"polygon {k} has non-finite coordinates"
            t = POLYGON_TOLERANCE
            if xs.min() < -t or ys.min() < -t or xs.max() > width + t or ys.max() > height + t:
                return (f"polygon {k} has points outside the {width}x{height} image (x {xs.min():g}..{xs.max():g}, "
                        f"y {ys.min():g}..{ys.max():g})")
        return None
    if isinstance(segm, dict):
        size = segm.get("size")
        if not (isinstance(size, (list, tuple)) and len(size) == 2) or "counts" not in segm:
            return "RLE segmentation needs 'size' [height, width] and 'counts'"
        if [int(v) for v in size] != [int(height), int(width)]:
            return f"RLE of size {size[1]}x{size[0]} in an image of {width}x{height} (width x height)"
        return None
    return f"unknown segmentation type {type(segm).__name__} (expected polygons or RLE)"


def mask_to_polygon(mask: np.ndarray) -> list[float] | None:
    """The outline of a simply-connected bool mask as one polygon along pixel edges
    ``[x0, y0, x1, y1, ...]`` (pixel (r, c) is the square [c, c+1] x [r, r+1]), or None when
    the mask is empty, has several regions or holes, or touches itself diagonally."""
    m = np.pad(np.asarray(mask, bool), 1)
    if not m.any():
        return None
    # directed edges with the inside on the left when walking; vertices in padded coordinates
    nxt: dict[tuple[int, int], tuple[int, int]] = {}
    ys, xs = np.nonzero(m[1:, :] != m[:-1, :])  # horizontal edge between rows y and y+1, at y+1
    for y, x in zip(ys.tolist(), xs.tolist()):
        a, b = ((x, y + 1), (x + 1, y + 1)) if m[y + 1, x] else ((x + 1, y + 1), (x, y + 1))
        if a in nxt:
            return None
        nxt[a] = b
    ys, xs = np.nonzero(m[:, 1:] != m[:, :-1])  # vertical edge between columns x and x+1, at x+1
    for y, x in zip(ys.tolist(), xs.tolist()):
        a, b = ((x + 1, y + 1), (x + 1, y)) if m[y, x + 1] else ((x + 1, y), (x + 1, y + 1))
        if a in nxt:
            return None
        nxt[a] = b
    start = next(iter(nxt))
    loop = [start]
    v = nxt[start]
    while v != start:
        loop.append(v)
        v = nxt[v]
    if len(loop) != len(nxt):  # several loops: several regions or holes
        return None
    pts = []  # drop collinear vertices
    n = len(loop)
    for i in range(n):
        (x0, y0), (x1, y1), (x2, y2) = loop[i - 1], loop[i], loop[(i + 1) % n]
        if (x1 - x0) * (y2 - y1) - (y1 - y0) * (x2 - x1) != 0:
            pts.append((x1 - 1, y1 - 1))
    return [float(c) for p in pts for c in p]


def _bbox_of(mask: np.ndarray) -> list[float]:
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if rows.size == 0:
        return [0.0, 0.0, 0.0, 0.0]
    return [float(cols[0]), float(rows[0]), float(cols[-1] + 1 - cols[0]), float(rows[-1] + 1 - rows[0])]


def annotation_from_mask(mask: np.ndarray, image_id: int, category_id: int, ann_id: int, iscrowd: int = 0,
                         encoding: str = "auto") -> dict[str, Any]:
    """A COCO annotation for a bool (H, W) mask; ``encoding``: ``"auto"`` (exact polygon when
    possible, else RLE), ``"rle"`` or ``"polygon"`` (raises if the mask has no exact polygon).
    Crowd regions are always RLE (the COCO convention)."""
    if encoding not in ("auto", "rle", "polygon"):
        raise ValueError(f"encoding must be 'auto', 'rle' or 'polygon', got {encoding!r}")
    mask = np.asarray(mask, bool)
    segm: Any = None
    if encoding != "rle" and not iscrowd:
        poly = mask_to_polygon(mask)
        if poly is not None and (not _have_mask_api()  # the tracing is exact; verify when we can
                                 or np.array_equal(decode_segmentation([poly], *mask.shape), mask)):
            segm = [poly]
        elif encoding == "polygon":
            raise ValueError("mask has no exact single-polygon outline (several regions, holes or diagonal touches)")
    if segm is None:
        segm = encode_rle(mask)
    return {"id": int(ann_id), "image_id": int(image_id), "category_id": int(category_id), "segmentation": segm,
            "area": float(mask.sum()), "bbox": _bbox_of(mask), "iscrowd": int(bool(iscrowd))}


def write_coco_instances(path: str | os.PathLike, images: Sequence[dict[str, Any]],
                         annotations: Sequence[dict[str, Any]], categories: Sequence[dict[str, Any]],
                         info: dict[str, Any] | None = None) -> Path:
    """Atomically write a COCO instance JSON (images, annotations, categories)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"info": info or {"description": "written by pixelwise"}, "licenses": [], "images": list(images),
           "annotations": list(annotations), "categories": list(categories)}
    atomic_write_text(path, json.dumps(doc, separators=(",", ":")) + "\n", fsync=False)
    return path


# ---------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------
# field types: one line per malformed entry, never a traceback or a silent misreading
# ---------------------------------------------------------------------------------------


def is_int(value: Any) -> bool:
    """A JSON integer (not a bool, a string or a list)."""
    return isinstance(value, int) and not isinstance(value, bool)


ID_FIX = "COCO ids are plain integers: write 3, not \"3\" or [3]"


def unwrap_id(value: Any) -> int | None:
    """The integer a malformed id stands for (``[3]`` or ``"3"`` -> 3), else None."""
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return value if is_int(value) else None


def crowd_problem(value: Any) -> str | None:
    """What is wrong with an ``iscrowd`` value (0, 1, false or true), or None."""
    if value is None or value in (0, 1) and isinstance(value, (int, bool)):
        return None
    return f"field 'iscrowd' must be 0 or 1, got {value!r}"


def rle_counts_problem(segm: Any) -> str | None:
    """What is wrong with an RLE's ``counts`` (a compressed string or a list of run lengths)."""
    if not isinstance(segm, dict) or "counts" not in segm:
        return None
    counts = segm["counts"]
    if isinstance(counts, str) or (isinstance(counts, list) and all(is_int(v) and v >= 0 for v in counts)):
        return None
    return (f"field 'segmentation.counts' must be a string (compressed RLE) or a list of non-negative run lengths, "
            f"got {type(counts).__name__} {counts!r}"[:200])


def _list(doc: Any, key: str) -> list:
    value = doc.get(key) if isinstance(doc, dict) else None
    return value if isinstance(value, list) else []


def coco_field_problems(doc: dict[str, Any], path: str | os.PathLike
                        ) -> tuple[list[DataError], dict[Any, list[DataError]], set[tuple[str, int]]]:
    """Malformed fields of a COCO instance JSON, each a DataError naming the file, the entry
    and the field: ids that are not integers (lists, strings), ``iscrowd`` other than 0/1,
    an RLE whose ``counts`` is neither a string nor a list, an ``image_id`` that is a string
    or names no image.

    Returns ``(general, by_image, flagged)``: problems that belong to no single image (a
    category, an annotation of no known image), problems of one image, keyed by its image id
    (``("images", k)`` for a malformed image entry) (a dataset raises them when loading that
    image, so
    ``--skip-bad-samples`` leaves the image out), and the ``(list name, index)`` of every
    flagged entry.
    """
    general: list[DataError] = []
    by_image: dict[Any, list[DataError]] = {}
    flagged: set[tuple[str, int]] = set()
    for k, c in enumerate(_list(doc, "categories")):
        if not isinstance(c, dict):
            general.append(DataError(path, f"categories[{k}] is not an object: {c!r}"[:200]))
        elif not is_int(c.get("id")):
            general.append(DataError(path, f"categories[{k}] ({c.get('name')!r}): field 'id' must be an integer, "
                                     f"got {c.get('id')!r}", ID_FIX))
        else:
            continue
        flagged.add(("categories", k))
    image_ids: set[int] = set()
    for k, im in enumerate(_list(doc, "images")):
        if not isinstance(im, dict):
            e = DataError(path, f"images[{k}] is not an object: {im!r}"[:200])
        elif not is_int(im.get("id")):
            e = DataError(path, f"images[{k}] ({im.get('file_name')!r}): field 'id' must be an integer, "
                          f"got {im.get('id')!r}", ID_FIX)
        elif not isinstance(im.get("file_name"), str):
            e = DataError(path, f"images[{k}] (id {im['id']}): field 'file_name' must be a string, "
                          f"got {im.get('file_name')!r}")
        else:
            image_ids.add(im["id"])
            continue
        by_image[("images", k)] = [e]  # a sample of its own, which fails to load
        flagged.add(("images", k))
        alias = unwrap_id(im.get("id")) if isinstance(im, dict) else None
        if alias is not None:
            flagged.add(("image_alias", alias))
    for k, a in enumerate(_list(doc, "annotations")):
        if not isinstance(a, dict):
            general.append(DataError(path, f"annotations[{k}] is not an object: {a!r}"[:200]))
            flagged.add(("annotations", k))
            continue
        where = f"annotations[{k}] (id {a.get('id')!r})"
        iid = a.get("image_id")
        if not is_int(iid):
            e = DataError(path, f"{where}: field 'image_id' must be an integer, got {iid!r}", ID_FIX)
            match = int(iid) if isinstance(iid, str) and iid.strip().isdigit() else None
            (by_image.setdefault(match, []) if match in image_ids else general).append(e)
            flagged.add(("annotations", k))
            continue
        if iid not in image_ids and ("image_alias", iid) in flagged:
            flagged.add(("annotations", k))  # an annotation of a malformed image entry: that image reports it
            continue
        problems = []
        for key in ("id", "category_id"):
            if key in a and not is_int(a[key]):
                problems.append(f"field '{key}' must be an integer, got {a[key]!r}")
        for problem in (crowd_problem(a.get("iscrowd")), rle_counts_problem(a.get("segmentation"))):
            if problem:
                problems.append(problem)
        if problems:
            e = DataError(path, f"{where} of image {iid}: {problems[0]}",
                          ID_FIX if "integer" in problems[0] else "fix the annotation")
            (by_image.setdefault(iid, []) if iid in image_ids else general).append(e)
            flagged.add(("annotations", k))
    return general, by_image, flagged


def find_coco_annotations(data: str | os.PathLike, split: str = "train") -> tuple[Path, Path]:
    """(annotation JSON, image root) of a COCO dataset given as a JSON file or a folder."""
    data = Path(data)
    if data.is_file():
        ann = data
    else:
        candidates = [data / "annotations" / f"instances_{split}.json", data / "annotations" / f"instances_{split}2017.json",
                      data / f"{split}.json", data / "annotations.json"]
        found = [c for c in candidates if c.is_file()]
        if not found:
            raise DataError(data, f"no COCO annotation file for split {split!r}",
                            f"expected one of: {', '.join(str(c.relative_to(data)) for c in candidates)}")
        ann = found[0]
    root = ann.parent.parent if ann.parent.name == "annotations" else ann.parent
    return ann, root


def find_coco_image(root: str | os.PathLike, split: str, file_name: str) -> Path | None:
    """The image file an annotation's ``file_name`` names: looked up under ``root``, then
    ``root/{split}``, ``root/{split}2017``, ``root/images`` and ``root/JPEGImages``; None
    when it is in none of them."""
    root = Path(root)
    for base in (root, root / split, root / f"{split}2017", root / "images", root / "JPEGImages"):
        p = base / file_name
        if p.is_file():
            return p
    return None


def read_coco_json(path: Path, what: str, kind: str) -> dict[str, Any]:
    """The parsed annotation JSON at ``path``, which must hold ``images``, ``annotations`` and
    ``categories`` lists, else DataError (``cannot read {what}`` / ``not a {kind} file``)."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(path, f"cannot read {what} ({e})") from None
    for key in ("images", "annotations", "categories"):
        if not isinstance(doc.get(key), list):
            raise DataError(path, f"not a {kind} file: no '{key}' list")
    return doc


def is_coco_dataset(data: str | os.PathLike, split: str = "train") -> bool:
    """True when ``data`` is a COCO JSON, or a folder holding one for ``split`` (and no VOC labels)."""
    p = Path(data)
    if p.is_file():
        return p.suffix.lower() == ".json"
    try:
        find_coco_annotations(p, split)
    except DataError:
        return False
    return True


class CocoImageDataset(SampleDataset):
    """What the COCO instance and COCO panoptic datasets share: the annotation file's image
    list (entries with a problem kept as placeholders that raise it when loaded, so that
    ``--skip-bad-samples`` can count them), the image file lookup and the length."""

    #: how the image-not-found message names the annotation file
    annotation_kind = "COCO annotation file"
    images: list[dict[str, Any]]
    _bad: dict[Any, list[DataError]]

    def _setup(self, root: Path, split: str, transforms: Any, image_mode: str) -> None:
        self.root, self.split, self.transforms = root, split, transforms
        if image_mode not in ("RGB", "L"):
            raise ValueError(f"image_mode must be 'RGB' or 'L', got {image_mode!r}")
        self.image_mode = image_mode

    def _listed_images(self, doc: dict[str, Any], flagged: set) -> list[dict[str, Any]]:
        """The usable ``images`` entries sorted by id, then one placeholder per flagged entry."""
        images = sorted((im for k, im in enumerate(doc["images"]) if ("images", k) not in flagged),
                        key=lambda im: im["id"])
        return images + [{"id": key, "file_name": str(key)} for key in self._bad if isinstance(key, tuple)]

    def __len__(self) -> int:
        return len(self.images)

    def image_path(self, file_name: str) -> Path:
        p = find_coco_image(self.root, self.split, file_name)
        if p is not None:
            return p
        raise DataError(self.root / file_name, f"image of the {self.annotation_kind} not found",
                        "pass image_root= (the folder file_name is relative to)")


class CocoInstances(CocoImageDataset):
    """A COCO instance-segmentation dataset (see the module docstring for the sample format).

    Args:
        data: the annotation JSON, or a dataset folder (:func:`find_coco_annotations`).
        split: used to find the JSON in a folder and as an image sub-folder.
        transforms: called on each sample dict (:mod:`pixelwise.data.transforms`).
        image_mode: ``"RGB"`` or ``"L"``.
        image_root: where ``file_name`` is relative to (default: see module docstring).
        skip_empty: leave out images without any non-crowd annotation.
    """

    def __init__(self, data: str | os.PathLike, split: str = "train",
                 transforms: Callable[[dict[str, Any]], dict[str, Any]] | None = None, image_mode: str = "RGB",
                 image_root: str | os.PathLike | None = None, skip_empty: bool = False) -> None:
        self.annotation_file, root = find_coco_annotations(data, split)
        self._setup(Path(image_root) if image_root is not None else root, split, transforms, image_mode)
        doc = read_coco_json(self.annotation_file, "COCO JSON", "COCO instance")
        general, self._bad, flagged = coco_field_problems(doc, self.annotation_file)
        if general:
            raise general[0]
        cats = sorted((c for c in doc["categories"] if str(c.get("name", "")).lower() not in BACKGROUND_NAMES),
                      key=lambda c: c["id"])
        self.categories = cats
        self.category_ids = [0] + [int(c["id"]) for c in cats]
        self._label_of = {cid: i for i, cid in enumerate(self.category_ids) if i > 0}
        colors = palette(len(cats) + 1)
        self.classes = [ClassInfo(0, "background", False, (0, 0, 0))] + [
            ClassInfo(i, str(c["name"]), True, tuple(c["color"]) if isinstance(c.get("color"), list) and len(c["color"]) == 3
                      else tuple(colors[i]))
            for i, c in enumerate(cats, start=1)]
        self._anns: dict[int, list[dict[str, Any]]] = {}
        self._unknown: dict[Any, list[dict[str, Any]]] = {}  # annotations whose category is not listed
        known = {c.get("id") for c in doc["categories"] if isinstance(c, dict)}
        image_ids = {im["id"] for k, im in enumerate(doc["images"]) if ("images", k) not in flagged}
        for k, a in enumerate(doc["annotations"]):
            if ("annotations", k) in flagged:
                continue  # its image raises the problem when loaded
            if a.get("image_id") not in image_ids:
                raise DataError(self.annotation_file, f"annotations[{k}] (id {a.get('id')!r}): image_id "
                                f"{a.get('image_id')!r} is not in 'images': the annotation would be dropped",
                                "add the image to 'images' or remove the annotation")
            if a.get("category_id") in self._label_of:
                self._anns.setdefault(a["image_id"], []).append(a)
            elif a.get("category_id") not in known:
                self._unknown.setdefault(a.get("image_id"), []).append(a)
        images = self._listed_images(doc, flagged)
        if skip_empty:
            images = [im for im in images if im["id"] in self._bad
                      or any(not a.get("iscrowd", 0) for a in self._anns.get(im["id"], []))]
        self.images = images
        self.ids = [im["id"] for im in images]

    @property
    def num_classes(self) -> int:
        """Classes including the background (the ``num_classes`` of a Mask R-CNN)."""
        return len(self.classes)

    def load(self, index: int) -> dict[str, Any]:
        """The sample at ``index`` before ``transforms``."""
        info = self.images[index]
        if info["id"] in self._bad:
            raise self._bad[info["id"]][0]
        path = self.image_path(info["file_name"])
        image = read_image(path, self.image_mode)
        h, w = int(image.shape[0]), int(image.shape[1])
        if (info.get("height"), info.get("width")) not in ((h, w), (None, None)):
            raise DataError(path, f"image is {w}x{h} but the annotation file says {info['width']}x{info['height']}")
        if info["id"] in self._unknown:
            a = self._unknown[info["id"]][0]
            raise DataError(self.annotation_file, f"image {info['id']} ({info['file_name']}): annotation {a.get('id')} "
                            f"has unknown category_id {a.get('category_id')!r}",
                            "add the category to 'categories' or fix the annotation's category_id")
        anns = self._anns.get(info["id"], [])
        masks = np.zeros((len(anns), h, w), bool)
        for k, a in enumerate(anns):
            problem = segmentation_problem(a.get("segmentation"), h, w)
            if problem is not None:
                raise DataError(self.annotation_file, f"image {info['id']} ({info['file_name']}): annotation "
                                f"{a.get('id')}: {problem}", "fix the annotation (or the image size in 'images')")
            try:
                masks[k] = decode_segmentation(a["segmentation"], h, w)
            except (ValueError, KeyError, TypeError) as e:
                raise DataError(self.annotation_file, f"annotation {a.get('id')}: bad segmentation ({e})") from None
        keep = masks.reshape(len(anns), -1).any(1) if anns else np.zeros(0, bool)
        anns = [a for a, k in zip(anns, keep) if k]
        mt = torch.from_numpy(masks[keep])
        from pixelwise.data.transforms import _boxes_from_masks  # the same box rule as the transforms

        chw = image[:, :, None] if image.ndim == 2 else image
        instances = {
            "boxes": _boxes_from_masks(mt),
            "labels": torch.tensor([self._label_of[a["category_id"]] for a in anns], dtype=torch.int64),
            "masks": mt,
            "iscrowd": torch.tensor([bool(a.get("iscrowd", 0)) for a in anns], dtype=torch.bool),
            "category_ids": torch.tensor([int(a["category_id"]) for a in anns], dtype=torch.int64),
            "ann_ids": torch.tensor([int(a["id"]) for a in anns], dtype=torch.int64),
        }
        return {"image": torch.from_numpy(np.ascontiguousarray(chw.transpose(2, 0, 1))).float().div_(255.0),
                "instances": instances,
                "meta": {"id": str(info["id"]), "image_id": info["id"], "file": str(path), "size": (h, w)}}


    def __repr__(self) -> str:
        return (f"{type(self).__name__}({str(self.annotation_file)!r}, n={len(self)}, "
                f"categories={[c['name'] for c in self.categories]})")


def voc_to_coco_instances(root: str | os.PathLike, splits: Sequence[str] = ("train", "val"),
                          encoding: str = "auto") -> list[Path]:
    """Write ``root/annotations/instances_{split}.json`` from a VOC-layout dataset's instance
    maps (``SegmentationObject``: ids 1..K, 0 = none, 255 = ignore). The category of an
    instance is the most frequent class of its pixels in ``SegmentationClass`` (ignore and
    stuff classes left out; an instance with no thing pixel takes the first thing class);
    categories are the ``isthing`` classes of the dataset with their class ids. Splits
    without a split file are skipped. Returns the files written."""
    from pixelwise.data.formats.voc import iter_voc_splits

    root = Path(root)
    written = []
    for split, ds in iter_voc_splits(root, splits, with_instances=True):
        things = [c for c in ds.classes if c.isthing] or [c for c in ds.classes if c.id != 0]
        thing_ids = np.array([c.id for c in things])
        images, anns = [], []
        for index in range(len(ds)):
            s = ds.load(index)
            sem, inst = s["semantic"].numpy(), s["instance_map"].numpy()
            h, w = inst.shape
            image_id = index + 1
            images.append({"id": image_id, "file_name": Path(s["meta"]["file"]).relative_to(root).as_posix(),
                           "height": int(h), "width": int(w)})
            for k in np.unique(inst):
                if k == 0 or k == ds.ignore_index:
                    continue
                mask = inst == k
                counts = np.array([(sem[mask] == c).sum() for c in thing_ids])
                cat = int(thing_ids[int(counts.argmax())])
                anns.append(annotation_from_mask(mask, image_id, cat, len(anns) + 1, encoding=encoding))
        cats = [{"id": c.id, "name": c.name, "isthing": 1, "color": list(c.color)} for c in things]
        written.append(write_coco_instances(root / "annotations" / f"instances_{split}.json", images, anns, cats,
                                            info={"description": f"instances of {root.name} (from SegmentationObject)"}))
    return written
