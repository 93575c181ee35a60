"""``python -m bench [--quick] [--only GROUP ...] [--write]``: one table (what, pixelwise,
reference, ratio); ``--write`` also rewrites ``bench/RESULTS.md``."""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import traceback
from pathlib import Path

GROUPS = ["metrics", "pq", "mask_ap", "inference", "int8", "train", "elastic", "memory", "data", "predict", "byod", "quality", "histolytics"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench")
    ap.add_argument("--quick", action="store_true", help="fewer images and repetitions (a smoke run)")
    ap.add_argument("--only", nargs="+", choices=GROUPS)
    ap.add_argument("--write", action="store_true", help="write bench/RESULTS.md")
    a = ap.parse_args(argv)
    if a.quick:
        os.environ["PIXELWISE_BENCH_QUICK"] = "1"
    from bench import common, int8, metrics, models, predict

    groups = a.only or GROUPS
    load_before = common.load()
    rows: list = []
    flops: dict = {}
    runners = {
        "metrics": metrics.confusion_rows, "pq": metrics.pq_rows, "mask_ap": metrics.mask_ap_rows,
        "inference": lambda: models.inference_rows(flops) + models.flops_rows(flops),
        "train": models.train_rows, "elastic": models.elastic_rows, "memory": models.memory_rows,
        "data": models.data_rows, "int8": int8.int8_rows, "predict": predict.predict_rows,
        "byod": lambda: __import__("bench.byod", fromlist=["byod_rows"]).byod_rows(),
        "quality": lambda: __import__("bench.quality", fromlist=["quality_rows"]).quality_rows(),
        "histolytics": lambda: __import__("bench.histolytics", fromlist=["histolytics_rows"]).histolytics_rows(),
    }
    for g in groups:
        print(f"[bench] {g} ...", file=sys.stderr, flush=True)
        try:
            rows.extend(runners[g]())
        except Exception as e:  # a missing reference library must not hide the other rows
            traceback.print_exc()
            rows.append(common.Row(g, "error", "", "", f"{type(e).__name__}: {str(e)[:120]}"))
    header = "| what | pixelwise | reference | ratio (pixelwise / reference) | note |\n|---|---|---|---|---|"
    table = header + "\n" + "\n".join(f"| {r.what} | {r.pixelwise} | {r.reference} | {r.ratio} | {r.note} |"
                                      for r in rows)
    print(table)
    if a.write:
        text = (f"# Benchmark results\n\n{datetime.date.today().isoformat()}, {common.machine()}\n\n"
                f"Load average (1/5/15 min) before: {load_before}; after: {common.load()}"
                f"{' (QUICK run: fewer images/repetitions)' if a.quick else ''}.\n"
                f"Medians of alternating repetitions; ratio = pixelwise time / reference time.\n\n{table}\n")
        Path(__file__).with_name("RESULTS.md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
