"""Instance segmentation (Mask R-CNN) on COCO-format datasets.

Data: ``--data`` is a COCO instance JSON or a folder holding ``annotations/instances_{split}.json``
(:class:`~pixelwise.data.formats.coco.CocoInstances`); label i of the model is COCO category
``category_ids[i]`` (0 = background), recorded in every checkpoint. Crowd regions are left
out of the training targets and kept in the evaluation's ground truth. The model follows
torchvision's detection convention: in training it returns its loss dict, which is the step.

Evaluation: the COCO results JSON (RLE masks), mask AP and box AP
(:func:`pixelwise.metrics.instance.coco_evaluate`). Prediction: per image a palette PNG of
instance ids (1..K by score, 0 = none), an overlay with each instance in its own colour with
class and score, and the image's COCO results JSON.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Sequence

import numpy as np
import torch
import torch.nn as nn

from pixelwise.data.classes import palette_bytes
from pixelwise.data.formats.coco import CocoInstances
from pixelwise.data.io import write_image, write_label_png
from pixelwise.data.loading import instance_collate, uint8_image, write_json
from pixelwise.data.transforms import build_transforms, normalize_image
from pixelwise.errors import DataError
from pixelwise.metrics.instance import coco_evaluate, detections_to_coco, format_coco_metrics, write_coco_results
from pixelwise.postprocess import instance_id_map
from pixelwise.tasks.base import Evaluator, ReportContext, ReportSections, Task, TrainingSetup
from pixelwise.viz import comparison_grid, draw_instances, draw_labelled_masks, fit_masks, fit_panel, instance_colors

__all__ = ["InstanceTask", "CocoEvaluator", "InstanceResult", "detection_step", "format_instance_metrics",
           "per_class_mask_ap", "PICTURE_SCORE"]

#: pictures (TensorBoard, report) show the detections with at least this score
PICTURE_SCORE = 0.5


def open_coco(data: str | os.PathLike, split: str, transforms: Any, image_mode: str) -> CocoInstances:
    if not Path(data).exists():
        raise DataError(data, "dataset not found", "create one with `pixelwise data synth --out DIR`")
    return CocoInstances(data, split, transforms=transforms, image_mode=image_mode)


def detection_step(net: nn.Module, batch: dict[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
    """The training step of every model of torchvision's detection convention: its loss dict."""
    images = [im.to(device) for im in batch["images"]]
    targets = [{k: v.to(device) for k, v in t.items()} for t in batch["targets"]]
    return {k: v.float() for k, v in net(images, targets).items()}


def format_instance_metrics(m: dict[str, Any]) -> str:
    return "\n".join([format_coco_metrics(m["segm"], "mask"), format_coco_metrics(m["bbox"], "box ")])


def per_class_mask_ap(gt: dict[str, Any], detections: list[dict[str, Any]], category_ids: Sequence[int],
                      img_ids: Sequence[Any] | None = None, iou_type: str = "segm") -> list[float | None]:
    """COCO AP of each category alone (COCOeval on that category's ground truth and
    detections), in the order of ``category_ids``; None for a category without ground truth."""
    out: list[float | None] = []
    for cid in category_ids:
        anns = [a for a in gt.get("annotations", []) if a.get("category_id") == cid]
        if not anns:
            out.append(None)
            continue
        ap = coco_evaluate({**gt, "annotations": anns}, [d for d in detections if d.get("category_id") == cid],
                           iou_type, img_ids=img_ids)["AP"]
        out.append(None if ap < 0 else ap)
    return out


class CocoEvaluator(Evaluator):
    """COCO mask and box metrics of the detections against ``gt_json`` (restricted to the
    images seen); writes the results JSON to ``results_path`` when given."""

    def __init__(self, category_ids: Sequence[int], gt_json: str | os.PathLike | dict, mask_threshold: float = 0.5,
                 results_path: str | os.PathLike | None = None) -> None:
        self.category_ids, self.gt_json = list(category_ids), gt_json
        self.threshold, self.results_path = float(mask_threshold), results_path
        self.reset()

    def reset(self) -> None:
        self.items: list[tuple[Any, list[dict[str, Any]]]] = []  # per image: (image id, detections)

    def forward(self, model: nn.Module, batch: dict[str, Any], device: torch.device) -> list[dict[str, torch.Tensor]]:
        return model([im.to(device) for im in batch["images"]])

    def process(self, batch: dict[str, Any], outputs: list[dict[str, torch.Tensor]]) -> None:
        for out, meta in zip(outputs, batch["meta"]):
            self.items.append((meta["image_id"], detections_to_coco(meta["image_id"], out, self.category_ids,
                                                                    self.threshold)))

    def state(self) -> list[Any]:
        return list(self.items)

    def load_state(self, items: list[Any]) -> None:
        self.items = list(items)

    def evaluate(self) -> dict[str, Any]:
        results = [d for _, dets in self.items for d in dets]
        img_ids = [i for i, _ in self.items]
        if self.results_path is not None:
            write_coco_results(self.results_path, results)
        gt = (json.loads(Path(self.gt_json).read_text()) if isinstance(self.gt_json, (str, os.PathLike))
              else self.gt_json)
        m = {"segm": coco_evaluate(gt, results, "segm", img_ids=img_ids),
             "bbox": coco_evaluate(gt, results, "bbox", img_ids=img_ids),
             "num_images": len(img_ids), "num_detections": len(results)}
        if self.results_path is not None:
            m["results_json"] = str(self.results_path)
        return m


@dataclass
class InstanceResult:
    """One image's instances, highest score first: ``masks`` (K, H, W) bool, ``boxes`` (K, 4)
    xyxy, ``labels`` (K,) model labels, ``scores`` (K,)."""

    masks: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray
    scores: np.ndarray
    class_names: Sequence[str]

    def id_map(self) -> np.ndarray:
        """(H, W) uint8: 1 + index of the best-scoring instance at each pixel, 0 = none."""
        return instance_id_map(self.masks, self.masks.shape[1:] if len(self.masks) else (0, 0))

    def overlay(self, image: np.ndarray, alpha: float = 0.5) -> np.ndarray:
        return draw_instances(image, self.masks, self.boxes, self.labels.tolist(), self.scores.tolist(),
                              list(self.class_names), alpha)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the instance-id PNG (1 + index of the best instance per pixel, 0 = none) at
        ``path`` and ``path`` with suffix ``.json``: per instance ``id``, ``label``,
        ``class_name``, ``score``, ``box`` [x0, y0, x1, y1]; both atomically."""
        path = Path(path)
        if len(self.masks) > 255:
            raise DataError(path, f"{len(self.masks)} instances do not fit an 8-bit id PNG (255 at most)",
                            "raise the score threshold")
        write_label_png(path, instance_id_map(self.masks, self.masks.shape[1:]), palette_bytes(None))
        names = list(self.class_names)
        rows = [{"id": i + 1, "label": int(lab), "class_name": names[lab] if 0 <= lab < len(names) else str(lab),
                 "score": float(s), "box": [float(v) for v in b]}
                for i, (lab, s, b) in enumerate(zip(self.labels.tolist(), self.scores.tolist(), self.boxes))]
        write_json(path.with_suffix(".json"), {"id_png": path.name, "instances": rows})
        return path


def _kept(out: dict[str, torch.Tensor], score: float, mask_threshold: float) -> dict[str, Any]:
    keep = out["scores"] >= score
    out = {k: v[keep].cpu() for k, v in out.items()}
    out["masks"] = (out["masks"][:, 0] >= mask_threshold).numpy()
    return out


class InstanceTask(Task):
    name: ClassVar[str] = "instance"
    best_metric: ClassVar[str] = "mask_AP"
    best_key: ClassVar[str] = "best_mask_ap"
    default_grad_clip: ClassVar[float | None] = 10.0
    export_kind: ClassVar[str | None] = "detection"
    predict_options: ClassVar[frozenset[str]] = frozenset({"score_threshold"})
    #: detection models take a list of (C, H, W) images
    image_list_input: ClassVar[bool] = True
    find_unused_parameters: ClassVar[bool] = True
    output_suffixes: ClassVar[tuple[str, ...]] = (".png", "_overlay.png", ".json")

    # -- data ---------------------------------------------------------------------------
    def open(self, data: str, split: str, transforms: Any = None, image_mode: str = "RGB", **options: Any) -> Any:
        return open_coco(data, split, transforms, image_mode)

    def collate(self):
        return instance_collate

    def checkpoint_extras(self, ds: Any) -> dict[str, Any]:
        return {"category_ids": list(ds.category_ids)}

    def check_data(self, ds: Any, ckpt: dict[str, Any], data: Any) -> None:
        names = [c["name"] for c in ckpt["classes"]]
        if [c.name for c in ds.classes] != names:
            raise DataError(data, f"dataset classes {[c.name for c in ds.classes]} differ from the checkpoint's {names}")

    # -- training -----------------------------------------------------------------------
    def open_training(self, cfg: Any) -> dict[str, Any]:
        return {}

    def training(self, cfg: Any, model: nn.Module, train_ds: Any, norm: dict[str, Any], out: Path,
                 main: bool) -> TrainingSetup:
        train_ds.transforms = build_transforms(train=True, crop_size=cfg.crop_size,
                                               scale=(cfg.scale_min, cfg.scale_max), flip=cfg.flip,
                                               mean=norm["mean"], std=norm["std"])
        return TrainingSetup(train_ds, detection_step, cfg.crop_size)

    # -- evaluation ---------------------------------------------------------------------
    def evaluator(self, ds: Any, ckpt_like: dict[str, Any], model: nn.Module, **options: Any) -> CocoEvaluator:
        return CocoEvaluator(ckpt_like["category_ids"], ds.annotation_file, getattr(model, "mask_threshold", 0.5),
                             options.get("results_path"))

    def evaluation_files(self, checkpoint: Path, out: Path | None, split: str) -> dict[str, Any]:
        """Where ``evaluate`` writes the COCO results JSON: next to ``out``, else to the checkpoint."""
        return {"results_path": (out.with_name(out.stem + "_coco_results.json") if out is not None
                                 else checkpoint.parent / f"coco_results_{split}.json")}

    def record(self, metrics: dict[str, Any], ds: Any) -> dict[str, Any]:
        return {**{f"mask_{k}": v for k, v in metrics["segm"].items()},
                **{f"box_{k}": v for k, v in metrics["bbox"].items()},
                "seconds_per_image": metrics["seconds_per_image"]}

    def describe(self, r: dict[str, Any]) -> str:
        return f"mask AP {r['mask_AP']:.3f} AP50 {r['mask_AP50']:.3f}  box AP {r['box_AP']:.3f} AP50 {r['box_AP50']:.3f}"

    def format(self, metrics: dict[str, Any]) -> str:
        text = format_instance_metrics(metrics)
        if "results_json" in metrics:
            text += f"\nCOCO results (RLE) written to {metrics['results_json']}"
        return text

    def summary(self, result: dict[str, Any]) -> str:
        best, nan = result["best"], float("nan")
        return (f"best val mask AP {best.get('mask_AP', nan):.4f} AP50 {best.get('mask_AP50', nan):.4f} "
                f"(epoch {best.get('epoch', -1) + 1})")

    def picture(self, model: nn.Module, ds: Any, index: int, device: torch.device) -> np.ndarray:
        image = uint8_image(ds.load(index)["image"])
        out = _kept(model([ds[index]["image"].to(device)])[0], PICTURE_SCORE, float(getattr(model, "mask_threshold", 0.5)))
        pred = draw_instances(image, out["masks"], out["boxes"].numpy(), out["labels"].tolist(), out["scores"].tolist(),
                              [c.name for c in ds.classes])
        return comparison_grid([[image, pred]])

    # -- prediction ---------------------------------------------------------------------
    def predict(self, model: nn.Module, image: np.ndarray, ckpt: dict[str, Any], device: torch.device,
                **options: Any) -> InstanceResult:
        score = float(options.get("score_threshold") or 0.5)
        out = _kept(model([normalize_image(image, ckpt["normalization"]).to(device)])[0], score,
                    float(getattr(model, "mask_threshold", 0.5)))
        masks = out["masks"].reshape(-1, *image.shape[:2])
        return InstanceResult(masks, out["boxes"].numpy(), out["labels"].numpy(), out["scores"].numpy(),
                              [c["name"] for c in ckpt["classes"]])

    def write(self, result: InstanceResult, image: np.ndarray, out: Path, stem: str, ckpt: dict[str, Any],
              state: dict[str, Any], alpha: float = 0.5, *, outputs: Sequence[str] = ("labels", "overlay")) -> Path:
        path = write_label_png(out / f"{stem}.png", instance_id_map(result.masks, image.shape), palette_bytes(None))
        if "overlay" in outputs:
            write_image(out / f"{stem}_overlay.png", result.overlay(image, alpha))
        dets = detections_to_coco(stem, {"boxes": torch.from_numpy(result.boxes), "scores": torch.from_numpy(
            result.scores), "labels": torch.from_numpy(result.labels), "masks": result.masks}, ckpt["category_ids"])
        names = result.class_names
        for d, lab in zip(dets, result.labels.tolist()):
            d["class_name"] = names[lab]
        write_json(out / f"{stem}.json", dets)
        return path

    def serve_layer(self, result: InstanceResult, ckpt: dict[str, Any]) -> dict[str, Any]:
        classes = self.classes_of(ckpt)
        masks = result.masks
        ids = np.zeros(masks.shape[1:], np.int64)
        for k in range(len(masks) - 1, -1, -1):  # lowest score first, so the best ends on top
            ids[masks[k]] = k + 1
        colors = instance_colors(len(masks))
        lut = np.zeros((len(masks) + 1, 4), np.uint8)
        if len(masks):
            lut[1:, :3] = np.asarray(colors, np.uint8)
            lut[1:, 3] = 255
        counts = np.bincount(ids.ravel(), minlength=len(masks) + 1)
        total = max(1, ids.size)
        legend = [{"id": 0, "name": "(no instance)", "color": None, "pixels": int(counts[0]),
                   "share": float(counts[0]) / total}]
        for k, (lab, score, box) in enumerate(zip(result.labels.tolist(), result.scores.tolist(),
                                                  result.boxes.tolist())):
            legend.append({"id": k + 1, "name": classes[lab]["name"] if 0 <= lab < len(classes) else str(lab),
                           "class_id": int(lab), "score": float(score), "box": [round(float(v), 1) for v in box],
                           "color": list(colors[k]), "pixels": int(counts[k + 1]),
                           "share": float(counts[k + 1]) / total})
        return {"labels": ids, "layer": lut[ids], "legend": legend}

    # -- report -------------------------------------------------------------------------
    def report(self, ctx: ReportContext, model: nn.Module, ds: Any, metrics: dict[str, Any]) -> ReportSections:
        """COCO mask and box AP over the split, per-class mask AP, instances with class and score."""
        from pixelwise.viz import panel_scale, save_per_class_bars

        m, names = metrics, ctx.class_names
        category_ids = list(ctx.ckpt["category_ids"])
        results_path = Path(m["results_json"])
        gt = json.loads(Path(ds.annotation_file).read_text(encoding="utf-8"))
        dets = json.loads(results_path.read_text(encoding="utf-8"))
        per_class = per_class_mask_ap(gt, dets, category_ids[1:], ds.ids)
        save_per_class_bars(ctx.run_dir / "per_class_ap.png", per_class, names[1:],
                            title=f"per-class mask AP on {ctx.split} (mask AP {m['segm']['AP']:.4f})",
                            xlabel="mask AP")
        thr = float(getattr(model, "mask_threshold", 0.5))
        rows = []
        with torch.inference_mode():
            for i in range(min(ctx.max_images, len(ds))):
                raw = ds.load(i)
                img = uint8_image(raw["image"])
                s = panel_scale(*img.shape[:2])
                big = fit_panel(img)  # drawn at display size, so that the text stays small
                inst = raw["instances"]
                crowd = inst["iscrowd"].tolist() if "iscrowd" in inst else [False] * len(inst["labels"])
                texts = [f"{names[lab]}{' (crowd)' if c else ''}" for lab, c in zip(inst["labels"].tolist(), crowd)]
                truth = draw_labelled_masks(big, fit_masks(inst["masks"].numpy().astype(bool), big.shape[:2]), texts,
                                            instance_colors(len(texts)))
                out = _kept(model([ds[i]["image"].to(ctx.device)])[0], PICTURE_SCORE, thr)
                pred = draw_instances(big, fit_masks(out["masks"], big.shape[:2]), out["boxes"].numpy() * s,
                                      out["labels"].tolist(), out["scores"].tolist(), names)
                rows.append([big, truth, pred])
        figures = [("per_class_ap.png", f"per-class mask AP on {ctx.split} (COCOeval on each category alone)")]
        summary = [(f"mask_{k}", f"mask {k}", m["segm"][k]) for k in ("AP", "AP50", "AP75", "AR100")]
        summary += [(f"box_{k}", f"box {k}", m["bbox"][k]) for k in ("AP", "AP50", "AP75")]
        evaluation = {**m, "per_class_mask_AP": dict(zip(names[1:], per_class)), "class_names": names}
        return ReportSections(summary, figures, ("mask_AP", "mask_AP50", "box_AP"), list(zip(names, ctx.class_colors)),
                              evaluation, rows,
                              f"image | ground-truth instances | predicted instances with score >= {PICTURE_SCORE}")
