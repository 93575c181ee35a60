"""Prediction on image files, for every task: the task's result files per image.

Semantic: a palette label PNG and a colour overlay (``outputs``: ``labels`` alone skips the
drawing; ``probs`` adds the class probabilities as ``{name}_probs.npz``); instance: an
instance-id PNG, an overlay with class and score, and the COCO results JSON; panoptic: the
COCO panoptic PNG, an overlay, and one ``panoptic.json`` for the folder (:mod:`pixelwise.tasks`).
Images of any size: ``unet_original`` always runs by overlap-tile; other semantic models run
the whole image, or by sliding window with ``tile``/``overlap``; ``flip``/``scales`` add
test-time augmentation.

Nothing is destroyed: the output names mirror the inputs' paths below their common folder
(``a/x.png`` and ``b/x.png`` give ``OUT/a/x.png`` and ``OUT/b/x.png``), a run whose outputs
would overwrite an input or each other is refused before anything is written, and every
file is written atomically.

Speed: images of one size are stacked into batches of ``batch_size`` (different sizes are
grouped by size first, so results equal the one-by-one path); with ``num_workers`` > 0 the
decoding runs in DataLoader worker processes and the PNG encoding in a pool of as many
writer processes, both overlapped with the forward pass. Under ``torchrun`` each rank
predicts its contiguous block of the inputs (every output is written once, by one rank);
a task's per-run files (``panoptic.json``) are merged by rank 0.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import sys
from collections import deque
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from tqdm import tqdm

from pixelwise.data.io import read_image
from pixelwise.data.transforms import normalize_image  # noqa: F401  (re-exported)
from pixelwise.engine.checkpoint import load_checkpoint, model_from_checkpoint
from pixelwise.engine.common import resolve_device
from pixelwise.errors import DataError, PixelwiseError
from pixelwise.tasks import task_of_checkpoint

__all__ = ["predict_files", "predict_array", "normalize_image", "collect_inputs", "pending_inputs",
           "output_names", "check_outputs", "size_batches", "OUTPUT_KINDS", "SKIPPED_JSON"]

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
SEMANTIC_OUTPUTS = (".png", "_overlay.png")  # per input image, written in this order
#: what ``outputs`` may name; ``labels`` (the main file) is always written
OUTPUT_KINDS = ("labels", "overlay", "probs")
DEFAULT_OUTPUTS = ("labels", "overlay")
#: ``batch_size=None``: up to 8 images, at most this many pixels per forward pass (8 x 512 x 512)
AUTO_BATCH, AUTO_BATCH_PIXELS = 8, 8 * 512 * 512
#: the list of unreadable images a ``skip_bad_images`` run left out, in ``out``
SKIPPED_JSON = "skipped_images.json"


def collect_inputs(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    """Files as given, folders expanded to their images (sorted); a file named twice is kept once."""
    files: list[Path] = []
    seen: set[Path] = set()
    inputs = list(inputs)
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
        elif p.is_file():
            found = [p]
        else:
            raise DataError(p, "input image not found")
        for f in found:
            key = f.resolve()
            if key not in seen:
                seen.add(key)
                files.append(f)
    if not files:
        raise DataError(", ".join(map(str, inputs)), "no input images found")
    return files


def output_names(files: Sequence[Path]) -> list[str]:
    """Each input's output name (a relative POSIX path without suffix): its path below the
    inputs' deepest common folder, without the extension, so equal file names in different
    folders never collide (one folder: just the stems). Files of one folder that differ only
    by extension (``x.png``, ``x.jpg``) keep it (``x.png``, ``x.jpg``)."""
    parents = [os.path.abspath(f.parent) for f in files]
    root = os.path.commonpath(parents) if parents else ""
    rel = [Path(os.path.relpath(os.path.abspath(f), root)) for f in files]
    names = [r.with_suffix("").as_posix() for r in rel]
    counts: dict[str, int] = {}
    for n in names:
        counts[n] = counts.get(n, 0) + 1
    return [r.as_posix() if counts[n] > 1 else n for n, r in zip(names, rel)]


def _suffixes(task: Any, outputs: Sequence[str]) -> tuple[str, ...]:
    return tuple(task.output_suffixes_for(outputs))


def check_outputs(files: Sequence[Path], names: Sequence[str], out: Path, suffixes: Sequence[str],
                  per_run: Sequence[str] = ()) -> None:
    """Refuse a run whose outputs would overwrite one of its inputs or each other (one line
    naming both files and the fix); nothing is written before this passes."""
    inputs = {os.path.realpath(f): f for f in files}
    owner: dict[str, Path] = {}
    planned = [(f, out / f"{n}{s}") for f, n in zip(files, names) for s in suffixes]
    planned += [(Path("(this run)"), out / p) for p in per_run]
    for f, target in planned:
        key = os.path.realpath(target)
        if key in inputs:
            raise PixelwiseError(f"predict: --out {out} would overwrite the input image {inputs[key]} with the "
                                 f"output of {f} ({target}); choose an --out folder that holds no input image")
        if key in owner:
            raise PixelwiseError(f"predict: the outputs of {owner[key]} and {f} would both be written to {target}; "
                                 "rename one of them or predict them into different --out folders")
        owner[key] = f


def pending_inputs(files: Iterable[Path], out: str | os.PathLike, suffixes: Iterable[str],
                   names: Sequence[str] | None = None) -> list[Path]:
    """The input images not done yet: an image is done when ``OUT/{name}{suffix}`` exists for
    every one of ``suffixes`` (outputs are written atomically, so an existing file is whole).
    ``names``: the output names (:func:`output_names`; default the stems)."""
    out = Path(out)
    files = list(files)
    suffixes = tuple(suffixes)
    names = list(names) if names is not None else [f.stem for f in files]
    return [f for f, n in zip(files, names) if not all((out / f"{n}{s}").is_file() for s in suffixes)]


def size_batches(sizes: Sequence[Any], batch_size: int, max_pixels: int | None = None) -> list[list[int]]:
    """Indices grouped into batches of at most ``batch_size`` images of one size, in the order
    each size first appears (input order within a size); an unknown size (None) is alone.
    ``max_pixels``: also at most this many pixels per batch (``(w, h)`` sizes; at least one image)."""
    groups: dict[Any, list[int]] = {}
    batches: list[list[int]] = []
    for i, s in enumerate(sizes):
        cap = batch_size if s is None or not max_pixels else min(batch_size, max(1, max_pixels // (s[0] * s[1])))
        if s is None or cap <= 1:
            batches.append([i])
            continue
        if s not in groups:
            groups[s] = []
            batches.append(groups[s])
        group = groups[s]
        if len(group) == cap:
            groups[s] = group = []
            batches.append(group)
        group.append(i)
    return batches


def _header_size(path: Path) -> tuple[int, int] | None:
    """The stored (width, height) read from the header only; None when PIL cannot open it."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.size
    except Exception:  # the decoder will name the problem
        return None


class _Images(torch.utils.data.Dataset):
    """Decoded images by index; an unreadable file gives its error message instead (so a
    DataLoader worker never raises and the main process decides: skip or stop)."""

    def __init__(self, files: Sequence[Path], mode: str) -> None:
        self.files, self.mode = list(files), mode

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[int, np.ndarray | None, tuple[str, str, str | None] | None]:
        try:
            return i, read_image(self.files[i], mode=self.mode), None
        except DataError as e:
            return i, None, (e.path, e.problem, e.fix)


def _as_list(batch: list[Any]) -> list[Any]:
    return batch


# -- writers ------------------------------------------------------------------------------
_WRITER: dict[str, Any] = {}


def _writer_init(task: Any, ckpt: dict[str, Any], out: Path, alpha: float, outputs: tuple[str, ...]) -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the main process, which ends the pool
    torch.set_num_threads(1)
    _WRITER.update(task=task, ckpt=ckpt, out=out, alpha=alpha, outputs=outputs)


def _write_one(result: Any, image: np.ndarray, name: str) -> tuple[str | None, str | None]:
    """Write one image's files in a writer process: (path, None) or (None, the error line)."""
    w = _WRITER
    try:
        path = w["task"].write(result, image, w["out"], name, w["ckpt"], {}, w["alpha"], outputs=w["outputs"])
        return str(path), None
    except PixelwiseError as e:  # exceptions with custom constructors do not pickle back
        return None, str(e)


def _slim(ckpt: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint without its tensors (what the writers need: classes, categories, ...)."""
    return {k: v for k, v in ckpt.items() if k not in ("state_dict", "optimizer", "scheduler", "scaler", "ema")}


@torch.inference_mode()
def predict_array(model: torch.nn.Module, image: np.ndarray, normalization: dict[str, Any],
                  device: torch.device | str = "cpu", *, tile: int | None = None, overlap: int | None = None,
                  flip: bool = False, scales: tuple[float, ...] | None = None) -> np.ndarray:
    """uint8 (H, W[, C]) image -> (H, W) int64 class ids of a semantic model (in eval mode)."""
    from pixelwise.postprocess import predict_labels

    x = normalize_image(image, normalization)[None].to(device)
    return predict_labels(model, x, tile, overlap, flip, scales)[0].cpu().numpy()


def parse_outputs(outputs: str | Sequence[str] | None) -> tuple[str, ...]:
    """``"labels,overlay"`` (or a list) -> the output kinds, ``labels`` first, validated."""
    if outputs is None:
        return DEFAULT_OUTPUTS
    items = [s.strip() for s in (outputs.split(",") if isinstance(outputs, str) else outputs) if s.strip()]
    bad = [s for s in items if s not in OUTPUT_KINDS]
    if bad or not items:
        raise PixelwiseError(f"--outputs: unknown kind(s) {', '.join(bad) or '(none given)'}; choose from "
                             f"{', '.join(OUTPUT_KINDS)} (comma-separated; labels are always written)")
    return tuple(k for k in OUTPUT_KINDS if k == "labels" or k in items)


@torch.inference_mode()
def predict_files(checkpoint: str | os.PathLike, inputs: Iterable[str | os.PathLike], out: str | os.PathLike,
                  device: str = "auto", alpha: float = 0.5, progress: bool = True, *, tile: int | None = None,
                  overlap: int | None = None, flip: bool = False,
                  scales: tuple[float, ...] | None = None, fast: bool = False, optimize: bool | None = None,
                  skip_existing: bool = False, score_threshold: float = 0.5,
                  gt_json: str | os.PathLike | None = None, ckpt: dict[str, Any] | None = None,
                  batch_size: int | None = 1, num_workers: int = 0, outputs: str | Sequence[str] | None = None,
                  skip_bad_images: bool = False) -> list[Path]:
    """Write the task's files for every input image (see the module docstring) into ``out``.

    ``optimize``: run :func:`pixelwise.optimize.optimize`'s model (same outputs within 1e-4;
    it checks itself); None (default) = on where the task supports it (semantic), ``fast``
    forces it on (the old flag). ``skip_existing``: leave out the images whose outputs all
    exist (an interrupted run resumes where it stopped; every file is written atomically, so a
    killed run leaves no partial file and its last image is redone). ``score_threshold``: the
    lowest instance score written (instance checkpoints). ``batch_size``: images of one size
    per forward pass (tasks without batching run one by one); None: automatic, up to 8 images
    and 8 x 512 x 512 pixels per pass. ``num_workers``: decoding and
    writing processes (0: all in this process). ``outputs``: ``labels``, ``overlay``,
    ``probs`` (comma-separated; default labels,overlay). ``skip_bad_images``: leave out the
    images that cannot be read, list them in ``OUT/skipped_images.json`` and warn in one line
    (default: stop with one line naming the file). Returns the main file per image (input
    order), then the files written once per run (panoptic: ``panoptic.json``).
    """
    from pixelwise.engine import distributed as dist_

    if (batch_size is not None and batch_size < 1) or num_workers < 0:
        raise PixelwiseError(f"batch_size must be >= 1 and num_workers >= 0, got {batch_size} and {num_workers}")
    ckpt = ckpt if ckpt is not None else load_checkpoint(checkpoint)
    task = task_of_checkpoint(ckpt)
    kinds = parse_outputs(outputs)
    task.check_outputs(kinds)
    options = {k: v for k, v in {"tile": tile, "overlap": overlap, "flip": flip, "scales": scales}.items() if v}
    task.check_eval_options(options)
    dev = dist_.init_distributed(device) if dist_.launched_by_torchrun() else resolve_device(device)
    out = Path(out)
    files = collect_inputs(inputs)
    names = output_names(files)
    suffixes = _suffixes(task, kinds)
    check_outputs(files, names, out, suffixes, task.per_run_files)
    model = model_from_checkpoint(ckpt, checkpoint).eval()
    model.to(dev)
    if fast or (optimize if optimize is not None else task.supports_optimize):
        if task.supports_optimize:
            from pixelwise.optimize import optimize as _optimize

            model = _optimize(model, inplace=True)
    mode = ckpt["normalization"].get("image_mode", "RGB")
    state = task.begin_predict(files, out, ckpt, skip_existing=skip_existing, gt_json=gt_json, names=names)
    index = list(range(len(files)))
    if skip_existing:
        index = [i for i in index if not all((out / f"{names[i]}{s}").is_file() for s in suffixes)]
    world, rank = dist_.world_size(), dist_.rank()
    index = dist_.broadcast_object(index)  # rank 0's view: other ranks may already be writing
    index = index[len(index) * rank // world:len(index) * (rank + 1) // world]  # this rank's block
    out.mkdir(parents=True, exist_ok=True)
    for d in sorted({(out / names[i]).parent for i in index}):
        d.mkdir(parents=True, exist_ok=True)

    bs = (batch_size or AUTO_BATCH) if task.batched_predict else 1
    batches = size_batches([_header_size(files[i]) for i in index] if bs > 1 else [None] * len(index), bs,
                           AUTO_BATCH_PIXELS if batch_size is None else None)
    ds = _Images([files[i] for i in index], mode)
    start = "fork" if "fork" in mp.get_all_start_methods() else "spawn"  # fork: no re-import per worker
    loader = torch.utils.data.DataLoader(ds, batch_sampler=batches, num_workers=num_workers, collate_fn=_as_list,
                                         multiprocessing_context=start if num_workers else None)
    pool = None
    if num_workers and task.write_in_workers:
        pool = mp.get_context(start).Pool(num_workers, _writer_init, (task, _slim(ckpt), out, alpha, kinds))
    written: dict[int, Path] = {}
    skipped: list[dict[str, str]] = []
    pending: deque = deque()

    def drain(limit: int) -> None:
        while len(pending) > limit:
            i, res = pending.popleft()
            path, err = res.get()
            if err is not None:
                raise PixelwiseError(err)
            written[i] = Path(path)

    bar = tqdm(total=len(index), desc="predict", unit="img", disable=not progress or rank != 0)
    try:
        for batch in loader:
            good = []
            for j, image, err in batch:
                if err is None:
                    good.append((index[j], image))
                elif skip_bad_images:
                    skipped.append({"file": str(files[index[j]]), "error": err[1]})
                else:
                    fix = f"{err[2]}; or leave such images out with --skip-bad-images" if err[2] else \
                        "leave such images out with --skip-bad-images"
                    raise DataError(err[0], err[1], fix)
            if good:
                results = task.predict_batch(model, [im for _, im in good], ckpt, dev,
                                             score_threshold=score_threshold, outputs=kinds, **options)
                for (i, image), result in zip(good, results):
                    if pool is not None:
                        pending.append((i, pool.apply_async(_write_one, (result, image, names[i]))))
                    else:
                        written[i] = task.write(result, image, out, names[i], ckpt, state, alpha, outputs=kinds)
                drain(4 * max(1, num_workers) * bs)
            bar.update(len(batch))
        drain(0)
    except BaseException:
        if pool is not None:  # writers stopped mid-file leave their temporary files: remove them
            pool.terminate()
            pool.join()
            for i, _ in pending:
                for sfx in suffixes:
                    target = out / f"{names[i]}{sfx}"
                    for tmp in target.parent.glob(f".{target.name}.*.tmp"):
                        tmp.unlink(missing_ok=True)
        raise
    finally:
        bar.close()
        if pool is not None:
            pool.close()
            pool.join()
    mine = [written[i] for i in sorted(written)]
    if world > 1:
        skipped = dist_.gather_objects(skipped)
        mine = [Path(p) for p in dist_.gather_objects([str(p) for p in mine])]
        state = task.gather_predict_state(state, dist_.gather_objects)
    if skipped:
        if rank == 0:
            from pixelwise.data.loading import write_json

            write_json(out / SKIPPED_JSON, {"skipped": skipped})
            print(f"warning: {len(skipped)} unreadable image(s) left out (--skip-bad-images), listed in "
                  f"{out / SKIPPED_JSON}; first: {skipped[0]['file']}: {skipped[0]['error']}", file=sys.stderr)
    per_run = task.end_predict(out, ckpt, state) if rank == 0 else [out / p for p in task.per_run_files]
    dist_.barrier()  # every rank returns once the run's files are all there
    return mine + per_run
