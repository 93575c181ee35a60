"""The demo (``make demo`` / ``pixelwise demo``): the whole pipeline on the built-in data.

1. synthesise the 'shapes' dataset (VOC layout) into OUT/data,
2. train a model on it for a bounded time on the CPU (OUT/run),
3. evaluate the best checkpoint on the val split (OUT/metrics.json, confusion matrix PNG) and
   write the run report (OUT/run/report.html, as ``pixelwise train`` does),
4. predict overlays for a few val images (OUT/predictions),
5. print a summary that says where to look.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from pixelwise.engine.config import TrainConfig

__all__ = ["DEMO_CONFIG", "run_demo"]

# Measured on the 2-core CI machine: see README ("The demo").
DEMO_CONFIG: dict[str, Any] = dict(
    model="fcn8s",
    model_kwargs={"backbone": "vgg16_bn", "width": 0.25},
    epochs=8,
    batch_size=8,
    lr=0.002,
    optimizer="adamw",
    weight_decay=1e-4,
    scale_min=0.75,
    scale_max=1.25,
    crop_size=None,
    num_workers=1,
    time_limit=190.0,
    threads=2,
)
DEMO_DATA = dict(num_train=240, num_val=60, size=128, seed=0)


def run_demo(out: str | Path = "runs/demo", quick: bool = False) -> dict[str, Any]:
    from pixelwise.data.synthetic import generate_shapes
    from pixelwise.engine.evaluate import evaluate_checkpoint, format_metrics
    from pixelwise.engine.predict import predict_files
    from pixelwise.engine.train import train
    from pixelwise.report import write_report
    from pixelwise.viz import save_confusion_matrix, save_curves

    t0 = time.time()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = out / "data"
    if not (data / "classes.json").is_file():
        sizes = dict(DEMO_DATA, num_train=16, num_val=4) if quick else DEMO_DATA
        print(f"[1/4] synthesising the shapes dataset -> {data}")
        generate_shapes(data, **sizes)
    else:
        print(f"[1/4] using the shapes dataset in {data}")

    # the demo's own run folder: `make demo` again replaces the previous demo run, and says so
    cfg = TrainConfig(data=str(data), out=str(out / "run"), overwrite=True, **DEMO_CONFIG)
    if (out / "run" / "last.pt").exists():
        print(f"      (replacing the previous demo run in {out / 'run'})")
    if quick:
        cfg.epochs, cfg.time_limit = 1, 20.0
    print(f"[2/4] training {cfg.model} {cfg.model_kwargs} for at most {cfg.epochs} epochs / "
          f"{cfg.time_limit:.0f}s on {torch.get_num_threads()} CPU threads")
    result = train(cfg)

    print("[3/4] evaluating the best checkpoint on the val split")
    ckpt = out / "run" / "best.pt"
    metrics = evaluate_checkpoint(ckpt, data, "val", out=out / "metrics.json", progress=False)
    print(format_metrics(metrics, metrics["class_names"]))
    pictures = []
    try:
        pictures.append(save_confusion_matrix(out / "confusion_matrix.png", metrics["confusion"],
                                              metrics["class_names"]))
        import json

        history = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
        pictures.append(save_curves(out / "curves.png", history))
    except ImportError:
        print("(install matplotlib for the confusion-matrix and curve images)")
    try:  # the page `pixelwise train` writes: metrics, per-epoch table, config, pictures
        pictures.append(write_report(cfg.out, data=data, split=cfg.val_split, device=cfg.device))
    except ImportError as e:
        print(f"(report not written: {e}; install matplotlib: pip install 'pixelwise[extra]')")

    print("[4/4] predicting overlays for 8 val images")
    ids = (data / "ImageSets" / "Segmentation" / "val.txt").read_text().split()[:8]
    predict_files(ckpt, [data / "JPEGImages" / f"{i}.png" for i in ids], out / "predictions", progress=False)
    pictures.append(_save_val_grid(out / "val_grid.png", data, ids, out / "predictions"))

    elapsed = time.time() - t0
    summary = (
        f"\nDemo finished in {elapsed:.0f}s: val mIoU {metrics['miou']:.4f}, pixel accuracy "
        f"{metrics['pixel_accuracy']:.4f} ({result['steps']} training steps).\n"
        f"Look at:\n"
        f"  {out / 'predictions'}/*_overlay.png   predicted classes over the val images\n"
        f"  (val_grid.png: image | ground truth | prediction for 8 val images)\n"
        + "".join(f"  {p}\n" for p in pictures)
        + f"  {out / 'metrics.json'}   all metrics, per-class IoU and the confusion matrix\n"
        f"  {out / 'run'}   checkpoints (best.pt, last.pt), metrics.jsonl, config.json\n"
        f"Next: pixelwise predict --checkpoint {ckpt} YOUR_IMAGES --out preds\n"
    )
    print(summary)
    (out / "SUMMARY.txt").write_text(summary)
    return {"metrics": metrics, "time": elapsed, "train": result}


def _save_val_grid(path: Path, data: Path, ids: list[str], pred_dir: Path) -> Path:
    """image | ground truth | prediction, one row per val image."""
    from pixelwise.data.classes import load_classes
    from pixelwise.data.io import read_image, read_label, write_image
    from pixelwise.viz import colorize, comparison_grid

    colors = [c.color for c in load_classes(data / "classes.json")]
    rows = []
    for i in ids:
        img = read_image(data / "JPEGImages" / f"{i}.png")
        gt = read_label(data / "SegmentationClass" / f"{i}.png")
        pred = read_label(pred_dir / f"{i}.png")
        rows.append([img, colorize(gt, colors), colorize(pred, colors)])
    write_image(path, comparison_grid(rows))
    return path
