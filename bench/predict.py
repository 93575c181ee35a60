"""Bulk prediction rows (issue 18 item 1): images/s of ``pixelwise predict`` (labels only, default
flags: automatic batch, worker processes, optimize()) vs the plain loop of
``bench/plain_predict.py``, both run as fresh processes (imports and checkpoint loading
included), on 128 px and 1024 px images with the demo-sized model (fcn8s, VGG16-BN width 1/4,
6 classes, seeded weights); and overlays vs labels-only. The labels of both are compared."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import QUICK, Row

ROOT = Path(__file__).resolve().parents[1]


def _checkpoint(path: Path) -> Path:
    import torch

    from pixelwise.data.synthetic import SHAPES_CLASSES
    from pixelwise.engine.checkpoint import save_checkpoint
    from pixelwise.models.registry import build_model

    torch.manual_seed(0)
    m = build_model("fcn8s", len(SHAPES_CLASSES), backbone="vgg16_bn", width=0.25).eval()
    save_checkpoint(path, {"model": m.pixelwise_spec, "state_dict": m.state_dict(),
                           "classes": [{"id": c.id, "name": c.name, "color": list(c.color)} for c in SHAPES_CLASSES],
                           "normalization": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                                             "image_mode": "RGB"},
                           "config": {}, "epoch": 0, "step": 0, "metrics": {}})
    return path


def _images(work: Path, n: int, size: int) -> Path:
    """``n`` shapes images of ``size`` px (128 px renders, upscaled bicubic beyond)."""
    from PIL import Image

    from pixelwise.data.synthetic import generate_shapes

    shapes = generate_shapes(work / f"shapes{n}", num_train=n, num_val=1, size=128, seed=0)
    dst = work / f"in_{n}x{size}"
    dst.mkdir()
    for f in sorted((shapes / "JPEGImages").glob("train_*.png"))[:n]:
        im = Image.open(f).convert("RGB")
        (im if size == 128 else im.resize((size, size), Image.BICUBIC)).save(dst / f.name)
    return dst


def _run(argv: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(argv, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def _equal_fraction(a: Path, b: Path) -> float:
    from PIL import Image

    same = total = 0
    for f in sorted(a.glob("*.png")):
        if f.name.endswith("_overlay.png"):
            continue
        x, y = np.asarray(Image.open(f)), np.asarray(Image.open(b / f.name))
        same, total = same + int((x == y).sum()), total + x.size
    return same / max(1, total)


def predict_rows() -> list[Row]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ckpt = str(_checkpoint(work / "demo.pt"))
        cases = [(60, 128), (8, 1024)] if QUICK else [(300, 128), (40, 1024)]
        if os.environ.get("PIXELWISE_BENCH_PREDICT"):  # e.g. "40x1024": only these cases
            cases = [tuple(int(v) for v in c.split("x")) for c in os.environ["PIXELWISE_BENCH_PREDICT"].split(",")]
        for n, size in cases:
            src = _images(work, n, size)
            out = work / f"out{size}"

            def pixelwise(*flags: str, dst: str = "pw", src: Path = src, out: Path = out) -> float:
                return _run([sys.executable, "-m", "pixelwise", "predict", "--checkpoint", ckpt, str(src),
                             "--out", str(out / dst), "--quiet", *flags])

            def plain(src: Path = src, out: Path = out) -> float:
                return _run([sys.executable, "bench/plain_predict.py", ckpt, str(src), str(out / "plain")])

            times = {"pw": [], "plain": [], "overlay": []}
            for rep in range(2):  # alternating order; the faster of two runs each
                order = ["pw", "plain", "overlay"] if rep % 2 == 0 else ["plain", "overlay", "pw"]
                for k in order:
                    times[k].append(plain() if k == "plain" else
                                    pixelwise("--outputs", "labels") if k == "pw" else
                                    pixelwise(dst="ov") if size == 128 else 0.0)
            pw, ref = min(times["pw"]), min(times["plain"])
            eq = _equal_fraction(out / "pw", out / "plain")
            assert eq > 0.999, f"labels differ from the plain loop's on {1 - eq:.2%} of the pixels"
            rows.append(Row(f"predict {n} images of {size} px, labels only: `pixelwise predict --outputs labels` "
                            f"(defaults) vs the plain loop (bench/plain_predict.py), images/s",
                            f"{n / pw:.2f} img/s ({pw:.1f} s)", f"{n / ref:.2f} img/s ({ref:.1f} s)",
                            f"{ref / pw:.2f}x the plain loop's images/s",
                            f"goal >= 1.5x; equal labels on {eq:.6%} of the pixels (optimize() folds conv+BN: "
                            f"logits within 1e-4); fresh processes, setup included"))
            if size == 128:
                ov = min(times["overlay"])
                rows.append(Row(f"predict {n} images of {size} px: labels + overlays (default outputs) vs labels "
                                "only", f"{ov:.1f} s", f"{pw:.1f} s", f"{ov / pw:.2f}x", "goal <= 1.2x"))
    return rows
