"""Learning quality side by side (issue 17): what a user gets in the same CPU budget from
``pixelwise train`` with its ready config vs the tool they would pick instead.

Rows (both from scratch, no weights; same data split; same wall-clock training budget; one
torch thread each; the two runs of a seed run at the same time, one per core, so that they
share the machine alike; 3 seeds, mean +- half the spread):

* U-Net ResNet-34: ``configs/unet_resnet34_{stardist,histolytics}.yaml`` vs ``smp.Unet``;
* DeepLab v3+ ResNet-34: ``configs/deeplabv3plus_resnet34_*.yaml`` vs ``smp.DeepLabV3Plus``;
* Mask R-CNN ResNet-18-FPN: ``configs/maskrcnn_cpu.yaml`` (shapes) and
  ``configs/maskrcnn_stardist_scratch.yaml`` vs torchvision's ``MaskRCNN``;

the reference loops are in ``bench/quality_reference.py``. Metrics: stardist foreground IoU,
histolytics mIoU (and per-class IoU), mask AP / AP50 (COCOeval semantics) on the val split, of
the weights at the end of the budget (no picking the best epoch on val, for either side).

``python -m bench --only quality`` (~50 minutes on 2 cores); ``PIXELWISE_BENCH_QUICK=1``
(``--quick``): one seed, short budgets (a smoke run, not a result).
"""
from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import QUICK, Row

ROOT = Path(__file__).resolve().parent.parent
SEEDS = (0,) if QUICK else (0, 1, 2)
#: training seconds per run (wall clock, one thread)
BUDGET = {"stardist": 90, "histolytics": 150, "maskrcnn": 180}
if QUICK:
    BUDGET = {k: 15 for k in BUDGET}

SEMANTIC = [  # (row name, pixelwise config, smp arch, dataset, classes, crop, batch)
    ("U-Net ResNet-34", "configs/unet_resnet34_stardist.yaml", "unet", "stardist", 2, 128, 4),
    ("U-Net ResNet-34", "configs/unet_resnet34_histolytics.yaml", "unet", "histolytics", 4, 160, 8),
    ("DeepLab v3+ ResNet-34", "configs/deeplabv3plus_resnet34_stardist.yaml", "deeplabv3plus", "stardist", 2, 128, 4),
    ("DeepLab v3+ ResNet-34", "configs/deeplabv3plus_resnet34_histolytics.yaml", "deeplabv3plus", "histolytics", 4,
     160, 8),
]
INSTANCE = [  # (dataset, pixelwise config, data folder)
    ("shapes", "configs/maskrcnn_cpu.yaml", "shapes"),
    ("stardist", "configs/maskrcnn_stardist_scratch.yaml", "stardist_coco"),
]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _pixelwise_cmd(config: str, data: Path, out: Path, seed: int, budget: float) -> list[str]:
    # epochs: many, so that the time limit (and the schedule that follows it) ends the run
    return [sys.executable, "-m", "pixelwise", "train", "--config", config, "--data", str(data), "--out", str(out),
            "--seed", str(seed), "--threads", "1", "--time-limit", str(budget), "--epochs", "1000",
            "--set", "eval_every=1000", "--num-workers", "0", "--quiet", "--no-report"]


def _pair(pw_cmd: list[str], ref_cmd: list[str]) -> tuple[dict, dict]:
    """Run pixelwise and the reference at the same time; (pixelwise's last metrics record, reference result)."""
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=_env())
             for c in (pw_cmd, ref_cmd)]
    outs = [p.communicate() for p in procs]
    for p, (so, se), c in zip(procs, outs, (pw_cmd, ref_cmd)):
        if p.returncode != 0:
            raise RuntimeError(f"{' '.join(c[:4])}... failed: {(se.strip().splitlines() or ['?'])[-1]}")
    out = Path(pw_cmd[pw_cmd.index("--out") + 1])
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    ref = json.loads(outs[1][0].split("RESULT ", 1)[1].splitlines()[0])
    return records[-1], ref


def _mean_spread(xs: list[float]) -> str:
    if len(xs) == 1:
        return f"{xs[0]:.3f}"
    return f"{statistics.mean(xs):.3f} +- {(max(xs) - min(xs)) / 2:.3f}"


def _row(what: str, ours: list[float], ref: list[float], note: str) -> Row:
    m1, m2 = statistics.mean(ours), statistics.mean(ref)
    verdict = "pixelwise >= reference" if m1 >= m2 else "pixelwise BELOW reference"
    print(f"[quality] row: {what}: {_mean_spread(ours)} vs {_mean_spread(ref)}", file=sys.stderr, flush=True)
    return Row(what, _mean_spread(ours), _mean_spread(ref), f"{m1 / m2:.2f}" if m2 else "-", f"{verdict}; {note}")


def _nanmean(xs: list[float]) -> float:
    xs = [x for x in xs if not math.isnan(x)]
    return sum(xs) / len(xs)


def _ensure_data(tmp: Path) -> dict[str, Path]:
    """The datasets as pixelwise's importers write them (the reference reads the same files)."""
    data = {"stardist": tmp / "stardist", "stardist_coco": tmp / "stardist_coco",
            "histolytics": tmp / "histolytics", "shapes": tmp / "shapes"}
    run = [sys.executable, "-m", "pixelwise", "data"]
    for name, args in (("stardist", ["import", "stardist"]), ("stardist_coco", ["import", "stardist"]),
                       ("histolytics", ["import", "histolytics"]), ("shapes", ["synth"])):
        subprocess.run([*run, *args, "--out", str(data[name])], check=True, cwd=ROOT, env=_env(),
                       capture_output=True)
    return data


def quality_rows() -> list[Row]:
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="bench_quality_") as t:
        tmp = Path(t)
        data = _ensure_data(tmp)
        for name, config, arch, ds, k, crop, batch in SEMANTIC:
            try:
                rows += _semantic_rows(tmp, data, name, config, arch, ds, k, crop, batch)
            except (RuntimeError, KeyError, ValueError) as e:  # one failing row must not hide the others
                rows.append(Row(f"{name}, {ds}", "error", "", "", f"{type(e).__name__}: {str(e)[:160]}"))
        for ds, config, folder in INSTANCE:
            try:
                rows += _instance_rows(tmp, data, ds, config, folder)
            except (RuntimeError, KeyError, ValueError) as e:
                rows.append(Row(f"Mask R-CNN, {ds}", "error", "", "", f"{type(e).__name__}: {str(e)[:160]}"))
    return rows


def _semantic_rows(tmp: Path, data: dict[str, Path], name: str, config: str, arch: str, ds: str, k: int, crop: int,
                   batch: int) -> list[Row]:
    rows: list[Row] = []
    ours, ref, ours_cls, ref_cls, steps = [], [], [], [], []
    for seed in SEEDS:
        out = tmp / f"{Path(config).stem}_{seed}"
        pw, rf = _pair(_pixelwise_cmd(config, data[ds], out, seed, BUDGET[ds]),
                       [sys.executable, "-m", "bench.quality_reference", "semantic", "--arch", arch,
                        "--classes", str(k), "--crop", str(crop), "--batch-size", str(batch),
                        "--data", str(data[ds]), "--seed", str(seed), "--budget", str(BUDGET[ds])])
        score = (lambda iou: iou[1]) if ds == "stardist" else _nanmean
        ours.append(score(pw["iou"]))
        ref.append(score(rf["iou"]))
        ours_cls.append(pw["iou"])
        ref_cls.append(rf["iou"])
        steps.append((pw["step"], rf["steps"]))
        print(f"[quality] {name} {ds} seed {seed}: pixelwise {ours[-1]:.3f} ({pw['step']} steps), "
              f"reference {ref[-1]:.3f} ({rf['steps']} steps)", file=sys.stderr, flush=True)
    metric = "foreground IoU" if ds == "stardist" else "mIoU"
    per_step = f"steps {statistics.mean(s[0] for s in steps):.0f} vs {statistics.mean(s[1] for s in steps):.0f}"
    rows.append(_row(f"{name} from scratch, {ds}, {BUDGET[ds]} s on 1 thread: {metric} "
                     f"(`{config}` vs smp.{'Unet' if arch == 'unet' else 'DeepLabV3Plus'})",
                     ours, ref, per_step))
    if ds != "stardist":
        per_class = lambda rs: " / ".join(f"{_nanmean([r[c] for r in rs]):.2f}" for c in range(k))
        rows.append(Row("  same runs: per-class IoU (background / connective / inflammatory / neoplastic)",
                        per_class(ours_cls), per_class(ref_cls), "", "means over the seeds"))
    return rows


def _instance_rows(tmp: Path, data: dict[str, Path], ds: str, config: str, folder: str) -> list[Row]:
    rows: list[Row] = []
    ours, ref, ours50, ref50, steps = [], [], [], [], []
    for seed in SEEDS:
        out = tmp / f"{Path(config).stem}_{seed}"
        pw, rf = _pair(_pixelwise_cmd(config, data[folder], out, seed, BUDGET["maskrcnn"]),
                       [sys.executable, "-m", "bench.quality_reference", "maskrcnn", "--data",
                        str(data[folder]), "--seed", str(seed), "--budget", str(BUDGET["maskrcnn"])])
        ours.append(pw["mask_AP"])
        ref.append(rf["mask_ap"])
        ours50.append(pw["mask_AP50"])
        ref50.append(rf["mask_ap50"])
        steps.append((pw["step"], rf["steps"]))
        print(f"[quality] Mask R-CNN {ds} seed {seed}: pixelwise AP {ours[-1]:.3f} ({pw['step']} steps), "
              f"reference {ref[-1]:.3f} ({rf['steps']} steps)", file=sys.stderr, flush=True)
    per_step = f"steps {statistics.mean(s[0] for s in steps):.0f} vs {statistics.mean(s[1] for s in steps):.0f}"
    what = (f"Mask R-CNN ResNet-18-FPN from scratch, {ds}, {BUDGET['maskrcnn']} s on 1 thread: mask AP "
            f"(`{config}` vs torchvision MaskRCNN)")
    rows.append(_row(what, ours, ref, per_step))
    rows.append(_row("  same runs: mask AP50", ours50, ref50, ""))
    return rows
