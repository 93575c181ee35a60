"""Golden check of the training engine: a deterministic 20-step run of fcn8s, maskrcnn (cpu
preset) and panoptic_fpn on tiny synthetic data; prints one line per model with the SHA-256 of
the final weights and of the evaluation metrics. A refactoring of the engine must leave both
unchanged (run this before and after it, on the same machine and torch build).

    python scripts/golden.py [--work DIR]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
from pathlib import Path

RUNS = {
    "fcn8s": ["--model", "fcn8s", "--model-arg", "width=0.125", "--model-arg", "backbone=vgg16_bn",
              "--batch-size", "2", "--crop-size", "48", "--optimizer", "adamw", "--lr", "0.002"],
    "maskrcnn": ["--model", "maskrcnn", "--model-arg", "preset=cpu", "--batch-size", "2", "--lr", "0.01"],
    "panoptic_fpn": ["--model", "panoptic_fpn", "--model-arg", "preset=cpu", "--model-arg", "backbone=resnet18",
                     "--model-arg", "fpn_channels=32", "--model-arg", "semantic_channels=32",
                     "--batch-size", "2", "--lr", "0.01"],
}


def weights_hash(path: Path) -> str:
    from pixelwise.engine.checkpoint import load_checkpoint

    sd = load_checkpoint(path)["state_dict"]
    h = hashlib.sha256()
    for k in sorted(sd):
        h.update(k.encode())
        h.update(sd[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def metrics_hash(path: Path) -> tuple[str, dict]:
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    drop = {"time", "seconds_per_image"}
    clean = [{k: v for k, v in r.items() if k not in drop} for r in records]
    return hashlib.sha256(json.dumps(clean, sort_keys=True).encode()).hexdigest()[:16], clean[-1]


def main() -> None:
    from pixelwise.cli import main as cli

    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default=None)
    ap.add_argument("--only", nargs="*", default=list(RUNS))
    a = ap.parse_args()
    work = Path(a.work or tempfile.mkdtemp(prefix="golden_"))
    data = work / "shapes"
    if not data.exists():
        cli(["data", "synth", "--out", str(data), "--num-train", "20", "--num-val", "4", "--size", "64", "--seed", "0"])
    for name in a.only:
        out = work / name
        # 20 train images, batch 2 -> 10 steps per epoch; 2 epochs = 20 steps, one evaluation at the end
        cli(["train", *RUNS[name], "--data", str(data), "--out", str(out), "--epochs", "2", "--seed", "0",
             "--num-workers", "0", "--threads", "1", "--deterministic", "--quiet", "--no-report",
             "--set", "eval_every=2", "--set", "scale_min=1.0", "--set", "scale_max=1.0",
             "--set", "train_split=train", "--repeat", "1", "--set", "time_limit=null"])
        mh, last = metrics_hash(out / "metrics.jsonl")
        keys = {k: last[k] for k in ("step", "train_loss", "miou", "mask_AP", "pq") if k in last}
        print(f"GOLDEN {name}: weights {weights_hash(out / 'last.pt')} metrics {mh} {json.dumps(keys)}", flush=True)


if __name__ == "__main__":
    main()
