"""Semantic segmentation: one class per pixel (FCN, SegNet, U-Net, PSPNet, DeepLab).

Data: a VOC-layout folder (:class:`~pixelwise.data.formats.voc.VOCSegmentation`). Loss: the
config's ``loss`` (cross-entropy, + class weights, + the auxiliary head's term, Dice, the
U-Net border-weighted cross-entropy) from :mod:`pixelwise.losses`. Metrics: the confusion
matrix over the split (FCN §5: pixel accuracy, mean accuracy, mIoU, fwIoU), optionally the
instance F1 of the predicted foreground's connected components. Prediction: a palette label
PNG and a colour overlay per image.

U-Net specifics (SPEC §3), all in :meth:`SemanticTask.training`:

- ``loss: weighted_ce`` (or any ``weight_map: {w0, sigma, class_balance}``): the training
  set is wrapped in :class:`~pixelwise.data.weightmap.WeightMapDataset`, which computes each
  image's border weight map once, from its instance map (``SegmentationObject``; without
  one, from the connected components of the classes), and the transforms move it with the
  image. A picture of the first map is saved as ``OUT/weight_map_{id}.png``.
- ``elastic: true`` adds the elastic deformation to the training transforms.
- ``unet_original``: the crop must be a valid input size (the largest valid size <=
  ``crop_size`` is used), images are mirror-padded by half the size loss before cropping,
  and the target and weight map are centre-cropped to the output (``model.crop_target``).
  Validation uses overlap-tile inference.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Sequence

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import Dataset

from pixelwise.data.classes import ClassInfo, palette_bytes
from pixelwise.data.io import write_image, write_label_png
from pixelwise.data.loading import apply_skip_bad, uint8_image
from pixelwise.data.transforms import build_transforms, normalize_image
from pixelwise.errors import DataError, PixelwiseError
from pixelwise.losses import build_loss
from pixelwise.metrics.instance_f1 import match_instances, summarize_counts
from pixelwise.metrics.semantic import ConfusionMatrix
from pixelwise.postprocess import (
    connected_components,
    is_unpadded,
    labels_from_probs,
    logits_of,
    predict_labels,
    predict_probs,
    probabilities,
)
from pixelwise.tasks.base import Evaluator, ReportContext, ReportSections, Task, TrainingSetup
from pixelwise.viz import colorize, comparison_grid, fit_panel, overlay

__all__ = ["SemanticTask", "SemanticEvaluator", "SemanticResult", "open_dataset", "has_instance_maps",
           "format_metrics", "class_weights"]


def open_dataset(root: str | os.PathLike, split: str, transforms=None, image_mode: str = "RGB",
                 with_instances: bool = False, skip_bad: bool = False,
                 report_to: str | os.PathLike | None = None, quiet: bool = False, *,
                 val_fraction: float = 0.2, seed: int = 0, colors: str | os.PathLike | None = None) -> Dataset:
    """Open a semantic dataset on disk in any layout :func:`pixelwise.data.formats.detect.open_semantic`
    knows (images/ + masks/, train/ + val/ folders, VOC, labelme, CVAT, Cityscapes, ADE20K).
    ``with_instances`` also loads the instance maps (``instance_map``). ``val_fraction`` and
    ``seed`` give the automatic train/val split of layouts without one; ``colors`` is the
    colour table of RGB masks. Guessed encodings are said in one line on stderr (unless
    ``quiet``). ``skip_bad``: leave out the samples whose files raise a DataError, print a
    warning line (unless ``quiet``) and, with ``report_to``, record them in that JSON file."""
    from pixelwise.data.formats.detect import open_semantic
    from pixelwise.data.formats.folder import print_notes

    root = Path(root)
    if not root.is_dir():
        raise DataError(root, "dataset folder not found", "create one with `pixelwise data synth --out DIR`")
    ds = open_semantic(root, split, transforms, image_mode=image_mode, with_instances=with_instances,
                       val_fraction=val_fraction, seed=seed, colors=colors)
    if not quiet:
        print_notes(ds)
    return apply_skip_bad(ds, skip_bad, split, root, report_to, quiet=quiet)


def has_instance_maps(root: str | os.PathLike) -> bool:
    """True when a VOC-layout folder has instance maps (``SegmentationObject[PNG]/*.png``)."""
    from pixelwise.data.formats.voc import OBJECT_DIRS

    return any(Path(root, d).is_dir() and any(Path(root, d).glob("*.png")) for d in OBJECT_DIRS)


def _layout_options(config: dict[str, Any]) -> dict[str, Any]:
    """The automatic train/val split (``val_fraction``, seed 0: the split does not change with
    the training seed) and the RGB masks' colour table of a run's config."""
    return {"val_fraction": float(config.get("val_fraction", 0.2) or 0.2), "colors": config.get("colors")}


def class_weights(cfg: Any, num_classes: int) -> list[float] | None:
    """The loss's class weights of ``cfg.class_weights``: None, SegNet's median-frequency
    balancing computed on the training split, or the given list."""
    if cfg.class_weights in (None, "none"):
        return None
    if cfg.class_weights in ("median_frequency", "median_freq"):
        from pixelwise.data.stats import dataset_class_stats

        raw = open_dataset(cfg.data, cfg.train_split, None, cfg.image_mode, skip_bad=cfg.skip_bad_samples, quiet=True,
                           **_layout_options(cfg.to_dict()))
        return [float(w) for w in dataset_class_stats(raw, num_classes)["median_frequency_weights"]]
    if isinstance(cfg.class_weights, (list, tuple)) and len(cfg.class_weights) == num_classes:
        return [float(w) for w in cfg.class_weights]
    raise PixelwiseError(
        f"class_weights must be null, 'median_frequency' or a list of {num_classes} numbers, got {cfg.class_weights!r}"
    )


def _weight_map_params(cfg: Any) -> dict[str, Any] | None:
    """The weight map settings, or None when the loss uses no weight map."""
    if cfg.weight_map is None and cfg.loss != "weighted_ce":
        return None
    params = dict(cfg.weight_map or {})
    unknown = sorted(set(params) - {"w0", "sigma", "class_balance"})
    if unknown:
        raise PixelwiseError(f"weight_map: unknown key(s) {', '.join(unknown)}; valid keys: w0, sigma, class_balance")
    if cfg.loss not in ("ce", "weighted_ce", "ce_dice"):
        raise PixelwiseError(f"weight_map weights the cross-entropy; loss {cfg.loss!r} has none: use "
                             "'weighted_ce' or 'ce_dice'")
    return params


def _valid_crop_size(model: nn.Module, crop_size: int | None) -> int:
    """The largest valid input size of the unpadded U-Net that is <= ``crop_size``."""
    if crop_size is None:
        sizes = model.valid_input_sizes(model.output_margin, model.output_margin + 400)
        raise PixelwiseError(
            f"unet_original needs crop_size: a valid input tile size (output = input - {model.output_margin}), "
            f"e.g. one of {', '.join(map(str, sizes[1:8]))}")
    n = next((m for m in range(int(crop_size), 0, -1) if model.is_valid_input_size(m)), None)
    if n is None:
        smallest = model.valid_input_sizes(1, int(crop_size) + 2 ** model.depth * 40)[0]
        raise PixelwiseError(f"crop_size {crop_size} is smaller than the smallest input unet_original "
                             f"(depth {model.depth}) can take: {smallest}")
    return n


def format_metrics(m: dict[str, Any], class_names: list[str] | None = None) -> str:
    """A short human-readable table: the four FCN metrics and per-class IoU."""
    lines = [
        f"pixel acc {m['pixel_accuracy']:.4f}   mean acc {m['mean_accuracy']:.4f}   "
        f"mIoU {m['miou']:.4f}   fwIoU {m['fwiou']:.4f}",
        f"{'class':<16}{'IoU':>8}{'acc':>8}{'dice':>8}",
    ]
    names = class_names or [str(i) for i in range(len(m["iou"]))]

    def fmt(v: Any) -> str:
        return "     n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:8.4f}"

    for name, iou, acc, dice in zip(names, m["iou"], m["accuracy"], m["dice"]):
        lines.append(f"{name:<16}{fmt(iou)}{fmt(acc)}{fmt(dice)}")
    inst = m.get("instance")
    if inst:
        lines.append(f"instances (connected components) at IoU {inst['threshold']}: F1 {inst['f1']:.4f}   "
                     f"precision {inst['precision']:.4f}   recall {inst['recall']:.4f}   "
                     f"(TP {inst['tp']}, FP {inst['fp']}, FN {inst['fn']})")
    return "\n".join(lines)


class SemanticEvaluator(Evaluator):
    """The confusion matrix of a split (FCN §5), plus with ``instance_f1`` the connected
    components of the predicted foreground matched to the ground-truth instance map
    (``SegmentationObject``) at IoU ``instance_iou`` (components under ``min_size`` pixels
    dropped). Inference: :func:`pixelwise.postprocess.predict_labels` (whole images,
    sliding window with ``tile``/``overlap``, test-time ``flip``/``scales``; ``unet_original``
    always by overlap-tile)."""

    def __init__(self, num_classes: int, *, tile: int | None = None, overlap: int | None = None, flip: bool = False,
                 scales: tuple[float, ...] | None = None, instance_f1: bool = False, instance_iou: float = 0.5,
                 min_size: int = 0, root: Any = "dataset") -> None:
        self.num_classes = num_classes
        self.options = {"tile": tile, "overlap": overlap, "flip": flip, "scales": scales}
        self.instance_f1, self.instance_iou, self.min_size, self.root = instance_f1, instance_iou, min_size, root
        self.reset()

    def reset(self) -> None:
        self.cm = ConfusionMatrix(self.num_classes, ignore_index=255)
        self.counts = [0, 0, 0]  # tp, fp, fn of the instance matching
        self.ious: list[float] = []

    def forward(self, model: nn.Module, batch: dict[str, Any], device: torch.device) -> torch.Tensor:
        return predict_labels(model, batch["image"].to(device), **self.options)

    def process(self, batch: dict[str, Any], outputs: torch.Tensor) -> None:
        self.cm.update(outputs, batch["semantic"].to(outputs.device))
        if not self.instance_f1:
            return
        if "instance_map" not in batch:
            raise DataError(self.root, "no instance maps for instance F1", "the dataset needs SegmentationObject/ PNGs")
        for p, g in zip(outputs.cpu().numpy(), batch["instance_map"].numpy()):
            inst, _ = connected_components(p, min_size=self.min_size)
            r = match_instances(inst, g, self.instance_iou)
            self.counts = [self.counts[0] + r["tp"], self.counts[1] + r["fp"], self.counts[2] + r["fn"]]
            self.ious.extend(r["ious"])

    def state(self) -> list[Any]:
        return [(self.cm.state_dict()["matrix"], list(self.counts), list(self.ious))]

    def load_state(self, items: list[Any]) -> None:  # every rank's matrix and counts, summed; IoUs in rank order
        self.cm.load_state_dict({"matrix": sum(m for m, _, _ in items)})
        self.counts = [sum(c[k] for _, c, _ in items) for k in range(3)]
        self.ious = [v for _, _, ious in items for v in ious]

    def evaluate(self) -> dict[str, Any]:
        metrics = self.cm.compute()
        if self.instance_f1:
            metrics["instance"] = {**summarize_counts(*self.counts, self.ious, self.instance_iou),
                                   "min_size": self.min_size}
        return metrics


@dataclass
class SemanticResult:
    """One image's semantic prediction: ``labels`` (H, W) class ids; ``probs`` (K, H, W)
    float32 class probabilities when asked for (``predict(..., probs=True)``), else None."""

    labels: np.ndarray
    colors: Sequence[Sequence[int]]
    probs: np.ndarray | None = None

    def save(self, path: str | os.PathLike) -> Path:
        """Write the labels as a palette PNG (pixel value = class id), atomically."""
        if self.labels.max(initial=0) > 255:
            raise PixelwiseError(f"{path}: {int(self.labels.max()) + 1} classes do not fit a palette PNG (256 at most)")
        return write_label_png(Path(path), self.labels.astype(np.uint8), _palette(self.colors))

    def overlay(self, image: np.ndarray, alpha: float = 0.5) -> np.ndarray:
        return overlay(image, self.labels, self.colors, alpha)  # grey (H, W) / (H, W, 1) images too


def _palette(colors: Sequence[Sequence[int]]) -> bytes:
    return palette_bytes([ClassInfo(i, str(i), False, tuple(int(v) for v in c)[:3]) for i, c in enumerate(colors)])
def write_probs(path: Path, probs: np.ndarray, class_names: Sequence[str]) -> Path:
    """Write (C, H, W) class probabilities as a compressed ``.npz`` atomically: ``probs``
    (float16, within 5e-4 of the float32 values) and ``classes`` (the names, in channel order)."""
    import io

    from pixelwise.fs import atomic_write_bytes

    buf = io.BytesIO()
    np.savez_compressed(buf, probs=np.asarray(probs, np.float16), classes=np.asarray(list(class_names)))
    return atomic_write_bytes(path, buf.getvalue())


def _classes(ckpt: dict[str, Any]) -> list[ClassInfo]:
    return [ClassInfo(c["id"], c["name"], bool(c.get("isthing", False)), tuple(c["color"])) for c in ckpt["classes"]]


class SemanticTask(Task):
    name: ClassVar[str] = "semantic"
    best_metric: ClassVar[str] = "miou"
    best_key: ClassVar[str] = "best_miou"
    supports_optimize: ClassVar[bool] = True
    export_kind: ClassVar[str | None] = "dense"
    predict_options: ClassVar[frozenset[str]] = frozenset({"probs"})
    config_keys: ClassVar[frozenset[str]] = frozenset({"loss", "class_weights", "aux_weight", "elastic",
                                                       "weight_map", "val_fraction", "colors"})

    # -- data ---------------------------------------------------------------------------
    def open(self, data: str, split: str, transforms: Any = None, image_mode: str = "RGB", **options: Any) -> Any:
        keys = ("with_instances", "val_fraction", "colors", "quiet")
        return open_dataset(data, split, transforms, image_mode, **{k: options[k] for k in keys if k in options})

    def wrap_dataset(self, data: Any, classes: Any = None, transform: Any = None, image_mode: str = "RGB",
                     indices: Sequence[int] | None = None) -> Any:
        from pixelwise.data.user import IndexSubset, UserSegmentation

        if isinstance(data, UserSegmentation) and indices is None:
            return data
        base = data.base if isinstance(data, UserSegmentation) else data
        if isinstance(data, UserSegmentation):
            classes, transform = classes or data.classes, transform or data.joint
        return UserSegmentation(IndexSubset(base, indices) if indices is not None else base, classes, transform,
                                image_mode)

    def data_options(self, config: dict[str, Any]) -> dict[str, Any]:
        return _layout_options(config)

    def check_data(self, ds: Any, ckpt: dict[str, Any], data: Any) -> None:
        names = [c["name"] for c in ckpt["classes"]]
        if len(ds.classes) != len(names):
            raise DataError(data, f"dataset has {len(ds.classes)} classes but the checkpoint was trained on "
                                  f"{len(names)} ({', '.join(names)})")

    # -- training -----------------------------------------------------------------------
    def open_training(self, cfg: Any) -> dict[str, Any]:
        """Options of :meth:`open` for the training split (instance maps for the weight map)."""
        wmap = _weight_map_params(cfg)
        return {"with_instances": wmap is not None and has_instance_maps(cfg.data)}

    def training(self, cfg: Any, model: nn.Module, train_ds: Any, norm: dict[str, Any], out: Path,
                 main: bool) -> TrainingSetup:
        wmap_params = _weight_map_params(cfg)
        unpadded = is_unpadded(model)
        crop = cfg.crop_size
        if unpadded:
            crop = _valid_crop_size(model, cfg.crop_size)
            if crop != cfg.crop_size and cfg.progress and main:
                from tqdm import tqdm

                tqdm.write(f"unet_original: crop_size {cfg.crop_size} -> {crop} (valid input size; output "
                           f"{model.output_size(crop)} px)")
        train_tf = build_transforms(train=True, crop_size=crop, scale=(cfg.scale_min, cfg.scale_max),
                                    flip=cfg.flip, mean=norm["mean"], std=norm["std"], elastic=cfg.elastic,
                                    mirror_pad=model.output_margin // 2 if unpadded else 0)
        if wmap_params is not None:
            from pixelwise.data.weightmap import WeightMapDataset, save_weight_map_image

            ds = WeightMapDataset(train_ds, train_tf, **wmap_params)
            if main:
                first = train_ds[0]
                save_weight_map_image(out / f"weight_map_{first['meta']['id']}.png", ds.maps[0], first["image"])
        else:
            train_ds.transforms = train_tf
            ds = train_ds
        num_classes = len(train_ds.classes)
        device = next(model.parameters()).device  # the loop moved the model to its device before this
        loss_fn = build_loss(cfg.loss, num_classes=num_classes, ignore_index=255,
                             class_weights=class_weights(cfg, num_classes), aux_weight=cfg.aux_weight).to(device)

        def step(net: nn.Module, batch: dict[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
            images = batch["image"].to(device, non_blocking=True)
            target = batch["semantic"].to(device, non_blocking=True)
            pixel_w = batch.get("weight_map")
            if unpadded:  # the output is the valid centre of the input
                target = model.crop_target(target)
                pixel_w = None if pixel_w is None else model.crop_target(pixel_w)
            outputs = net(images)
            return {"loss": loss_fn(outputs, target, pixel_weights=None if pixel_w is None else pixel_w.to(device))}

        return TrainingSetup(ds, step, crop)

    # -- evaluation ---------------------------------------------------------------------
    eval_options: ClassVar[frozenset[str]] = frozenset({"tile", "overlap", "flip", "scales", "instance_f1",
                                                        "instance_iou", "min_size"})

    def evaluation_summary(self, model: nn.Module, options: dict[str, Any]) -> dict[str, Any]:
        return {"inference": {"tile": options.get("tile"), "overlap": options.get("overlap"),
                              "flip": bool(options.get("flip")), "scales": list(options.get("scales") or (1.0,)),
                              "overlap_tile": is_unpadded(model)}}

    def evaluator(self, ds: Any, ckpt_like: dict[str, Any], model: nn.Module, **options: Any) -> SemanticEvaluator:
        return SemanticEvaluator(len(ckpt_like["classes"]), root=getattr(ds, "root", "dataset"), **options)

    def record(self, metrics: dict[str, Any], ds: Any) -> dict[str, Any]:
        rec = {k: metrics[k] for k in ("pixel_accuracy", "mean_accuracy", "miou", "fwiou")}
        rec["iou"] = metrics["iou"]
        return rec

    def describe(self, record: dict[str, Any]) -> str:
        return f"val mIoU {record['miou']:.4f}  pixel acc {record['pixel_accuracy']:.4f}"

    def format(self, metrics: dict[str, Any]) -> str:
        return format_metrics(metrics, metrics.get("class_names"))

    def summary(self, result: dict[str, Any]) -> str:
        best = result["best"]
        return (f"best val mIoU {best.get('miou', float('nan')):.4f} (epoch {best.get('epoch', -1) + 1})")

    def picture(self, model: nn.Module, ds: Any, index: int, device: torch.device) -> np.ndarray:
        image = uint8_image(ds.load(index)["image"])
        pred = predict_labels(model, ds[index]["image"][None].to(device))[0].cpu().numpy()
        return comparison_grid([[image, overlay(image, pred, [c.color for c in ds.classes])]])

    # -- prediction ---------------------------------------------------------------------
    batched_predict: ClassVar[bool] = True
    output_kinds: ClassVar[frozenset[str]] = frozenset({"labels", "overlay", "probs"})
    output_suffixes: ClassVar[tuple[str, ...]] = (".png", "_overlay.png", "_probs.npz")

    def output_suffixes_for(self, outputs: Sequence[str]) -> tuple[str, ...]:
        return (".png",) + (("_overlay.png",) if "overlay" in outputs else ()) + (
            ("_probs.npz",) if "probs" in outputs else ())

    def _infer(self, model: nn.Module, images: Sequence[np.ndarray], ckpt: dict[str, Any], device: torch.device,
               options: dict[str, Any]) -> list[SemanticResult]:
        """Images of one size in one forward pass; labels equal :func:`predict_labels`'s."""
        tta = {k: options.get(k) for k in ("tile", "overlap", "scales")} | {"flip": bool(options.get("flip"))}
        x = torch.stack([normalize_image(im, ckpt["normalization"]) for im in images]).to(device)
        probs = None
        if "probs" not in (options.get("outputs") or ()) and not options.get("probs"):
            labels = predict_labels(model, x, **tta)
        elif tta["tile"] is None and not tta["flip"] and not (tta["scales"] and tuple(tta["scales"]) != (1.0,)) \
                and not is_unpadded(model):  # predict_labels' plain case: labels from the logits, as there
            logits = logits_of(model(x))
            labels = (logits[:, 0] > 0).long() if logits.shape[1] == 1 else logits.argmax(1)
            probs = probabilities(logits)
        else:
            probs = predict_probs(model, x, **tta)
            labels = labels_from_probs(probs)
        colors = [c.color for c in _classes(ckpt)]
        labels = labels.cpu().numpy()
        probs_np = probs.cpu().numpy() if probs is not None else None
        return [SemanticResult(labels[k], colors, None if probs_np is None else probs_np[k])
                for k in range(len(images))]

    def predict(self, model: nn.Module, image: np.ndarray, ckpt: dict[str, Any], device: torch.device,
                **options: Any) -> SemanticResult:
        return self._infer(model, [image], ckpt, device, options)[0]

    def predict_batch(self, model: nn.Module, images: Sequence[np.ndarray], ckpt: dict[str, Any],
                      device: torch.device, **options: Any) -> list[SemanticResult]:
        if len(images) == 1:
            return [self.predict(model, images[0], ckpt, device, **options)]
        return self._infer(model, images, ckpt, device, options)

    def write(self, result: SemanticResult, image: np.ndarray, out: Path, stem: str, ckpt: dict[str, Any],
              state: dict[str, Any], alpha: float = 0.5, *, outputs: Sequence[str] = ("labels", "overlay")) -> Path:
        path = write_label_png(out / f"{stem}.png", result.labels.astype(np.uint8), palette_bytes(_classes(ckpt)))
        if "overlay" in outputs:
            write_image(out / f"{stem}_overlay.png", result.overlay(image, alpha))
        if "probs" in outputs:
            if result.probs is None:
                raise PixelwiseError(f"{stem}: no probabilities were computed; predict with outputs incl. 'probs'")
            write_probs(out / f"{stem}_probs.npz", result.probs, [c["name"] for c in ckpt["classes"]])
        return path

    def serve_layer(self, result: SemanticResult, ckpt: dict[str, Any]) -> dict[str, Any]:
        classes = self.classes_of(ckpt)
        label = result.labels
        layer = np.empty(label.shape + (4,), np.uint8)
        layer[..., :3] = colorize(label, [c["color"] for c in classes])
        layer[..., 3] = 255
        counts = np.bincount(label.ravel(), minlength=len(classes))[:len(classes)]
        total = max(1, label.size)
        legend = [{"id": i, "name": c["name"], "color": c["color"], "pixels": int(counts[i]),
                   "share": float(counts[i]) / total} for i, c in enumerate(classes)]
        return {"labels": label, "layer": layer, "legend": legend}

    # -- report -------------------------------------------------------------------------
    def report(self, ctx: ReportContext, model: nn.Module, ds: Any, metrics: dict[str, Any]) -> ReportSections:
        """Confusion matrix over the split (FCN §5 metrics), per-class IoU, image | truth | prediction."""
        from pixelwise.viz import save_confusion_matrix, save_per_class_bars

        m, names, colors = metrics, ctx.class_names, ctx.class_colors
        save_confusion_matrix(ctx.run_dir / "confusion_matrix.png", m["confusion"], names)
        save_per_class_bars(ctx.run_dir / "per_class_iou.png", m["iou"], names,
                            title=f"per-class IoU on {ctx.split} (mIoU {_fmt(m['miou'])})")
        rows = []
        with torch.inference_mode():
            for i in range(min(ctx.max_images, len(ds))):
                raw = ds.load(i)
                pred = predict_labels(model, ds[i]["image"][None].to(ctx.device))[0].cpu().numpy()
                rows.append([fit_panel(uint8_image(raw["image"])),
                             fit_panel(colorize(raw["semantic"].numpy(), colors), nearest=True),
                             fit_panel(colorize(pred, colors), nearest=True)])
        figures = [("confusion_matrix.png", f"confusion matrix on {ctx.split}, each ground-truth row normalised to 1"),
                   ("per_class_iou.png", f"per-class IoU on {ctx.split}")]
        labels = (("miou", "mean IoU"), ("pixel_accuracy", "pixel accuracy"), ("mean_accuracy", "mean accuracy"),
                  ("fwiou", "frequency-weighted IoU"), ("mean_dice", "mean Dice"))
        return ReportSections([(k, label, m[k]) for k, label in labels], figures, ("miou", "pixel_accuracy"),
                              list(zip(names, colors)), {**m, "class_names": names}, rows,
                              "image | ground truth | prediction (class colours as in the legend; void in beige)")


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return f"{v:.4f}" if isinstance(v, float) else str(v)
