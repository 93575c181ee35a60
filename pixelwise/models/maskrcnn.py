"""Mask R-CNN (He, Gkioxari, Dollar, Girshick, ICCV 2017) on pixelwise's own backbones.

The detection machinery (anchors, RPN, box/mask sampling, losses, box coding, NMS, mask
pasting) is torchvision's (``torchvision.models.detection``); pixelwise composes it with:

- its encoders (ResNet-18/34/50/101, EfficientNet-Lite0 with its real ImageNet weights)
  under an FPN (:mod:`pixelwise.models.fpn`, P2..P6);
- a multi-scale RoI pooler (:class:`MultiScaleRoIPooler`) whose paper ablations are options:
  ``roi_op="roi_align"`` (default) or ``"roi_pool"`` (quantised Fast R-CNN RoIPool),
  ``aligned`` (the half-pixel offset: continuous coordinate x samples feature x/s - 0.5),
  ``sampling_ratio`` (sampling points per bin side: 2 -> the paper's 4 points per bin;
  0 = adaptive, ceil(roi size / output size)); the FPN level of an RoI is
  k = floor(4 + log2(sqrt(wh) / 224)) clamped to the pyramid (P2..P5);
- SPEC defaults (§6): box head 7x7 RoI -> fc 1024 -> fc 1024 -> classes + per-class deltas;
  mask head 14x14 RoI -> 4 x (3x3 conv 256 + ReLU) -> 2x2 transposed conv stride 2 (+ReLU)
  -> 1x1 conv -> ``num_classes`` 28x28 masks, per-pixel sigmoid, BCE on the ground-truth
  class only, positive RoIs only (IoU >= 0.5); output layers initialised as in detectron2
  (:func:`init_predictors`); 512 RoIs per image at 1:3; RPN anchors of
  3 ratios per level, sizes 32..512 on P2..P6, IoU 0.7/0.3, 256 anchors at 50 % positive;
  at test time masks of the top 100 detections are pasted into the image.

Conventions (torchvision's): ``num_classes`` INCLUDES the background (label 0); training
``model(images, targets)`` returns a dict of losses, eval ``model(images)`` returns one dict
per image: ``boxes`` (K, 4) xyxy, ``labels`` (K,), ``scores`` (K,), ``masks`` (K, 1, H, W)
mask probabilities pasted into the image (threshold at ``model.mask_threshold`` = 0.5, see
:func:`binarize_masks`). Images are expected already normalised (pixelwise's data
pipeline does it), so the internal transform only resizes (``min_size``/``max_size``) and
batches (padding to a multiple of 32).

Presets: ``preset="paper"`` (the default: the values above, ResNet-50, 800/1333 resizing,
frozen BN when the backbone is pretrained) and ``preset="cpu"`` (SPEC §11: a lean setting
measured on a 2-core CPU: ResNet-18, FPN 128 channels, mask head 4 x 128, 128 RoIs per
image, RPN batch 128, proposals 1000/500 train and 500/200 test, anchors 12..192 for ~128 px
images, trainable BN, no resizing of 128 px images). Any option overrides the preset.

torchvision's ``maskrcnn_resnet50_fpn_v2`` (Li et al., "Benchmarking Detection Transfer
Learning with Vision Transformers", 2021) is expressed by four options that are off in both
presets: ``fpn_norm`` (BN after every FPN conv, no conv bias), ``rpn_conv_depth=2`` (two 3x3
convs in the RPN head), ``box_head_convs=4`` (box head of 4 x 3x3 conv ``box_head_channels``
+ ONE fc ``box_head_dim`` instead of two fcs) and ``head_norm`` (BN in the box and mask
heads' convs).
"""
from __future__ import annotations

import math
import warnings
from typing import Any

import torch
import torch.nn as nn
import torchvision
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import (
    FastRCNNConvFCHead,
    FastRCNNPredictor,
    TwoMLPHead,
)
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import FrozenBatchNorm2d, MultiScaleRoIAlign, roi_align, roi_pool
from torchvision.ops.misc import Conv2dNormActivation
from torchvision.ops.poolers import _onnx_merge_levels

from pixelwise.models.backbones import build_encoder
from pixelwise.models.fpn import EncoderFPN
from pixelwise.models.registry import register_model

__all__ = [
    "PRESETS",
    "MaskRCNNOptions",
    "MultiScaleRoIPooler",
    "PixelwiseMaskRCNN",
    "assign_fpn_levels",
    "binarize_masks",
    "build_maskrcnn",
    "freeze_batchnorm",
    "init_predictors",
]

PAPER: dict[str, Any] = {
    "backbone": "resnet50",
    "pretrained": None,  # "efficientnet-lite0" for the packaged EfficientNet-Lite0 weights
    "backbone_weights": None,  # a state dict file: torchvision ImageNet .pth for resnet*, timm's for timm:*
    "in_channels": 3,
    "fpn_channels": 256,
    "frozen_bn": None,  # None: frozen when the backbone is pretrained, trainable otherwise
    "trainable_stages": None,  # None: 3 (res3..res5) when pretrained, 5 (all) otherwise
    # transform
    "min_size": 800,  # 0: no resizing (images are used at their own size)
    "max_size": 1333,
    # RPN
    "anchor_sizes": (32, 64, 128, 256, 512),  # one per level P2..P6
    "aspect_ratios": (0.5, 1.0, 2.0),
    "rpn_fg_iou_thresh": 0.7,
    "rpn_bg_iou_thresh": 0.3,
    "rpn_batch_size_per_image": 256,
    "rpn_positive_fraction": 0.5,
    "rpn_pre_nms_top_n_train": 2000,
    "rpn_post_nms_top_n_train": 2000,
    "rpn_pre_nms_top_n_test": 1000,
    "rpn_post_nms_top_n_test": 1000,
    "rpn_nms_thresh": 0.7,
    # RoI pooling
    "roi_op": "roi_align",  # or "roi_pool"
    "aligned": True,  # detectron2's ROIAlignV2; the paper (and torchvision's MultiScaleRoIAlign): False
    "sampling_ratio": 2,  # 2 x 2 = the paper's 4 sampling points per bin
    "box_roi_size": 7,
    "mask_roi_size": 14,
    "canonical_scale": 224,
    "canonical_level": 4,
    # heads
    "box_head_dim": 1024,
    "mask_head_channels": 256,
    "mask_head_convs": 4,
    "box_batch_size_per_image": 512,
    "box_positive_fraction": 0.25,
    "box_fg_iou_thresh": 0.5,
    "box_bg_iou_thresh": 0.5,
    # inference
    "box_score_thresh": 0.05,
    "box_nms_thresh": 0.5,
    "detections_per_img": 100,
    "mask_threshold": 0.5,
    # torchvision maskrcnn_resnet50_fpn_v2 (see the module docstring); off = the paper's heads
    "fpn_norm": False,
    "rpn_conv_depth": 1,
    "box_head_convs": 0,
    "box_head_channels": 256,
    "head_norm": False,
}

CPU: dict[str, Any] = {
    **PAPER,
    "backbone": "resnet18",
    "fpn_channels": 128,
    "mask_head_channels": 128,
    "frozen_bn": False,
    "min_size": 128,
    "max_size": 256,
    "anchor_sizes": (12, 24, 48, 96, 192),
    "rpn_batch_size_per_image": 128,
    "rpn_pre_nms_top_n_train": 1000,
    "rpn_post_nms_top_n_train": 500,
    "rpn_pre_nms_top_n_test": 500,
    "rpn_post_nms_top_n_test": 200,
    "box_batch_size_per_image": 128,
}

PRESETS: dict[str, dict[str, Any]] = {"paper": PAPER, "cpu": CPU}
"""Named option sets; ``build_model("maskrcnn", n, preset="cpu", fpn_channels=64)``."""

MaskRCNNOptions = dict[str, Any]


# ---------------------------------------------------------------------------------------
# RoI pooling with the paper's ablations as options
# ---------------------------------------------------------------------------------------


def assign_fpn_levels(boxes: torch.Tensor, k_min: int = 2, k_max: int = 5, canonical_scale: float = 224,
                      canonical_level: int = 4, eps: float = 1e-6) -> torch.Tensor:
    """FPN level of each (N, 4) xyxy box: k = floor(k0 + log2(sqrt(w h) / 224)), clamped to [k_min, k_max]."""
    wh = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).clamp(min=0)
    k = torch.floor(canonical_level + torch.log2(wh.sqrt() / canonical_scale + eps))
    return k.clamp(k_min, k_max).to(torch.int64)


class MultiScaleRoIPooler(MultiScaleRoIAlign):
    """Pools each RoI from its FPN level with RoIAlign or RoIPool.

    Args:
        featmap_names: the pyramid levels to pool from (finest first, consecutive strides x2).
        output_size: side of the pooled map (7 for the box head, 14 for the mask head).
        sampling_ratio: RoIAlign sampling points per bin side (0 = adaptive).
        roi_op: ``"roi_align"`` (no quantisation, bilinear samples averaged per bin) or
            ``"roi_pool"`` (coordinates rounded to the feature grid, max per quantised bin).
        aligned: RoIAlign's half-pixel offset (ignored by RoIPool).

    A subclass of torchvision's ``MultiScaleRoIAlign`` so that torchvision's ``MaskRCNN``
    accepts it; scales are inferred from the feature sizes on every call (not cached), see
    :meth:`feature_scales`.
    """

    def __init__(self, featmap_names: list[str], output_size: int, sampling_ratio: int = 2, *,
                 roi_op: str = "roi_align", aligned: bool = True, canonical_scale: int = 224,
                 canonical_level: int = 4):
        if roi_op not in ("roi_align", "roi_pool"):
            raise ValueError(f"roi_op must be 'roi_align' or 'roi_pool', got {roi_op!r}")
        if int(sampling_ratio) < 0:
            raise ValueError(f"sampling_ratio must be >= 0 (0 = adaptive), got {sampling_ratio}")
        super().__init__(list(featmap_names), output_size, int(sampling_ratio),
                         canonical_scale=canonical_scale, canonical_level=canonical_level)
        self.roi_op = roi_op
        self.aligned = bool(aligned)

    @staticmethod
    def feature_scales(feats: list[torch.Tensor], image_shapes: list[tuple[int, int]]) -> list[float]:
        """1 / stride of each map. The maps are computed on the batch padded up to a multiple
        of the coarsest stride, so ``image height / map height`` lies in (stride / 2, stride]
        for images at least that stride tall; rounding it UP to a power of two gives the
        stride exactly (torchvision rounds to the nearest power, which halves the scale of
        small images padded by more than 41%, e.g. 40 px padded to 64)."""
        max_h = max(s[0] for s in image_shapes)
        return [2.0 ** -math.ceil(math.log2(max_h / f.shape[-2]) - 1e-6) for f in feats]

    def pool_level(self, feature: torch.Tensor, rois: torch.Tensor, scale: float) -> torch.Tensor:
        """Pool (R, 5) rois [batch index, x1, y1, x2, y2] (image coordinates) from one map."""
        if self.roi_op == "roi_pool":
            return roi_pool(feature, rois, self.output_size, scale)
        return roi_align(feature, rois, self.output_size, scale, self.sampling_ratio, self.aligned)

    def forward(self, x: dict[str, torch.Tensor], boxes: list[torch.Tensor],
                image_shapes: list[tuple[int, int]]) -> torch.Tensor:
        feats = [x[name] for name in self.featmap_names]
        scales = self.feature_scales(feats, image_shapes)
        rois = torch.cat([torch.cat([torch.full_like(b[:, :1], i), b], dim=1) for i, b in enumerate(boxes)], dim=0)
        if len(feats) == 1:
            return self.pool_level(feats[0], rois, scales[0])
        k_min, k_max = round(-math.log2(scales[0])), round(-math.log2(scales[-1]))
        levels = assign_fpn_levels(rois[:, 1:], k_min, k_max, self.canonical_scale, self.canonical_level) - k_min
        if torchvision._is_tracing():
            # ONNX export: every level is pooled (empty ones too) and scattered back, as
            # torchvision's poolers do; `if idx.numel()` and `out[idx] =` would freeze the
            # example image's RoI counts per level into the graph
            pooled = [self.pool_level(feat, rois[torch.where(levels == lvl)[0]], scale).to(feats[0].dtype)
                      for lvl, (feat, scale) in enumerate(zip(feats, scales))]
            return _onnx_merge_levels(levels, pooled)
        out = feats[0].new_zeros((rois.shape[0], feats[0].shape[1], *self.output_size))
        for lvl, (feat, scale) in enumerate(zip(feats, scales)):
            idx = torch.nonzero(levels == lvl).flatten()
            if idx.numel():
                out[idx] = self.pool_level(feat, rois[idx], scale).to(out.dtype)
        return out

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(featmap_names={self.featmap_names}, output_size={self.output_size}, "
                f"roi_op={self.roi_op!r}, aligned={self.aligned}, sampling_ratio={self.sampling_ratio})")


# ---------------------------------------------------------------------------------------
# backbone helpers
# ---------------------------------------------------------------------------------------


def freeze_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every ``nn.BatchNorm2d`` in ``module`` by a ``FrozenBatchNorm2d`` with the same
    statistics, affine parameters and eps (in place; returns ``module``)."""
    for name, child in list(module.named_children()):
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            with torch.no_grad():
                if child.affine:
                    frozen.weight.copy_(child.weight)
                    frozen.bias.copy_(child.bias)
                if child.running_mean is not None:
                    frozen.running_mean.copy_(child.running_mean)
                    frozen.running_var.copy_(child.running_var)
            setattr(module, name, frozen)
        else:
            freeze_batchnorm(child)
    return module


def _encoder_stages(encoder: nn.Module) -> list[list[nn.Module]]:
    """The encoder's modules grouped into the 5 stages that produce c1..c5."""
    if hasattr(encoder, "stage_modules"):  # EfficientNet-Lite*, timm encoders
        return encoder.stage_modules()
    if hasattr(encoder, "layer1"):  # ResNet
        return [[encoder.conv1, encoder.bn1], [encoder.layer1], [encoder.layer2], [encoder.layer3], [encoder.layer4]]
    if hasattr(encoder, "_blocks"):  # EfficientNet-Lite0: features after blocks 0, 2, 4, 10, 15
        from pixelwise.models.backbones.efficientnet_lite import FEATURE_BLOCKS

        stages, start = [], 0
        for i, end in enumerate(FEATURE_BLOCKS):
            group = list(encoder._blocks[start:end + 1])
            if i == 0:
                group = [encoder._conv_stem, encoder._bn0, *group]
            stages.append(group)
            start = end + 1
        return stages
    raise ValueError(f"trainable_stages is not supported for {type(encoder).__name__}")


def _add_fpn_norm(backbone: EncoderFPN) -> None:
    """torchvision's FPN with ``norm_layer=BatchNorm2d``: each lateral (1x1) and output (3x3)
    conv becomes conv without bias + BN (``maskrcnn_resnet50_fpn_v2``)."""
    fpn = backbone.fpn
    c = fpn.out_channels
    fpn.lateral = nn.ModuleList(
        Conv2dNormActivation(ci, c, kernel_size=1, padding=0, norm_layer=nn.BatchNorm2d, activation_layer=None)
        for ci in fpn.in_channels)
    fpn.output = nn.ModuleList(
        Conv2dNormActivation(c, c, kernel_size=3, norm_layer=nn.BatchNorm2d, activation_layer=None)
        for _ in fpn.in_channels)
    for m in fpn.modules():
        if isinstance(m, nn.Conv2d):  # the FPN reference init, as FPN's own convs
            nn.init.kaiming_uniform_(m.weight, a=1)


def _freeze_stages(encoder: nn.Module, trainable_stages: int) -> None:
    if not 0 <= trainable_stages <= 5:
        raise ValueError(f"trainable_stages must be in 0..5, got {trainable_stages}")
    if trainable_stages == 5:
        return
    for group in _encoder_stages(encoder)[: 5 - trainable_stages]:
        for m in group:
            for p in m.parameters():
                p.requires_grad_(False)


# ---------------------------------------------------------------------------------------
# the model
# ---------------------------------------------------------------------------------------


class _NoResizeTransform(GeneralizedRCNNTransform):
    """torchvision's detection transform without the resizing step (``min_size=0``): images
    are only batched (padded to a multiple of 32); boxes and masks keep their coordinates."""

    def __init__(self, base: GeneralizedRCNNTransform):
        super().__init__(base.min_size, base.max_size, base.image_mean, base.image_std,
                         size_divisible=base.size_divisible, fixed_size=base.fixed_size)

    def resize(self, image, target=None):
        return image, target


class PixelwiseMaskRCNN(MaskRCNN):
    """torchvision's ``MaskRCNN`` with pixelwise's backbone and poolers; ``options`` holds the
    resolved settings and ``mask_threshold`` the binarisation threshold of pasted masks."""

    options: dict[str, Any]
    mask_threshold: float


def init_predictors(box_predictor: FastRCNNPredictor, mask_predictor: MaskRCNNPredictor) -> None:
    """detectron2's initialisation of the output layers (``FastRCNNOutputLayers``,
    ``MaskRCNNConvUpsampleHead``): class scores N(0, 0.01), box deltas N(0, 0.001), mask
    logits N(0, 0.001), zero biases; the mask deconvolution keeps the MSRA fill (fan_out).

    torchvision leaves the 1x1 mask-logit conv with its kaiming fan_out init (std ~0.7 for a
    few classes): mask logits of std ~10 (ResNet-18) to ~28 (EfficientNet-Lite0) at step one,
    an initial mask loss of ~4 to ~11 instead of ln 2. Small logits start every mask at 0.5."""
    nn.init.normal_(box_predictor.cls_score.weight, std=0.01)
    nn.init.normal_(box_predictor.bbox_pred.weight, std=0.001)
    nn.init.normal_(mask_predictor.mask_fcn_logits.weight, std=0.001)
    for layer in (box_predictor.cls_score, box_predictor.bbox_pred, mask_predictor.mask_fcn_logits):
        nn.init.zeros_(layer.bias)


def binarize_masks(output: dict[str, torch.Tensor], threshold: float = 0.5) -> torch.Tensor:
    """(K, H, W) bool masks of one eval output (``masks`` (K, 1, H, W) probabilities >= threshold)."""
    m = output["masks"]
    if m.dim() == 4:
        m = m[:, 0]
    return m >= threshold


def build_maskrcnn(num_classes: int, preset: str = "paper", **options: Any) -> PixelwiseMaskRCNN:
    """Build Mask R-CNN; ``num_classes`` counts the background. See the module docstring."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; available: {', '.join(PRESETS)}")
    if "weights_path" in options:  # the old name, before every model took backbone_weights
        if "backbone_weights" in options:
            raise ValueError("give backbone_weights, not also its old name weights_path")
        warnings.warn("maskrcnn option weights_path is deprecated, use backbone_weights", FutureWarning,
                      stacklevel=2)
        options["backbone_weights"] = options.pop("weights_path")
    unknown = sorted(set(options) - set(PAPER))
    if unknown:
        raise ValueError(f"unknown maskrcnn option(s): {', '.join(unknown)}; valid: {', '.join(sorted(PAPER))}")
    if num_classes < 2:
        raise ValueError(f"num_classes counts the background and must be >= 2, got {num_classes}")
    o = {**PRESETS[preset], **options}

    encoder = build_encoder(o["backbone"], in_channels=int(o["in_channels"]), pretrained=o["pretrained"],
                            weights_path=o["backbone_weights"])
    pretrained = o["pretrained"] is not None or o["backbone_weights"] is not None
    frozen_bn = pretrained if o["frozen_bn"] is None else bool(o["frozen_bn"])
    trainable = (3 if pretrained else 5) if o["trainable_stages"] is None else int(o["trainable_stages"])
    if frozen_bn:
        freeze_batchnorm(encoder)
    _freeze_stages(encoder, trainable)
    backbone = EncoderFPN(encoder, int(o["fpn_channels"]))
    if o["fpn_norm"]:
        _add_fpn_norm(backbone)

    anchor_sizes = tuple(int(s) for s in o["anchor_sizes"])
    if len(anchor_sizes) != len(backbone.level_names):
        raise ValueError(f"anchor_sizes needs one size per level {backbone.level_names}, got {anchor_sizes}")
    ratios = tuple(float(r) for r in o["aspect_ratios"])
    anchors = AnchorGenerator(tuple((s,) for s in anchor_sizes), (ratios,) * len(anchor_sizes))

    roi_levels = list(backbone.level_names[:4])  # P2..P5
    pool_kw = dict(roi_op=o["roi_op"], aligned=o["aligned"], canonical_scale=o["canonical_scale"],
                   canonical_level=o["canonical_level"])
    box_pool = MultiScaleRoIPooler(roi_levels, int(o["box_roi_size"]), o["sampling_ratio"], **pool_kw)
    mask_pool = MultiScaleRoIPooler(roi_levels, int(o["mask_roi_size"]), o["sampling_ratio"], **pool_kw)
    c = backbone.out_channels
    head_norm = nn.BatchNorm2d if o["head_norm"] else None
    if int(o["box_head_convs"]) > 0:
        box_head = FastRCNNConvFCHead((c, int(o["box_roi_size"]), int(o["box_roi_size"])),
                                      [int(o["box_head_channels"])] * int(o["box_head_convs"]),
                                      [int(o["box_head_dim"])], norm_layer=head_norm)
    else:
        box_head = TwoMLPHead(c * int(o["box_roi_size"]) ** 2, int(o["box_head_dim"]))
    box_predictor = FastRCNNPredictor(int(o["box_head_dim"]), num_classes)
    rpn_head = None  # torchvision's default RPNHead (one 3x3 conv), built inside MaskRCNN
    if int(o["rpn_conv_depth"]) != 1:
        rpn_head = RPNHead(c, anchors.num_anchors_per_location()[0], conv_depth=int(o["rpn_conv_depth"]))
    mc = int(o["mask_head_channels"])
    mask_head = MaskRCNNHeads(c, [mc] * int(o["mask_head_convs"]), 1, norm_layer=head_norm)
    mask_predictor = MaskRCNNPredictor(mc, mc, num_classes)
    init_predictors(box_predictor, mask_predictor)

    n_in = int(o["in_channels"])
    model = PixelwiseMaskRCNN(
        backbone, num_classes=None,
        min_size=int(o["min_size"]) or 800, max_size=int(o["max_size"]) or 1333,
        image_mean=[0.0] * n_in, image_std=[1.0] * n_in,  # pixelwise normalises in its data pipeline
        rpn_anchor_generator=anchors, rpn_head=rpn_head,
        rpn_pre_nms_top_n_train=int(o["rpn_pre_nms_top_n_train"]),
        rpn_pre_nms_top_n_test=int(o["rpn_pre_nms_top_n_test"]),
        rpn_post_nms_top_n_train=int(o["rpn_post_nms_top_n_train"]),
        rpn_post_nms_top_n_test=int(o["rpn_post_nms_top_n_test"]),
        rpn_nms_thresh=float(o["rpn_nms_thresh"]),
        rpn_fg_iou_thresh=float(o["rpn_fg_iou_thresh"]), rpn_bg_iou_thresh=float(o["rpn_bg_iou_thresh"]),
        rpn_batch_size_per_image=int(o["rpn_batch_size_per_image"]),
        rpn_positive_fraction=float(o["rpn_positive_fraction"]),
        box_roi_pool=box_pool, box_head=box_head, box_predictor=box_predictor,
        box_score_thresh=float(o["box_score_thresh"]), box_nms_thresh=float(o["box_nms_thresh"]),
        box_detections_per_img=int(o["detections_per_img"]),
        box_fg_iou_thresh=float(o["box_fg_iou_thresh"]), box_bg_iou_thresh=float(o["box_bg_iou_thresh"]),
        box_batch_size_per_image=int(o["box_batch_size_per_image"]),
        box_positive_fraction=float(o["box_positive_fraction"]),
        mask_roi_pool=mask_pool, mask_head=mask_head, mask_predictor=mask_predictor,
    )
    if not o["min_size"]:
        model.transform = _NoResizeTransform(model.transform)
    model.options = {"preset": preset, **o, "frozen_bn": frozen_bn, "trainable_stages": trainable}
    model.mask_threshold = float(o["mask_threshold"])
    model.in_channels = n_in
    model.num_classes = int(num_classes)
    return model


@register_model("maskrcnn", task="instance", paper="He et al., Mask R-CNN, ICCV 2017",
                options=lambda: ["preset", *PAPER])
def maskrcnn(num_classes: int, **kwargs: Any) -> PixelwiseMaskRCNN:
    """Mask R-CNN with an FPN on a pixelwise encoder; ``num_classes`` includes the background.
    Options: see :data:`PAPER` (``preset="cpu"`` for the lean CPU setting)."""
    return build_maskrcnn(num_classes, **kwargs)
