"""``pixelwise data check DIR``: validate a dataset and report every problem at once.

The formats present are detected and each is checked in full (a ``pixelwise data synth``
folder holds all three):

- **VOC layout** (:mod:`pixelwise.data.formats.voc`): split files (missing ids, empty
  splits, a ``train`` or ``val`` split training could not open), every image (missing,
  unreadable, truncated), every label map decoded as training decodes it (unreadable, an RGB
  colour mask without a colour table, a JPEG, size different from the image, values that are
  no class id), the mask encoding (binary 0/255 said as a note; more than half ignore, binary
  masks under a table that calls 255 ignore: errors), instance maps (size);
- **the other semantic layouts** (``images/`` + ``masks/``, ``SPLIT/{images,masks}``, CVAT,
  Cityscapes, ADE20K; :mod:`pixelwise.data.formats.detect`): every split opened and every
  sample loaded through :func:`~pixelwise.data.formats.detect.open_semantic`, the code path
  training uses, so ``data check`` and ``train`` accept and refuse the same datasets;
- **COCO instances** (``annotations/instances_*.json`` or a JSON given directly,
  :mod:`pixelwise.data.formats.coco`): the JSON itself, images it references that are
  missing or unreadable or of another size than it says, annotations of unknown images or
  unknown categories, polygons with points outside the image, RLE of the wrong size,
  empty splits, a folder without a ``train`` split, malformed fields (ids that are lists or
  strings, ``iscrowd`` other than 0/1, an RLE ``counts`` that is a number: one line naming
  the file, the entry and the field, :func:`~pixelwise.data.formats.coco.coco_field_problems`);
- **COCO panoptic** (``annotations/panoptic_*.json`` + PNG folder,
  :mod:`pixelwise.data.formats.coco_panoptic`): the JSON and categories, every PNG
  (missing, unreadable, not RGB, size), ids in a PNG without a ``segments_info`` entry
  and entries without pixels (the checks of :func:`pixelwise.metrics.panoptic.pq_compute`),
  unknown categories, duplicate segment ids, images without annotation and vice versa,
  malformed fields (segments without ``category_id``, string ids,
  :func:`~pixelwise.data.formats.coco_panoptic.panoptic_field_problems`).

Images that are accepted but converted (16-bit, with alpha, grayscale, CMYK, ...) are
reported as warnings: training reads them (:func:`pixelwise.data.io.read_image_info`).
Problems are :class:`Problem` records (file, problem, fix, severity); the readers' own
:class:`~pixelwise.errors.DataError` messages are reused, so ``data check`` says what
training would say, for every file instead of the first.
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pixelwise.errors import DataError

__all__ = ["DatasetCheck", "Problem", "check_dataset", "detect_formats", "format_problems"]

VOC, COCO, PANOPTIC = "voc", "coco", "coco_panoptic"


@dataclass(frozen=True)
class Problem:
    """One problem found: the file, what is wrong, how to fix it; ``severity`` is
    ``"error"`` (training would stop or learn wrong labels) or ``"warning"`` (accepted and
    converted)."""

    file: str
    problem: str
    fix: str | None = None
    severity: str = "error"

    @classmethod
    def of(cls, e: DataError, severity: str = "error") -> Problem:
        return cls(e.path, e.problem, e.fix, severity)

    @property
    def is_error(self) -> bool:
        return self.severity == "error"


@dataclass
class DatasetCheck:
    """The checks of one dataset folder (or COCO JSON file). :meth:`run` fills
    :attr:`problems`, :attr:`formats` (``(format, file)`` pairs checked) and
    :attr:`num_images` (distinct image files read)."""

    root: Path
    image_mode: str | None = None
    val_fraction: float = 0.2
    seed: int = 0
    colors: str | None = None
    problems: list[Problem] = field(default_factory=list)
    formats: list[tuple[str, Path]] = field(default_factory=list)
    _images: dict[Path, tuple[int, int] | None] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.root = Path(self.root)

    @property
    def num_images(self) -> int:
        return len(self._images)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.is_error]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]

    @property
    def notes(self) -> list[Problem]:
        """How the data is read where it had to be guessed (e.g. binary 0/255 masks)."""
        return [p for p in self.problems if p.severity == "note"]

    # -- collecting ------------------------------------------------------------------------

    def error(self, file: object, problem: str, fix: str | None = None) -> None:
        self.problems.append(Problem(str(file), problem, fix, "error"))

    def warn(self, file: object, problem: str, fix: str | None = None) -> None:
        self.problems.append(Problem(str(file), problem, fix, "warning"))

    def image(self, path: Path) -> tuple[int, int] | None:
        """(H, W) of a readable image; problems and conversion notes are recorded once per file."""
        from pixelwise.data.io import read_image_info

        key = Path(os.path.abspath(path))
        if key in self._images:
            return self._images[key]
        hw = None
        try:
            a, note = read_image_info(path, self._mode())
        except DataError as e:
            self.problems.append(Problem.of(e))
        else:
            hw = (int(a.shape[0]), int(a.shape[1]))
            if note:
                self.warn(path, f"{note} (accepted and converted)")
        self._images[key] = hw
        return hw

    def _mode(self) -> str:
        if self.image_mode is None:  # an imported dataset says how it is read (regions.json)
            self.image_mode = "RGB"
            info = (self.root if self.root.is_dir() else self.root.parent) / "regions.json"
            try:
                mode = json.loads(info.read_text(encoding="utf-8")).get("image_mode")
            except (OSError, ValueError, AttributeError):
                mode = None
            if mode in ("RGB", "L"):
                self.image_mode = mode
        return self.image_mode

    # -- the whole dataset -----------------------------------------------------------------

    def run(self) -> DatasetCheck:
        if not self.root.exists():
            self.error(self.root, "dataset not found")
            return self
        found = detect_formats(self.root)
        layout = None
        if self.root.is_dir():
            from pixelwise.data.formats.detect import detect_layout

            try:
                layout = detect_layout(self.root)
            except DataError as e:
                if not found:  # no semantic layout and no COCO JSON: say what was expected
                    self.problems.append(Problem.of(e))
                    return self
            if layout is not None and layout != VOC:
                found = [(layout, self.root)] + [(f, p) for f, p in found if f != VOC]
        if not found:
            self.error(self.root, "no dataset found: neither a VOC layout (JPEGImages/, SegmentationClass/) nor a "
                       "COCO instances or panoptic JSON",
                       "point at the dataset folder, or create one with `pixelwise data synth --out DIR`")
            return self
        for fmt, path in found:
            self.formats.append((fmt, path))
            try:
                if fmt == VOC:
                    self.check_voc(path)
                    self.check_training_splits(path)
                elif fmt in (COCO, PANOPTIC):
                    {COCO: self.check_coco, PANOPTIC: self.check_panoptic}[fmt](path)
                else:
                    self.check_semantic(path, fmt)
            except DataError as e:  # a problem that stops this format's checks
                self.problems.append(Problem.of(e))
        self.check_coco_train_split(found)
        return self

    def check_coco_train_split(self, found: list[tuple[str, Path]]) -> None:
        """A COCO (or panoptic) folder whose JSONs hold no ``train`` split: training stops there."""
        if not self.root.is_dir():
            return  # a JSON given directly is its own split
        for kind, prefix in ((COCO, "instances_"), (PANOPTIC, "panoptic_")):
            jsons = [p for f, p in found if f == kind]
            if not jsons or any(p.name == "annotations.json" for p in jsons):
                continue
            splits = sorted({_split_of(p, prefix) for p in jsons})
            if "train" not in splits:
                name = f"annotations/{prefix}train.json"
                self.error(self.root / name, f"no train split: the {kind} JSONs hold only {', '.join(splits)}",
                           f"training reads {name}: add it (or rename a split's JSON)")

    # -- VOC layout ------------------------------------------------------------------------

    def check_voc(self, root: Path) -> None:
        from pixelwise.data.formats.voc import (
            CLASS_DIRS, IMAGE_DIR, OBJECT_DIRS, SPLIT_DIR, _index_images, _label_dir, find_voc_classes,
            label_map_problem,
        )
        from pixelwise.data.formats.folder import _read_instances
        from pixelwise.data.io import read_label

        num_classes: int | None
        try:
            classes, ignore = find_voc_classes(root)
            num_classes = len(classes)
        except DataError as e:
            self.problems.append(Problem.of(e))
            num_classes, ignore = None, 255
        image_dir = root / IMAGE_DIR
        images = _index_images(image_dir) if image_dir.is_dir() else {}
        if not image_dir.is_dir():
            self.error(image_dir, "image folder not found", "a VOC-layout dataset keeps its images in JPEGImages/")
        label_dir = _label_dir(root, CLASS_DIRS)
        if label_dir is None:
            self.error(root, f"no label folder with PNG files ({' or '.join(CLASS_DIRS)})",
                       "put one palette/index PNG per image in SegmentationClass/")
            return
        object_dir = _label_dir(root, OBJECT_DIRS)

        split_dir = root / SPLIT_DIR
        split_files = sorted(split_dir.glob("*.txt")) if split_dir.is_dir() else []
        ids: dict[str, None] = {}  # every id of every split, in order, once
        if not split_files:
            ids.update((p.stem, None) for p in sorted(label_dir.glob("*.png")))
        for sf in split_files:
            try:
                lines = sf.read_text(encoding="utf-8").splitlines()
            except (OSError, UnicodeDecodeError) as e:
                self.error(sf, f"cannot read split file: {e}")
                continue
            split_ids = [ln.split()[0] for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
            if not split_ids:
                self.error(sf, f"split {sf.stem!r} is empty: no image ids",
                           "list one image id (file name without extension) a line, or delete the file")
            for sid in split_ids:
                if sid in ids:
                    continue
                ids[sid] = None
                if sid not in images and image_dir.is_dir():
                    self.error(image_dir / sid, f"no image for id {sid!r} of split {sf.stem!r}",
                               f"expected {sid}.jpg, .jpeg or .png in {image_dir}")
                if not (label_dir / f"{sid}.png").is_file():
                    self.error(label_dir / f"{sid}.png", f"label file for id {sid!r} of split {sf.stem!r} not found")

        codec = self._voc_codec(root, label_dir)
        for sid in ids:
            hw = self.image(images[sid]) if sid in images else None
            for folder, n in ((label_dir, num_classes), (object_dir, None)):
                path = None if folder is None else folder / f"{sid}.png"
                if path is None or not path.is_file():
                    continue
                try:
                    if folder is object_dir:
                        label = _read_instances(path)
                    elif codec is not None and (codec.kind == "rgb" or codec.lut is not None):
                        label = codec.decode(path)  # as training decodes it (binary 0/255, colours, ...)
                        n = None  # the codec checked the values
                    else:  # ids as stored (or an encoding that could not be resolved: reported once)
                        label = read_label(path)
                        if codec is not None:
                            n, ignore = codec.num_classes, codec.ignore_index
                except DataError as e:
                    self.problems.append(Problem.of(e))
                    continue
                if hw is None:  # no usable image: only the label itself can be checked
                    hw = label.shape
                    if n is None:
                        continue
                problem = label_map_problem(label, path, hw, n, ignore)
                if problem is not None:
                    self.problems.append(Problem.of(problem))

    def _voc_codec(self, root: Path, label_dir: Path):
        """The mask encoding training resolves for this VOC folder (None, with the problem
        recorded, when it cannot be resolved)."""
        from pixelwise.data.classes import VOC_CLASSES
        from pixelwise.data.formats.detect import VOC_TABLES
        from pixelwise.data.formats.folder import check_ignore_share, find_class_table, resolve_codec

        masks = sorted(label_dir.glob("*.png"))
        try:
            _, codec = resolve_codec(root, masks, find_class_table(root, self.colors, VOC_TABLES), VOC_CLASSES)
            check_ignore_share(root, masks, codec)
        except DataError as e:
            self._once(Problem.of(e))
            return None
        return codec

    def _field_problems(self, doc: dict, found: tuple) -> dict:
        """Record the malformed-field problems of a COCO JSON; the document without the
        flagged entries (so the other checks do not trip over them)."""
        general, by_image, flagged = found
        for e in [*general, *(e for errors in by_image.values() for e in errors)]:
            self.problems.append(Problem.of(e))
        if not flagged:
            return doc
        doc = dict(doc)
        for key in ("categories", "images", "annotations"):
            if isinstance(doc.get(key), list):
                doc[key] = [x for k, x in enumerate(doc[key]) if (key, k) not in flagged]
        return doc

    # -- the semantic layouts (images/ + masks/, split folders, CVAT, Cityscapes, ADE20K) ------

    def check_semantic(self, root: Path, layout: str) -> None:
        """Open every split the way training does (:func:`~pixelwise.data.formats.detect.open_semantic`)
        and load every sample: the same readers, so the same errors."""
        from pixelwise.data.formats.detect import layout_splits, open_semantic

        seen: set[str] = set()
        for split in self._splits_to_open(root, layout, layout_splits(root, layout)):
            try:
                ds = open_semantic(root, split, image_mode=self._mode(), val_fraction=self.val_fraction,
                                   seed=self.seed, colors=self.colors)
            except DataError as e:
                self._once(Problem.of(e))
                continue
            for note in getattr(ds, "notes", ()):
                self._once(Problem(str(root), note, None, "note"))
            pairs = getattr(ds, "pairs", None)
            for i in range(len(ds)):
                key = str(pairs[i].image) if pairs is not None else f"{split}:{i}"
                if key in seen:
                    continue
                seen.add(key)
                if pairs is not None:
                    self.image(pairs[i].image)  # conversion notes as warnings, read once
                try:
                    ds.load(i)
                except DataError as e:
                    self._once(Problem.of(e))

    def _splits_to_open(self, root: Path, layout: str, splits: list[str]) -> list[str]:
        """Every split of the layout, and ``train`` / ``val`` (what training opens) always."""
        return list(dict.fromkeys(["train", "val", *splits]))

    def _once(self, problem: Problem) -> None:
        if problem not in self.problems:
            self.problems.append(problem)

    def check_training_splits(self, root: Path) -> None:
        """What training opens (``train`` and ``val`` of the VOC layout, the automatic split
        without ImageSets): a split it cannot open is an error here too."""
        from pixelwise.data.formats.detect import open_semantic

        for split in ("train", "val"):
            try:
                open_semantic(root, split, image_mode=self._mode(), val_fraction=self.val_fraction, seed=self.seed,
                              colors=self.colors)
            except DataError as e:
                self._once(Problem.of(e))

    # -- COCO instances --------------------------------------------------------------------

    def check_coco(self, path: Path) -> None:
        from pixelwise.data.formats.coco import BACKGROUND_NAMES, find_coco_image, segmentation_problem

        from pixelwise.data.formats.coco import coco_field_problems

        doc = _load_json(path)
        for key in ("images", "annotations", "categories"):
            if not isinstance(doc.get(key), list):
                raise DataError(path, f"not a COCO instance file: no '{key}' list",
                                "a COCO instance JSON has 'images', 'annotations' and 'categories' lists")
        doc = self._field_problems(doc, coco_field_problems(doc, path))
        split = _split_of(path, "instances_")
        root = path.parent.parent if path.parent.name == "annotations" else path.parent
        if not doc["images"]:
            self.error(path, f"split {split!r} is empty: the JSON lists no images", "add images or remove the file")
        cat_ids: set[Any] = set()
        for c in doc["categories"]:
            if not isinstance(c, dict) or "id" not in c:
                self.error(path, f"category {c!r} has no 'id'")
            elif c["id"] in cat_ids:
                self.error(path, f"category id {c['id']} is listed twice", "category ids must be unique")
            else:
                cat_ids.add(c["id"])
        if not [c for c in doc["categories"] if isinstance(c, dict)
                and str(c.get("name", "")).lower() not in BACKGROUND_NAMES]:
            self.error(path, "no categories (other than background)", "list the object categories in 'categories'")

        sizes: dict[Any, tuple[int, int] | None] = {}
        names: dict[Any, str] = {}
        for k, im in enumerate(doc["images"]):
            if not isinstance(im, dict) or "id" not in im or "file_name" not in im:
                self.error(path, f"images[{k}] needs 'id' and 'file_name'")
                continue
            if im["id"] in sizes:
                self.error(path, f"image id {im['id']!r} is listed twice", "image ids must be unique")
                continue
            names[im["id"]] = str(im["file_name"])
            file = find_coco_image(root, split, str(im["file_name"]))
            hw = None
            if file is None:
                self.error(root / str(im["file_name"]), f"image file not found (image {im['id']!r} of {path.name})",
                           "copy the image there, or fix 'file_name' (relative to the dataset folder)")
            else:
                hw = self.image(file)
                stated = (im.get("height"), im.get("width"))
                if hw is not None and stated != (None, None) and stated != hw:
                    self.error(file, f"image is {hw[1]}x{hw[0]} but {path.name} says {stated[1]}x{stated[0]} "
                               "(width x height)", "fix 'width'/'height' in the JSON, or the image")
            if hw is None and isinstance(im.get("height"), int) and isinstance(im.get("width"), int):
                hw = (im["height"], im["width"])
            sizes[im["id"]] = hw

        for k, a in enumerate(doc["annotations"]):
            if not isinstance(a, dict):
                self.error(path, f"annotations[{k}] is not an object")
                continue
            aid = a.get("id", f"#{k}")
            if a.get("image_id") not in sizes:
                self.error(path, f"annotation {aid} refers to image_id {a.get('image_id')!r}, which is not in 'images'",
                           "add the image to 'images' or remove the annotation")
                continue
            where = f"image {a['image_id']!r} ({names[a['image_id']]}): annotation {aid}"
            if a.get("category_id") not in cat_ids:
                self.error(path, f"{where} has unknown category_id {a.get('category_id')!r}",
                           "add the category to 'categories' or fix the annotation's category_id")
            segm = a.get("segmentation")
            if segm is None:
                self.error(path, f"{where} has no 'segmentation'")
                continue
            hw = sizes[a["image_id"]]
            if hw is None:
                continue
            problem = segmentation_problem(segm, *hw)
            if problem is not None:
                self.error(path, f"{where}: {problem}", "fix the annotation (or the image size in 'images')")
            elif isinstance(segm, list) and any(len(p) < 6 for p in segm):
                self.warn(path, f"{where}: a polygon has fewer than 3 points (no area): it is left out",
                          "remove degenerate polygons")

    # -- COCO panoptic ---------------------------------------------------------------------

    def check_panoptic(self, path: Path) -> None:
        from pixelwise.data.formats.coco import find_coco_image
        from pixelwise.data.formats.coco_panoptic import SegmentsInfo as _Segments
        from pixelwise.data.formats.coco_panoptic import annotations_by_image as _annotations
        from pixelwise.data.formats.coco_panoptic import format_ids as _fmt_ids
        from pixelwise.data.formats.coco_panoptic import json_category_table as _json_category_table
        from pixelwise.data.formats.coco_panoptic import read_panoptic_png as _read_id_png
        from pixelwise.data.formats.coco_panoptic import unknown_ids_error as _unknown_ids

        from pixelwise.data.formats.coco_panoptic import panoptic_field_problems

        doc = _load_json(path)
        doc = self._field_problems(doc, panoptic_field_problems(doc, path))
        split = _split_of(path, "panoptic_")
        root = path.parent.parent if path.parent.name == "annotations" else path.parent
        table = _json_category_table(doc, path, "a COCO panoptic JSON lists the categories with id and isthing")
        for cid, info in table.items():
            if "isthing" not in info:
                self.error(path, f"category {cid} has no 'isthing'", "mark every category isthing 0 or 1")
        anns = _annotations(doc, str(path))  # structure errors stop here (DataError)
        images = doc.get("images")
        if not isinstance(images, list):
            raise DataError(path, "has no 'images' list", "a COCO panoptic JSON lists its images")
        if not images and not anns:
            self.error(path, f"split {split!r} is empty: the JSON lists no images", "add images or remove the file")
        folder = path.with_suffix("")
        if not folder.is_dir():
            self.error(folder, "folder with the panoptic PNGs not found",
                       f"the PNGs of {path.name} belong in {folder.name}/ next to it")
        by_id: dict[Any, dict] = {}
        for k, im in enumerate(images):
            if not isinstance(im, dict) or "id" not in im or "file_name" not in im:
                self.error(path, f"images[{k}] needs 'id' and 'file_name'")
            else:
                by_id[im["id"]] = im
        for iid in by_id.keys() - anns.keys():
            self.error(path, f"image {iid!r} ({by_id[iid]['file_name']}) has no annotation (segments_info)",
                       "add an annotation for it, or remove the image")
        cat_ids = set(table)
        for iid, ann in anns.items():
            image = f"image {iid!r}"
            im = by_id.get(iid)
            if im is None:
                self.error(path, f"annotation of image_id {iid!r} ({ann['file_name']}) has no entry in 'images'",
                           "add the image to 'images' or remove the annotation")
            try:
                segs = _Segments(ann["segments_info"], cat_ids, str(path), image)
            except DataError as e:
                self.problems.append(Problem.of(e))
                segs = None
            png = folder / str(ann["file_name"])
            if not folder.is_dir():
                continue
            if not png.is_file():
                self.error(png, f"panoptic PNG not found ({image} of {path.name})",
                           f"write the PNG of every annotation into {folder.name}/")
                continue
            try:
                id_map = _read_id_png(png)
            except DataError as e:
                self.problems.append(Problem.of(e))
                continue
            if segs is not None:
                present = np.unique(id_map)
                if np.any((present != 0) & ~np.isin(present, segs.ids)):
                    self.problems.append(Problem.of(_unknown_ids(id_map, segs, str(png), image)))
                absent = segs.ids[~np.isin(segs.ids, present)]
                if absent.size:
                    self.error(png, f"{image}: segment ids {_fmt_ids(absent)} are in segments_info but not in the PNG",
                               "remove them from segments_info or paint them into the PNG")
            if im is None:
                continue
            hw = None
            file = find_coco_image(root, split, str(im["file_name"]))
            if file is None:
                self.error(root / str(im["file_name"]), f"image file not found ({image} of {path.name})",
                           "copy the image there, or fix 'file_name' (relative to the dataset folder)")
            else:
                hw = self.image(file)
            stated = (im.get("height"), im.get("width"))
            for size, what in ((hw, "its image"), (stated if None not in stated else None, path.name)):
                if size is not None and tuple(size) != id_map.shape:
                    self.error(png, f"{image}: panoptic PNG is {id_map.shape[1]}x{id_map.shape[0]} but {what} "
                               f"is {size[1]}x{size[0]} (width x height)", "the PNG must have the size of its image")


def _load_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise DataError(path, f"cannot read the JSON file: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise DataError(path, f"JSON file is not UTF-8 text: {e}") from None
    except json.JSONDecodeError as e:
        raise DataError(path, f"invalid JSON: {e.msg} at line {e.lineno} column {e.colno}",
                        "the file is corrupt or truncated: write it again") from None
    if not isinstance(data, dict):
        raise DataError(path, f"a COCO JSON must be an object, got a {type(data).__name__}")
    return data


def _split_of(path: Path, prefix: str) -> str:
    """``instances_val2017.json`` -> ``val``; ``train.json`` -> ``train``."""
    stem = path.stem
    if stem.startswith(prefix):
        stem = stem[len(prefix):]
    return stem[:-4] if stem.endswith("2017") else stem


def _json_kind(path: Path) -> str | None:
    """COCO or PANOPTIC for a dataset JSON, judged by name, else by content; None otherwise."""
    name = path.name.lower()
    if name.startswith("panoptic_"):
        return PANOPTIC
    if name.startswith("instances_"):
        return COCO
    if name in ("classes.json", "regions.json"):
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("annotations"), list) or "images" not in doc:
        return None
    if any(isinstance(a, dict) and "segments_info" in a for a in doc["annotations"]):
        return PANOPTIC
    return COCO if "categories" in doc else None


def detect_formats(root: str | os.PathLike) -> list[tuple[str, Path]]:
    """The formats found in ``root``, as ``(format, path)`` with format ``"voc"`` (path: the
    folder), ``"coco"`` or ``"coco_panoptic"`` (path: the JSON): a VOC layout (a label folder
    or ``ImageSets/Segmentation/``; ``JPEGImages/`` alone only when no COCO JSON is there, as
    labelme's COCO export keeps its images in ``JPEGImages/``), JSON files in ``annotations/``
    and in the folder itself; or the JSON file ``root`` is."""
    from pixelwise.data.formats.voc import CLASS_DIRS, IMAGE_DIR

    root = Path(root)
    if root.is_file():
        kind = _json_kind(root) if root.suffix.lower() == ".json" else None
        return [(kind, root)] if kind else []
    found: list[tuple[str, Path]] = []
    jsons = sorted((root / "annotations").glob("*.json")) + sorted(root.glob("*.json"))
    for j in jsons:
        kind = _json_kind(j)
        if kind:
            found.append((kind, j))
    # JPEGImages/ alone is VOC only without a COCO JSON: labelme's COCO export keeps its images there too
    has_labels = any((root / d).is_dir() for d in CLASS_DIRS) or (root / "ImageSets" / "Segmentation").is_dir()
    if has_labels or ((root / IMAGE_DIR).is_dir() and not found):
        found.insert(0, (VOC, root))
    return found


def check_dataset(root: str | os.PathLike, image_mode: str | None = None) -> list[Problem]:
    """Every problem of the dataset(s) in ``root`` (see the module docstring), errors and
    warnings, in the order found. ``image_mode`` ("RGB" or "L"; default: ``regions.json``'s,
    else RGB) is how images will be read, which decides what counts as a conversion."""
    return DatasetCheck(Path(root), image_mode).run().problems


def _short(path: str, root: Path) -> str:
    try:
        return str(Path(path).relative_to(root if root.is_dir() else root.parent))
    except ValueError:
        return path


def format_problems(problems: Sequence[Problem], root: str | os.PathLike | None = None, *,
                    max_same_warning: int = 3) -> str:
    """A table (level, file, problem, how to fix) with file paths relative to ``root``.
    Errors are listed one by one; more than ``max_same_warning`` warnings with the same text
    are folded into one row that names the first file and says how many more there are."""
    base = Path(root) if root is not None else None
    rows: list[tuple[str, str, str, str]] = []
    seen: dict[str, int] = {}
    folded: dict[str, list[Problem]] = {}
    for p in problems:
        if not p.is_error:
            folded.setdefault(p.problem, []).append(p)
    for p in problems:
        file = _short(p.file, base) if base is not None else p.file
        if not p.is_error and len(folded[p.problem]) > max_same_warning:
            if p.problem in seen:
                continue
            seen[p.problem] = 1
            file += f" (and {len(folded[p.problem]) - 1} more files)"
        rows.append((p.severity, file, p.problem, p.fix or ""))
    if not rows:
        return "no problems found"
    head = ("level", "file", "problem", "how to fix")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(3)]
    widths[1] = min(widths[1], 60)
    widths[2] = min(widths[2], 100)
    lines = []
    for r in [head, *rows]:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + "  " + r[3])
        if r is head:
            lines.append("  ".join("-" * w for w in widths) + "  " + "-" * 10)
    return "\n".join(line.rstrip() for line in lines)
