"""Prediction on image files: a palette label PNG and a colour overlay per image."""
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
from pixelwise.engine.evaluate import logits_of
from pixelwise.errors import DataError
from pixelwise.viz import overlay

__all__ = ["predict_files", "predict_array", "collect_inputs"]

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


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


@torch.inference_mode()
def predict_array(model: torch.nn.Module, image: np.ndarray, normalization: dict[str, Any],
                  device: torch.device | str = "cpu") -> np.ndarray:
    """uint8 (H, W[, C]) image -> (H, W) int64 class ids."""
    x = torch.from_numpy(np.ascontiguousarray(image)).float().div_(255)
    x = x[None] if x.dim() == 2 else x.permute(2, 0, 1)
    mean = torch.tensor(normalization["mean"]).view(-1, 1, 1)
    std = torch.tensor(normalization["std"]).view(-1, 1, 1)
    x = ((x - mean) / std)[None].to(device)
    return logits_of(model(x)).argmax(1)[0].cpu().numpy()


def predict_files(checkpoint: str | os.PathLike, inputs: Iterable[str | os.PathLike], out: str | os.PathLike,
                  device: str = "auto", alpha: float = 0.5, progress: bool = True) -> list[Path]:
    """Write ``OUT/{stem}.png`` (palette label map) and ``OUT/{stem}_overlay.png`` per input image."""
    ckpt = load_checkpoint(checkpoint)
    model = model_from_checkpoint(ckpt, checkpoint).eval()
    dev = resolve_device(device)
    model.to(dev)
    norm = ckpt["normalization"]
    mode = norm.get("image_mode", "RGB")
    classes = [ClassInfo(c["id"], c["name"], bool(c.get("isthing", False)), tuple(c["color"])) for c in ckpt["classes"]]
    colors = [c.color for c in classes]
    pal = palette_bytes(classes)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for f in tqdm(collect_inputs(inputs), desc="predict", unit="img", disable=not progress):
        image = read_image(f, mode=mode)
        label = predict_array(model, image, norm, dev)
        write_label_png(out / f"{f.stem}.png", label.astype(np.uint8), pal)
        rgb = image if mode == "RGB" else np.repeat(image.reshape(image.shape[0], image.shape[1], 1), 3, 2)
        write_image(out / f"{f.stem}_overlay.png", overlay(rgb, label, colors, alpha))
        written.append(out / f"{f.stem}.png")
    return written
