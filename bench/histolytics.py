"""What limits mIoU on histolytics (issue 17): ``python -m bench --only histolytics``.

``configs/unet_histolytics.yaml`` (padded U-Net at 1/4 width, 240 steps) trained with one
change at a time, two runs at a time on one thread each, at equal steps (no time limit), and
evaluated on the val split (the bottom row of the 6 x 6 grid of 250 px crops): mIoU, per-class
IoU, and the class shares of the train and val splits, which differ (the data's split is
spatial). Per-class IoU of the last weights; ``pixelwise evaluate`` gives the confusion matrix.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import QUICK, Row
from bench.quality_reference import voc_split

ROOT = Path(__file__).resolve().parent.parent
CONFIG = "configs/unet_histolytics.yaml"
VARIANTS = {  # name -> --set overrides
    "CE (the config)": [],
    "CE + Dice": ["loss=ce_dice"],
    "CE with median-frequency class weights": ["class_weights=median_frequency"],
    "CE + Dice, whole 250 px crops": ["loss=ce_dice", "crop_size=null", "batch_size=4", "repeat=2"],
}
NAMES = ("background", "connective", "inflammatory", "neoplastic")


def class_shares(data: Path) -> dict[str, list[float]]:
    """Each class's share of the labelled pixels, per split."""
    out = {}
    for split in ("train", "val"):
        counts = sum(np.bincount(mask.ravel(), minlength=256) for _, mask in voc_split(data, split))
        out[split] = (counts[:4] / counts[:4].sum()).tolist()
    return out


def _start(data: Path, out: Path, sets: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "pixelwise", "train", "--config", CONFIG, "--data", str(data), "--out", str(out),
           "--threads", "1", "--num-workers", "0", "--quiet", "--no-report", "--set", "time_limit=null"]
    if QUICK:
        cmd += ["--epochs", "1"]
    for s in sets:
        cmd += ["--set", s]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def histolytics_rows() -> list[Row]:
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="bench_histolytics_") as t:
        data = Path(t) / "histolytics"
        subprocess.run([sys.executable, "-m", "pixelwise", "data", "import", "histolytics", "--out", str(data)],
                       check=True, cwd=ROOT, capture_output=True)
        shares = class_shares(data)
        rows.append(Row("histolytics class shares of the pixels, train split (30 crops) | val split (6 crops): "
                        + " / ".join(NAMES), " / ".join(f"{x:.3f}" for x in shares["train"]),
                        " / ".join(f"{x:.3f}" for x in shares["val"]), "", "pixelwise column = train, "
                        "reference column = val"))
        names = list(VARIANTS)
        for pair in (names[:2], names[2:]):
            t0 = time.perf_counter()
            procs = {n: _start(data, Path(t) / f"run{names.index(n)}", VARIANTS[n]) for n in pair}
            for n, p in procs.items():
                _, err = p.communicate()
                if p.returncode != 0:
                    raise RuntimeError(f"{n}: {(err.strip().splitlines() or ['?'])[-1]}")
            wall = time.perf_counter() - t0
            for n in pair:
                recs = [json.loads(x) for x in (Path(t) / f"run{names.index(n)}" / "metrics.jsonl").read_text().split("\n")
                        if x.strip()]
                last = recs[-1]
                rows.append(Row(f"unet_histolytics, {n}: val mIoU (last weights) | per-class IoU "
                                + " / ".join(NAMES), f"{last['miou']:.3f}",
                                " / ".join(f"{x:.2f}" for x in last["iou"]), "",
                                f"{last['step']} steps; the pair took {wall:.0f} s"))
    return rows
