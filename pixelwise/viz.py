"""Pictures people look at: colour label maps, overlays, confusion matrices, curves."""
from __future__ import annotations

import colorsys
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch

__all__ = ["colorize", "overlay", "label_boundaries", "comparison_grid", "save_confusion_matrix", "save_curves",
           "save_per_class_bars", "titled_grid", "draw_labelled_masks",
           "instance_colors", "draw_instances", "segment_colors", "draw_panoptic",
           "panel_scale", "fit_panel", "fit_masks", "fit_ids", "GRID_SIDE"]

from pixelwise.data.classes import IGNORE_COLOR  # VOC's colour for the 'void' border


def colorize(label: np.ndarray, colors: Sequence[Sequence[int]], ignore_index: int = 255) -> np.ndarray:
    """(H, W) class ids -> (H, W, 3) uint8 colours; ``ignore_index`` gets VOC's void colour."""
    lut = np.zeros((256, 3), np.uint8)
    lut[: len(colors)] = np.asarray(colors, np.uint8)[:256]
    lut[ignore_index] = IGNORE_COLOR
    return lut[np.clip(label, 0, 255).astype(np.uint8)]


def label_boundaries(label: np.ndarray) -> np.ndarray:
    """(H, W) bool: pixels whose right or lower neighbour has another label."""
    b = np.zeros(label.shape, bool)
    b[:, :-1] |= label[:, :-1] != label[:, 1:]
    b[:-1, :] |= label[:-1, :] != label[1:, :]
    return b


def overlay(image: np.ndarray, label: np.ndarray, colors: Sequence[Sequence[int]], alpha: float = 0.5,
            ignore_index: int = 255, boundaries: bool = True) -> np.ndarray:
    """Blend the colour label map over an RGB (or grayscale) uint8 image; region boundaries
    are drawn in white so the segmentation stays visible where class colours resemble the image."""
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    image = image[..., :3]
    color = colorize(label, colors, ignore_index).astype(np.float32)
    out = np.clip((1 - alpha) * image.astype(np.float32) + alpha * color + 0.5, 0, 255).astype(np.uint8)
    if boundaries:
        out[label_boundaries(label)] = 255
    return out


def comparison_grid(rows: Sequence[Sequence[np.ndarray]], gap: int = 4) -> np.ndarray:
    """Tile equally sized (H, W, 3) uint8 panels into a grid (e.g. image | ground truth | prediction)."""
    h = max(p.shape[0] for r in rows for p in r)
    w = max(p.shape[1] for r in rows for p in r)
    ncol = max(len(r) for r in rows)
    grid = np.full((len(rows) * (h + gap) - gap, ncol * (w + gap) - gap, 3), 255, np.uint8)
    for i, r in enumerate(rows):
        for j, p in enumerate(r):
            p = p if p.ndim == 3 else np.repeat(p[..., None], 3, 2)
            grid[i * (h + gap): i * (h + gap) + p.shape[0], j * (w + gap): j * (w + gap) + p.shape[1]] = p[..., :3]
    return grid


def save_confusion_matrix(path: str | os.PathLike, confusion: Sequence[Sequence[int]], class_names: Sequence[str],
                          title: str = "confusion matrix\n(rows: ground truth, normalised per row)") -> Path:
    """Write the row-normalised confusion matrix as a PNG (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pixelwise.data.io import atomic_write_bytes

    cm = np.asarray(confusion, np.float64)
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    n = len(class_names)
    fig, ax = plt.subplots(figsize=(max(4.5, 1.0 + 0.6 * n), max(4.0, 0.8 + 0.6 * n)), dpi=100)
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), class_names, rotation=45, ha="right")
    ax.set_yticks(range(n), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("ground truth")
    ax.set_title(title, fontsize=9)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, f"{norm[i, j]:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if norm[i, j] > 0.5 else "black")
    fig.tight_layout()
    return _save_fig(fig, path, plt, atomic_write_bytes)


def save_curves(path: str | os.PathLike, history: list[dict], keys: Sequence[str] = ("train_loss", "miou")) -> Path:
    """Plot per-epoch curves (one panel per key) from ``metrics.jsonl`` records."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    from pixelwise.data.io import atomic_write_bytes

    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3), dpi=100)
    for ax, key in zip(np.atleast_1d(axes), keys):
        pts = [(h["epoch"] + 1, h[key]) for h in history if h.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_title(key)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save_fig(fig, path, plt, atomic_write_bytes)


def save_per_class_bars(path: str | os.PathLike, values: Sequence[float | None], class_names: Sequence[str],
                        title: str = "per-class IoU", xlabel: str = "IoU") -> Path:
    """Horizontal bars, one per class, with the value written at the end of each bar; a
    class without a value (None / NaN: absent from ground truth and prediction) reads "n/a"."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pixelwise.data.io import atomic_write_bytes

    vals = [float("nan") if v is None else float(v) for v in values]
    n = len(class_names)
    fig, ax = plt.subplots(figsize=(6, 0.8 + 0.35 * n), dpi=100)
    y = np.arange(n)
    ax.barh(y, [0.0 if np.isnan(v) else v for v in vals], color="#4878a8")
    for i, v in enumerate(vals):
        ax.text(0.01 if np.isnan(v) else min(v, 1.0) + 0.01, i, "n/a" if np.isnan(v) else f"{v:.3f}",
                va="center", fontsize=8)
    ax.set_yticks(y, class_names)
    ax.invert_yaxis()  # first class on top
    ax.set_xlim(0, 1.12)
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return _save_fig(fig, path, plt, atomic_write_bytes)


def titled_grid(rows: Sequence[Sequence[np.ndarray]], titles: Sequence[str], gap: int = 4) -> np.ndarray:
    """:func:`comparison_grid` with a white header band holding one title per column."""
    from PIL import Image, ImageDraw

    grid = comparison_grid(rows, gap)
    w = max(p.shape[1] for r in rows for p in r)
    band = Image.new("RGB", (grid.shape[1], 14), (255, 255, 255))
    draw = ImageDraw.Draw(band)
    for j, t in enumerate(titles):
        draw.text((j * (w + gap) + 2, 1), t, fill=(0, 0, 0))
    return np.concatenate([np.asarray(band), grid], axis=0)


def draw_labelled_masks(image: np.ndarray, masks: np.ndarray, texts: Sequence[str],
                        colors: Sequence[Sequence[int]], alpha: float = 0.5,
                        boxes: np.ndarray | None = None) -> np.ndarray:
    """uint8 (H, W, 3): each (H, W) bool mask blended in its colour, its outline drawn and its
    text (e.g. the class name, or "id class") written at the top-left of its bounding box. With
    ``boxes`` ((K, 4) xyxy, e.g. detections), each box is outlined too and its text written just
    above it (inside the image)."""
    from PIL import Image, ImageDraw

    rgb = image if image.ndim == 3 else np.repeat(image[:, :, None], 3, 2)
    if rgb.shape[2] == 1:
        rgb = np.repeat(rgb, 3, 2)
    canvas = rgb[..., :3].astype(np.float32).copy()
    for m, c in zip(masks, colors):
        canvas[m] = (1 - alpha) * canvas[m] + alpha * np.asarray(c, np.float32)
    out = np.clip(canvas + 0.5, 0, 255).astype(np.uint8)
    for m, c in zip(masks, colors):
        out[_mask_outline(m)] = c
    pil = Image.fromarray(out)
    draw = ImageDraw.Draw(pil)
    for k, (m, text, c) in enumerate(zip(masks, texts, colors)):
        c = tuple(int(v) for v in c)
        if boxes is not None:
            x1, y1, x2, y2 = [float(v) for v in boxes[k]]
            draw.rectangle([x1, y1, max(x1, x2 - 1), max(y1, y2 - 1)], outline=c, width=1)
            tb = draw.textbbox((x1, y1), text)
            x, y = x1 + 1, (y1 - (tb[3] - tb[1]) - 2 if y1 - (tb[3] - tb[1]) - 2 >= 0 else y1)
        else:
            ys, xs = np.nonzero(m)
            if len(ys) == 0:
                continue
            x, y = int(xs.min()), int(ys.min())
        if not text:
            continue
        tb = draw.textbbox((x, y), text)
        draw.rectangle(tb, fill=c)
        draw.text((x, y), text, fill=(0, 0, 0) if sum(c) > 380 else (255, 255, 255))
    return np.asarray(pil)


def _mask_outline(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` with a 4-neighbour outside it (or on the image border)."""
    p = np.pad(mask, 1, constant_values=False)
    inner = p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return mask & ~inner


def _save_fig(fig, path, plt, atomic_write_bytes) -> Path:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(Path(path), buf.getvalue())
    return Path(path)


def instance_colors(n: int, seed: int = 0) -> list[tuple[int, int, int]]:
    """``n`` well-separated saturated colours (golden-ratio hue steps)."""
    out = []
    for i in range(n):
        h = (seed * 0.1 + i * 0.618033988749895) % 1.0
        r, g, b = colorsys.hsv_to_rgb(h, 0.85, 0.95)
        out.append((int(r * 255), int(g * 255), int(b * 255)))
    return out


def draw_instances(image: np.ndarray, masks: np.ndarray, boxes: np.ndarray, labels: Iterable[int],
                   scores: Iterable[float], class_names: list[str], alpha: float = 0.5) -> np.ndarray:
    """uint8 (H, W, 3): :func:`draw_labelled_masks` of the instances, each in its own colour
    (:func:`instance_colors`), its box outlined and ``"class 0.93"`` written above it."""
    labels, scores = list(labels), list(scores)
    texts = [f"{class_names[lab] if 0 <= lab < len(class_names) else lab} {sc:.2f}" for lab, sc in zip(labels, scores)]
    return draw_labelled_masks(image, masks, texts, instance_colors(len(labels)), alpha, boxes=np.asarray(boxes))


def segment_colors(segments: Sequence[Mapping[str, Any]], categories: Sequence[Mapping[str, Any]]) -> list[tuple]:
    """One distinct colour per segment: a stuff segment keeps its category's colour (unless
    an earlier segment has it), things get well-separated hues (golden-ratio steps)."""
    cat_color = {int(c["id"]): tuple(int(v) for v in c.get("color", ())) for c in categories}
    used: set[tuple] = set()
    out = []
    k = 0

    def next_hue() -> tuple:
        nonlocal k
        while True:
            h = (k * 0.618033988749895) % 1.0
            sat = 0.85 if (k // 7) % 2 == 0 else 0.6
            k += 1
            r, g, b = colorsys.hsv_to_rgb(h, sat, 0.95)
            c = (int(r * 255), int(g * 255), int(b * 255))
            if c not in used:
                return c

    for s in segments:
        c = cat_color.get(int(s["category_id"])) if not s.get("isthing") else None
        if not c or len(c) != 3 or c in used:
            c = next_hue()
        used.add(c)
        out.append(c)
    return out


def draw_panoptic(image: np.ndarray, id_map: np.ndarray, segments: Sequence[Mapping[str, Any]],
                  categories: Sequence[Mapping[str, Any]], alpha: float = 0.5) -> np.ndarray:
    """uint8 (H, W, 3): every segment blended in its own colour (:func:`segment_colors`) and
    outlined; things labelled ``"{class} {segment id}"`` at the top-left of their box. VOID
    pixels keep the image."""
    names = {int(c["id"]): c["name"] for c in categories}
    masks = np.stack([id_map == int(s["id"]) for s in segments]) if segments else np.zeros((0, *id_map.shape), bool)
    texts = [f"{names.get(int(s['category_id']), s['category_id'])} {s['id']}" if s.get("isthing") else ""
             for s in segments]
    return draw_labelled_masks(image, masks, texts, segment_colors(segments, categories), alpha)


#: longest side of a report grid panel (smaller images are enlarged by a whole factor)
GRID_SIDE = 256


def panel_scale(h: int, w: int, side: int = GRID_SIDE) -> float:
    """The factor that brings an image's longest side to at most ``side``; images under
    ``side / 2`` are enlarged by a whole factor (pixel replication) to stay legible."""
    n = max(h, w, 1)
    if n > side:
        return side / n
    return float(side // n) if n < side // 2 else 1.0


def fit_panel(panel: np.ndarray, side: int = GRID_SIDE, nearest: bool = False) -> np.ndarray:
    """A (H, W, 3) uint8 panel scaled by :func:`panel_scale` (nearest for label colours)."""
    from PIL import Image

    h, w = panel.shape[:2]
    s = panel_scale(h, w, side)
    if s == 1.0:
        return panel
    if s > 1:
        k = int(s)
        return np.repeat(np.repeat(panel, k, axis=0), k, axis=1)
    size = (max(1, round(w * s)), max(1, round(h * s)))
    return np.asarray(Image.fromarray(panel).resize(size, Image.NEAREST if nearest else Image.BILINEAR))


def fit_masks(masks: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """(K, H, W) bool masks resized (nearest) to ``hw``."""
    if masks.shape[1:] == tuple(hw) or len(masks) == 0:
        return masks.reshape(len(masks), *hw) if len(masks) == 0 else masks
    t = torch.from_numpy(masks.astype(np.uint8))[None].float()
    return torch.nn.functional.interpolate(t, size=hw, mode="nearest")[0].numpy() > 0.5


def fit_ids(id_map: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """An (H, W) id map resized (nearest) to ``hw``."""
    if id_map.shape == tuple(hw):
        return id_map
    t = torch.from_numpy(id_map.astype(np.float64))[None, None]
    return torch.nn.functional.interpolate(t, size=hw, mode="nearest")[0, 0].numpy().astype(id_map.dtype)
