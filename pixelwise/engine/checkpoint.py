"""Checkpoints: one dict that rebuilds the model without any other flag (DESIGN.md).

Keys: ``model`` ({name, num_classes, kwargs}), ``state_dict``, ``classes`` (list of
class dicts), ``normalization`` ({mean, std, image_mode}), ``config``, ``optimizer``,
``scheduler``, ``epoch``, ``step``, ``rng``, ``metrics``, ``version``. A checkpoint written
in the middle of an epoch (every ``checkpoint_every`` steps) also has ``epoch_progress``:
``{"batches": k, "sums": {...}}``, the batches of ``epoch`` already trained and the running
sums of its logged losses; one written at the end of an epoch has none.

Never lose work: every write is atomic (a temporary file in the same folder, fsync, then
``os.replace``), so a crash, even ``kill -9`` during a write, never leaves a half-written
checkpoint under a checkpoint's name. A run folder holds

- ``step_{N}.pt``: the last ``keep_last`` step checkpoints (:func:`save_step`);
- ``last.pt``: always the newest checkpoint, step or epoch;
- ``best.pt``: the epoch with the best validation score (:func:`save_epoch`).

:func:`restore_run` resumes from the newest of them that loads (``last.pt``, or a newer
``step_{N}.pt`` when the process died between writing it and updating ``last.pt``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

import pixelwise
from pixelwise.data.io import atomic_open
from pixelwise.errors import CheckpointError
from pixelwise.models.registry import UnknownModelError, build_model

__all__ = ["save_checkpoint", "save_epoch", "save_step", "step_checkpoints", "latest_checkpoint", "restore_run",
           "RunState", "resume_run", "load_checkpoint", "model_from_checkpoint", "rng_state", "set_rng_state"]

_STEP_FILE = re.compile(r"^step_(\d+)\.pt$")


def save_checkpoint(path: str | os.PathLike, ckpt: dict[str, Any]) -> Path:
    """Atomically write ``ckpt`` to ``path`` (temp file + fsync + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ckpt = {"version": pixelwise.__version__, **ckpt}
    with atomic_open(path, "wb") as f:
        torch.save(ckpt, f)
    _fsync_dir(path.parent)
    return path


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (a power cut after it keeps the new name)."""
    with contextlib.suppress(OSError):  # not every platform/file system can open a folder
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _atomic_copy(src: Path, dst: Path) -> None:
    """``dst`` becomes a complete copy of ``src`` at once: a hard link when the file system
    has them (checkpoints are never modified in place, only replaced), else a copy; both
    through a temporary name and ``os.replace``."""
    tmp = dst.with_name(f".{dst.name}.link.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    try:
        os.link(src, tmp)
        os.replace(tmp, dst)
    except OSError:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        with open(src, "rb") as fin, atomic_open(dst, "wb") as fout:
            shutil.copyfileobj(fin, fout)
    _fsync_dir(dst.parent)


def save_epoch(out: str | os.PathLike, history: list[dict[str, Any]], ckpt: dict[str, Any], is_best: bool) -> None:
    """End of an epoch, for every task: rewrite ``metrics.jsonl`` with ``history``, save
    ``last.pt`` and, when this epoch is the best so far, make ``best.pt`` a copy of it (all atomic)."""
    import json

    from pixelwise.data.io import atomic_write_text
    from pixelwise.engine.common import json_clean

    out = Path(out)
    atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(json_clean(r)) + "\n" for r in history))
    last = save_checkpoint(out / "last.pt", ckpt)
    if is_best:
        _atomic_copy(last, out / "best.pt")


def step_checkpoints(out: str | os.PathLike) -> list[tuple[int, Path]]:
    """The ``step_{N}.pt`` files of a run folder as ``(N, path)``, oldest first."""
    out = Path(out)
    found = [(int(m.group(1)), p) for p in out.glob("step_*.pt") if (m := _STEP_FILE.match(p.name))]
    return sorted(found)


def save_step(out: str | os.PathLike, ckpt: dict[str, Any], keep_last: int = 3) -> Path:
    """Every ``checkpoint_every`` steps: write ``step_{ckpt['step']}.pt``, make ``last.pt`` the
    same checkpoint, and delete the step checkpoints older than the newest ``keep_last``
    (``keep_last`` < 1 keeps them all). Returns the new file."""
    out = Path(out)
    path = save_checkpoint(out / f"step_{int(ckpt['step'])}.pt", ckpt)
    _atomic_copy(path, out / "last.pt")
    if keep_last >= 1:
        for _, old in step_checkpoints(out)[:-keep_last]:
            with contextlib.suppress(FileNotFoundError):
                old.unlink()
    return path


def latest_checkpoint(out: str | os.PathLike) -> tuple[Path, dict[str, Any]]:
    """The newest checkpoint of a run folder that loads: ``last.pt`` unless a ``step_{N}.pt``
    of a later step exists (the process died between the two writes) or ``last.pt`` does not
    load. Raises :class:`CheckpointError` when there is none."""
    out = Path(out)
    last = out / "last.pt"
    candidates: list[tuple[int, int, Path]] = [(n, 0, p) for n, p in step_checkpoints(out)]
    problems: list[str] = []
    if last.is_file():
        try:
            ck = load_checkpoint(last)
        except CheckpointError as e:
            problems.append(str(e))
        else:
            candidates = [c for c in candidates if c[0] > int(ck.get("step", -1))]
            candidates.append((int(ck.get("step", -1)), 1, last))  # on a tie, last.pt (it has the epoch's metrics)
            if len(candidates) == 1:
                return last, ck
    for _, _, path in sorted(candidates, reverse=True):
        try:
            return path, (load_checkpoint(path) if path != last else ck)
        except CheckpointError as e:
            problems.append(str(e))
    detail = f"; {'; '.join(problems)}" if problems else ""
    raise CheckpointError(f"{last}: nothing to resume from (no readable last.pt or step_*.pt in {out}){detail}")


@dataclasses.dataclass
class RunState:
    """Where a resumed run continues: ``epoch`` (0-based) after its first ``batches`` batches,
    at global ``step``; ``sums`` are the running loss sums of that epoch's batches so far,
    ``best`` the best validation score, ``history`` the ``metrics.jsonl`` records of the
    epochs already finished, ``path`` the checkpoint it came from."""

    epoch: int = 0
    batches: int = 0
    step: int = 0
    best: float = -1.0
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    sums: dict[str, float] = dataclasses.field(default_factory=dict)
    path: Path | None = None


def restore_run(out: str | os.PathLike, spec: dict[str, Any], num_classes: int, model: nn.Module,
                optimizer: torch.optim.Optimizer, scheduler: Any, best_key: str) -> RunState:
    """Restore the newest checkpoint of ``out`` (:func:`latest_checkpoint`) into model,
    optimizer, scheduler and the RNGs, for every task; returns the :class:`RunState`.

    Under torchrun, rank 0 reads the files and every rank gets the same checkpoint (the run
    folder need not be shared between machines). Stale temporary files of a killed run are
    removed.
    """
    import json

    from pixelwise.engine import distributed as dist

    out = Path(out)
    loaded: Any
    if dist.is_main():
        try:
            path, ck = latest_checkpoint(out)
            history: list[dict[str, Any]] = []
            log = out / "metrics.jsonl"
            if log.is_file():
                history = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
            for tmp in out.glob(".*.tmp"):  # left behind by a kill during a write
                with contextlib.suppress(OSError):
                    tmp.unlink()
            loaded = (path, ck, history)
        except Exception as e:  # every rank raises it, rather than waiting for rank 0 forever
            loaded = e
    else:
        loaded = None
    loaded = dist.broadcast_object(loaded)
    if isinstance(loaded, Exception):
        raise loaded
    path, ck, history = loaded
    if ck["model"]["name"] != spec["name"] or ck["model"]["num_classes"] != num_classes:
        raise CheckpointError(
            f"{path}: written for model {ck['model']['name']!r} with {ck['model']['num_classes']} classes, "
            f"not {spec['name']!r} with {num_classes}; use the same --model or another --out")
    load_state_dict_checked(model, ck["state_dict"], path, spec["name"])
    optimizer.load_state_dict(ck["optimizer"])
    scheduler.load_state_dict(ck["scheduler"])
    set_rng_state(ck["rng"])
    progress = ck.get("epoch_progress")
    if progress is None:  # end of an epoch
        epoch, batches, sums = ck["epoch"] + 1, 0, {}
    else:
        epoch, batches, sums = ck["epoch"], int(progress["batches"]), dict(progress.get("sums", {}))
    return RunState(epoch=epoch, batches=batches, step=int(ck["step"]), best=ck.get(best_key, -1.0),
                    history=[h for h in history if h["epoch"] < epoch], sums=sums, path=path)


def resume_run(out: str | os.PathLike, spec: dict[str, Any], num_classes: int, model: nn.Module,
               optimizer: torch.optim.Optimizer, scheduler: Any, best_key: str) -> tuple[int, int, float, list]:
    """:func:`restore_run` for loops that checkpoint only at epoch ends: returns
    ``(start_epoch, step, best, history)``."""
    s = restore_run(out, spec, num_classes, model, optimizer, scheduler, best_key)
    if s.batches:
        raise CheckpointError(f"{s.path}: written in the middle of epoch {s.epoch + 1}; this training loop "
                              "resumes only from the end of an epoch")
    return s.epoch, s.step, s.best, s.history


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
    """The state of every random generator a training step draws from (CUDA's too, if in use)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        states = state["cuda"][: torch.cuda.device_count()]
        torch.cuda.set_rng_state_all(states)
