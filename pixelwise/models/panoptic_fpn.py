"""Panoptic FPN (Kirillov, Girshick, He, Dollar, CVPR 2019; SPEC §7).

One network, two branches on ONE shared FPN:

- **instance branch** = the Mask R-CNN of :mod:`pixelwise.models.maskrcnn`, built by
  :func:`~pixelwise.models.maskrcnn.build_maskrcnn` and kept whole as ``model.instance``
  (its encoder + FPN is ``model.instance.backbone``; every maskrcnn option and preset passes
  through);
- **semantic branch** (:class:`SemanticFPNHead`, ``model.semantic``) on the same P2..P5
  maps: each level goes through :class:`SemanticStage` blocks
  [3x3 conv ``semantic_channels`` (128) + GroupNorm(32) + ReLU + 2x bilinear up] until 1/4
  scale -- P5: 3 stages, P4: 2, P3: 1, P2: one stage WITHOUT upsampling; the four 1/4-scale
  maps are SUMMED, a 1x1 conv gives ``num_stuff + 1`` logits (the stuff classes and one
  'thing/other' class) and a x4 bilinear upsample brings them to the input size.

Classes
-------
- ``num_things``: Mask R-CNN's ``num_classes`` -- thing categories **plus the background**
  (label 0). Instance labels are 1..num_things-1.
- ``num_stuff``: stuff categories. Semantic class ids: 0..num_stuff-1 are the stuff classes,
  ``num_stuff`` is the 'thing/other' class (``model.thing_class``), 255 is ignored.
- ``num_classes`` (the builder's first argument) = thing + stuff categories, background NOT
  counted: ``num_classes == (num_things - 1) + num_stuff``. Give ``num_things`` or
  ``num_stuff`` (the other is derived) or both (checked), or ``thing_ids`` / ``stuff_ids``
  (category ids written into the panoptic segments; their lengths set the counts). With
  none of them every category is a thing (``num_stuff = 0``; the semantic branch then only
  has the 'thing/other' class) -- a fallback so ``build_model("panoptic_fpn", n)`` works.
- Panoptic ``category_id``: a thing with instance label ``l`` gets ``thing_ids[l - 1]``
  (default ``l``, i.e. 1..T); a stuff segment of semantic class ``s`` gets ``stuff_ids[s]``
  (default ``T + 1 + s``), so by default categories are 1..num_classes, 0 = void.

Contract (torchvision's detection convention, like ``maskrcnn``)
-----------------------------------------------------------------
- training: ``model(images, targets)``; each target has the Mask R-CNN keys (``boxes``,
  ``labels``, ``masks``) plus ``semantic`` (H, W) long already mapped to the semantic ids
  above. Returns the Mask R-CNN loss dict plus
  ``loss_semantic = semantic_weight * cross_entropy(logits, semantic, ignore_index=255)``
  (``semantic_weight`` 0.5, SPEC §7's lambda_s; the sum of the dict is the paper's loss).
- eval: ``model(images)`` returns one dict per image: the Mask R-CNN outputs (``boxes``,
  ``labels``, ``scores``, ``masks``) plus ``sem_seg`` (num_stuff + 1, H, W) logits,
  ``panoptic`` (H, W) int32 segment ids (0 = void) and ``segments_info`` (the segment list),
  i.e. the two results of :func:`~pixelwise.postprocess_panoptic.merge_panoptic`. Stuff
  regions under ``stuff_area`` (4096) pixels are dropped, counted at the ORIGINAL image size
  as in detectron2's PanopticFPN (the merge runs after the semantic logits and masks are
  resized to it). ``scale_stuff_area=True`` (a pixelwise option for small synthetic images,
  not the reference) scales the threshold with the image area by
  :func:`~pixelwise.postprocess_panoptic.scaled_stuff_area` (4096 px on 800 x 1333, ~63 px
  on 128 x 128).

The semantic logits are computed on the batched (resized, padded) images of the Mask R-CNN
transform, cropped to each image's valid area and resized bilinearly to its original size;
the semantic loss is taken at that original size.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from pixelwise.data.classes import IGNORE_INDEX
from pixelwise.models.maskrcnn import PixelwiseMaskRCNN, build_maskrcnn
from pixelwise.models.registry import keyword_options, model_options, register_model
from pixelwise.postprocess_panoptic import REFERENCE_STUFF_AREA, merge_panoptic, scaled_stuff_area

__all__ = ["SemanticStage", "SemanticFPNHead", "PanopticFPN", "build_panoptic_fpn", "STAGES_PER_LEVEL",
           "IGNORE_INDEX"]

#: SemanticStage blocks per FPN level (each but P2's ends with a 2x upsample): 1/4 scale after them
STAGES_PER_LEVEL = {"p2": 1, "p3": 1, "p4": 2, "p5": 3}


class SemanticStage(nn.Module):
    """3x3 conv (no bias) + GroupNorm + ReLU, then (if ``upsample``) 2x bilinear upsampling."""

    def __init__(self, in_channels: int, out_channels: int = 128, upsample: bool = True, groups: int = 32):
        super().__init__()
        if out_channels % groups:
            raise ValueError(f"semantic_channels ({out_channels}) must be divisible by the GroupNorm groups ({groups})")
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.norm = nn.GroupNorm(groups, out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.upsample = bool(upsample)
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.norm(self.conv(x)))
        if self.upsample:
            x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
        return x

    def extra_repr(self) -> str:
        return f"upsample={self.upsample}"


class SemanticFPNHead(nn.Module):
    """Panoptic FPN's semantic branch: P2..P5 -> (B, num_classes, 4 h_P2, 4 w_P2) logits.

    ``levels[name]`` is the ``nn.Sequential`` of :class:`SemanticStage` of one level
    (:data:`STAGES_PER_LEVEL`); ``predictor`` the 1x1 conv; ``forward(..., upsample=False)``
    returns the 1/4-scale logits.
    """

    def __init__(self, in_channels: int, num_classes: int, channels: int = 128, groups: int = 32):
        super().__init__()
        self.levels = nn.ModuleDict()
        for name, n in STAGES_PER_LEVEL.items():
            up = name != "p2"
            self.levels[name] = nn.Sequential(*[
                SemanticStage(in_channels if i == 0 else channels, channels, upsample=up, groups=groups)
                for i in range(n)])
        self.predictor = nn.Conv2d(channels, num_classes, 1)
        nn.init.normal_(self.predictor.weight, std=0.001)
        nn.init.zeros_(self.predictor.bias)

    def forward(self, features: dict[str, torch.Tensor], upsample: bool = True) -> torch.Tensor:
        size = features["p2"].shape[-2:]
        x = None
        for name, stages in self.levels.items():
            y = stages(features[name])
            if y.shape[-2:] != size:  # only when a level's size is not an exact power-of-2 fraction
                y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
            x = y if x is None else x + y
        logits = self.predictor(x)
        if upsample:
            logits = F.interpolate(logits, scale_factor=4.0, mode="bilinear", align_corners=False)
        return logits


class PanopticFPN(nn.Module):
    """Mask R-CNN (``instance``) + semantic FPN head (``semantic``) on the instance branch's FPN."""

    def __init__(self, instance: PixelwiseMaskRCNN, semantic: SemanticFPNHead, *, num_things: int, num_stuff: int,
                 thing_ids: Sequence[int], stuff_ids: Sequence[int], semantic_weight: float = 0.5,
                 stuff_area: float = REFERENCE_STUFF_AREA, scale_stuff_area: bool = False,
                 merge_score_threshold: float = 0.5, merge_overlap_threshold: float = 0.5):
        super().__init__()
        self.instance = instance
        self.semantic = semantic
        self.num_things = int(num_things)
        self.num_stuff = int(num_stuff)
        self.thing_class = int(num_stuff)
        self.thing_ids = [int(i) for i in thing_ids]
        self.stuff_ids = [int(i) for i in stuff_ids]
        self.semantic_weight = float(semantic_weight)
        self.stuff_area = float(stuff_area)
        self.scale_stuff_area = bool(scale_stuff_area)
        self.merge_score_threshold = float(merge_score_threshold)
        self.merge_overlap_threshold = float(merge_overlap_threshold)

    @property
    def backbone(self) -> nn.Module:
        """The shared encoder + FPN (the instance branch's)."""
        return self.instance.backbone

    @property
    def mask_threshold(self) -> float:
        return self.instance.mask_threshold

    def _semantic_logits(self, features, image_sizes, original_sizes) -> list[torch.Tensor]:
        logits = self.semantic(features)  # at the batched (padded) size
        out = []
        for i, ((h, w), orig) in enumerate(zip(image_sizes, original_sizes)):
            lg = logits[i:i + 1, :, :h, :w]
            if (h, w) != tuple(orig):
                lg = F.interpolate(lg, size=tuple(orig), mode="bilinear", align_corners=False)
            out.append(lg[0])
        return out

    def forward(self, images: list[torch.Tensor] | torch.Tensor, targets: list[dict[str, torch.Tensor]] | None = None):
        m = self.instance
        if self.training and targets is None:
            raise ValueError("training forward needs targets (Mask R-CNN keys + 'semantic')")
        images = list(images)
        original_sizes = [tuple(img.shape[-2:]) for img in images]
        semantic_targets = None
        if self.training:
            missing = [i for i, t in enumerate(targets) if "semantic" not in t]
            if missing:
                raise ValueError(f"targets {missing} have no 'semantic' map")
            semantic_targets = [t["semantic"] for t in targets]
            targets = [{k: v for k, v in t.items() if k != "semantic"} for t in targets]
        batch, targets = m.transform(images, targets)
        features = m.backbone(batch.tensors)
        proposals, proposal_losses = m.rpn(batch, features, targets)
        detections, detector_losses = m.roi_heads(features, proposals, batch.image_sizes, targets)
        sem_logits = self._semantic_logits(features, batch.image_sizes, original_sizes)

        if self.training:
            ce = torch.stack([
                F.cross_entropy(lg[None], st[None].to(device=lg.device, dtype=torch.long), ignore_index=IGNORE_INDEX,
                                reduction="sum") for lg, st in zip(sem_logits, semantic_targets)]).sum()
            n_valid = sum(int((st != IGNORE_INDEX).sum()) for st in semantic_targets)
            ce = ce / max(n_valid, 1)
            return {**proposal_losses, **detector_losses, "loss_semantic": self.semantic_weight * ce}

        detections = m.transform.postprocess(detections, batch.image_sizes, original_sizes)
        for det, lg in zip(detections, sem_logits):
            det["sem_seg"] = lg
            det["panoptic"], det["segments_info"] = self.merge(det, lg)
        return detections

    def merge(self, det: dict[str, torch.Tensor], sem_logits: torch.Tensor):
        """SPEC §7's merge of one image's Mask R-CNN output and (C, H, W) semantic logits."""
        h, w = sem_logits.shape[-2:]
        min_area = scaled_stuff_area(h, w, min_area=self.stuff_area) if self.scale_stuff_area else self.stuff_area
        labels = det["labels"]
        cats = torch.as_tensor(self.thing_ids, device=labels.device)[(labels - 1).clamp(min=0)] if labels.numel() \
            else labels
        return merge_panoptic(
            det["masks"], det["scores"], cats, sem_logits.argmax(0), thing_class=self.thing_class,
            stuff_classes={s: c for s, c in enumerate(self.stuff_ids)},
            score_threshold=self.merge_score_threshold, overlap_threshold=self.merge_overlap_threshold,
            mask_threshold=self.instance.mask_threshold, stuff_area_min=min_area)


def _resolve_counts(num_classes: int, num_things, num_stuff, thing_ids, stuff_ids) -> tuple[int, int, list, list]:
    if thing_ids is not None:
        n = len(thing_ids) + 1
        if num_things is not None and int(num_things) != n:
            raise ValueError(f"num_things={num_things} but {len(thing_ids)} thing_ids (+1 background)")
        num_things = n
    if stuff_ids is not None:
        if num_stuff is not None and int(num_stuff) != len(stuff_ids):
            raise ValueError(f"num_stuff={num_stuff} but {len(stuff_ids)} stuff_ids")
        num_stuff = len(stuff_ids)
    if num_things is None and num_stuff is None:
        num_things, num_stuff = num_classes + 1, 0
    elif num_things is None:
        num_things = num_classes - int(num_stuff) + 1
    elif num_stuff is None:
        num_stuff = num_classes - (int(num_things) - 1)
    num_things, num_stuff = int(num_things), int(num_stuff)
    if num_things < 2:
        raise ValueError(f"num_things counts the background and must be >= 2, got {num_things}")
    if num_stuff < 0:
        raise ValueError(f"num_stuff must be >= 0, got {num_stuff}")
    if (num_things - 1) + num_stuff != num_classes:
        raise ValueError(f"num_classes ({num_classes}) must equal thing categories (num_things - 1 = "
                         f"{num_things - 1}) + stuff categories ({num_stuff})")
    thing_ids = list(range(1, num_things)) if thing_ids is None else [int(i) for i in thing_ids]
    stuff_ids = list(range(num_things, num_things + num_stuff)) if stuff_ids is None else [int(i) for i in stuff_ids]
    if len(set(thing_ids) | set(stuff_ids)) != len(thing_ids) + len(stuff_ids):
        raise ValueError("thing_ids and stuff_ids must be distinct")
    return num_things, num_stuff, thing_ids, stuff_ids


def build_panoptic_fpn(num_classes: int, *, num_things: int | None = None, num_stuff: int | None = None,
                       thing_ids: Sequence[int] | None = None, stuff_ids: Sequence[int] | None = None,
                       semantic_channels: int = 128, semantic_groups: int = 32, semantic_weight: float = 0.5,
                       stuff_area: float = REFERENCE_STUFF_AREA, scale_stuff_area: bool = False,
                       merge_score_threshold: float = 0.5, merge_overlap_threshold: float = 0.5,
                       **maskrcnn_options: Any) -> PanopticFPN:
    """Build Panoptic FPN; see the module docstring for the class counts. ``maskrcnn_options``
    (``preset``, ``backbone``, ``fpn_channels``, ...) go to :func:`build_maskrcnn` unchanged.
    ``stuff_area`` (4096) is the merge's minimum stuff area at the original image size, as in
    detectron2; ``scale_stuff_area=True`` scales it with the image area (pixelwise's option
    for small images)."""
    if semantic_weight < 0:
        raise ValueError(f"semantic_weight must be >= 0, got {semantic_weight}")
    num_things, num_stuff, thing_ids, stuff_ids = _resolve_counts(int(num_classes), num_things, num_stuff,
                                                                  thing_ids, stuff_ids)
    instance = build_maskrcnn(num_things, **maskrcnn_options)
    semantic = SemanticFPNHead(instance.backbone.out_channels, num_stuff + 1, int(semantic_channels),
                               int(semantic_groups))
    model = PanopticFPN(instance, semantic, num_things=num_things, num_stuff=num_stuff, thing_ids=thing_ids,
                        stuff_ids=stuff_ids, semantic_weight=semantic_weight, stuff_area=stuff_area,
                        scale_stuff_area=scale_stuff_area, merge_score_threshold=merge_score_threshold,
                        merge_overlap_threshold=merge_overlap_threshold)
    model.in_channels = instance.in_channels
    model.num_classes = int(num_classes)
    model.options = {**instance.options, "num_things": num_things, "num_stuff": num_stuff,
                     "semantic_channels": int(semantic_channels), "semantic_weight": float(semantic_weight),
                     "stuff_area": float(stuff_area), "scale_stuff_area": bool(scale_stuff_area)}
    return model


@register_model("panoptic_fpn", task="panoptic",
                paper="Kirillov, Girshick, He, Dollar, Panoptic Feature Pyramid Networks, CVPR 2019",
                options=lambda: [*keyword_options(build_panoptic_fpn), *model_options("maskrcnn")])
def panoptic_fpn(num_classes: int, **kwargs: Any) -> PanopticFPN:
    """Panoptic FPN: Mask R-CNN + semantic FPN head on one shared FPN. ``num_classes`` = thing +
    stuff categories (no background); give ``num_things`` (incl. background) and/or
    ``num_stuff``, or ``thing_ids``/``stuff_ids``. Other options: :func:`build_panoptic_fpn`."""
    return build_panoptic_fpn(num_classes, **kwargs)
