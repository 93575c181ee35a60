"""Checkpoints: one dict that rebuilds the model without any other flag (DESIGN.md).

Keys: ``model`` ({name, num_classes, kwargs}), ``state_dict``, ``classes`` (list of
class dicts), ``normalization`` ({mean, std, image_mode}), ``config``, ``optimizer``,
``scheduler``, ``epoch``, ``step``, ``rng``, ``metrics``, ``version``. A checkpoint written
in the middle of an epoch (every ``checkpoint_every`` steps) also has ``epoch_progress``:
``{"batches": k, "sums": {...}}``, the batches of ``epoch`` already trained and the running
sums of its logged losses; one written at the end of an epoch has none.

Never lose work: every write is atomic (a temporary file in the same folder, fsync, then
``os.replace``), so a crash, even ``kill -9`` during a write, never leaves a half-written
checkpoint under a checkpoint's name.

Never run code from a file: every load is ``torch.load(..., weights_only=True)``, which
unpickles tensors and plain containers only. So every write holds only those (tensors,
dicts, lists, tuples, str, numbers, ``None``; :func:`rng_state` stores NumPy's state as plain
ints), checked by :func:`save_checkpoint`. A file that needs any other Python object
(a checkpoint written by an older pixelwise, with NumPy arrays in it, or a malicious one) is refused
with :class:`UnsafeCheckpointError`; :func:`upgrade_checkpoint` rewrites one's own old
checkpoint, the one place that unpickles arbitrary objects, and only when called.

A run folder holds

- ``step_{N}.pt``: the last ``keep_last`` step checkpoints (:func:`save_step`);
- ``last.pt``: always the newest checkpoint, step or epoch;
- ``best.pt``: the epoch with the best validation score (:func:`save_epoch`).

:func:`restore_run` resumes from the newest of them that loads (``last.pt``, or a newer
``step_{N}.pt`` when the process died between writing it and updating ``last.pt``).
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
import pickle
import random
import re
import shutil
import warnings
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
           "RunState", "load_checkpoint", "model_from_checkpoint", "rng_state", "set_rng_state",
           "UnsafeCheckpointError", "upgrade_checkpoint", "safe_value"]

_STEP_FILE = re.compile(r"^step_(\d+)\.pt$")


class UnsafeCheckpointError(CheckpointError):
    """A file that ``torch.load(weights_only=True)`` refuses: it needs Python objects other
    than tensors and plain containers to be unpickled (an old checkpoint, or a malicious one)."""


# what torch.load(weights_only=True) rebuilds without any allow-listing (see save_checkpoint)
_PLAIN = (type(None), bool, int, float, complex, str, bytes)
_TORCH = (torch.Tensor, torch.Size, torch.dtype, torch.device)


def safe_value(obj: Any, where: str = "checkpoint") -> Any:
    """``obj`` with only what a weights-only load rebuilds: tensors, dicts, lists, tuples, sets,
    str, bytes, numbers, ``None``. NumPy scalars become Python numbers, NumPy arrays lists (as in
    ``metrics.jsonl``), paths strings; anything else raises :class:`CheckpointError` naming ``where``
    (a bug in what the caller stores, caught when writing rather than when loading)."""
    if type(obj) in _PLAIN or isinstance(obj, _TORCH):  # exact types: np.float64 is a float subclass
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, dict):
        out = {k: safe_value(v, f"{where}[{k!r}]") for k, v in obj.items()}
        if type(obj) in (dict, collections.OrderedDict) and all(out[k] is v for k, v in obj.items()):
            return obj  # unchanged: keep it as it is (a state dict's ``_metadata`` included)
        return collections.OrderedDict(out) if isinstance(obj, collections.OrderedDict) else out
    if isinstance(obj, (list, tuple, set)):
        items = [safe_value(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        if type(obj) in (list, tuple, set) and all(a is b for a, b in zip(items, obj)):
            return obj
        return set(items) if isinstance(obj, set) else list(items) if isinstance(obj, list) else tuple(items)
    raise CheckpointError(f"{where}: a {type(obj).__module__}.{type(obj).__qualname__} cannot be stored in a "
                          "weights-only checkpoint (store tensors, numbers, strings, lists or dicts)")


def save_checkpoint(path: str | os.PathLike, ckpt: dict[str, Any]) -> Path:
    """Atomically write ``ckpt`` to ``path`` (temp file + fsync + rename). Only what a
    weights-only load rebuilds is accepted (:func:`safe_value`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ckpt = safe_value({"version": pixelwise.__version__, **ckpt}, str(path))
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
        except UnsafeCheckpointError:
            raise  # not a crash artefact to step over: the user must see it
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
        except UnsafeCheckpointError:
            raise
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


_UNSUPPORTED = re.compile(r"Unsupported (global: GLOBAL [^ ]+|operand \d+)")


def safe_load(path: str | os.PathLike) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU: never runs code from the file.
    Raises :class:`UnsafeCheckpointError` (one line: the file, why, what to do) for a file that
    needs other Python objects, :class:`CheckpointError` for a missing or unreadable one."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols of foreign files
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights_only" not in str(e) and "Weights only" not in str(e):
            raise CheckpointError(f"{path}: not a readable checkpoint (UnpicklingError: {_first_line(e)})") from None
        m = _UNSUPPORTED.search(str(e))
        what = ("it needs " + m.group(1).replace("global: GLOBAL ", "the Python object ")
                if m else "it is not a weights-only torch file")
        raise UnsafeCheckpointError(
            f"{path}: contains non-weight Python objects ({what}) and was not loaded, since unpickling them "
            f"could run code; if it is your own checkpoint from an older pixelwise, convert it once with "
            f"`pixelwise checkpoint upgrade {path} --out NEW.pt --trust-this-file`, otherwise do not use it"
        ) from None
    except Exception as e:  # truncated zip, not a torch file, ...
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__}: {_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0][:300] if lines else ""


def _check_layout(path: Path, ckpt: Any) -> dict[str, Any]:
    if not isinstance(ckpt, dict) or "model" not in ckpt or "state_dict" not in ckpt:
        raise CheckpointError(f"{path}: not a pixelwise checkpoint (no 'model'/'state_dict' entries)")
    return ckpt


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a pixelwise checkpoint without running code from it (:func:`safe_load`), with a
    one-line error for missing/corrupt/foreign/unsafe files."""
    path = Path(path)
    ckpt = safe_load(path)
    return _check_layout(path, ckpt)


def upgrade_checkpoint(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Rewrite a checkpoint of an older pixelwise (NumPy arrays in its RNG state) in the
    weights-only format; returns ``dst``.

    This UNPICKLES ``src`` WITH ``weights_only=False``, which runs whatever code the file
    carries: call it only on a file you wrote yourself (the CLI asks for
    ``--trust-this-file``). ``src`` is left as it is; ``dst`` is written atomically and then
    read back with the safe loader.
    """
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise CheckpointError(f"{src}: checkpoint not found")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ckpt = torch.load(src, map_location="cpu", weights_only=False)  # trusted by the caller
    except Exception as e:
        raise CheckpointError(f"{src}: not a readable checkpoint ({type(e).__name__}: {_first_line(e)})") from None
    ckpt = dict(_check_layout(src, ckpt))
    if isinstance(ckpt.get("rng"), dict) and "numpy" in ckpt["rng"]:
        ckpt["rng"] = {**ckpt["rng"], "numpy": _plain_numpy_state(ckpt["rng"]["numpy"])}
    ckpt.pop("version", None)  # save_checkpoint stamps the version writing it
    try:
        save_checkpoint(dst, ckpt)
    except CheckpointError as e:
        raise CheckpointError(f"{src}: cannot be upgraded: {e}") from None
    load_checkpoint(dst)
    return dst


def model_from_checkpoint(ckpt: dict[str, Any], path: str | os.PathLike = "checkpoint") -> nn.Module:
    """Rebuild the model recorded in ``ckpt`` and load its weights (an encoder weight file
    named in its options is not read: it need not exist where the checkpoint is used)."""
    from pixelwise.models.backbones import weight_files_skipped

    spec = ckpt["model"]
    try:
        with weight_files_skipped():  # the state dict below holds the weights; their file may be elsewhere
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


def _plain_numpy_state(state: Any) -> dict[str, Any]:
    """NumPy's legacy global generator state (the tuple or dict of ``np.random.get_state``) as
    plain ints and floats: ``{"bit_generator", "key": [624 ints], "pos", "has_gauss", "gauss"}``."""
    if isinstance(state, dict) and "key" in state:  # already plain
        return state
    if isinstance(state, dict):  # np.random.get_state(legacy=False)
        name, key, pos = state["bit_generator"], state["state"]["key"], state["state"]["pos"]
        has_gauss, gauss = state["has_gauss"], state["gauss"]
    else:
        name, key, pos, has_gauss, gauss = state
    return {"bit_generator": str(name), "key": [int(k) for k in np.asarray(key, dtype=np.uint32)],
            "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)}


def rng_state() -> dict[str, Any]:
    """The state of every random generator a training step draws from (CUDA's too, if in use),
    in types a weights-only load rebuilds: Python's as a tuple of ints, NumPy's as plain ints
    (:func:`_plain_numpy_state`), torch's as byte tensors."""
    state = {"python": random.getstate(), "numpy": _plain_numpy_state(np.random.get_state()),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore exactly what :func:`rng_state` returned (also after a save/load round trip, which
    turns Python's tuples into lists when read back by older torch versions)."""
    py = state["python"]
    random.setstate((int(py[0]), tuple(int(v) for v in py[1]), py[2]))
    n = _plain_numpy_state(state["numpy"])
    np.random.set_state((n["bit_generator"], np.asarray(n["key"], dtype=np.uint32), n["pos"], n["has_gauss"],
                         n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        states = state["cuda"][: torch.cuda.device_count()]
        torch.cuda.set_rng_state_all(states)
