"""Panoptic FPN merge: instance predictions + a semantic prediction -> one panoptic map.

:func:`merge_panoptic` is the heuristic of Panoptic FPN (Kirillov et al., CVPR 2019; SPEC §7)
with the defaults of the reference code, as a plain function on tensors:

1. **Things.** Instances are sorted by score (descending; ties keep their input order) and
   those with ``score < score_threshold`` (0.5) are dropped. Each one is pasted in turn:
   its mask (float probabilities are binarised with ``prob >= mask_threshold``) is compared
   with the pixels already taken. It is dropped if its mask is empty or if MORE than
   ``overlap_threshold`` (0.5) of its pixels are already taken (exactly 50% is kept);
   otherwise only its free pixels become a new segment. So a lower-score instance never
   takes pixels from a higher-score one.
2. **Stuff.** The pixels still free are filled from the semantic prediction: one segment
   per stuff class (all free pixels of that class, connected or not, as in the reference
   code). A class whose free area is smaller than the minimum stuff area is dropped (its
   pixels stay void), and the semantic branch's ``thing_class`` ('other/thing') is never
   emitted.
3. **Void.** Every pixel left unassigned is 0.

Segment ids are 1..N in paste order: things first (by descending score), then stuff (by
ascending semantic class id).

Minimum stuff area and image size
---------------------------------
The reference (detectron2's ``PanopticFPN``, ``combine_semantic_and_instance_outputs``)
drops stuff regions under 4096 pixels (64^2) counted at the ORIGINAL image resolution:
the semantic logits are first resized to the input image's height and width
(``sem_seg_postprocess``), then merged. That is the default here (``stuff_area_min=4096``,
no scaling) and of :class:`~pixelwise.models.panoptic_fpn.PanopticFPN`, which merges at the
original size too.

A pixelwise choice, NOT the reference: on small synthetic images (128 x 128 = 16384 px)
4096 px is a quarter of the image and wipes out nearly every stuff region, so the threshold
can be scaled with the image area (the model option ``scale_stuff_area=True``, used by the
``configs/*panoptic*shapes*.yaml`` configs):

- ``stuff_area_scale=s`` makes the threshold ``stuff_area_min * s`` (a float; no rounding),
  e.g. ``s = H * W / (800 * 1333)`` keeps the same FRACTION of the image as 4096 px is of an
  800 x 1333 image (about 63 px on 128 x 128);
- :func:`scaled_stuff_area` computes that scaled threshold directly, to pass as
  ``stuff_area_min``.

Input and output types
----------------------
Inputs may be torch tensors (CPU, or any one device) or numpy arrays. The panoptic map is
an int32 array of the same kind as ``semantic_pred`` (numpy in -> numpy out, tensor in ->
tensor out on its device). Segments are plain Python dicts (COCO panoptic
``segments_info`` style)::

    {"id": 1, "category_id": 3, "isthing": True, "score": 0.93, "area": 412,
     "instance_index": 5}          # things: index into the input instances
    {"id": 4, "category_id": 21, "isthing": False, "area": 5120}   # stuff: no score
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

__all__ = ["merge_panoptic", "scaled_stuff_area", "REFERENCE_IMAGE_SIZE", "REFERENCE_STUFF_AREA"]

#: image size (H, W) the optional stuff-area scaling is relative to (COCO resized to short side 800)
REFERENCE_IMAGE_SIZE = (800, 1333)
#: reference minimum stuff area in pixels (64^2)
REFERENCE_STUFF_AREA = 4096


def scaled_stuff_area(h: int, w: int, reference: tuple[int, int] = REFERENCE_IMAGE_SIZE,
                      min_area: float = REFERENCE_STUFF_AREA) -> float:
    """Minimum stuff area for an ``h x w`` image, proportional to its area.

    ``min_area * (h * w) / (reference[0] * reference[1])``: the same fraction of the image
    as ``min_area`` is of a ``reference`` image. With the defaults, 4096 px for 800 x 1333,
    about 62.9 px for 128 x 128, about 1180 px for 512 x 512.
    """
    if h <= 0 or w <= 0:
        raise ValueError(f"image size must be positive, got {h} x {w}")
    rh, rw = reference
    if rh <= 0 or rw <= 0:
        raise ValueError(f"reference size must be positive, got {rh} x {rw}")
    return float(min_area) * (h * w) / (rh * rw)


def _to_tensor(x: Any, device: torch.device | None = None) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        t = x.detach()
    else:
        t = torch.as_tensor(np.asarray(x))
    return t if device is None else t.to(device)


def merge_panoptic(
    instance_masks: Any,
    instance_scores: Any,
    instance_labels: Any,
    semantic_pred: Any,
    *,
    thing_class: int,
    stuff_classes: Mapping[int, int] | None = None,
    score_threshold: float = 0.5,
    overlap_threshold: float = 0.5,
    mask_threshold: float = 0.5,
    stuff_area_min: float = REFERENCE_STUFF_AREA,
    stuff_area_scale: float | None = None,
) -> tuple[Any, list[dict[str, Any]]]:
    """Merge instance and semantic predictions into a panoptic segmentation (Panoptic FPN).

    Args:
        instance_masks: (K, H, W) bool masks or float probabilities (a (K, 1, H, W) stack
            is accepted too); K may be 0 (``None`` also means no instances).
        instance_scores: (K,) confidence of each instance.
        instance_labels: (K,) category id of each instance (written as ``category_id``).
        semantic_pred: (H, W) integer class ids of the semantic branch.
        thing_class: the semantic branch's single 'other/thing' class id; never emitted.
        stuff_classes: semantic class id -> category id of the stuff segments. ``None``:
            identity (every class but ``thing_class`` is stuff, category id = class id).
            With a mapping, semantic classes not in it are left void (e.g. an ignore id).
        score_threshold: instances with ``score < score_threshold`` are dropped.
        overlap_threshold: an instance is dropped when MORE than this fraction of its mask
            is already taken by higher-score instances.
        mask_threshold: float masks are binarised with ``prob >= mask_threshold``
            (ignored for bool masks).
        stuff_area_min: stuff segments with fewer free pixels than this are dropped; the
            reference's 4096 counted on the maps at the original image size (default).
        stuff_area_scale: if given (a pixelwise option for small images, not the
            reference), the threshold is ``stuff_area_min * stuff_area_scale`` (e.g.
            ``H * W / (800 * 1333)``; see :func:`scaled_stuff_area`).

    Returns:
        ``(panoptic, segments)``: ``panoptic`` is an (H, W) int32 map of segment ids (0 =
        void), numpy if ``semantic_pred`` is numpy, else a tensor on its device;
        ``segments`` lists one dict per segment id 1..N: ``id``, ``category_id``,
        ``isthing``, ``area`` and, for things, ``score`` and ``instance_index`` (index of
        the instance in the inputs).
    """
    return_numpy = not isinstance(semantic_pred, torch.Tensor)
    sem = _to_tensor(semantic_pred)
    if sem.ndim != 2:
        raise ValueError(f"semantic_pred must be (H, W), got shape {tuple(sem.shape)}")
    if sem.dtype.is_floating_point or sem.dtype == torch.bool or sem.is_complex():
        raise ValueError(f"semantic_pred must hold integer class ids, got {sem.dtype}")
    device = sem.device
    H, W = sem.shape

    scores = _to_tensor(instance_scores if instance_scores is not None else [], device)
    scores = scores.reshape(-1).to(torch.float64)
    labels = _to_tensor(instance_labels if instance_labels is not None else [], device).reshape(-1)
    K = scores.numel()
    if labels.numel() != K:
        raise ValueError(f"{K} instance scores but {labels.numel()} instance labels")
    if instance_masks is None:
        masks = torch.zeros((0, H, W), dtype=torch.bool, device=device)
    else:
        masks = _to_tensor(instance_masks, device)
        if masks.ndim == 4 and masks.shape[1] == 1:
            masks = masks[:, 0]
        if masks.numel() == 0 and K == 0:
            masks = torch.zeros((0, H, W), dtype=torch.bool, device=device)
    if masks.ndim != 3 or masks.shape[0] != K or tuple(masks.shape[1:]) != (H, W):
        raise ValueError(f"instance_masks must be (K={K}, H={H}, W={W}), "
                         f"got shape {tuple(masks.shape)}")
    if masks.dtype != torch.bool:
        masks = masks >= mask_threshold

    min_area = float(stuff_area_min)
    if stuff_area_scale is not None:
        if stuff_area_scale < 0:
            raise ValueError(f"stuff_area_scale must be >= 0, got {stuff_area_scale}")
        min_area *= float(stuff_area_scale)

    panoptic = torch.zeros((H, W), dtype=torch.int32, device=device)
    taken = torch.zeros((H, W), dtype=torch.bool, device=device)
    segments: list[dict[str, Any]] = []

    # --- things: highest score first; stable so equal scores keep their input order
    if K:
        order = torch.sort(scores, descending=True, stable=True).indices.tolist()
        for k in order:
            score = float(scores[k])
            if not score >= score_threshold:  # also drops NaN scores
                break
            mask = masks[k]
            area = int(mask.sum())
            if area == 0:
                continue
            overlap = int((mask & taken).sum())
            if overlap / area > overlap_threshold:
                continue
            free = mask & ~taken
            seg_id = len(segments) + 1
            panoptic[free] = seg_id
            taken |= free
            segments.append({"id": seg_id, "category_id": int(labels[k]), "isthing": True,
                             "score": score, "area": area - overlap, "instance_index": k})

    # --- stuff: one segment per semantic class among the free pixels
    free_sem = sem[~taken]
    if free_sem.numel():
        classes, counts = torch.unique(free_sem, sorted=True, return_counts=True)
        for cls, cnt in zip(classes.tolist(), counts.tolist()):
            if cls == thing_class:
                continue
            if stuff_classes is None:
                category = int(cls)
            elif cls in stuff_classes:
                category = int(stuff_classes[cls])
            else:
                continue
            if cnt < min_area:
                continue
            seg_id = len(segments) + 1
            panoptic[(sem == cls) & ~taken] = seg_id
            segments.append({"id": seg_id, "category_id": category, "isthing": False,
                             "area": int(cnt)})

    if return_numpy:
        return panoptic.cpu().numpy(), segments
    return panoptic, segments
