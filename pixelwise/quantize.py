"""int8 CPU inference: post-training static quantization of a semantic model's ONNX export.

``pixelwise export --checkpoint CKPT --int8 --calibrate DATA --out model.int8.onnx``:

1. the checkpoint's model is exported to ONNX as ``pixelwise export --dynamic`` does
   (BatchNorm folded, free batch / height / width, metadata for ``predict --onnx``);
2. ``n`` training images of DATA (any layout ``pixelwise train`` reads; its ``train`` split,
   spread evenly over it; a plain folder of images works too) are normalised exactly as
   ``predict --onnx`` normalises (mirror-padded to a valid tile for ``unet_original``);
3. onnxruntime's ``quantize_static`` records the activations' min/max on them and writes a
   QDQ graph: weights int8 per output channel (symmetric), activations uint8 per tensor;
   onnxruntime fuses each QuantizeLinear -> Conv -> DequantizeLinear into an integer conv.

The result is an ONNX file like any other export (``pixelwise predict --onnx`` runs it; its
metadata adds ``quantization``). Why onnxruntime and not PyTorch: see bench/RESULTS.md (the
``int8`` rows) - PT2E (``prepare_pt2e``/``convert_pt2e``) moved out of torch into ``torchao``
(not a dependency here), and torch's FX int8 path measured slower than onnxruntime's here.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

__all__ = ["quantize", "calibration_inputs"]


def _calibration_images(data: Path, image_mode: str, n: int) -> list[np.ndarray]:
    """Up to ``n`` images of ``data`` as float32 (C, H, W) in [0, 1]: the train split of a
    dataset, else the image files of the folder; spread evenly over what is there."""
    from pixelwise.errors import DataError, PixelwiseError

    if not data.is_dir():
        raise DataError(data, "calibration folder not found", "give a dataset or a folder of training images")
    try:
        from pixelwise.tasks.semantic import open_dataset

        ds = open_dataset(data, "train", image_mode=image_mode, quiet=True)
    except PixelwiseError as e:
        ds, why = None, getattr(e, "problem", str(e))
    if ds is not None and len(ds) > 0:
        load = ds.load if hasattr(ds, "load") else ds.__getitem__
        idx = np.unique(np.linspace(0, len(ds) - 1, min(n, len(ds))).round().astype(int))
        return [load(int(i))["image"].numpy().astype(np.float32) for i in idx]
    from pixelwise.data.io import read_image
    from pixelwise.engine.predict import IMAGE_SUFFIXES

    files = sorted(f for f in data.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        reason = f"not a dataset ({why})" if ds is None else "its train split is empty"
        raise DataError(data, f"no calibration images: {reason} and no image files in it",
                        "give the training data, e.g. --calibrate runs/data/shapes")
    idx = np.unique(np.linspace(0, len(files) - 1, min(n, len(files))).round().astype(int))
    out = []
    for i in idx:
        a = read_image(files[i], mode=image_mode).astype(np.float32) / 255.0
        out.append(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))
    return out


def calibration_inputs(onnx_path: str | os.PathLike, data: str | os.PathLike, n: int = 32) -> list[np.ndarray]:
    """The float32 (1, C, H, W) inputs that ``predict --onnx`` would feed the exported model at
    ``onnx_path`` for ``n`` training images of ``data`` (its normalisation and padding)."""
    from pixelwise.errors import PixelwiseError
    from pixelwise.export import OnnxSegmenter

    if n < 1:
        raise PixelwiseError(f"calibration needs at least 1 image, got n={n}")
    seen: list[np.ndarray] = []

    class _Recorder(OnnxSegmenter):  # predict's own padding, the graph replaced by a recorder
        def logits(self, x: np.ndarray) -> np.ndarray:
            seen.append(np.ascontiguousarray(x, dtype=np.float32))
            return np.zeros((1, 1) + x.shape[-2:], np.float32)

    rec = _Recorder(onnx_path)
    for img in _calibration_images(Path(data), rec.image_mode, n):
        c = img.shape[0]
        x = (img - rec.mean[:c, None, None]) / rec.std[:c, None, None]
        rec._padded_logits(x[None].astype(np.float32))
    return seen


class _Reader:
    """onnxruntime's CalibrationDataReader over a list of inputs."""

    def __init__(self, name: str, inputs: Sequence[np.ndarray]):
        self._it: Iterator[np.ndarray] = iter(inputs)
        self.name = name

    def get_next(self) -> dict[str, np.ndarray] | None:
        x = next(self._it, None)
        return None if x is None else {self.name: x}

    def rewind(self) -> None:  # pragma: no cover - MinMax calibration reads once
        raise NotImplementedError


def quantize(checkpoint: str | os.PathLike, calibration_data_dir: str | os.PathLike, n: int = 32,
             out: str | os.PathLike | None = None, *, per_channel: bool = True, opset: int = 17) -> Path:
    """int8 ONNX model of a semantic checkpoint, calibrated on ``n`` images of
    ``calibration_data_dir`` (see the module docstring). ``checkpoint``: whatever
    :func:`pixelwise.export.export_checkpoint` reads. ``out``: default ``CKPT.int8.onnx`` next
    to the checkpoint (a folder: ``FOLDER/model.int8.onnx``). Written atomically (a temporary
    folder next to ``out``, one rename). Returns ``out``."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from pixelwise.errors import DataError, PixelwiseError
    from pixelwise.export import _META_KEY, _task, export_checkpoint

    if calibration_data_dir is None:
        raise PixelwiseError("int8 export needs calibration images: --calibrate DATA (the training data)")
    if not Path(calibration_data_dir).is_dir():  # before the export: fail fast
        raise DataError(calibration_data_dir, "calibration folder not found",
                        "give a dataset or a folder of training images")
    checkpoint = Path(checkpoint)
    if out is None:
        out = checkpoint / "model.int8.onnx" if checkpoint.is_dir() else checkpoint.with_suffix(".int8.onnx")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".int8-", dir=out.parent) as tmp:
        # whatever `pixelwise export` reads; the task is judged from the exported metadata
        fp32 = export_checkpoint(checkpoint, Path(tmp) / "fp32.onnx", dynamic=True, size=64, opset=opset)
        meta = json.loads(next(p.value for p in onnx.load(str(fp32), load_external_data=False).metadata_props
                               if p.key == _META_KEY))
        if _task(meta.get("task", "semantic")).export_kind != "dense":
            raise PixelwiseError(f"{checkpoint}: int8 quantization covers the semantic models, not "
                                 f"{meta.get('task')!r} models")
        inputs = calibration_inputs(fp32, calibration_data_dir, n)
        q = Path(tmp) / "int8.onnx"
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)  # its advice to pre-process: symbolic shape inference fails on free H, W
        try:
            quantize_static(str(fp32), str(q), _Reader("image", inputs), quant_format=QuantFormat.QDQ,
                            per_channel=per_channel, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax)
        finally:
            root.setLevel(level)
        proto = onnx.load(str(q))
        meta["quantization"] = {"method": "onnxruntime quantize_static (QDQ, MinMax)", "weights": "int8",
                                "activations": "uint8", "per_channel": bool(per_channel),
                                "calibration_images": len(inputs), "calibration_data": str(calibration_data_dir)}
        del proto.metadata_props[:]
        entry = proto.metadata_props.add()
        entry.key, entry.value = _META_KEY, json.dumps(meta)
        staged = Path(tmp) / "staged.onnx"  # same filesystem as out: the rename is atomic
        onnx.save(proto, str(staged))
        os.replace(staged, out)
    return out
