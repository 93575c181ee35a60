"""Prediction on image files: a palette label PNG and a colour overlay per image.

Images of any size: ``unet_original`` always runs by overlap-tile; other models run the
whole image, or by sliding window with ``tile``/``overlap`` (large images, bounded
memory); ``flip``/``scales`` add test-time augmentation (see :mod:`pixelwise.postprocess`).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from tqdm import tqdm

from pixelwise.data.classes import ClassInfo, palette_bytes
from pixelwise.data.io import read_image, write_image, write_label_png
from pixelwise.engine.checkpoint import load_checkpoint, model_from_checkpoint
from pixelwise.engine.common import resolve_device
from pixelwise.engine.evaluate import predict_labels
from pixelwise.errors import DataError, PixelwiseError
from pixelwise.viz import overlay

__all__ = ["predict_files", "predict_array", "normalize_image", "collect_inputs", "pending_inputs"]

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
SEMANTIC_OUTPUTS = (".png", "_overlay.png")  # per input image, written in this order


def collect_inputs(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    """Files as given, folders expanded to their images (sorted)."""
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            files.extend(sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES))
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(p, "input image not found")
    if not files:
        raise DataError(", ".join(map(str, inputs)), "no input images found")
    return files


def pending_inputs(files: Iterable[Path], out: str | os.PathLike, suffixes: Iterable[str]) -> list[Path]:
    """The input images not done yet: an image is done when ``OUT/{stem}{suffix}`` exists for
    every one of ``suffixes`` (outputs are written atomically, so an existing file is whole)."""
    out = Path(out)
    suffixes = tuple(suffixes)
    return [f for f in files if not all((out / f"{f.stem}{s}").is_file() for s in suffixes)]


def normalize_image(image: np.ndarray, normalization: dict[str, Any]) -> torch.Tensor:
    """uint8 (H, W[, C]) image -> float (C, H, W) tensor on the CPU, scaled to [0, 1] and
    normalised with the checkpoint's ``mean``/``std`` (the model's input for one image)."""
    x = torch.from_numpy(np.ascontiguousarray(image)).float().div_(255)
    x = x[None] if x.dim() == 2 else x.permute(2, 0, 1)
    mean = torch.tensor(normalization["mean"]).view(-1, 1, 1)
    std = torch.tensor(normalization["std"]).view(-1, 1, 1)
    return (x - mean) / std


@torch.inference_mode()
def predict_array(model: torch.nn.Module, image: np.ndarray, normalization: dict[str, Any],
                  device: torch.device | str = "cpu", *, tile: int | None = None, overlap: int | None = None,
                  flip: bool = False, scales: tuple[float, ...] | None = None) -> np.ndarray:
    """uint8 (H, W[, C]) image -> (H, W) int64 class ids (model in eval mode)."""
    x = normalize_image(image, normalization)[None].to(device)
    return predict_labels(model, x, tile, overlap, flip, scales)[0].cpu().numpy()


def predict_files(checkpoint: str | os.PathLike, inputs: Iterable[str | os.PathLike], out: str | os.PathLike,
                  device: str = "auto", alpha: float = 0.5, progress: bool = True, *, tile: int | None = None,
                  overlap: int | None = None, flip: bool = False,
                  scales: tuple[float, ...] | None = None, fast: bool = False,
                  skip_existing: bool = False) -> list[Path]:
    """Write ``OUT/{stem}.png`` (palette label map) and ``OUT/{stem}_overlay.png`` per input image.
    ``fast``: run :func:`pixelwise.inference.optimize`'s model (same outputs within 1e-4).
    ``skip_existing``: leave out the images whose outputs all exist (an interrupted run
    resumes where it stopped; every file is written atomically, the overlay last, so a killed
    run leaves no partial file and its last image is redone). Returns the label maps written."""
    ckpt = load_checkpoint(checkpoint)
    if ckpt.get("task") == "instance":  # one colour per instance, class and score: engine/instance.py
        from pixelwise.engine.instance import predict_instance_files

        return predict_instance_files(checkpoint, inputs, out, device, alpha, progress, ckpt=ckpt,
                                      skip_existing=skip_existing)
    if ckpt.get("task") == "panoptic":  # COCO panoptic PNGs + panoptic.json, segment overlays: engine/panoptic.py
        from pixelwise.engine.panoptic import predict_panoptic_files

        if skip_existing:  # its one JSON for the whole folder would have to be merged
            raise PixelwiseError("--skip-existing is not supported for panoptic checkpoints")

        return predict_panoptic_files(checkpoint, inputs, out, device, alpha, progress, ckpt=ckpt)
    model = model_from_checkpoint(ckpt, checkpoint).eval()
    dev = resolve_device(device)
    model.to(dev)
    if fast:
        from pixelwise.inference import optimize

        model = optimize(model, inplace=True)
    norm = ckpt["normalization"]
    mode = norm.get("image_mode", "RGB")
    classes = [ClassInfo(c["id"], c["name"], bool(c.get("isthing", False)), tuple(c["color"])) for c in ckpt["classes"]]
    colors = [c.color for c in classes]
    pal = palette_bytes(classes)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    files = collect_inputs(inputs)
    if skip_existing:
        files = pending_inputs(files, out, SEMANTIC_OUTPUTS)
    for f in tqdm(files, desc="predict", unit="img", disable=not progress):
        image = read_image(f, mode=mode)
        label = predict_array(model, image, norm, dev, tile=tile, overlap=overlap, flip=flip, scales=scales)
        write_label_png(out / f"{f.stem}.png", label.astype(np.uint8), pal)
        rgb = image if mode == "RGB" else np.repeat(image.reshape(image.shape[0], image.shape[1], 1), 3, 2)
        write_image(out / f"{f.stem}_overlay.png", overlay(rgb, label, colors, alpha))
        written.append(out / f"{f.stem}.png")
    return written
