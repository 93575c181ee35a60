"""Prediction on image files, for every task: the task's result files per image.

Semantic: a palette label PNG and a colour overlay; instance: an instance-id PNG, an overlay
with class and score, and the COCO results JSON; panoptic: the COCO panoptic PNG, an overlay,
and one ``panoptic.json`` for the folder (:mod:`pixelwise.tasks`). Images of any size:
``unet_original`` always runs by overlap-tile; other semantic models run the whole image, or
by sliding window with ``tile``/``overlap``; ``flip``/``scales`` add test-time augmentation.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from tqdm import tqdm

from pixelwise.data.io import read_image
from pixelwise.data.transforms import normalize_image  # noqa: F401  (re-exported)
from pixelwise.engine.checkpoint import load_checkpoint, model_from_checkpoint
from pixelwise.engine.common import resolve_device
from pixelwise.errors import DataError
from pixelwise.tasks import task_of_checkpoint

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


@torch.inference_mode()
def predict_array(model: torch.nn.Module, image: np.ndarray, normalization: dict[str, Any],
                  device: torch.device | str = "cpu", *, tile: int | None = None, overlap: int | None = None,
                  flip: bool = False, scales: tuple[float, ...] | None = None) -> np.ndarray:
    """uint8 (H, W[, C]) image -> (H, W) int64 class ids of a semantic model (in eval mode)."""
    from pixelwise.postprocess import predict_labels

    x = normalize_image(image, normalization)[None].to(device)
    return predict_labels(model, x, tile, overlap, flip, scales)[0].cpu().numpy()


@torch.inference_mode()
def predict_files(checkpoint: str | os.PathLike, inputs: Iterable[str | os.PathLike], out: str | os.PathLike,
                  device: str = "auto", alpha: float = 0.5, progress: bool = True, *, tile: int | None = None,
                  overlap: int | None = None, flip: bool = False,
                  scales: tuple[float, ...] | None = None, fast: bool = False,
                  skip_existing: bool = False, score_threshold: float = 0.5,
                  gt_json: str | os.PathLike | None = None, ckpt: dict[str, Any] | None = None) -> list[Path]:
    """Write the task's files for every input image (see the module docstring) into ``out``.
    ``fast``: run :func:`pixelwise.optimize.optimize`'s model (same outputs within 1e-4).
    ``skip_existing``: leave out the images whose outputs all exist (an interrupted run
    resumes where it stopped; every file is written atomically, so a killed run leaves no
    partial file and its last image is redone). ``score_threshold``: the lowest instance
    score written (instance checkpoints). Returns the main file per image, then the files
    written once per run (panoptic: ``panoptic.json``)."""
    ckpt = ckpt if ckpt is not None else load_checkpoint(checkpoint)
    task = task_of_checkpoint(ckpt)
    options = {k: v for k, v in {"tile": tile, "overlap": overlap, "flip": flip, "scales": scales}.items() if v}
    task.check_eval_options(options)
    model = model_from_checkpoint(ckpt, checkpoint).eval()
    dev = resolve_device(device)
    model.to(dev)
    if fast and task.supports_optimize:
        from pixelwise.optimize import optimize

        model = optimize(model, inplace=True)
    mode = ckpt["normalization"].get("image_mode", "RGB")
    out = Path(out)
    files = collect_inputs(inputs)
    state = task.begin_predict(files, out, ckpt, skip_existing=skip_existing, gt_json=gt_json)
    if skip_existing:
        files = pending_inputs(files, out, task.output_suffixes)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for f in tqdm(files, desc="predict", unit="img", disable=not progress):
        image = read_image(f, mode=mode)
        result = task.predict(model, image, ckpt, dev, score_threshold=score_threshold, **options)
        written.append(task.write(result, image, out, f.stem, ckpt, state, alpha))
    return written + task.end_predict(out, ckpt, state)
