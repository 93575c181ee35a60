"""Bring your own data (issue 15 item 4): ``pixelwise train --model unet --data D`` with no other
flag, on the real stardist nuclei image as a user has it (``images/`` 16-bit TIFF tiles +
``masks/`` 0/255 PNG, no split, no class table), side by side with the ready config
``configs/unet_stardist.yaml`` on the same folder. Goal: foreground IoU >= 0.85 within 3
minutes (wall clock of the whole command) with peak RSS < 4 GB, on 2 cores."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import Row

ROOT = Path(__file__).resolve().parent.parent


def make_folder(out: Path, tile: int = 256) -> Path:
    """The stardist image (512x512 uint16) and its instance mask as 4 tiles: images/*.tif + masks/*.png (0/255)."""
    import tifffile
    from PIL import Image

    spec = importlib.util.find_spec("stardist")
    if spec is None:
        raise RuntimeError("pip install --no-deps stardist==0.9.2 (its data files are read, never imported)")
    d = Path(spec.submodule_search_locations[0]) / "data" / "images"
    img, inst = tifffile.imread(d / "img2d.tif"), tifffile.imread(d / "mask2d.tif")
    (out / "images").mkdir(parents=True)
    (out / "masks").mkdir()
    for k in range(4):
        y, x = (k // 2) * tile, (k % 2) * tile
        tifffile.imwrite(out / "images" / f"frame{k}.tif", img[y:y + tile, x:x + tile])
        Image.fromarray(((inst[y:y + tile, x:x + tile] > 0) * 255).astype(np.uint8)).save(out / "masks" / f"frame{k}.png")
    return out


def _run(args: list[str]) -> tuple[float, float, dict]:
    """(wall seconds, peak RSS GB of the child, best val record) of ``pixelwise train ARGS``."""
    # a fresh parent per run, so that RUSAGE_CHILDREN's peak is this run's (the largest process of its tree)
    probe = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
             "print('PEAK_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)")
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", probe, sys.executable, "-m", "pixelwise", "train", *args, "--quiet",
                        "--no-report"], capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(r.stderr.strip().splitlines()[-1] if r.stderr.strip() else "train failed")
    peak = int(r.stdout.split("PEAK_KB")[-1].split()[0]) / 2 ** 20  # KB -> GB
    out = Path(args[args.index("--out") + 1])
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    best = max((r for r in records if "iou" in r), key=lambda r: r["iou"][1])
    plan = next((line for line in r.stdout.splitlines() if line.startswith("plan:")), "")
    return seconds, peak, {**best, "plan": plan}


def byod_rows() -> list[Row]:
    with tempfile.TemporaryDirectory(prefix="bench_byod_") as tmp:
        data = make_folder(Path(tmp) / "cells")
        ours = _run(["--model", "unet", "--data", str(data), "--out", str(Path(tmp) / "plan")])
        ref = _run(["--config", "configs/unet_stardist.yaml", "--data", str(data), "--out", str(Path(tmp) / "cfg")])
    (s1, m1, b1), (s2, m2, b2) = ours, ref
    iou1, iou2 = b1["iou"][1], b2["iou"][1]
    goal = "goal met" if iou1 >= 0.85 and s1 <= 180 and m1 < 4 else "goal NOT met"
    return [Row("train --model unet --data D, no other flag (CPU plan) vs configs/unet_stardist.yaml, "
                "stardist as images/ + 0/255 masks/: foreground IoU", f"{iou1:.3f}", f"{iou2:.3f}",
                f"{iou1 / iou2:.2f}", f"{goal}: IoU >= 0.85 in <= 180 s, peak < 4 GB"),
            Row("  same runs: wall seconds of the whole command", f"{s1:.0f}", f"{s2:.0f}", f"{s1 / s2:.2f}",
                b1["plan"].split(". A config")[0]),
            Row("  same runs: peak RSS (GB)", f"{m1:.2f}", f"{m2:.2f}", f"{m1 / m2:.2f}", "")]
