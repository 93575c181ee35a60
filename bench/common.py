"""Timing helpers shared by the benchmark modules."""
from __future__ import annotations

import os
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Callable

QUICK = os.environ.get("PIXELWISE_BENCH_QUICK") == "1"


@dataclass
class Row:
    what: str
    pixelwise: str
    reference: str
    ratio: str
    note: str = ""


def seconds(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def side_by_side(a: Callable[[], object], b: Callable[[], object], reps: int, warmup: int = 1) -> tuple[float, float]:
    """Medians of ``reps`` alternating runs of ``a`` and ``b`` (after ``warmup`` of each)."""
    for _ in range(warmup):
        a()
        b()
    ta, tb = [], []
    for i in range(reps):
        if i % 2 == 0:
            ta.append(seconds(a))
            tb.append(seconds(b))
        else:
            tb.append(seconds(b))
            ta.append(seconds(a))
    return statistics.median(ta), statistics.median(tb)


def median_time(fn: Callable[[], object], reps: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    return statistics.median(seconds(fn) for _ in range(reps))


def fmt_s(t: float) -> str:
    return f"{t * 1000:.1f} ms" if t < 1 else f"{t:.2f} s"


def ratio(a: float, b: float) -> str:
    """pixelwise time / reference time (< 1 = pixelwise faster) and the speed-up."""
    return f"{a / b:.2f}x ({b / a:.1f}x faster)" if a < b else f"{a / b:.2f}x"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    import torch

    return f"{cpu}, {n} cores, Python {platform.python_version()}, torch {torch.__version__}"


def load() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"
