"""The Python API: load a model in one line, predict in another.

::

    import pixelwise

    seg = pixelwise.load("runs/demo/run")            # a run folder, a .pt, a pretrained folder or a hub id
    result = seg.predict("photo.jpg")                 # path, PIL image, ndarray, tensor, or a list of them
    result.save("photo_labels.png"); overlay = result.overlay(image)

``load`` takes a run folder (its ``best.pt``, else ``last.pt``), a checkpoint file, a
*pretrained folder* (``model.safetensors`` + ``config.json``, written by
:meth:`Segmenter.save_pretrained`) or a Hugging Face hub repo id already in the local hub
cache (offline: ``huggingface_hub.snapshot_download(repo_id, local_files_only=True)``).
A pretrained folder is read without unpickling anything: the weights are safetensors, the
rest JSON. Predictions go through the model's task (:mod:`pixelwise.tasks`), so every
model kind works and returns its typed result: :class:`~pixelwise.tasks.semantic.SemanticResult`
(``labels``, ``probs`` with ``probs=True``), :class:`~pixelwise.tasks.instance.InstanceResult`
(``masks``, ``boxes``, ``labels``, ``scores``) or :class:`~pixelwise.tasks.panoptic.PanopticResult`
(``id_map``, ``segments_info()``); each has ``.overlay(image)`` and ``.save(path)``.
"""
from __future__ import annotations

import json
import os
import re
import threading
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from pixelwise.errors import CheckpointError, PixelwiseError

__all__ = ["load", "Segmenter", "WEIGHTS_NAME", "CONFIG_NAME", "PRETRAINED_FORMAT"]

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
#: version of the config.json layout
PRETRAINED_FORMAT = 1
#: checkpoint entries that describe training, not the model: never written to config.json
_TRAINING_KEYS = frozenset({"state_dict", "optimizer", "scheduler", "rng", "epoch_progress", "config", "metrics",
                            "epoch", "step", "version", "scaler", "ema"})
_INFERENCE_KEYS = ("tile", "overlap", "flip", "scales")
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _json_ready(value: Any) -> Any:
    """``value`` as plain JSON types (tuples -> lists, NumPy scalars -> numbers); raises TypeError."""
    return json.loads(json.dumps(value, default=lambda o: o.item() if hasattr(o, "item") else list(o)))


class Segmenter:
    """A loaded model ready to predict: ``predict(images)`` -> the task's typed results.

    Build it with :func:`load` (or :meth:`from_pretrained`). Attributes: ``model`` (eval
    mode, on ``device``), ``task`` (the :class:`~pixelwise.tasks.base.Task`), ``model_name``,
    ``classes`` (``[{id, name, color, isthing}]``), ``normalization``, ``image_mode``,
    ``info`` (the checkpoint entries describing the model, no weights). Calls to
    :meth:`predict` run one at a time (thread-safe).
    """

    def __init__(self, model: torch.nn.Module, info: dict[str, Any], device: str | torch.device | None = None, *,
                 source: str = "model", optimize: bool = False, tile: int | None = None,
                 overlap: int | None = None, flip: bool = False, scales: Sequence[float] | None = None,
                 score_threshold: float = 0.5):
        from pixelwise.engine.common import resolve_device
        from pixelwise.tasks import task_of_checkpoint

        self.info = info
        self.source = str(source)
        self.task = task_of_checkpoint(info)
        self.model_name = str(info["model"]["name"])
        self.classes = self.task.classes_of(info)
        self.normalization = dict(info["normalization"])
        self.image_mode = self.normalization.get("image_mode", "RGB")
        self.device = resolve_device("auto" if device is None else str(device))
        self.inference = {"tile": tile, "overlap": overlap, "flip": bool(flip),
                          "scales": tuple(scales) if scales else None}
        self.task.check_eval_options({k: v for k, v in self.inference.items() if v})
        self.score_threshold = float(score_threshold)
        model = model.eval().to(self.device)
        self.optimized = bool(optimize and self.task.supports_optimize)
        if self.optimized:
            from pixelwise.optimize import optimize as fold

            model = fold(model, inplace=False)
        self.model = model
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return (f"Segmenter({self.model_name}, task={self.task.name}, {len(self.classes)} classes, "
                f"device={self.device}, from {self.source})")

    # -- prediction -----------------------------------------------------------------------
    def predict(self, images: Any, **options: Any) -> Any:
        """Segment one image or a list / batch of them; returns one result or a list.

        ``images``: a path, a PIL image, a uint8 ndarray (H, W) or (H, W, C) (a float array
        is read as 0..1), a tensor (C, H, W) float 0..1 or uint8, a (N, ...) batch of arrays
        or tensors, or a list of any of these. ``options`` override :func:`load`'s: ``tile``,
        ``overlap``, ``flip``, ``scales`` (semantic), ``score_threshold`` (instance),
        ``probs=True`` (semantic: also the (K, H, W) class probabilities).
        """
        unknown = sorted(set(options) - set(_INFERENCE_KEYS) - self.task.predict_options - {"score_threshold"})
        if unknown:
            raise PixelwiseError(f"predict() of a {self.task.name} model does not take {', '.join(unknown)}; it "
                                 f"takes: {', '.join(sorted(set(_INFERENCE_KEYS) | self.task.predict_options))}")
        inference = {**self.inference, **{k: options.pop(k) for k in _INFERENCE_KEYS if k in options}}
        self.task.check_eval_options({k: v for k, v in inference.items() if v})
        options.setdefault("score_threshold", self.score_threshold)
        arrays, batched = _images(images, self.image_mode)
        with self._lock, torch.inference_mode():
            results = [self.task.predict(self.model, a, self.info, self.device, **inference, **options)
                       for a in arrays]
        return results if batched else results[0]

    __call__ = predict

    def read(self, image: Any) -> np.ndarray:
        """The uint8 (H, W, C) array :meth:`predict` would see for ``image`` (to draw overlays on)."""
        return _images(image, self.image_mode)[0][0]

    # -- sharing ----------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """The ``config.json`` of :meth:`save_pretrained`: the model spec (name, classes count,
        build options), task, classes (and the task's entries such as COCO category ids),
        normalisation, pixelwise version."""
        import pixelwise

        cfg: dict[str, Any] = {"pixelwise_format": PRETRAINED_FORMAT, "pixelwise_version": pixelwise.__version__,
                               "task": self.task.name}
        for key, value in self.info.items():
            if key in _TRAINING_KEYS or key.startswith("best_"):
                continue
            try:
                cfg[key] = _json_ready(value)
            except (TypeError, ValueError):
                raise PixelwiseError(f"checkpoint entry {key!r} cannot be written as JSON ({type(value).__name__})"
                                     ) from None
        cfg["task"] = self.task.name
        return cfg

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write ``directory/model.safetensors`` (weights) and ``directory/config.json``
        (:meth:`config`), each atomically (the config last: a folder with a config has its
        weights). Loading it back never unpickles anything. Returns the folder."""
        from safetensors.torch import save

        from pixelwise.fs import atomic_write_bytes, atomic_write_text

        directory = Path(directory)
        if directory.exists() and not directory.is_dir():
            raise PixelwiseError(f"{directory}: exists and is not a folder; choose another output folder")
        directory.mkdir(parents=True, exist_ok=True)
        state = _weights_of(self)
        atomic_write_bytes(directory / WEIGHTS_NAME, save(_unshared(state), metadata={"format": "pt"}))
        atomic_write_text(directory / CONFIG_NAME, json.dumps(self.config(), indent=2) + "\n")
        return directory

    @classmethod
    def from_pretrained(cls, repo_id_or_dir: str | os.PathLike, device: str | None = None,
                        **options: Any) -> "Segmenter":
        """A pretrained folder, or a hub repo id from the local hub cache (no network)."""
        folder = Path(repo_id_or_dir)
        if not folder.is_dir():
            folder = _hub_folder(str(repo_id_or_dir))
        return _from_folder(folder, device, **options)

    def push_to_hub(self, repo_id: str, *, private: bool = False, token: str | None = None,
                    commit_message: str = "Upload pixelwise model") -> str:
        """Upload :meth:`save_pretrained`'s folder to the Hugging Face hub (needs the network
        and a token); returns the commit URL."""
        import tempfile

        from huggingface_hub import HfApi

        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="pixelwise-push-") as tmp:
            self.save_pretrained(tmp)
            info = api.upload_folder(repo_id=repo_id, folder_path=tmp, commit_message=commit_message)
        return str(getattr(info, "commit_url", info))


def _weights_of(seg: Segmenter) -> dict[str, torch.Tensor]:
    """The state dict the model was loaded with (an optimized model's folded weights would
    not fit the model its config rebuilds)."""
    state = getattr(seg, "_state_dict", None)
    if state is None:
        if seg.optimized:
            raise PixelwiseError("save_pretrained() of an optimize=True model: load it without optimize to save it")
        state = seg.model.state_dict()
    return {k: v.detach().cpu() for k, v in state.items()}


def _unshared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensors safetensors can write: contiguous, and tensors sharing memory copied apart
    (tied weights are stored twice; ``load_state_dict`` fills both)."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for k, v in state.items():
        key = (v.untyped_storage().data_ptr(), v.untyped_storage().nbytes()) if v.numel() else (0, -len(out))
        out[k] = v.contiguous().clone() if key in seen or not v.is_contiguous() else v
        seen.add(key)
    return out


# -- loading ------------------------------------------------------------------------------------


def load(source: str | os.PathLike, device: str | None = None, *, optimize: bool = False, tile: int | None = None,
         overlap: int | None = None, flip: bool = False, scales: Sequence[float] | None = None,
         score_threshold: float = 0.5) -> Segmenter:
    """Load a model to predict with: ``source`` is a run folder (``best.pt``, else
    ``last.pt``), a checkpoint file, a pretrained folder (``model.safetensors`` +
    ``config.json``) or a hub repo id in the local hub cache. ``device``: None = CUDA when
    available. ``optimize``: fold BatchNorm into the convolutions (same outputs within 1e-4;
    models whose task supports it). ``tile``/``overlap``/``flip``/``scales``: sliding-window
    and test-time augmentation defaults of :meth:`Segmenter.predict`; ``score_threshold``:
    the lowest instance score kept."""
    options = dict(optimize=optimize, tile=tile, overlap=overlap, flip=flip, scales=scales,
                   score_threshold=score_threshold)
    path = Path(source)
    if path.is_dir():
        if (path / CONFIG_NAME).is_file() or (path / WEIGHTS_NAME).is_file():
            return _from_folder(path, device, **options)
        for name in ("best.pt", "last.pt"):
            if (path / name).is_file():
                return _from_checkpoint(path / name, device, **options)
        raise PixelwiseError(f"{path}: no best.pt, last.pt or {WEIGHTS_NAME} + {CONFIG_NAME} in this folder "
                             "(a run folder of `pixelwise train`, or a folder of Segmenter.save_pretrained)")
    if path.is_file():
        if path.name in (WEIGHTS_NAME, CONFIG_NAME):
            return _from_folder(path.parent, device, **options)
        return _from_checkpoint(path, device, **options)
    if _REPO_ID.match(str(source)) and not str(source).startswith((".", "/")):
        return _from_folder(_hub_folder(str(source)), device, **options)
    raise PixelwiseError(f"{source}: not found (give a run folder, a checkpoint file, a pretrained folder or a "
                         "hub repo id such as user/model)")


def _from_checkpoint(path: Path, device: str | None, **options: Any) -> Segmenter:
    from pixelwise.engine.checkpoint import load_checkpoint, model_from_checkpoint

    ckpt = load_checkpoint(path)
    model = model_from_checkpoint(ckpt, path)
    info = {k: v for k, v in ckpt.items() if k not in ("state_dict", "optimizer", "scheduler", "rng")}
    seg = Segmenter(model, info, device, source=str(path), **options)
    if seg.optimized:
        seg._state_dict = ckpt["state_dict"]
    return seg


def _from_folder(folder: Path, device: str | None, **options: Any) -> Segmenter:
    """A pretrained folder: JSON and safetensors only (nothing is unpickled)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from pixelwise.engine.checkpoint import load_state_dict_checked
    from pixelwise.models.registry import UnknownModelError, build_model

    cfg_path, weights = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    for p in (cfg_path, weights):
        if not p.is_file():
            raise CheckpointError(f"{p}: missing (a pretrained folder holds {WEIGHTS_NAME} and {CONFIG_NAME}, "
                                  "written by Segmenter.save_pretrained or `pixelwise export --format safetensors`)")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{cfg_path}: not readable JSON ({e})") from None
    missing = [k for k in ("model", "classes", "normalization") if k not in (cfg if isinstance(cfg, dict) else {})]
    if missing:
        raise CheckpointError(f"{cfg_path}: not a pixelwise config (no {', '.join(missing)} entry)")
    if int(cfg.get("pixelwise_format", 1)) > PRETRAINED_FORMAT:
        raise CheckpointError(f"{cfg_path}: written by a newer pixelwise (format {cfg['pixelwise_format']}); "
                              "upgrade pixelwise")
    spec = cfg["model"]
    from pixelwise.models.backbones import weight_files_skipped

    try:
        with weight_files_skipped():  # the weights come from model.safetensors; the encoder file need not exist
            model = build_model(spec["name"], int(spec["num_classes"]), **spec.get("kwargs", {}))
    except UnknownModelError as e:
        raise CheckpointError(f"{cfg_path}: {e}") from None
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{cfg_path}: the model entry does not build a model ({type(e).__name__}: {e})"
                              ) from None
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{weights}: not a readable safetensors file ({e})") from None
    load_state_dict_checked(model, state, weights, spec["name"])
    seg = Segmenter(model, cfg, device, source=str(folder), **options)
    if seg.optimized:
        seg._state_dict = state
    return seg


def _hub_folder(repo_id: str) -> Path:
    """The local snapshot of a hub repo (the hub cache only: nothing is downloaded)."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:  # pragma: no cover - a dependency
        raise PixelwiseError(f"{repo_id}: loading a hub repo id needs huggingface_hub (pip install "
                             "huggingface_hub)") from None
    try:
        return Path(snapshot_download(repo_id, local_files_only=True, allow_patterns=[WEIGHTS_NAME, CONFIG_NAME]))
    except LocalEntryNotFoundError:
        raise PixelwiseError(f"{repo_id}: not in the local hub cache (pixelwise loads hub models offline: "
                             f"download it first with `huggingface-cli download {repo_id}`, or give a local folder)"
                             ) from None
    except Exception as e:  # noqa: BLE001 - invalid ids, broken cache entries
        raise PixelwiseError(f"{repo_id}: cannot be loaded from the hub cache ({type(e).__name__}: {e})") from None


# -- inputs -------------------------------------------------------------------------------------


def _images(images: Any, mode: str) -> tuple[list[np.ndarray], bool]:
    """``(uint8 (H, W, C) arrays, was a list or batch)`` of anything :meth:`Segmenter.predict` takes."""
    if isinstance(images, (list, tuple)):
        if not images:
            raise PixelwiseError("predict() got an empty list of images")
        return [_image(x, mode, f"image {i}") for i, x in enumerate(images)], True
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
        return [_image(x, mode, f"image {i} of the batch") for i, x in enumerate(images)], True
    return [_image(images, mode, "the image")], False


def _image(x: Any, mode: str, what: str) -> np.ndarray:
    from PIL import Image

    if isinstance(x, (str, os.PathLike)):
        from pixelwise.data.io import read_image

        return read_image(x, mode=mode)
    if isinstance(x, Image.Image):
        what = f"{what} (PIL {x.mode} {x.width}x{x.height})"
        if x.mode != mode:
            x = x.convert("RGB").convert(mode) if mode == "L" and x.mode not in ("1", "LA", "I;16", "I", "F") \
                else x.convert(mode)
        a = np.array(x, dtype=np.uint8)  # a writable copy
        return a[:, :, None] if a.ndim == 2 else a
    if isinstance(x, torch.Tensor):
        t = x.detach().cpu()
        if t.ndim == 3:
            t = t.permute(1, 2, 0)  # (C, H, W) -> (H, W, C)
        x = t.numpy()
        what = f"{what} (tensor of shape {tuple(t.shape)})"
    elif isinstance(x, np.ndarray):
        what = f"{what} (array of shape {x.shape}, {x.dtype})"
    else:
        raise PixelwiseError(f"{what}: a {type(x).__name__} is not an image (give a path, a PIL image, a NumPy "
                             "array or a tensor)")
    a = np.asarray(x)
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[2] not in (1, 3, 4) or 0 in a.shape:
        raise PixelwiseError(f"{what}: expected (H, W), (H, W, C) or a (C, H, W) tensor with 1, 3 or 4 channels")
    if a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255
    elif np.issubdtype(a.dtype, np.floating):
        lo, hi = float(np.nanmin(a)), float(np.nanmax(a))
        if not (np.isfinite(a).all() and lo >= 0.0 and hi <= 1.0):
            raise PixelwiseError(f"{what}: float images must hold values in 0..1 (found {lo:g}..{hi:g}); give uint8 "
                                 "for 0..255")
        a = np.round(a * 255.0).astype(np.uint8)
    elif a.dtype != np.uint8:
        if a.min() < 0 or a.max() > 255:
            raise PixelwiseError(f"{what}: integer images must hold values 0..255 (found {a.min()}..{a.max()})")
        a = a.astype(np.uint8)
    c = a.shape[2]
    if mode == "RGB":
        a = np.repeat(a, 3, axis=2) if c == 1 else a[:, :, :3]
    elif c != 1:  # colour -> luma as PIL (and read_image) compute it
        a = np.asarray(Image.fromarray(np.ascontiguousarray(a[:, :, :3])).convert("L"))[:, :, None]
    return np.ascontiguousarray(a)
