"""Print the markdown table of a train_zoo.sh run: best val mIoU and wall time per model."""
import json
import sys
from pathlib import Path

runs = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/zoo")
print("| config | model | best val mIoU | pixel acc | epochs | steps | train time (s) |")
print("|---|---|---|---|---|---|---|")
for d in sorted(p for p in runs.iterdir() if (p / "metrics.jsonl").is_file()):
    hist = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    best = max((h for h in hist if h.get("miou") is not None), key=lambda h: h["miou"])
    cfg = json.loads((d / "config.json").read_text())
    print(f"| {d.name} | {cfg['model']} {cfg['model_kwargs']} | {best['miou']:.3f} | {best['pixel_accuracy']:.3f} "
          f"| {hist[-1]['epoch'] + 1} | {hist[-1]['step']} | {hist[-1]['time']:.0f} |")
