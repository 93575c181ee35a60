"""The Task protocol: everything that differs between semantic, instance and panoptic work.

The engine (one training loop, one evaluation driver, prediction, report, serve, export)
never asks which task it runs: it calls the :class:`Task` that the model's registry entry
names (:func:`pixelwise.tasks.task_for_model`) or that a checkpoint records
(:func:`pixelwise.tasks.task_of_checkpoint`). A task owns:

- its data: :meth:`Task.open` (a split of a dataset on disk), :meth:`Task.collate`,
  the model's build arguments from the data (:meth:`Task.model_args`) and the checkpoint
  entries describing the classes (:meth:`Task.checkpoint_extras`);
- training: :meth:`Task.training` prepares the training set and returns the step,
  ``step(model, batch) -> {name: loss}`` (the loop sums the values and calls ``backward``);
- evaluation: :meth:`Task.evaluator` (``reset / process(batch, outputs) / evaluate()``),
  :meth:`Task.record` (the ``metrics.jsonl`` entries), :meth:`Task.describe` and
  :meth:`Task.format` (what a person reads);
- prediction: :meth:`Task.predict` one image into a typed result (:mod:`pixelwise.tasks.results`),
  its files (:meth:`Task.write`), its picture (:meth:`Task.draw`);
- its report sections (:meth:`Task.report`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

import numpy as np
import torch
import torch.nn as nn

from pixelwise.errors import PixelwiseError

__all__ = ["Task", "Evaluator", "TrainingSetup", "ReportContext", "ReportSections", "COMMON_CONFIG_KEYS"]

#: TrainConfig keys that every task's training reads
COMMON_CONFIG_KEYS = frozenset({
    "model", "model_kwargs", "data", "out", "train_split", "val_split", "epochs", "batch_size", "lr", "optimizer",
    "momentum", "weight_decay", "poly_power", "warmup_steps", "crop_size", "scale_min", "scale_max", "flip",
    "repeat", "image_mode", "mean", "std", "num_workers", "seed", "time_limit", "time_schedule", "eval_every", "device", "threads",
    "resume", "checkpoint_every", "keep_last", "deterministic", "amp", "skip_bad_samples", "tensorboard",
    "progress", "grad_clip", "overwrite", "init_from",
})


class Evaluator:
    """Accumulates one split's predictions and scores them (detectron2's DatasetEvaluator).

    The driver (:func:`pixelwise.engine.evaluate.run_evaluation`) calls :meth:`reset`, then
    per batch ``outputs = forward(model, batch, device)`` and :meth:`process`, then
    :meth:`evaluate`. Under torchrun each rank processes its block of the split; the driver
    gathers every rank's :meth:`state` (a list, in dataset order), hands the concatenation to
    :meth:`load_state` and scores once, so the metrics are those of one process.
    """

    def reset(self) -> None:
        raise NotImplementedError

    def forward(self, model: nn.Module, batch: dict[str, Any], device: torch.device) -> Any:
        raise NotImplementedError

    def process(self, batch: dict[str, Any], outputs: Any) -> None:
        raise NotImplementedError

    def state(self) -> list[Any]:
        raise NotImplementedError

    def load_state(self, items: list[Any]) -> None:
        raise NotImplementedError

    def evaluate(self) -> dict[str, Any]:
        raise NotImplementedError


@dataclass
class TrainingSetup:
    """What :meth:`Task.training` hands the training loop.

    Attributes:
        dataset: the training set (transforms set; the loop adds repetition and seeding).
        step: ``(model, batch, device) -> {name: loss tensor}``; ``"loss"`` alone means one term.
        crop_size: the crop actually used (a model may need another than the config's).
    """

    dataset: Any
    step: Callable[[nn.Module, dict[str, Any], torch.device], dict[str, torch.Tensor]]
    crop_size: int | None = None


@dataclass
class ReportContext:
    """Everything a task's report sections need (built by :mod:`pixelwise.report`)."""

    ckpt: dict[str, Any]
    ckpt_path: Path
    data: str
    split: str
    run_dir: Path
    max_images: int
    device: torch.device
    batch_size: int

    @property
    def class_names(self) -> list[str]:
        return [c["name"] for c in self.ckpt["classes"]]

    @property
    def class_colors(self) -> list[tuple[int, int, int]]:
        from pixelwise.data.classes import palette

        fallback = palette(len(self.ckpt["classes"]))
        return [tuple(int(v) for v in c.get("color", fallback[i]))[:3] for i, c in enumerate(self.ckpt["classes"])]

    @property
    def image_mode(self) -> str:
        return self.ckpt["normalization"].get("image_mode", "RGB")


@dataclass
class ReportSections:
    """A task's part of the run report.

    Attributes:
        summary: ``(key, label, value)`` rows of the final-metrics table.
        figures: ``(file name in the run folder, caption)`` of the pictures it wrote.
        curve_keys: ``metrics.jsonl`` keys plotted per epoch besides the loss.
        legend: ``(class name, colour)`` pairs.
        evaluation: the whole evaluation (written to ``report_metrics.json``).
        rows: picture rows "image | ground truth | prediction" for the grid.
    """

    summary: list[tuple[str, str, float | None]]
    figures: list[tuple[str, str]]
    curve_keys: tuple[str, ...]
    legend: list[tuple[str, tuple[int, int, int]]] = field(default_factory=list)
    evaluation: dict[str, Any] = field(default_factory=dict)
    rows: list[list[np.ndarray]] = field(default_factory=list)
    grid_caption: str = ""


class Task:
    """One kind of segmentation work. Subclasses set the class attributes and the methods."""

    #: registry name, also written into checkpoints (``task``)
    name: ClassVar[str] = ""
    #: the ``metrics.jsonl`` key that picks ``best.pt`` (higher is better)
    best_metric: ClassVar[str] = ""
    #: the checkpoint key holding the best value so far (read on ``--resume``)
    best_key: ClassVar[str] = ""
    #: TrainConfig keys this task reads besides :data:`COMMON_CONFIG_KEYS`
    config_keys: ClassVar[frozenset[str]] = frozenset()
    #: gradient-norm clipping when the config says ``grad_clip: null``
    default_grad_clip: ClassVar[float | None] = None
    #: DDP: some parameters may get no gradient in a step (a head sitting out a batch)
    find_unused_parameters: ClassVar[bool] = False
    #: :func:`pixelwise.optimize.optimize` (conv+BN folding, channels_last) applies to its models
    supports_optimize: ClassVar[bool] = False
    #: how :mod:`pixelwise.export` exports its models: "dense" (batch -> logits), "detection"
    #: (one image -> boxes, labels, scores, masks), "detection+semantic" (plus semantic logits,
    #: merged after the graph) or None (no export yet)
    export_kind: ClassVar[str | None] = None
    #: the model takes a list of (C, H, W) images (torchvision's detection convention), not a batch
    image_list_input: ClassVar[bool] = False
    #: keyword options of :meth:`predict` besides tiling / TTA (``pixelwise.load(...).predict``
    #: refuses the others by name)
    predict_options: ClassVar[frozenset[str]] = frozenset()
    #: files written per input image by :meth:`write`, in order (``--skip-existing``)
    output_suffixes: ClassVar[tuple[str, ...]] = (".png", "_overlay.png")

    # -- configuration ------------------------------------------------------------------
    def check_config(self, cfg: Any, defaults: Any) -> None:
        """Refuse keys this task would ignore: set to a non-default value in ``cfg``."""
        used = COMMON_CONFIG_KEYS | self.config_keys
        ignored = sorted(f.name for f in dataclasses.fields(cfg)
                         if f.name not in used and getattr(cfg, f.name) != getattr(defaults, f.name))
        if ignored:
            raise PixelwiseError(
                f"model {cfg.model!r} ({self.name} task) does not use the config key(s) {', '.join(ignored)}; "
                f"remove them. Keys of this task: {', '.join(sorted(self.config_keys)) or 'none'} besides the "
                f"common ones ({', '.join(sorted(COMMON_CONFIG_KEYS))})")

    # -- data ---------------------------------------------------------------------------
    def open(self, data: str, split: str, transforms: Any = None, image_mode: str = "RGB", **options: Any) -> Any:
        raise NotImplementedError

    def data_options(self, config: dict[str, Any]) -> dict[str, Any]:
        """Options of :meth:`open` that a run's config fixes (the same split when evaluating)."""
        return {}

    def wrap_dataset(self, data: Any, classes: Any = None, transform: Any = None, image_mode: str = "RGB",
                     indices: Sequence[int] | None = None) -> Any:
        """A user's own map-style dataset as this task's samples (``indices``: a subset)."""
        raise PixelwiseError(f"{self.name} models train on dataset folders (COCO files); a Python dataset of "
                             "(image, mask) pairs is for semantic models")

    def collate(self) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
        """The DataLoader's collate function (default: batch tensors, padding images of other sizes)."""
        from pixelwise.data.loading import pad_collate

        return pad_collate

    def model_args(self, ds: Any) -> tuple[int, dict[str, Any]]:
        """``(num_classes, build_model kwargs)`` from the training set."""
        return len(ds.classes), {}

    def checkpoint_extras(self, ds: Any) -> dict[str, Any]:
        """Entries of every checkpoint besides the common ones (e.g. COCO category ids)."""
        return {}

    def check_data(self, ds: Any, ckpt: dict[str, Any], data: Any) -> None:
        """Raise a DataError when ``ds`` does not have the classes ``ckpt`` was trained on."""

    # -- training -----------------------------------------------------------------------
    def training(self, cfg: Any, model: nn.Module, train_ds: Any, norm: dict[str, Any], out: Path,
                 main: bool) -> TrainingSetup:
        raise NotImplementedError

    # -- evaluation ---------------------------------------------------------------------
    def evaluator(self, ds: Any, ckpt_like: dict[str, Any], model: nn.Module, **options: Any) -> Evaluator:
        raise NotImplementedError

    #: options of :meth:`evaluator` a user may set (``pixelwise evaluate`` flags)
    eval_options: ClassVar[frozenset[str]] = frozenset()

    def check_eval_options(self, options: dict[str, Any]) -> None:
        """Refuse evaluation options this task does not have (e.g. ``tile`` for Mask R-CNN)."""
        unknown = sorted(set(options) - self.eval_options)
        if unknown:
            raise PixelwiseError(f"{self.name} checkpoints do not take the evaluation option(s) {', '.join(unknown)}"
                                 f"; this task takes: {', '.join(sorted(self.eval_options)) or 'none'}")

    def naming(self, ckpt: dict[str, Any]) -> dict[str, Any]:
        """How metrics name the classes: ``{"class_names": [...]}`` (panoptic: its categories)."""
        return {"class_names": [c["name"] for c in ckpt["classes"]]}

    def evaluation_summary(self, model: nn.Module, options: dict[str, Any]) -> dict[str, Any]:
        """Entries of ``pixelwise evaluate``'s metrics saying how it was evaluated."""
        return {}

    def evaluation_files(self, checkpoint: Path, out: Path | None, split: str) -> dict[str, Any]:
        """Evaluator options naming the files ``pixelwise evaluate`` writes besides the metrics."""
        return {}

    def record(self, metrics: dict[str, Any], ds: Any) -> dict[str, Any]:
        """The flat ``metrics.jsonl`` entries of one validation pass."""
        raise NotImplementedError

    def describe(self, record: dict[str, Any]) -> str:
        """The metrics part of an epoch's progress line."""
        raise NotImplementedError

    def format(self, metrics: dict[str, Any]) -> str:
        """The table ``pixelwise evaluate`` prints."""
        raise NotImplementedError

    def summary(self, result: dict[str, Any]) -> str:
        """The line ``pixelwise train`` prints at the end."""
        raise NotImplementedError

    def picture(self, model: nn.Module, ds: Any, index: int, device: torch.device) -> np.ndarray:
        """uint8 (H, W, 3) "image | prediction" panel of val image ``index`` (model in eval mode)."""
        raise NotImplementedError

    # -- prediction ---------------------------------------------------------------------
    def predict(self, model: nn.Module, image: np.ndarray, ckpt: dict[str, Any], device: torch.device,
                **options: Any) -> Any:
        """One uint8 (H, W[, C]) image -> a typed result (model in eval mode)."""
        raise NotImplementedError

    #: :meth:`predict_batch` runs several images of one size in one forward pass
    batched_predict: ClassVar[bool] = False
    #: :meth:`write` keeps no run state, so it may run in writer processes
    write_in_workers: ClassVar[bool] = True
    #: the output kinds of ``predict --outputs`` this task writes ("labels" is always written)
    output_kinds: ClassVar[frozenset[str]] = frozenset({"labels", "overlay"})
    #: files written once per run by :meth:`end_predict`, relative to the output folder
    per_run_files: ClassVar[tuple[str, ...]] = ()

    def predict_batch(self, model: nn.Module, images: Sequence[np.ndarray], ckpt: dict[str, Any],
                      device: torch.device, **options: Any) -> list[Any]:
        """Images of one size -> their results, equal to :meth:`predict` on each (default: one by one)."""
        return [self.predict(model, image, ckpt, device, **options) for image in images]

    def check_outputs(self, outputs: Sequence[str]) -> None:
        """Refuse output kinds this task cannot write (one line)."""
        bad = sorted(set(outputs) - self.output_kinds)
        if bad:
            raise PixelwiseError(f"{self.name} checkpoints cannot write --outputs {', '.join(bad)}; this task "
                                 f"writes: {', '.join(sorted(self.output_kinds))}")

    def output_suffixes_for(self, outputs: Sequence[str]) -> tuple[str, ...]:
        """The files :meth:`write` writes per image for these output kinds (``--skip-existing``)."""
        return tuple(s for s in self.output_suffixes if s != "_overlay.png" or "overlay" in outputs)

    def gather_predict_state(self, state: dict[str, Any], gather: Callable[[list[Any]], list[Any]]) -> dict[str, Any]:
        """Under torchrun: every rank's run state combined (``gather`` concatenates lists in rank order)."""
        return state

    def begin_predict(self, files: Sequence[Path], out: Path, ckpt: dict[str, Any], **options: Any) -> dict[str, Any]:
        """State shared by the images of one ``predict`` run (e.g. image ids)."""
        return {}

    def write(self, result: Any, image: np.ndarray, out: Path, stem: str, ckpt: dict[str, Any],
              state: dict[str, Any], alpha: float = 0.5, *, outputs: Sequence[str] = ("labels", "overlay")) -> Path:
        """Write the result's files (:meth:`output_suffixes_for` ``outputs``) atomically as
        ``out/{stem}{suffix}`` (``stem`` may hold sub-folders, which exist); returns the main one."""
        raise NotImplementedError

    def end_predict(self, out: Path, ckpt: dict[str, Any], state: dict[str, Any]) -> list[Path]:
        """Files written once per run after all images (e.g. ``panoptic.json``)."""
        return []

    #: how many files :meth:`end_predict` returns
    end_predict_files: ClassVar[int] = 0

    def predict_summary(self, images: int, out: Any, extra: Sequence[Path]) -> str:
        """The line ``pixelwise predict`` prints."""
        return f"wrote {images} label maps and overlays to {out}"

    def classes_of(self, ckpt: dict[str, Any]) -> list[dict[str, Any]]:
        """``[{id, name, color, isthing}]`` a person sees in legends (serve, report)."""
        return [{"id": int(c["id"]), "name": str(c["name"]), "color": [int(v) for v in c["color"]],
                 "isthing": bool(c.get("isthing", False))} for c in ckpt["classes"]]

    def serve_layer(self, result: Any, ckpt: dict[str, Any]) -> dict[str, Any]:
        """``{"labels": (H, W) ids, "layer": (H, W, 4) uint8 RGBA, "legend": [...]}`` for serve."""
        raise NotImplementedError

    # -- report -------------------------------------------------------------------------
    def report(self, ctx: ReportContext, model: nn.Module, ds: Any, metrics: dict[str, Any]) -> ReportSections:
        raise NotImplementedError
