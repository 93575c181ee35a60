"""The built-in "shapes" dataset: small synthetic scenes for semantic, instance and panoptic
segmentation that a CNN learns in minutes on a CPU.

Each image is a landscape of three textured *stuff* regions separated by irregular curves
(0 sky: vertical blue gradient at the top; 1 grass: green, high-frequency texture; 2 water:
blue-cyan with horizontal waves) with 2-6 *thing* instances painted on top (3 circle,
4 rectangle, 5 triangle) of random size (10-40 % of the side), position and rotation. Each
thing class has its own hue range (circles red-orange, rectangles yellow, triangles
purple-magenta) with jitter, shading and noise, so classes can be told apart by shape and by
colour. Some instances touch or overlap: later ones occlude earlier ones, the instance map
holds the visible pixels only, and instances with fewer than :data:`MIN_VISIBLE_PIXELS`
visible pixels are dropped.

Rendering and writing are separate: :func:`render_sample` builds one in-memory
:class:`ShapesSample` (image, semantic map, instance map, instance list, border band) from a
random generator, :func:`iter_shapes` yields the samples of a split deterministically, and
:func:`write_voc_sample` / :func:`generate_shapes` write the VOC layout::

    out_dir/
      JPEGImages/{id}.png               RGB image (lossless PNG despite the folder name)
      SegmentationClass/{id}.png        palette PNG of class ids; 255 on a 2 px band around things
      SegmentationObject/{id}.png       palette PNG of instance ids 1..K, 0 = none, 255 on the band
      ImageSets/Segmentation/train.txt  one id a line (and val.txt)
      annotations/instances_train.json  the things as COCO instances (and _val; :func:`write_coco_split`)
      annotations/panoptic_train.json   COCO panoptic segments (and _val; PNGs in annotations/panoptic_train/)
      classes.json

Everything is a pure function of ``seed``: rerunning gives the same bytes.
"""
from __future__ import annotations

import colorsys
import math
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pixelwise.data.classes import IGNORE_INDEX, ClassInfo, palette_bytes, save_classes
from pixelwise.data.formats.coco_panoptic import write_coco_panoptic
from pixelwise.data.io import atomic_directory, atomic_write_text, write_image, write_label_png

__all__ = [
    "MIN_VISIBLE_PIXELS",
    "SHAPES_CLASSES",
    "ShapeInstance",
    "ShapesSample",
    "generate_shapes",
    "iter_shapes",
    "render_sample",
    "write_coco_split",
    "write_voc_sample",
]

SKY, GRASS, WATER, CIRCLE, RECTANGLE, TRIANGLE = range(6)

SHAPES_CLASSES: tuple[ClassInfo, ...] = (
    ClassInfo(SKY, "sky", False, (135, 206, 235)),
    ClassInfo(GRASS, "grass", False, (60, 160, 60)),
    ClassInfo(WATER, "water", False, (30, 80, 200)),
    ClassInfo(CIRCLE, "circle", True, (220, 40, 40)),
    ClassInfo(RECTANGLE, "rectangle", True, (240, 200, 30)),
    ClassInfo(TRIANGLE, "triangle", True, (190, 60, 220)),
)
"""Classes of the shapes dataset: stuff 0 sky, 1 grass, 2 water; things 3 circle,
4 rectangle, 5 triangle. Colours are for display only."""

MIN_VISIBLE_PIXELS = 20
"""Instances with fewer visible pixels than this are dropped from the scene."""

MIN_INSTANCES, MAX_INSTANCES = 2, 6

# Hue ranges (degrees) of the thing classes: disjoint from each other and from the stuff
# (green ~110, blue ~200-220).
_HUE_RANGE = {CIRCLE: (-15.0, 22.0), RECTANGLE: (40.0, 62.0), TRIANGLE: (275.0, 320.0)}


@dataclass(frozen=True)
class ShapeInstance:
    """One visible thing in a :class:`ShapesSample`.

    Attributes:
        id: value of the instance in ``instance_map`` (1..K, in painting order).
        class_id: 3 circle, 4 rectangle or 5 triangle.
        area: number of visible pixels.
        bbox: (x, y, width, height) of the visible pixels, COCO style, in pixels.
    """

    id: int
    class_id: int
    area: int
    bbox: tuple[int, int, int, int]


@dataclass
class ShapesSample:
    """One rendered scene.

    Attributes:
        image: uint8 (H, W, 3) RGB.
        semantic: uint8 (H, W) class id of every pixel (no ignore values).
        instance_map: uint8 (H, W) instance id 1..K of every visible thing pixel, 0 elsewhere.
        border: bool (H, W) the 2 px band along thing outlines (1 px each side) that VOC-style
            labels mark as ignore.
        instances: the K visible instances, ``instances[k].id == k + 1``.
    """

    image: np.ndarray
    semantic: np.ndarray
    instance_map: np.ndarray
    border: np.ndarray
    instances: list[ShapeInstance] = field(default_factory=list)

    def voc_semantic(self, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
        """Class ids with ``ignore_index`` on the border band, as in VOC's SegmentationClass."""
        out = self.semantic.copy()
        out[self.border] = ignore_index
        return out

    def voc_instance_map(self, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
        """Instance ids with ``ignore_index`` on the border band, as in VOC's SegmentationObject."""
        out = self.instance_map.copy()
        out[self.border] = ignore_index
        return out

    def masks(self) -> np.ndarray:
        """bool (K, H, W): the visible pixels of each instance, in ``instances`` order."""
        ids = np.array([inst.id for inst in self.instances], dtype=self.instance_map.dtype)
        return self.instance_map[None, :, :] == ids[:, None, None]


# ---------------------------------------------------------------------------------------
# rendering
# ---------------------------------------------------------------------------------------


def _random_waves(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, n: int,
                  wavelengths: tuple[float, float]) -> np.ndarray:
    """A smooth random field: the sum of ``n`` plane waves of random direction and phase."""
    out = np.zeros(np.broadcast_shapes(yy.shape, xx.shape), np.float32)
    for _ in range(n):
        angle = rng.uniform(0.0, math.pi)
        k = 2.0 * math.pi / rng.uniform(*wavelengths)
        phase = rng.uniform(0.0, 2.0 * math.pi)
        amp = rng.uniform(0.5, 1.0)
        out += amp * np.sin((k * math.cos(angle)) * xx + (k * math.sin(angle)) * yy + phase)
    return out


def _stuff_layout(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Class map of sky / grass / water and the horizon height per column."""
    h, w = yy.shape
    x = xx[0]
    horizon = np.full(w, h * rng.uniform(0.2, 0.5), np.float32)
    for k in range(1, 4):  # an irregular horizon: a few random low-frequency waves
        amp, freq, phase = h * rng.uniform(0.01, 0.06) / k, rng.uniform(0.5, 2.5) * k, rng.uniform(0, 2 * math.pi)
        horizon += amp * np.sin((2 * math.pi * freq / w) * x + phase)
    semantic = np.full((h, w), GRASS, np.uint8)
    sky = yy < horizon[None, :]
    semantic[sky] = SKY
    ground = ~sky
    if ground.any():  # water where a smooth random field exceeds a random level
        side = float(max(h, w))
        f = _random_waves(rng, yy, xx, 4, (0.5 * side, 1.5 * side))
        water_fraction = rng.uniform(0.0, 1.0)
        level = np.quantile(f[ground], 1.0 - water_fraction)
        semantic[ground & (f > level)] = WATER
    return semantic, horizon


def _color(rng: np.random.Generator, base: tuple[float, float, float], jitter: tuple[float, float]) -> np.ndarray:
    return (np.array(base) + rng.uniform(*jitter, 3)).astype(np.float32)


def _stuff_texture(rng: np.random.Generator, semantic: np.ndarray, horizon: np.ndarray,
                   yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """A float32 (H, W, 3) image (0..255 scale) that paints each stuff class with its texture."""
    h, w = semantic.shape
    image = np.empty((h, w, 3), np.float32)
    y, x = yy[:, :1], xx[:1, :]  # (H, 1) and (1, W) pixel-centre coordinates

    # sky: vertical blue gradient, darker at the top, low noise
    top, low = _color(rng, (40, 90, 190), (-15, 15)), _color(rng, (165, 205, 240), (-15, 10))
    t = np.clip(y / max(float(horizon.max()), 1.0), 0.0, 1.0)[:, :, None]  # (H, 1, 1)
    sky = (top + (low - top) * t) + 2.0 * rng.standard_normal((h, w, 1), dtype=np.float32)

    # grass: green with high-frequency texture (pixel noise and short blade-like streaks)
    base = _color(rng, (55, 135, 45), (-15, 15))
    blades = np.sin(rng.uniform(1.8, 2.6) * x + 2.5 * np.sin(rng.uniform(0.5, 0.9) * y))
    texture = 14.0 * blades + 20.0 * rng.standard_normal((h, w), dtype=np.float32)
    grass = base + texture[:, :, None] * np.array([0.45, 1.0, 0.35], np.float32)

    # water: blue-cyan with horizontal waves (slightly wobbling along x)
    base = _color(rng, (30, 115, 170), (-12, 12))
    k_y = 2 * math.pi / rng.uniform(5.0, 9.0)  # wave crests 5-9 px apart
    k_x = 2 * math.pi / rng.uniform(20.0, 40.0)
    phase = rng.uniform(0, 2 * math.pi)
    waves = 18.0 * np.sin(k_y * y + 0.8 * np.sin(k_x * x + phase))
    water = (base + waves[:, :, None] * np.array([0.6, 1.0, 1.0], np.float32)
             + 3.0 * rng.standard_normal((h, w, 1), dtype=np.float32))

    for cls, texture3 in ((SKY, sky), (GRASS, grass), (WATER, water)):
        region = semantic == cls
        image[region] = texture3[region]
    return image


def _shape_mask(rng: np.random.Generator, cls: int, cy: float, cx: float, s: float,
                yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """The bool mask of one shape of extent ``s`` pixels centred at (cy, cx)."""
    dx, dy = xx - cx, yy - cy
    if cls == CIRCLE:
        return dx * dx + dy * dy <= (s / 2) ** 2
    theta = rng.uniform(0.0, 2.0 * math.pi)
    if cls == RECTANGLE:
        half_w, half_h = s / 2, s * rng.uniform(0.45, 1.0) / 2
        cos, sin = math.cos(theta), math.sin(theta)
        u = cos * dx + sin * dy
        v = cos * dy - sin * dx
        return (np.abs(u) <= half_w) & (np.abs(v) <= half_h)
    # triangle: three vertices around the centre, angles jittered away from equilateral
    radius = 0.6 * s
    angles = theta + np.array([0.0, 2 * math.pi / 3, 4 * math.pi / 3]) + rng.uniform(-0.35, 0.35, 3)
    vx, vy = (radius * np.cos(angles)).tolist(), (radius * np.sin(angles)).tolist()
    inside = np.ones(xx.shape, bool)
    for i in range(3):  # left of every edge (vertices are in increasing angle order)
        j = (i + 1) % 3
        inside &= (vx[j] - vx[i]) * (dy - vy[i]) - (vy[j] - vy[i]) * (dx - vx[i]) >= 0
    return inside


def _place_shapes(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray
                  ) -> list[tuple[int, np.ndarray, tuple[float, float, float]]]:
    """Random shapes in painting order: (class id, full mask, (cy, cx, extent))."""
    h, w = yy.shape
    side = float(min(h, w))
    shapes: list[tuple[int, np.ndarray, tuple[float, float, float]]] = []
    for k in range(int(rng.integers(MIN_INSTANCES, MAX_INSTANCES + 1))):
        cls = int(rng.integers(CIRCLE, TRIANGLE + 1))
        s = side * rng.uniform(0.10, 0.40)
        if k > 0 and rng.uniform() < 0.35:  # put it against an earlier shape: touching / overlapping
            _, _, (py, px, ps) = shapes[int(rng.integers(0, k))]
            angle = rng.uniform(0.0, 2.0 * math.pi)
            dist = (ps + s) / 2 * rng.uniform(0.75, 1.0)
            cy, cx = py + dist * math.sin(angle), px + dist * math.cos(angle)
        else:
            cy, cx = rng.uniform(0.1, 0.9) * h, rng.uniform(0.1, 0.9) * w
        shapes.append((cls, _shape_mask(rng, cls, cy, cx, s, yy, xx), (cy, cx, s)))
    return shapes


def _ownership(masks: list[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """Which mask (1-based) owns each pixel when painted in order; 0 = none."""
    owner = np.zeros(shape, np.uint8)
    for i, m in enumerate(masks, start=1):
        owner[m] = i
    return owner


def _border_band(instance_map: np.ndarray) -> np.ndarray:
    """Pixels whose 8-neighbourhood holds another instance id, next to at least one thing."""
    h, w = instance_map.shape
    padded = np.pad(instance_map, 1, mode="edge")
    band = np.zeros((h, w), bool)
    is_thing = instance_map > 0
    for oy in (0, 1, 2):
        for ox in (0, 1, 2):
            if oy == 1 and ox == 1:
                continue
            other = padded[oy:oy + h, ox:ox + w]
            band |= (other != instance_map) & (is_thing | (other > 0))
    return band


def _paint_instance(rng: np.random.Generator, image: np.ndarray, mask: np.ndarray, cls: int,
                    cy: float, cx: float, s: float, yy: np.ndarray, xx: np.ndarray) -> None:
    """Fill ``mask`` with a class-coloured, shaded and noisy surface."""
    lo, hi = _HUE_RANGE[cls]
    hue = (rng.uniform(lo, hi) % 360.0) / 360.0
    rgb = np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.55, 0.95), rng.uniform(0.65, 0.95)), np.float32) * 255
    light = rng.uniform(0.0, 2.0 * math.pi)  # shading: brighter towards a random light direction
    ys, xs = yy[mask], xx[mask]
    proj = ((xs - cx) * math.cos(light) + (ys - cy) * math.sin(light)) * (1.0 / (s / 2 + 1e-6))
    shade = 1.0 + 0.2 * np.clip(proj, -1.0, 1.0)
    noise = 5.0 * rng.standard_normal((ys.size, 1), dtype=np.float32)
    image[mask] = rgb[None, :] * shade[:, None] + noise


def render_sample(rng: np.random.Generator, size: int | tuple[int, int] = 128) -> ShapesSample:
    """Render one scene from ``rng`` (the only source of randomness).

    Args:
        rng: a numpy Generator; the same generator state gives the same sample.
        size: side of a square image, or (height, width); at least 32.
    """
    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if min(h, w) < 32:
        raise ValueError(f"image size must be at least 32 pixels, got {h}x{w}")
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5  # pixel centres

    semantic, horizon = _stuff_layout(rng, yy, xx)
    image = _stuff_texture(rng, semantic, horizon, yy, xx)

    for _attempt in range(20):  # retry the (rare) layouts with fewer than 2 visible shapes
        shapes = _place_shapes(rng, yy, xx)
        counts = np.bincount(_ownership([m for _, m, _ in shapes], (h, w)).ravel(), minlength=len(shapes) + 1)
        # dropping a shape only uncovers pixels of earlier ones, so one pass suffices
        shapes = [sh for i, sh in enumerate(shapes, start=1) if counts[i] >= MIN_VISIBLE_PIXELS]
        if len(shapes) >= MIN_INSTANCES:
            break

    instance_map = _ownership([m for _, m, _ in shapes], (h, w))
    instances: list[ShapeInstance] = []
    for k, (cls, _, (cy, cx, s)) in enumerate(shapes, start=1):
        visible = instance_map == k
        _paint_instance(rng, image, visible, cls, cy, cx, s, yy, xx)
        semantic[visible] = cls
        rows, cols = np.flatnonzero(visible.any(axis=1)), np.flatnonzero(visible.any(axis=0))
        bbox = (int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1))
        instances.append(ShapeInstance(k, cls, int(visible.sum()), bbox))

    return ShapesSample(
        image=np.clip(np.rint(image), 0, 255).astype(np.uint8),
        semantic=semantic,
        instance_map=instance_map,
        border=_border_band(instance_map),
        instances=instances,
    )


def iter_shapes(split: str, num: int, size: int | tuple[int, int] = 128, seed: int = 0
                ) -> Iterator[tuple[str, ShapesSample]]:
    """Yield ``(id, sample)`` for the ``num`` images of a split, ids ``{split}_00000``...

    Image ``i`` of a split depends only on (seed, split, i): changing ``num`` or the other
    splits leaves it unchanged.
    """
    split_key = zlib.crc32(split.encode("utf-8"))
    for i in range(num):
        rng = np.random.default_rng([seed, split_key, i])
        yield f"{split}_{i:05d}", render_sample(rng, size)


# ---------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------


def write_voc_sample(root: str | Path, sample_id: str, sample: ShapesSample,
                     classes: Iterable[ClassInfo] = SHAPES_CLASSES, *, fsync: bool = False) -> None:
    """Write one sample's image, class map and object map into a VOC-layout folder."""
    root = Path(root)
    for sub in ("JPEGImages", "SegmentationClass", "SegmentationObject"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    write_image(root / "JPEGImages" / f"{sample_id}.png", sample.image, fsync=fsync)
    write_label_png(root / "SegmentationClass" / f"{sample_id}.png", sample.voc_semantic(),
                    palette_bytes(list(classes)), fsync=fsync)
    write_label_png(root / "SegmentationObject" / f"{sample_id}.png", sample.voc_instance_map(),
                    palette_bytes(None), fsync=fsync)


def generate_shapes(out_dir: str | Path, num_train: int = 200, num_val: int = 50,
                    size: int | tuple[int, int] = 128, seed: int = 0, overwrite: bool = False) -> Path:
    """Write the shapes dataset in VOC layout to ``out_dir`` and return its path.

    Besides the VOC folders it writes, per split, the things as COCO instances
    (``annotations/instances_{split}.json``) and the whole scene in COCO panoptic format
    (``annotations/panoptic_{split}.json`` + ``annotations/panoptic_{split}/`` PNGs; sky,
    grass, water are stuff, circle, rectangle, triangle things; image ids as in the instances
    file). The panoptic maps come from the exact semantic and instance maps (no ignore band).

    The dataset is built in a temporary folder next to ``out_dir`` and renamed into place at
    the end, so an interrupted run leaves nothing half-written. The same arguments always
    give byte-identical files.

    Raises:
        DataError: ``out_dir`` exists, is not empty, and ``overwrite`` is False.
    """
    if num_train < 0 or num_val < 0:
        raise ValueError("num_train and num_val must be >= 0")
    out_dir = Path(out_dir)
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        sets = tmp / "ImageSets" / "Segmentation"
        sets.mkdir(parents=True)
        for split, num in (("train", num_train), ("val", num_val)):
            ids, panoptic = [], []
            for index, (sample_id, sample) in enumerate(iter_shapes(split, num, size, seed), start=1):
                write_voc_sample(tmp, sample_id, sample)
                ids.append(sample_id)
                panoptic.append(_panoptic_record(index, sample_id, sample))
            atomic_write_text(sets / f"{split}.txt", "".join(f"{i}\n" for i in ids), fsync=False)
            write_coco_split(tmp, split, num, size, seed)  # annotations/instances_{split}.json
            write_coco_panoptic(tmp, split, panoptic, SHAPES_CLASSES,  # annotations/panoptic_{split}.json + PNGs
                                info={"description": "pixelwise shapes (panoptic)", "seed": seed})
        save_classes(SHAPES_CLASSES, tmp / "classes.json")
    return out_dir


def _panoptic_record(image_id: int, sample_id: str, sample: ShapesSample) -> dict:
    """One image of ``annotations/panoptic_{split}.json``: the exact (unbanded) semantic and
    instance maps, so the panoptic ground truth has no VOID pixels."""
    from pixelwise.data.formats.coco_panoptic import semantic_instance_to_panoptic

    id_map, segments = semantic_instance_to_panoptic(sample.semantic, sample.instance_map, SHAPES_CLASSES)
    return {"image_id": image_id, "file_name": f"JPEGImages/{sample_id}.png", "id_map": id_map, "segments": segments}


def write_coco_split(root: str | Path, split: str, num: int, size: int | tuple[int, int] = 128,
                     seed: int = 0) -> Path:
    """Write ``root/annotations/instances_{split}.json``: the things of the split as COCO
    instances (exact pixel-edge polygons where a mask is one region without holes, RLE
    otherwise); ``file_name`` is ``JPEGImages/{id}.png``, category ids are the class ids."""
    from pixelwise.data.formats.coco import annotation_from_mask, write_coco_instances

    images, anns = [], []
    for index, (sample_id, sample) in enumerate(iter_shapes(split, num, size, seed), start=1):
        h, w = sample.instance_map.shape
        images.append({"id": index, "file_name": f"JPEGImages/{sample_id}.png", "height": int(h), "width": int(w)})
        for inst, mask in zip(sample.instances, sample.masks()):
            anns.append(annotation_from_mask(mask, index, inst.class_id, len(anns) + 1))
    cats = [{"id": c.id, "name": c.name, "supercategory": "shape", "isthing": 1, "color": list(c.color)}
            for c in SHAPES_CLASSES if c.isthing]
    return write_coco_instances(Path(root) / "annotations" / f"instances_{split}.json", images, anns, cats,
                                info={"description": "pixelwise shapes", "seed": seed})
