"""int8 rows: ``pixelwise export --int8`` (onnxruntime static quantization, 32 calibration
images of the train split) vs the fp32 model in eager PyTorch, on the demo model and on a U-Net
trained briefly on the stardist data; images/s over the val split at batch 1 and mIoU of both.

The two trained models come from ``PIXELWISE_BENCH_INT8_DEMO`` (a ``pixelwise demo --out``
folder) and ``PIXELWISE_BENCH_INT8_UNET`` (``RUN_DIR:DATA_DIR`` of ``pixelwise train --config
configs/unet_stardist.yaml``); without them they are trained here into ``runs/bench_int8``
(the demo as ``pixelwise demo``; the U-Net for 180 s, 30 s with --quick).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from bench.common import QUICK, Row, fmt_s, ratio, side_by_side

ROOT = Path("runs/bench_int8")


def _demo() -> tuple[Path, Path]:
    folder = Path(os.environ.get("PIXELWISE_BENCH_INT8_DEMO", ROOT / "demo"))
    if not (folder / "run" / "best.pt").is_file():
        from pixelwise.demo import run_demo

        run_demo(folder, quick=QUICK)
    return folder / "run" / "best.pt", folder / "data"


def _unet() -> tuple[Path, Path]:
    given = os.environ.get("PIXELWISE_BENCH_INT8_UNET")
    run, data = (Path(p) for p in given.split(":", 1)) if given else (ROOT / "unet_stardist", ROOT / "stardist")
    if not (run / "best.pt").is_file():
        from pixelwise.data.importers import run_importer
        from pixelwise.engine.config import load_config
        from pixelwise.engine.train import train

        if not (data / "classes.json").is_file():
            run_importer("stardist", data)
        cfg = load_config(Path(__file__).parents[1] / "configs" / "unet_stardist.yaml",
                          {"data": str(data), "out": str(run), "time_limit": 30.0 if QUICK else 180.0})
        train(cfg)
    return run / "best.pt", data


def _miou(preds: list[np.ndarray], targets: list[np.ndarray], k: int) -> float:
    from pixelwise.metrics.semantic import ConfusionMatrix

    cm = ConfusionMatrix(max(k, 2))
    for p, t in zip(preds, targets):
        cm.update(p, t)
    return float(cm.compute()["miou"])


def _rows_for(name: str, ckpt_path: Path, data: Path, fx: bool = False) -> list[Row]:
    from pixelwise.data.io import read_image
    from pixelwise.engine.checkpoint import load_checkpoint, model_from_checkpoint
    from pixelwise.engine.predict import predict_array
    from pixelwise.export import export_checkpoint, open_onnx
    from pixelwise.quantize import quantize
    from pixelwise.tasks.semantic import open_dataset

    ckpt = load_checkpoint(ckpt_path)
    model = model_from_checkpoint(ckpt, ckpt_path).eval()
    norm = ckpt["normalization"]
    mode = norm.get("image_mode", "RGB")
    val = open_dataset(data, "val", image_mode=mode, quiet=True)
    images = [read_image(val.load(i)["meta"]["file"], mode=mode) for i in range(len(val))]
    targets = [val.load(i)["semantic"].numpy() for i in range(len(val))]
    h, w = images[0].shape[:2]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        q = quantize(ckpt_path, data, n=32, out=Path(tmp) / "model.int8.onnx")
        f = export_checkpoint(ckpt_path, Path(tmp) / "model.onnx", dynamic=True, size=64)
        k = int(ckpt["model"]["num_classes"])
        for threads in (2, 1):
            torch.set_num_threads(threads)
            s8, s32 = open_onnx(q, threads=threads), open_onnx(f, threads=threads)

            def eager() -> list[np.ndarray]:
                return [predict_array(model, im, norm) for im in images]

            def int8() -> list[np.ndarray]:
                return [s8.predict(im) for im in images]

            def fp32_ort() -> list[np.ndarray]:
                return [s32.predict(im) for im in images]

            p_e, p_8 = eager(), int8()
            m_e, m_8 = _miou(p_e, targets, k), _miou(p_8, targets, k)
            agree = float(np.mean([(a == b).mean() for a, b in zip(p_e, p_8)]))
            reps = 2 if QUICK else 5
            t8, te = side_by_side(int8, eager, reps)
            what = (f"int8 {name}, {len(images)} val images {h}x{w}, batch 1, {threads} thread(s): "
                    f"onnxruntime int8 (export --int8) vs fp32 eager PyTorch")
            met = "met" if te / t8 >= 2 and abs(m_e - m_8) * 100 <= 0.5 else "NOT met"
            rows.append(Row(what, f"{len(images) / t8:.1f} img/s ({fmt_s(t8)})",
                            f"{len(images) / te:.1f} img/s ({fmt_s(te)})", ratio(t8, te),
                            f"mIoU fp32 {m_e:.4f} vs int8 {m_8:.4f} ({(m_8 - m_e) * 100:+.2f} points); labels "
                            f"agree on {agree:.2%} of pixels; target >= 2x and within 0.5 points: {met}"))
            t8, t32 = side_by_side(int8, fp32_ort, reps)
            rows.append(Row(f"int8 {name}, {threads} thread(s): onnxruntime int8 vs onnxruntime fp32 (same export)",
                            f"{len(images) / t8:.1f} img/s", f"{len(images) / t32:.1f} img/s", ratio(t8, t32),
                            "what quantization itself buys; the rest of the gap to eager is onnxruntime's fp32"))
            if threads == 1 and fx:  # PyTorch healthy on 1 thread here (see RESULTS.md)
                rows.append(_torch_fx_row(name, model, f, s8, data, images, targets, k, norm, reps))
            del s8, s32
    return rows


def _torch_fx_row(name: str, model: torch.nn.Module, fp32_onnx: Path, s8, data: Path, images: list,
                  targets: list, k: int, norm: dict, reps: int) -> Row:
    """PyTorch's own int8 path on the same calibration inputs: FX graph mode static quantization
    (x86 backend: oneDNN/fbgemm int8 kernels, no compiler needed; PT2E's prepare_pt2e/convert_pt2e
    left torch for torchao, which is not installed). Same images, same threads."""
    import copy

    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    from pixelwise.data.transforms import normalize_image
    from pixelwise.quantize import calibration_inputs

    class Logits(torch.nn.Module):
        def __init__(self, m: torch.nn.Module):
            super().__init__()
            self.m = m

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.m(x)
            return y["out"] if isinstance(y, dict) else y

    torch.backends.quantized.engine = "x86"
    cal = [torch.from_numpy(c) for c in calibration_inputs(fp32_onnx, data, 32)]
    prepared = prepare_fx(Logits(copy.deepcopy(model)).eval(), get_default_qconfig_mapping("x86"), (cal[0],))
    with torch.inference_mode():
        for c in cal:
            prepared(c)
    qmodel = convert_fx(prepared)

    @torch.inference_mode()
    def fx() -> list[np.ndarray]:
        return [qmodel(normalize_image(im, norm)[None])[0].argmax(0).numpy() for im in images]

    def ort() -> list[np.ndarray]:
        return [s8.predict(im) for im in images]

    m_fx, m_ort = _miou(fx(), targets, k), _miou(ort(), targets, k)
    t_ort, t_fx = side_by_side(ort, fx, reps)
    return Row(f"int8 {name}, {torch.get_num_threads()} thread(s): onnxruntime int8 vs PyTorch FX int8 (x86 backend), "
               "same calibration",
               f"{len(images) / t_ort:.1f} img/s", f"{len(images) / t_fx:.1f} img/s", ratio(t_ort, t_fx),
               f"mIoU onnxruntime int8 {m_ort:.4f} vs FX int8 {m_fx:.4f}; why `export --int8` uses onnxruntime")


def int8_rows() -> list[Row]:
    """The demo model and the stardist U-Net: int8 vs fp32 eager (speed, mIoU)."""
    threads = torch.get_num_threads()
    try:
        runs: list[tuple[str, Callable[[], tuple[Path, Path]], bool]] = [
            ("demo fcn8s (VGG16-BN 1/4)", _demo, True), ("U-Net stardist (base 8, depth 4)", _unet, False)]
        rows: list[Row] = []
        for name, get, fx in runs:
            rows.extend(_rows_for(name, *get(), fx=fx))
        return rows
    finally:
        torch.set_num_threads(threads)
