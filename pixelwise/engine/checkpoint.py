"""Checkpoints: one dict that rebuilds the model without any other flag (DESIGN.md).

Keys: ``model`` ({name, num_classes, kwargs}), ``state_dict``, ``classes`` (list of
class dicts), ``normalization`` ({mean, std, image_mode}), ``config``, ``optimizer``,
``scheduler``, ``epoch``, ``step``, ``rng``, ``metrics``, ``version``.
Writes are atomic: a temporary file in the same folder, fsync, then ``os.replace``, so a
crash never leaves a half-written checkpoint behind.
"""
from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

import pixelwise
from pixelwise.errors import CheckpointError
from pixelwise.models.registry import UnknownModelError, build_model

__all__ = ["save_checkpoint", "save_epoch", "resume_run", "load_checkpoint", "model_from_checkpoint", "rng_state", "set_rng_state"]


def save_checkpoint(path: str | os.PathLike, ckpt: dict[str, Any]) -> Path:
    """Atomically write ``ckpt`` to ``path`` (temp file + fsync + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ckpt = {"version": pixelwise.__version__, **ckpt}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(ckpt, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def save_epoch(out: str | os.PathLike, history: list[dict[str, Any]], ckpt: dict[str, Any], is_best: bool) -> None:
    """End of an epoch, for every task: rewrite ``metrics.jsonl`` with ``history``, save
    ``last.pt`` and, when this epoch is the best so far, copy it to ``best.pt`` (all atomic)."""
    import json
    import shutil

    from pixelwise.data.io import atomic_write_text
    from pixelwise.engine.common import json_clean

    out = Path(out)
    atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(json_clean(r)) + "\n" for r in history))
    last = save_checkpoint(out / "last.pt", ckpt)
    if is_best:
        tmp = out / ".best.pt.tmp"
        shutil.copyfile(last, tmp)
        tmp.replace(out / "best.pt")


def resume_run(out: str | os.PathLike, spec: dict[str, Any], num_classes: int, model: nn.Module,
               optimizer: torch.optim.Optimizer, scheduler: Any, best_key: str) -> tuple[int, int, float, list]:
    """Restore ``OUT/last.pt`` into model, optimizer, scheduler and the RNGs, for every task.

    Returns ``(start_epoch, step, best, history)``: the epoch to continue with, the global
    step, the best score so far (checkpoint key ``best_key``) and the ``metrics.jsonl``
    records of the epochs already done.
    """
    import json

    out = Path(out)
    last = out / "last.pt"
    if not last.is_file():
        raise CheckpointError(f"{last}: nothing to resume from (no last.pt in {out})")
    ck = load_checkpoint(last)
    if ck["model"]["name"] != spec["name"] or ck["model"]["num_classes"] != num_classes:
        raise CheckpointError(
            f"{last}: written for model {ck['model']['name']!r} with {ck['model']['num_classes']} classes, "
            f"not {spec['name']!r} with {num_classes}; use the same --model or another --out")
    load_state_dict_checked(model, ck["state_dict"], last, spec["name"])
    optimizer.load_state_dict(ck["optimizer"])
    scheduler.load_state_dict(ck["scheduler"])
    set_rng_state(ck["rng"])
    start_epoch = ck["epoch"] + 1
    history = []
    log = out / "metrics.jsonl"
    if log.is_file():
        history = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        history = [h for h in history if h["epoch"] < start_epoch]
    return start_epoch, ck["step"], ck.get(best_key, -1.0), history


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a pixelwise checkpoint, with a clear error for missing/corrupt/foreign files."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated zip, pickle garbage, ...
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "state_dict" not in ckpt:
        raise CheckpointError(f"{path}: not a pixelwise checkpoint (no 'model'/'state_dict' entries)")
    return ckpt


def model_from_checkpoint(ckpt: dict[str, Any], path: str | os.PathLike = "checkpoint") -> nn.Module:
    """Rebuild the model recorded in ``ckpt`` and load its weights."""
    spec = ckpt["model"]
    try:
        model = build_model(spec["name"], spec["num_classes"], **spec.get("kwargs", {}))
    except UnknownModelError as e:
        raise CheckpointError(f"{path}: {e}") from None
    load_state_dict_checked(model, ckpt["state_dict"], path, spec["name"])
    return model


def load_state_dict_checked(model: nn.Module, state_dict: dict, path: Any, name: str) -> None:
    """``load_state_dict`` with a one-line error when the checkpoint is of another model."""
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        detail = "; ".join(line.strip() for line in first[1:3]) or first[0]
        raise CheckpointError(
            f"{path}: weights do not fit model {name!r} (checkpoint from another model or settings?): {detail[:300]}"
        ) from None


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
