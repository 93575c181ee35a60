"""Export: ONNX (semantic models and Mask R-CNN) with onnxruntime predictors that need no
PyTorch, ``torch.export`` programs (semantic models) and safetensors pretrained folders.

``pixelwise export --checkpoint CKPT --format onnx --out model.onnx [--size N]``:

* the model is exported in eval mode with BatchNorm folded into the convolutions
  (:func:`pixelwise.optimize.fold_conv_bn`), input ``image`` (N, C, H, W) float32
  (normalised), output ``logits`` (N, K, H, W);
* by default N, H and W are free (``unet_original``: any VALID tile size - see its
  ``valid_input_sizes``; the predictor mirror-pads images to one); ``--size N`` fixes them to
  N x N (``predict --onnx`` then resizes other images to N x N and the logits back; a
  fixed-size Mask R-CNN refuses other sizes in one line); ``--dynamic --size N`` keeps them
  free and uses N only for the example input;
* the ONNX file carries what prediction needs as metadata (``pixelwise`` JSON: model spec,
  classes, normalization, image mode, the unpadded U-Net's margin and valid sizes), so
  ``pixelwise predict --onnx model.onnx`` needs neither the checkpoint nor PyTorch on its hot
  path: decoding, normalising, onnxruntime, argmax and PNG writing are NumPy/PIL.

Mask R-CNN (task ``instance``) exports too (:func:`export_onnx` dispatches on the model's
task): the graph takes ONE normalised image ``image`` (C, H, W) float32 and returns
``boxes`` (K, 4) xyxy, ``labels`` (K,) int64 (contiguous, 0 = background), ``scores``
(K,) and ``masks`` (K, 1, H, W) mask probabilities pasted into the image - torchvision's
eval output for that image; K (0 included) is always free, H and W with ``--dynamic``. A
batch of N images is N runs of the graph (torchvision's detection post-processing - NMS,
per-image top-k, mask pasting - is traced for one image). The metadata adds the COCO
``category_ids``, ``mask_threshold`` and the graph's own ``box_score_thresh``;
:class:`OnnxInstanceSegmenter` runs it and ``predict --onnx`` writes what
``predict_instance_files`` writes (instance-id PNG, overlay with class and score, COCO JSON).
``--format torch-export --out model.pt2``: a :func:`torch.export` program of a semantic model
(:func:`export_torch`; H and W free among multiples of 32, :class:`TorchExportSegmenter` pads
to them). ``--format safetensors --out DIR``: ``DIR/model.safetensors`` + ``DIR/config.json``,
loadable with ``pixelwise.load(DIR)`` without unpickling anything.

Panoptic FPN exports to ONNX as Mask R-CNN does, with one more output ``sem_seg`` (the
semantic logits at the image size); its merge runs after onnxruntime
(:class:`OnnxPanopticSegmenter`: :func:`~pixelwise.postprocess_panoptic.merge_panoptic` on the
NumPy outputs with the model's merge settings from the metadata), and ``predict --onnx``
writes what ``predict`` writes for panoptic checkpoints (PNG, overlay, ``panoptic.json``).

Exact score ties (a constant image gives many identical proposals) may be broken in another
order by onnxruntime's NMS / top-k than by PyTorch's. The RoI pooler's feature scales
(1/4..1/32) are constants of the graph; eager PyTorch re-estimates them per call from the
unpadded image size, which goes wrong (1/2 instead of 1/4) when a small image is padded by
more than 41 % to the multiple of 32 (e.g. 40x40 with ``min_size=0``): there the two differ.
"""
from __future__ import annotations

import contextlib
import json
import os
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from pixelwise.postprocess import instance_id_map  # noqa: F401  (moved; re-exported)

__all__ = ["export_onnx", "export_checkpoint", "export_torch", "TorchExportSegmenter", "FORMATS", "OnnxModel",
           "OnnxSegmenter", "OnnxInstanceSegmenter", "OnnxPanopticSegmenter", "open_onnx", "instance_id_map", "predict_files_onnx", "onnx_metadata"]

_META_KEY = "pixelwise"


def _export_size(model: Any, size: int) -> int:
    """A size the model takes (``unet_original``: the nearest valid tile side >= ``size``)."""
    if hasattr(model, "valid_input_sizes") and hasattr(model, "output_margin"):
        return int(model.valid_input_sizes(min_size=size, max_size=size + 4096)[0])
    return size


def _pool_matrix(ones: Any, k: int) -> Any:
    """(k, n) averaging matrix of adaptive average pooling from n to k cells, built from the
    data (``ones``: a length-n vector of ones) so that a traced graph keeps n dynamic: cell
    i averages [floor(i n / k), ceil((i + 1) n / k))."""
    import torch

    j = torch.cumsum(ones, 0) - 1  # 0..n-1
    n = j[-1:] + 1
    i = torch.arange(k, dtype=ones.dtype, device=ones.device)[:, None]
    start = torch.floor(i * n / k)
    end = -torch.floor(-(i + 1) * n / k)
    m = ((j[None] >= start) & (j[None] < end)).to(ones.dtype)
    return m / m.sum(1, keepdim=True)


def _exportable_adaptive_pool(module: Any) -> Any:
    """An ``AdaptiveAvgPool2d`` that the ONNX exporter can export with dynamic H, W (two
    small matrix products; output 1: a plain mean)."""
    import torch

    class AdaptiveAvgPool2dAsMatmul(torch.nn.Module):
        def __init__(self, output_size: Any):
            super().__init__()
            oh, ow = (output_size, output_size) if isinstance(output_size, int) else output_size
            self.oh, self.ow = oh, ow

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.oh == 1 and self.ow == 1:
                return x.mean((-2, -1), keepdim=True)
            ph = _pool_matrix(torch.ones_like(x[0, 0, :, 0]), self.oh)  # (oh, H)
            pw = _pool_matrix(torch.ones_like(x[0, 0, 0, :]), self.ow)  # (ow, W)
            return torch.matmul(torch.matmul(ph, x), pw.t())

    return AdaptiveAvgPool2dAsMatmul(module.output_size)


def _swap_adaptive_pools(model: Any) -> int:
    import torch

    n = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.AdaptiveAvgPool2d) and None not in (
                    (child.output_size,) if isinstance(child.output_size, int) else tuple(child.output_size)):
                setattr(parent, name, _exportable_adaptive_pool(child))
                n += 1
    return n


def _swap_unpools(model: Any) -> int:
    """SegNet's max-unpooling as a scatter into a zero map of the pre-pool size (ONNX
    ScatterElements), so that the pre-pool size stays dynamic in the exported graph."""
    import torch

    from pixelwise.models.segnet import IndexUnpool

    class ScatterUnpool(torch.nn.Module):
        def forward(self, x: torch.Tensor, indices: torch.Tensor, size: Any) -> torch.Tensor:
            n, c = x.shape[0], x.shape[1]
            h, w = size[-2], size[-1]
            out = torch.zeros_like(x[:, :, :1, :1]).flatten(2).expand(n, c, h * w).contiguous()
            out = out.scatter(2, indices.flatten(2), x.flatten(2))
            return out.reshape(n, c, h, w)

    n = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, IndexUnpool):
                setattr(parent, name, ScatterUnpool())
                n += 1
    return n


def _make_exportable(model: Any, dynamic: bool) -> None:
    """Swap in export-friendly equivalents of the layers whose eager code turns sizes into
    Python ints (they would be frozen into the graph) or that the exporter cannot express
    with dynamic sizes. Same weights, same outputs. (The U-Net blocks need nothing: their
    forward keeps traced sizes symbolic.)"""
    _swap_unpools(model)
    if dynamic:
        _swap_adaptive_pools(model)


def _logits_only(model: Any) -> Any:
    """``model`` as a module returning only its logits (:func:`pixelwise.postprocess.logits_of`:
    a training-time ``{"out", "aux"}`` dict becomes ``out``), for the exporters."""
    import torch

    from pixelwise.postprocess import logits_of

    class _Logits(torch.nn.Module):
        def __init__(self, m: torch.nn.Module):
            super().__init__()
            self.m = m

        def forward(self, image: torch.Tensor) -> torch.Tensor:
            return logits_of(self.m(image))

    return _Logits(model)


def _task(name: str):
    """The registered task called ``name`` (it says how its models export)."""
    from pixelwise.tasks import get_task

    return get_task(name)


def onnx_metadata(model: Any, ckpt: dict[str, Any] | None = None) -> dict[str, Any]:
    """The JSON stored in the ONNX file's metadata: enough to predict without the checkpoint."""
    meta: dict[str, Any] = {
        "format": 1,
        "task": getattr(model, "pixelwise_task", "semantic"),
        "model": getattr(model, "pixelwise_spec", None),
    }
    if ckpt is not None:
        meta["model"] = ckpt.get("model", meta["model"])
        meta["classes"] = ckpt.get("classes")
        meta["normalization"] = ckpt.get("normalization")
    if hasattr(model, "valid_input_sizes") and hasattr(model, "output_margin"):
        meta["output_margin"] = int(model.output_margin)
        meta["valid_sizes"] = [int(n) for n in model.valid_input_sizes(1, 4096)]
    kind = _task(meta["task"]).export_kind
    if kind == "detection+semantic":  # the merge runs after the graph: its settings travel with it
        inst = model.instance
        meta["categories"] = (ckpt or {}).get("categories") or meta.get("classes")
        meta["merge"] = {"thing_ids": list(model.thing_ids), "stuff_ids": list(model.stuff_ids),
                         "thing_class": int(model.thing_class), "score_threshold": model.merge_score_threshold,
                         "overlap_threshold": model.merge_overlap_threshold, "stuff_area": model.stuff_area,
                         "scale_stuff_area": bool(model.scale_stuff_area)}
        model = inst
    if kind in ("detection", "detection+semantic"):
        n = int(getattr(model, "num_classes", 0) or 0)
        meta["category_ids"] = (ckpt or {}).get("category_ids") or list(range(n))
        meta["mask_threshold"] = float(getattr(model, "mask_threshold", 0.5))
        roi_heads = getattr(model, "roi_heads", None)
        if roi_heads is not None:
            meta["box_score_thresh"] = float(roi_heads.score_thresh)
            meta["detections_per_img"] = int(roi_heads.detections_per_img)
    return meta


def export_onnx(model: Any, out: str | os.PathLike, *, dynamic: bool = True, size: int | Sequence[int] = 64,
                in_channels: int | None = None, opset: int = 17, metadata: dict[str, Any] | None = None,
                fold: bool = True) -> Path:
    """Export a semantic ``model`` (eval mode; a deep copy is folded) to ONNX at ``out``;
    a Mask R-CNN (task ``instance``) goes to :func:`_export_instance` (one image per run).

    ``size``: the example input's (H, W) (``unet_original``: rounded up to a valid size);
    ``dynamic``: free batch, height and width (Mask R-CNN: height and width; its number of
    detections is always free). Written atomically (a unique temporary name, renamed; removed on failure).
    """
    import copy

    import torch

    from pixelwise.optimize import _in_channels, fold_conv_bn

    task = _task(getattr(model, "pixelwise_task", "semantic"))
    if task.export_kind in ("detection", "detection+semantic"):
        return _export_instance(model, out, dynamic=dynamic, size=size, in_channels=in_channels, opset=opset,
                                metadata=metadata, fold=fold, panoptic=task.export_kind == "detection+semantic")
    if task.export_kind != "dense":
        raise NotImplementedError(f"ONNX export covers the semantic models, Mask R-CNN and Panoptic FPN, not "
                                  f"{task.name!r} models")
    model = copy.deepcopy(model).eval().requires_grad_(False)
    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    h, w = _export_size(model, h), _export_size(model, w)
    c = in_channels if in_channels is not None else _in_channels(model)
    dtype = next((p.dtype for p in model.parameters()), torch.float32)
    x = torch.randn(1, c, h, w, generator=torch.Generator().manual_seed(0)).to(dtype)
    if fold:
        fold_conv_bn(model, x)
    _make_exportable(model, dynamic)

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    axes = {"image": {0: "batch", 2: "height", 3: "width"}, "logits": {0: "batch", 2: "out_height", 3: "out_width"}}
    with _temporary(out) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer / deprecation chatter
        torch.onnx.export(_logits_only(model), (x,), str(tmp), dynamo=False, input_names=["image"],
                          output_names=["logits"], dynamic_axes=axes if dynamic else None, opset_version=opset,
                          do_constant_folding=True)
        return _finish(tmp, out, metadata or onnx_metadata(model), dynamic, (h, w))


@contextlib.contextmanager
def _temporary(out: Path) -> Iterator[Path]:
    """A fresh temporary name beside ``out`` (``.NAME.RANDOM.tmp``: two exports to one file
    never share it), removed when the block fails; the block moves it onto ``out``."""
    import secrets

    tmp = out.with_name(f".{out.name}.{secrets.token_hex(6)}.tmp")
    try:
        yield tmp
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _finish(tmp: Path, out: Path, metadata: dict[str, Any], dynamic: bool, size: tuple[int, int]) -> Path:
    """Store the metadata JSON in the exported file ``tmp`` and move it to ``out``."""
    import onnx

    proto = onnx.load(str(tmp))
    meta = dict(metadata)
    meta["dynamic"] = bool(dynamic)
    meta["export_size"] = [int(size[0]), int(size[1])]
    entry = proto.metadata_props.add()
    entry.key, entry.value = _META_KEY, json.dumps(meta)
    onnx.save(proto, str(tmp))
    os.replace(tmp, out)
    return out


_INSTANCE_OUTPUTS = ("boxes", "labels", "scores", "masks")


def _export_instance(model: Any, out: str | os.PathLike, *, dynamic: bool, size: int | Sequence[int],
                     in_channels: int | None, opset: int, metadata: dict[str, Any] | None, fold: bool,
                     panoptic: bool = False) -> Path:
    """Mask R-CNN (torchvision detection convention) -> ONNX graph of one image (see the module
    docstring). The TorchScript exporter (``dynamo=False``) traces torchvision's ONNX-aware
    code paths: dynamic resize / batching, ``NonMaxSuppression``, ``RoiAlign`` (opset >= 16
    for the half-pixel ``aligned`` offset), the mask pasting loop."""
    import copy

    import torch

    from pixelwise.optimize import fold_conv_bn

    if opset < 16:
        raise ValueError(f"Mask R-CNN export needs opset >= 16 (RoiAlign with half-pixel offset), got {opset}")
    model = copy.deepcopy(model).eval().requires_grad_(False)
    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    c = in_channels if in_channels is not None else int(getattr(getattr(model, "instance", model), "in_channels", 3))
    dtype = next((p.dtype for p in model.parameters()), torch.float32)
    x = torch.randn(c, h, w, generator=torch.Generator().manual_seed(0)).to(dtype)
    if fold:
        fold_conv_bn(model, [x])

    class _OneImage(torch.nn.Module):
        def __init__(self, m: torch.nn.Module):
            super().__init__()
            self.m = m

        def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
            y = self.m([image])[0]
            return tuple(y[k] for k in _INSTANCE_OUTPUTS)

    class _PanopticOneImage(torch.nn.Module):
        """Panoptic FPN's two branches for one image; the merge runs after the graph."""

        def __init__(self, m: torch.nn.Module):
            super().__init__()
            self.m = m

        def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
            import torch.nn.functional as F

            inst = self.m.instance
            orig = [(image.shape[-2], image.shape[-1])]
            batch, _ = inst.transform([image])
            features = inst.backbone(batch.tensors)
            proposals, _ = inst.rpn(batch, features)
            dets, _ = inst.roi_heads(features, proposals, batch.image_sizes)
            y = inst.transform.postprocess(dets, batch.image_sizes, orig)[0]
            h, w = batch.image_sizes[0]
            # always resized (an identity at the same size): a size test would be frozen by the tracer
            sem = F.interpolate(self.m.semantic(features)[:, :, :h, :w], size=orig[0], mode="bilinear",
                                align_corners=False)[0]
            return (*(y[k] for k in _INSTANCE_OUTPUTS), sem)

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    names = list(_INSTANCE_OUTPUTS) + (["sem_seg"] if panoptic else [])
    axes: dict[str, dict[int, str]] = {k: {0: "detections"} for k in _INSTANCE_OUTPUTS}
    if dynamic:
        axes["image"] = {1: "height", 2: "width"}
        axes["masks"] = {0: "detections", 2: "height", 3: "width"}
        if panoptic:
            axes["sem_seg"] = {1: "height", 2: "width"}
    wrapper = _PanopticOneImage(model) if panoptic else _OneImage(model)
    with _temporary(out) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer / deprecation chatter
        torch.onnx.export(wrapper.eval(), (x,), str(tmp), dynamo=False, input_names=["image"],
                          output_names=names, dynamic_axes=axes, opset_version=opset,
                          do_constant_folding=True)
        return _finish(tmp, out, metadata or onnx_metadata(model), dynamic, (h, w))


#: the formats of :func:`export_checkpoint` (``pixelwise export --format``)
FORMATS = ("onnx", "torch-export", "safetensors")


def export_checkpoint(checkpoint: str | os.PathLike, out: str | os.PathLike, format: str = "onnx",
                      dynamic: bool | None = None, size: int | None = None, opset: int = 17) -> Path:
    """Export a model (a checkpoint, a run folder or a pretrained folder: anything
    :func:`pixelwise.load` takes) with its classes and normalisation (Mask R-CNN: its COCO
    category ids and mask threshold too) in the file.

    ``format``: ``"onnx"`` (semantic models, Mask R-CNN, Panoptic FPN), ``"torch-export"`` (a ``.pt2``
    :func:`torch.export` program; semantic models) or ``"safetensors"`` (``out`` is a folder:
    ``model.safetensors`` + ``config.json``, :meth:`pixelwise.api.Segmenter.save_pretrained`).
    Height and width are free unless ``size`` is given (``dynamic``: None = free exactly when
    ``size`` is None; ``dynamic=True`` with a ``size`` uses it as the example input only);
    a fixed-size ONNX model runs at ``size`` x ``size`` (``predict --onnx`` resizes other images)."""
    from pixelwise.api import load
    from pixelwise.errors import PixelwiseError

    if format not in FORMATS:
        raise PixelwiseError(f"unknown export format {format!r}; available: {', '.join(FORMATS)}")
    seg = load(checkpoint, device="cpu")
    if format == "safetensors":
        return seg.save_pretrained(out)
    task = seg.task
    dynamic = size is None if dynamic is None else bool(dynamic)
    in_ch = 1 if seg.image_mode == "L" else None
    meta = onnx_metadata(seg.model, seg.info)
    if format == "torch-export":
        if task.export_kind != "dense":
            raise PixelwiseError(f"{checkpoint}: torch-export covers the semantic models, not {task.name!r} models "
                                 "(export them with --format onnx or safetensors)")
        return export_torch(seg.model, out, dynamic=dynamic, size=size or 64, in_channels=in_ch, metadata=meta)
    if task.export_kind is None:
        raise PixelwiseError(f"{checkpoint}: ONNX export covers semantic models, Mask R-CNN and Panoptic FPN, not "
                             f"{task.name!r} models (export them with --format safetensors)")
    return export_onnx(seg.model, out, dynamic=dynamic, size=size or 512, in_channels=in_ch, opset=opset,
                       metadata=meta)


# --- torch.export ---------------------------------------------------------------------------------

#: a ``torch-export`` program takes heights and widths that are multiples of this (the largest
#: stride of the semantic models: their size arithmetic is exact there);
#: :class:`TorchExportSegmenter` pads other images to it
TORCH_EXPORT_MULTIPLE = 32
_PT2_META = "pixelwise.json"


def export_torch(model: Any, out: str | os.PathLike, *, dynamic: bool = True, size: int | Sequence[int] = 64,
                 in_channels: int | None = None, metadata: dict[str, Any] | None = None) -> Path:
    """A semantic ``model`` as a :func:`torch.export` program saved to ``out`` (``.pt2``),
    input ``(N, C, H, W)`` normalised float32, output the logits ``(N, K, H, W)``. ``dynamic``:
    N free, H and W free among multiples of :data:`TORCH_EXPORT_MULTIPLE` (``unet_original``:
    fixed; use ONNX); else fixed at ``size``. The metadata JSON (as in ONNX files) is the
    archive's ``pixelwise.json``. Written atomically."""
    import copy

    import torch
    from torch.export import Dim

    from pixelwise.fs import atomic_open
    from pixelwise.optimize import _in_channels

    model = copy.deepcopy(model).eval().requires_grad_(False)
    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    h, w = _export_size(model, h), _export_size(model, w)
    margin = hasattr(model, "output_margin") and hasattr(model, "valid_input_sizes")
    dynamic = dynamic and not margin
    if dynamic:
        h = w = max(2, -(-max(h, w) // TORCH_EXPORT_MULTIPLE)) * TORCH_EXPORT_MULTIPLE
    c = in_channels if in_channels is not None else _in_channels(model)
    _make_exportable(model, dynamic)

    n = 2 if dynamic else 1  # an example batch of 1 would fix N to 1
    x = torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(0))
    shapes = {"image": {0: Dim.AUTO, 2: Dim.AUTO, 3: Dim.AUTO}} if dynamic else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(_logits_only(model), (x,), dynamic_shapes=shapes, strict=False)
    meta = dict(metadata or onnx_metadata(model))
    meta.update(dynamic=bool(dynamic), export_size=[h, w], size_multiple=TORCH_EXPORT_MULTIPLE if dynamic else None)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(out, "wb") as f:
        torch.export.save(program, f, extra_files={_PT2_META: json.dumps(meta)})
    return out


class TorchExportSegmenter:
    """A ``.pt2`` of :func:`export_torch`: ``logits(x)`` on normalised (N, C, H, W) tensors of
    any size (reflect-padded to the program's multiple, cropped back), ``predict(image)``
    from a uint8 (H, W[, C]) image to (H, W) class ids; ``meta`` is its metadata."""

    def __init__(self, path: str | os.PathLike):
        import torch

        from pixelwise.errors import PixelwiseError

        self.path = Path(path)
        if not self.path.is_file():
            raise PixelwiseError(f"{path}: torch-export program not found")
        files = {_PT2_META: ""}
        try:
            program = torch.export.load(str(self.path), extra_files=files)
        except Exception as e:  # noqa: BLE001 - a foreign or damaged archive
            raise PixelwiseError(f"{path}: not a readable torch-export program ({type(e).__name__}: {e})") from None
        self.module = program.module()
        self.meta: dict[str, Any] = json.loads(files[_PT2_META] or "{}")
        norm = self.meta.get("normalization") or {}
        self.image_mode = norm.get("image_mode", "RGB")
        self.mean = torch.tensor(norm.get("mean", (0.485, 0.456, 0.406)), dtype=torch.float32)
        self.std = torch.tensor(norm.get("std", (0.229, 0.224, 0.225)), dtype=torch.float32)

    def logits(self, x: Any) -> Any:
        import torch
        import torch.nn.functional as F

        m = self.meta.get("size_multiple")
        h, w = x.shape[-2:]
        if not self.meta.get("dynamic", True) and list(x.shape[-2:]) != list(self.meta.get("export_size", [h, w])):
            from pixelwise.errors import PixelwiseError

            eh, ew = self.meta["export_size"]
            raise PixelwiseError(f"{self.path}: this program was exported for {ew}x{eh} inputs only, got {w}x{h}")
        if not m or (h % m == 0 and w % m == 0):
            return self.module(x)
        ph, pw = -h % m, -w % m
        mode = "reflect" if ph < h and pw < w else "replicate"
        with torch.no_grad():
            return self.module(F.pad(x, (0, pw, 0, ph), mode=mode))[..., :h, :w]

    def predict(self, image: np.ndarray) -> np.ndarray:
        """(H, W) int64 class ids of a uint8 image."""
        import torch

        x = torch.from_numpy(np.ascontiguousarray(image)).float().div_(255)
        x = x[None] if x.ndim == 2 else x.permute(2, 0, 1)
        c = x.shape[0]
        x = ((x - self.mean[:c, None, None]) / self.std[:c, None, None])[None]
        with torch.no_grad():
            y = self.logits(x)[0]
        return ((y[0] > 0).long() if y.shape[0] == 1 else y.argmax(0)).numpy()


# --- running an exported model ------------------------------------------------------------------


def _session(path: Path, threads: int | None) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = int(threads)
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _session_meta(session: Any) -> dict[str, Any]:
    raw = session.get_modelmeta().custom_metadata_map.get(_META_KEY)
    return json.loads(raw) if raw else {}


class OnnxModel:
    """An exported pixelwise model in an onnxruntime session (CPU): its metadata (``meta``),
    classes and normalisation; ``normalize(image)`` turns a uint8 image into its input."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None, *, session: Any = None):
        self.path = Path(path)
        self.session = session if session is not None else _session(self.path, threads)
        self.meta: dict[str, Any] = _session_meta(self.session)
        self.input_name = self.session.get_inputs()[0].name
        norm = self.meta.get("normalization") or {}
        self.image_mode = norm.get("image_mode", "RGB")
        self.mean = np.asarray(norm.get("mean", (0.485, 0.456, 0.406)), np.float32)
        self.std = np.asarray(norm.get("std", (0.229, 0.224, 0.225)), np.float32)

    @property
    def classes(self) -> list[dict[str, Any]] | None:
        return self.meta.get("classes")

    @property
    def task(self) -> str:
        return str(self.meta.get("task", "semantic"))

    def normalize(self, image: np.ndarray) -> np.ndarray:
        """uint8 (H, W[, C]) -> float32 (1, C, H, W) with the checkpoint's mean/std."""
        x = image.astype(np.float32) * (1.0 / 255.0)
        x = x[None] if x.ndim == 2 else x.transpose(2, 0, 1)
        c = x.shape[0]
        x = (x - self.mean[:c, None, None]) / self.std[:c, None, None]
        return x[None]


class OnnxSegmenter(OnnxModel):
    """An exported semantic model in onnxruntime: ``logits(x)`` on normalised float32 NCHW
    arrays, ``predict(image)`` from a uint8 (H, W[, C]) image to (H, W) class ids. Images of
    any size are mirror-padded for ``unet_original`` (one valid tile around the image) and
    run as they are otherwise (a fixed-size export needs its export size)."""

    def logits(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: np.ascontiguousarray(x, dtype=np.float32)})[0]

    def _padded_logits(self, x: np.ndarray) -> np.ndarray:
        margin = self.meta.get("output_margin")
        if margin is None:
            return self.logits(x)
        h, w = x.shape[-2:]
        valid = self.meta["valid_sizes"]
        need_h = next(n for n in valid if n - margin >= h)
        need_w = next(n for n in valid if n - margin >= w)
        top, left = margin // 2, margin // 2
        pad = ((0, 0), (0, 0), (top, need_h - h - top), (left, need_w - w - left))
        y = self.logits(np.pad(x, pad, mode="symmetric" if min(h, w) < 2 else "reflect"))
        return y[..., :h, :w]

    def fixed_size(self) -> tuple[int, int] | None:
        """(H, W) the graph was exported for when it is not free (``pixelwise export --size``), else None."""
        if self.meta.get("dynamic", True) or not self.meta.get("export_size"):
            return None
        h, w = (int(v) for v in self.meta["export_size"])
        margin = int(self.meta.get("output_margin") or 0)  # unet_original: the image part of its tile
        return h - margin, w - margin

    def predict(self, image: np.ndarray) -> np.ndarray:
        """(H, W) int64 class ids of a uint8 image. A fixed-size export runs on the image
        resized (bilinear) to its size; the logits are resized back (bilinear) before the argmax."""
        fixed = self.fixed_size()
        h, w = image.shape[:2]
        if fixed is None or fixed == (h, w):
            y = self._padded_logits(self.normalize(image))[0]
        else:
            small = _resize(image, fixed)
            y = _resize(self._padded_logits(self.normalize(small))[0].transpose(1, 2, 0), (h, w)).transpose(2, 0, 1)
        return (y[0] > 0).astype(np.int64) if y.shape[0] == 1 else y.argmax(0)


def _resize(a: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of (H, W[, C]) uint8 or float32 to ``size`` (H, W), channel by channel (PIL)."""
    from PIL import Image

    two_d = a.ndim == 2
    a3 = a[:, :, None] if two_d else a
    chans = [np.asarray(Image.fromarray(np.ascontiguousarray(a3[:, :, i].astype(np.float32))).resize(
        (size[1], size[0]), Image.BILINEAR)) for i in range(a3.shape[2])]
    out = np.stack(chans, -1)
    if a.dtype == np.uint8:
        out = np.clip(np.round(out), 0, 255).astype(np.uint8)
    return out[:, :, 0] if two_d else out


class OnnxInstanceSegmenter(OnnxModel):
    """An exported Mask R-CNN in onnxruntime. ``outputs(x)``: the graph's ``boxes``,
    ``labels``, ``scores``, ``masks`` (probabilities (K, 1, H, W)) for ONE normalised float32
    (C, H, W) image - a batch is one call per image; ``detect(image)``: the detections of a
    uint8 image with score >= ``score_threshold`` and masks binarised at the exported
    model's ``mask_threshold``."""

    @property
    def mask_threshold(self) -> float:
        return float(self.meta.get("mask_threshold", 0.5))

    @property
    def category_ids(self) -> list[int]:
        ids = self.meta.get("category_ids")
        return [int(i) for i in ids] if ids else list(range(len(self.classes or [])))

    def _check_size(self, image: np.ndarray) -> None:
        """A fixed-size graph refuses other sizes in one line (its detections cannot be resized back exactly)."""
        if not self.meta.get("dynamic", True) and self.meta.get("export_size") and \
                list(image.shape[:2]) != [int(v) for v in self.meta["export_size"]]:
            from pixelwise.errors import PixelwiseError

            eh, ew = self.meta["export_size"]
            raise PixelwiseError(f"the image is {image.shape[1]}x{image.shape[0]} but this {self.meta.get('task')} "
                                 f"model was exported for {ew}x{eh} images only; export it again without --size "
                                 "(free size)")

    def outputs(self, x: np.ndarray) -> dict[str, np.ndarray]:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 3:
            raise ValueError(f"the exported Mask R-CNN takes one (C, H, W) image per call, got shape {x.shape}")
        names = [o.name for o in self.session.get_outputs()]
        return dict(zip(names, self.session.run(None, {self.input_name: x})))

    def detect(self, image: np.ndarray, score_threshold: float = 0.5) -> dict[str, np.ndarray]:
        """``boxes`` (K, 4) float32 xyxy, ``labels`` (K,) int64, ``scores`` (K,), ``masks``
        (K, H, W) bool of a uint8 (H, W[, C]) image, best score first."""
        self._check_size(image)
        y = self.outputs(self.normalize(image)[0])
        keep = y["scores"] >= score_threshold
        masks = y["masks"][keep]
        return {"boxes": y["boxes"][keep], "labels": y["labels"][keep].astype(np.int64), "scores": y["scores"][keep],
                "masks": (masks[:, 0] if masks.ndim == 4 else masks) >= self.mask_threshold}

    def predict(self, image: np.ndarray, score_threshold: float = 0.5) -> np.ndarray:
        """(H, W) uint8 instance ids 1..K (0 = none; the best score on top)."""
        return instance_id_map(self.detect(image, score_threshold)["masks"], image.shape[:2])


class OnnxPanopticSegmenter(OnnxInstanceSegmenter):
    """An exported Panoptic FPN in onnxruntime: the graph gives the Mask R-CNN outputs and the
    semantic logits ``sem_seg`` of ONE image; :meth:`panoptic` merges them after the graph
    with :func:`pixelwise.postprocess_panoptic.merge_panoptic` (NumPy in, NumPy out) and the
    merge settings stored in the metadata, as the PyTorch model does."""

    def panoptic(self, image: np.ndarray) -> tuple[np.ndarray, list[dict[str, Any]]]:
        """``(id_map (H, W) int32, segments)`` of a uint8 (H, W[, C]) image (0 = void)."""
        from pixelwise.postprocess_panoptic import merge_panoptic, scaled_stuff_area

        self._check_size(image)
        y = self.outputs(self.normalize(image)[0])
        m = self.meta["merge"]
        h, w = image.shape[:2]
        labels = y["labels"].astype(np.int64)
        cats = np.asarray(m["thing_ids"], np.int64)[np.clip(labels - 1, 0, None)] if len(labels) else labels
        area = scaled_stuff_area(h, w, min_area=m["stuff_area"]) if m["scale_stuff_area"] else m["stuff_area"]
        id_map, segments = merge_panoptic(
            y["masks"], y["scores"], cats, y["sem_seg"].argmax(0), thing_class=int(m["thing_class"]),
            stuff_classes={s: c for s, c in enumerate(m["stuff_ids"])}, score_threshold=m["score_threshold"],
            overlap_threshold=m["overlap_threshold"], mask_threshold=self.mask_threshold, stuff_area_min=area)
        return np.asarray(id_map), list(segments)


def open_onnx(path: str | os.PathLike, threads: int | None = None) -> OnnxSegmenter | OnnxInstanceSegmenter:
    """The runner of an exported pixelwise model, by the task in its metadata."""
    from pixelwise.errors import PixelwiseError

    if not Path(path).is_file():
        raise PixelwiseError(f"{path}: ONNX model not found")
    session = _session(Path(path), threads)
    task = _session_meta(session).get("task", "semantic")
    runners = {"dense": OnnxSegmenter, "detection": OnnxInstanceSegmenter,
               "detection+semantic": OnnxPanopticSegmenter}
    kind = _task(task).export_kind
    if kind not in runners:
        raise PixelwiseError(f"{path}: cannot predict with a {task!r} ONNX model")
    return runners[kind](path, session=session)


def predict_files_onnx(onnx_path: str | os.PathLike, inputs: Iterable[str | os.PathLike], out: str | os.PathLike,
                       alpha: float = 0.5, progress: bool = True, threads: int | None = None,
                       score_threshold: float = 0.5) -> list[Path]:
    """``predict_files`` with an exported model: ``OUT/{stem}.png`` (palette labels) and
    ``OUT/{stem}_overlay.png`` per image; onnxruntime + NumPy, no PyTorch in the loop.
    A Mask R-CNN export writes what ``predict_instance_files`` writes (see
    :func:`_predict_instance_files_onnx`)."""
    from tqdm import tqdm

    from pixelwise.data.classes import ClassInfo, palette_bytes
    from pixelwise.data.io import read_image, write_image, write_label_png
    from pixelwise.engine.predict import collect_inputs
    from pixelwise.viz import overlay

    seg = open_onnx(onnx_path, threads)
    if isinstance(seg, OnnxPanopticSegmenter):
        return _predict_panoptic_files_onnx(seg, inputs, out, alpha, progress)
    if isinstance(seg, OnnxInstanceSegmenter):
        return _predict_instance_files_onnx(seg, inputs, out, alpha, progress, score_threshold)
    classes_meta = seg.classes
    if not classes_meta:
        n = int(seg.session.get_outputs()[0].shape[1]) if isinstance(seg.session.get_outputs()[0].shape[1], int) else 2
        rng = np.random.default_rng(0)
        classes_meta = [{"id": i, "name": str(i), "color": [int(v) for v in rng.integers(0, 256, 3)]} for i in range(n)]
    classes = [ClassInfo(c["id"], c["name"], bool(c.get("isthing", False)), tuple(c["color"])) for c in classes_meta]
    colors = [c.color for c in classes]
    pal = palette_bytes(classes)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for f in tqdm(collect_inputs(inputs), desc="predict (onnx)", unit="img", disable=not progress):
        image = read_image(f, mode=seg.image_mode)
        label = seg.predict(image)
        write_label_png(out / f"{f.stem}.png", label.astype(np.uint8), pal)
        rgb = image if image.ndim == 3 else np.repeat(image[..., None], 3, 2)
        write_image(out / f"{f.stem}_overlay.png", overlay(rgb, label, colors, alpha))
        written.append(out / f"{f.stem}.png")
    return written


def _predict_instance_files_onnx(seg: OnnxInstanceSegmenter, inputs: Iterable[str | os.PathLike],
                                 out: str | os.PathLike, alpha: float, progress: bool,
                                 score_threshold: float) -> list[Path]:
    """Per image, as ``predict_instance_files``: ``OUT/{stem}.png`` (palette PNG of instance ids
    1..K, 0 = none, best score on top), ``OUT/{stem}_overlay.png`` (each instance in its own
    colour with class and score) and ``OUT/{stem}.json`` (COCO results, RLE) of the detections
    with score >= ``score_threshold``. onnxruntime, NumPy and PIL only in the loop."""
    from tqdm import tqdm

    from pixelwise.data.classes import palette_bytes
    from pixelwise.data.io import read_image, write_image, write_label_png
    from pixelwise.engine.common import write_json
    from pixelwise.engine.instance import draw_instances
    from pixelwise.engine.predict import collect_inputs
    from pixelwise.errors import DataError, PixelwiseError
    from pixelwise.metrics.instance import detections_to_coco

    category_ids = seg.category_ids
    names = [c["name"] for c in seg.classes] if seg.classes else [str(i) for i in range(len(category_ids))]
    pal = palette_bytes(None)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for f in tqdm(collect_inputs(inputs), desc="predict (onnx)", unit="img", disable=not progress):
        image = read_image(f, mode=seg.image_mode)
        try:
            det = seg.detect(image, score_threshold)
        except PixelwiseError as e:
            raise DataError(f, str(e)) from None
        write_label_png(out / f"{f.stem}.png", instance_id_map(det["masks"], image.shape[:2]), pal)
        vis = draw_instances(image, det["masks"], det["boxes"], det["labels"].tolist(), det["scores"].tolist(),
                             names, alpha)
        write_image(out / f"{f.stem}_overlay.png", vis)
        dets = detections_to_coco(f.stem, det, category_ids)
        for d, lab in zip(dets, det["labels"].tolist()):
            d["class_name"] = names[lab] if 0 <= lab < len(names) else str(lab)
        write_json(out / f"{f.stem}.json", dets)
        written.append(out / f"{f.stem}.png")
    return written


def _predict_panoptic_files_onnx(seg: OnnxPanopticSegmenter, inputs: Iterable[str | os.PathLike],
                                 out: str | os.PathLike, alpha: float, progress: bool) -> list[Path]:
    """What ``predict`` writes for a panoptic checkpoint (COCO panoptic PNG and overlay per
    image, one ``panoptic.json``), through the panoptic task's writers."""
    from tqdm import tqdm

    from pixelwise.data.io import read_image
    from pixelwise.engine.predict import collect_inputs
    from pixelwise.errors import DataError, PixelwiseError
    from pixelwise.tasks import get_task
    from pixelwise.tasks.panoptic import PanopticResult

    task = get_task(seg.task)
    info = {**seg.meta, "categories": seg.meta.get("categories") or seg.classes}
    files = collect_inputs(inputs)
    out = Path(out)
    state = task.begin_predict(files, out, info)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for f in tqdm(files, desc="predict (onnx)", unit="img", disable=not progress):
        image = read_image(f, mode=seg.image_mode)
        try:
            id_map, segments = seg.panoptic(image)
        except PixelwiseError as e:
            raise DataError(f, str(e)) from None
        result = PanopticResult(id_map, segments, info["categories"])
        written.append(task.write(result, image, out, f.stem, info, state, alpha))
    return written + task.end_predict(out, info, state)
