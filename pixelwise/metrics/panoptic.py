"""Panoptic quality (Kirillov et al., CVPR 2019), computed exactly as panopticapi does (SPEC §8).

Files follow the COCO panoptic format: one RGB PNG per image whose pixel colour encodes a
segment id, ``id = R + 256 G + 256^2 B`` (0 = VOID), and a JSON file whose
``annotations[]`` give, per image, ``image_id``, ``file_name`` and ``segments_info``
(``{id, category_id, iscrowd, ...}``); the ground-truth JSON also lists the
``categories`` (``{id, name, isthing}``).

Per image, with ``|.|`` pixel counts:

- a predicted segment ``p`` and a ground-truth segment ``g`` MATCH when they have the same
  category and ``IoU = |p∩g| / (|p| + |g| - |p∩g| - |p∩VOID|) > 0.5`` (void pixels are
  removed from ``p``); a match is unique because segments do not overlap;
- crowd ground truth (``iscrowd = 1``) takes no part in matching and is never a FN;
- FN: the unmatched non-crowd ground-truth segments;
- FP: the unmatched predicted segments, except those with
  ``(|p∩VOID| + |p∩CROWD of p's category|) / |p| > 0.5``, which are ignored.

Over the whole dataset, per category ``c``: ``PQ_c = sum_TP IoU / (TP + FP/2 + FN/2)``,
``SQ_c = sum_TP IoU / TP`` (0 when TP = 0), ``RQ_c = TP / (TP + FP/2 + FN/2)``; PQ, SQ, RQ
are means over the categories with ``TP + FP + FN > 0`` (PQ^Th and PQ^St over the thing and
stuff categories). Because every number is a function of per-category
(TP, FP, FN, sum IoU), evaluating in pieces and summing :class:`PQStat` gives exactly the
result of one pass.

Where this module is deliberately stricter than, or differs from, panopticapi (on
well-formed data the numbers are identical):

- Input errors are :class:`~pixelwise.errors.DataError` with the file and the image named:
  a PNG id missing from ``segments_info``, a ``segments_info`` id missing from the PNG, an
  unknown ``category_id``, duplicate segment ids or image ids, GT/prediction size mismatch.
  panopticapi checks only the prediction and silently keeps the last of duplicated ids.
- Segment areas are counted from the PNGs (panopticapi takes the ground-truth area from the
  JSON ``area`` field; on COCO, and the COCO sample in this repository, they are equal).
- The crowd region of a category is the union of ALL its crowd segments in the image
  (panopticapi keeps only the last one; COCO has at most one crowd segment per category
  and image, where both agree).
- A group (Things/Stuff) with no category to average (n = 0) gives PQ = SQ = RQ = 0 with
  ``n = 0`` instead of panopticapi's ZeroDivisionError.
- A segment without ``iscrowd`` is not crowd (panopticapi raises KeyError).

Speed (a 512 x 512 pair costs little more than decoding its two PNGs): PIL decodes a PNG
into 4 bytes per pixel, which NumPy reads in place as one uint32 per pixel (the id in its
low 24 bits). One pass over the pixels finds the *runs* (raster order) over which neither
the ground truth nor the prediction changes; panoptic maps are made of large regions, so
there are a few thousand runs instead of 262144 pixels, and everything after works on runs:
their ids become dense segment indices through a 2^16-entry table (checked against the
real ids; binary search when 16 bits do not tell the ids apart), and one ``bincount`` over
``gt_index * (K_pred + 2) + pred_index`` weighted by the run lengths gives every
(ground truth, prediction) intersection. Only the overlapping segment pairs are looked at
after that, with NumPy, no Python loop over segments. Images are spread over threads (by
default: PNG decoding and the NumPy passes release the GIL, and threads cost nothing to
start) or worker processes, in chunks; each opens its own PNG pairs and returns a small
:class:`PQStat` per image, which are summed in image order: the result is bit-identical
whatever the number of threads or workers.
"""
from __future__ import annotations

import math
import multiprocessing
import os
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Self

import numpy as np

# The file format (PNG id codec, JSON tables, segments_info validation) lives in the data
# layer; the old private names stay importable from here.
from pixelwise.data.formats.coco_panoptic import (
    ID_MASK,
    MAX_ID,
    VOID,
    SegmentsInfo,
    annotations_by_image,
    category_table,
    decode_panoptic_png,
    format_ids,
    id2rgb,
    json_category_table,
    load_panoptic_json,
    read_panoptic_png,
    rgb2id,
    unknown_ids_error,
)
from pixelwise.errors import DataError

__all__ = ["MAX_ID", "PQStat", "VOID", "format_pq_table", "id2rgb", "pq_compute", "pq_single_image", "rgb2id"]

_category_table = category_table
_json_category_table = json_category_table
_Segments = SegmentsInfo
_fmt_ids = format_ids
_unknown_ids = unknown_ids_error
_decode_png = decode_panoptic_png
_read_id_png = read_panoptic_png
_load_json = load_panoptic_json
_annotations = annotations_by_image
_ID_BITS = ID_MASK
_GROUPS = (("All", None), ("Things", True), ("Stuff", False))


# ---------------------------------------------------------------------------------------
# categories
# ---------------------------------------------------------------------------------------


def _is_thing(cid: int, info: Mapping[str, Any]) -> bool:
    if "isthing" not in info:
        raise ValueError(f"category {cid} has no 'isthing' field: Things/Stuff need it "
                         "(pass the categories of the COCO panoptic JSON)")
    return info["isthing"] == 1


# ---------------------------------------------------------------------------------------
# the accumulator
# ---------------------------------------------------------------------------------------


class PQStat:
    """Per-category TP, FP, FN and sum of TP IoUs; add them up over images and processes.

    ``a += b`` adds ``b`` into ``a``; ``state_dict()`` is plain lists (JSON, pickle and
    ``torch.save`` friendly) and ``load_state_dict`` reads it back; for a collective sum
    (``torch.distributed.all_reduce``) use ``to_array(ids)`` / ``from_array(ids, array)``
    with the same category ids in every process.

    Example::

        stat = PQStat()
        for gt, gt_segs, pred, pred_segs in images:
            stat += pq_single_image(gt, gt_segs, pred, pred_segs, categories)
        print(format_pq_table(stat.results(categories)))
    """

    __slots__ = ("_stats",)

    def __init__(self) -> None:
        self._stats: dict[int, list] = {}  # category id -> [tp, fp, fn, iou_sum]

    # -- access --------------------------------------------------------------------------

    def _get(self, cid: int) -> list:
        s = self._stats.get(cid)
        if s is None:
            s = self._stats[cid] = [0, 0, 0, 0.0]
        return s

    def __getitem__(self, category_id: int) -> dict[str, float]:
        tp, fp, fn, iou = self._stats.get(int(category_id), (0, 0, 0, 0.0))
        return {"tp": tp, "fp": fp, "fn": fn, "iou_sum": iou}

    @property
    def category_ids(self) -> list[int]:
        """The categories with any count, sorted."""
        return sorted(self._stats)

    def add(self, category_id: int, tp: int = 0, fp: int = 0, fn: int = 0, iou_sum: float = 0.0) -> None:
        """Add counts to one category."""
        s = self._get(int(category_id))
        s[0] += int(tp)
        s[1] += int(fp)
        s[2] += int(fn)
        s[3] += float(iou_sum)

    def __iadd__(self, other: PQStat) -> Self:
        if not isinstance(other, PQStat):
            return NotImplemented
        for cid, (tp, fp, fn, iou) in other._stats.items():
            s = self._get(cid)
            s[0] += tp
            s[1] += fp
            s[2] += fn
            s[3] += iou
        return self

    def __add__(self, other: PQStat) -> PQStat:
        if not isinstance(other, PQStat):
            return NotImplemented
        out = self.copy()
        out += other
        return out

    def copy(self) -> PQStat:
        out = PQStat()
        out._stats = {k: list(v) for k, v in self._stats.items()}
        return out

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PQStat):
            return NotImplemented
        keys = set(self._stats) | set(other._stats)
        return all(self[k] == other[k] for k in keys)

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        items = ", ".join(f"{k}: tp={v[0]} fp={v[1]} fn={v[2]} iou_sum={v[3]:.4g}"
                          for k, v in sorted(self._stats.items()))
        return f"PQStat({{{items}}})"

    # -- serialisation -------------------------------------------------------------------

    def state_dict(self) -> dict[str, list]:
        """``{"category_ids", "tp", "fp", "fn", "iou_sum"}`` as plain lists, ids sorted."""
        ids = self.category_ids
        return {
            "category_ids": ids,
            "tp": [self._stats[k][0] for k in ids],
            "fp": [self._stats[k][1] for k in ids],
            "fn": [self._stats[k][2] for k in ids],
            "iou_sum": [self._stats[k][3] for k in ids],
        }

    def load_state_dict(self, state: Mapping[str, Sequence]) -> PQStat:
        """Replace the counts by those of a :meth:`state_dict`; returns ``self``."""
        ids = list(state["category_ids"])
        cols = [list(state[k]) for k in ("tp", "fp", "fn", "iou_sum")]
        if any(len(c) != len(ids) for c in cols):
            raise ValueError("PQStat state: tp, fp, fn and iou_sum must have one entry per category id")
        self._stats = {}
        for i, cid in enumerate(ids):
            self.add(int(cid), int(cols[0][i]), int(cols[1][i]), int(cols[2][i]), float(cols[3][i]))
        return self

    def to_array(self, category_ids: Iterable[int]) -> np.ndarray:
        """A float64 array (K, 4) of [tp, fp, fn, iou_sum] in the order of ``category_ids``
        (counts below 2^53 are exact), e.g. for ``all_reduce``."""
        ids = [int(c) for c in category_ids]
        missing = set(self._stats) - set(ids)
        if missing:
            raise ValueError(f"PQStat.to_array: categories {sorted(missing)} have counts but are not in category_ids")
        return np.array([self._stats.get(c, (0, 0, 0, 0.0)) for c in ids], np.float64).reshape(len(ids), 4)

    @classmethod
    def from_array(cls, category_ids: Iterable[int], array: Any) -> PQStat:
        """The inverse of :meth:`to_array`."""
        ids = [int(c) for c in category_ids]
        a = np.asarray(array, np.float64).reshape(len(ids), 4)
        out = cls()
        for cid, (tp, fp, fn, iou) in zip(ids, a.tolist()):
            if tp or fp or fn or iou:
                out.add(cid, round(tp), round(fp), round(fn), iou)
        return out

    # -- metrics -------------------------------------------------------------------------

    def _class_metrics(self, cid: int) -> dict[str, float] | None:
        tp, fp, fn, iou = self._stats.get(cid, (0, 0, 0, 0.0))
        if tp + fp + fn == 0:
            return None
        den = tp + 0.5 * fp + 0.5 * fn
        return {"pq": iou / den, "sq": iou / tp if tp != 0 else 0.0, "rq": tp / den}

    def pq_average(self, categories: Any, isthing: bool | None = None) -> dict[str, float]:
        """Mean PQ, SQ, RQ over ``categories`` with TP + FP + FN > 0.

        Args:
            categories: the categories to average over (the ``categories`` list of the
                ground-truth JSON, ``{id: info}``, or plain ids when ``isthing`` is None);
                counts of other categories are left out, as in panopticapi.
            isthing: None = all, True = things only, False = stuff only.

        Returns:
            ``{"pq", "sq", "rq", "n"}``; ``n`` is the number of categories averaged (when it
            is 0 the three means are 0.0).
        """
        table = category_table(categories)
        pq = sq = rq = 0.0
        n = 0
        for cid, info in table.items():
            if isthing is not None and _is_thing(cid, info) != isthing:
                continue
            m = self._class_metrics(cid)
            if m is None:
                continue
            n += 1
            pq += m["pq"]
            sq += m["sq"]
            rq += m["rq"]
        if n == 0:
            return {"pq": 0.0, "sq": 0.0, "rq": 0.0, "n": 0}
        return {"pq": pq / n, "sq": sq / n, "rq": rq / n, "n": n}

    def results(self, categories: Any) -> dict[str, Any]:
        """``{"All", "Things", "Stuff": {"pq", "sq", "rq", "n"}, "per_class": {id: {...}}}``.

        ``per_class`` has every category of ``categories`` with its ``pq, sq, rq`` (0 when
        TP + FP + FN = 0, as panopticapi) and its ``tp, fp, fn, iou_sum``. The categories need
        ``isthing``.
        """
        table = category_table(categories)
        out: dict[str, Any] = {name: self.pq_average(table, isthing) for name, isthing in _GROUPS}
        per_class = {}
        for cid in table:
            m = self._class_metrics(cid) or {"pq": 0.0, "sq": 0.0, "rq": 0.0}
            per_class[cid] = {**m, **self[cid]}
        out["per_class"] = per_class
        return out


def format_pq_table(results: Mapping[str, Any]) -> str:
    """The table panopticapi prints: rows All / Things / Stuff, columns PQ SQ RQ (x100, one
    decimal) and N."""
    lines = ["{:10s}| {:>5s}  {:>5s}  {:>5s} {:>5s}".format("", "PQ", "SQ", "RQ", "N"), "-" * (10 + 7 * 4)]
    for name, _ in _GROUPS:
        r = results[name]
        lines.append("{:10s}| {:5.1f}  {:5.1f}  {:5.1f} {:5d}".format(
            name, 100 * r["pq"], 100 * r["sq"], 100 * r["rq"], int(r["n"])))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# one image
# ---------------------------------------------------------------------------------------

_LUT_MAX_SEGMENTS = 65534  # indices 2 + k must fit the uint16 hash table
_HASH_BITS = 16  # the hash table has 2^16 entries (128 KiB: it stays in the CPU cache)
_DENSE_MAX_CELLS = 1 << 22  # above this many (gt, pred) cells (and runs), count pairs by sorting
_CHUNK_PIXELS = 65536  # pixels per run-finding block: the temporaries stay in the CPU cache

# Index convention while counting: 0 = an id that is not in segments_info, 1 = VOID,
# 2 + k = the k-th segment in ascending id order.
_UNKNOWN, _VOID_INDEX = 0, 1


def _as_id_map(x: Any, what: str) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, without importing torch
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    if a.ndim != 2:
        raise ValueError(f"{what} must be a 2-D id map (H, W), got shape {a.shape}")
    if a.dtype.kind not in "iu":
        raise ValueError(f"{what} must hold integer segment ids, got dtype {a.dtype}")
    if a.dtype.kind == "i" and a.size and a.min() < 0:
        raise ValueError(f"{what} must hold non-negative segment ids (0 = VOID)")
    return a


def _runs(gt_flat: np.ndarray, pred_flat: np.ndarray) -> np.ndarray:
    """Start positions of the runs of pixels (raster order) over which neither map changes.

    Every pixel of a run has the same (gt, pred) value pair, so counting runs weighted by
    their length counts pixels. Panoptic maps are made of large regions: a 512 x 512 image
    has a few thousand runs, and everything after this one pass over the pixels (two
    comparisons, one OR, one nonzero, all on cache-sized blocks) works on runs only."""
    n = gt_flat.size
    step = min(n, _CHUNK_PIXELS)
    change = np.empty(step, bool)
    other = np.empty(max(step - 1, 0), bool)
    starts = []
    for lo in range(0, n, step):
        g, p = gt_flat[lo:lo + step], pred_flat[lo:lo + step]
        m = g.size
        c, o = change[:m], other[:m - 1]
        c[0] = True  # a block starts a run (runs never cross blocks; that only splits a few)
        np.not_equal(g[1:], g[:-1], out=c[1:])
        np.not_equal(p[1:], p[:-1], out=o)
        np.logical_or(c[1:], o, out=c[1:])
        s = np.flatnonzero(c)
        if lo:
            s += lo
        starts.append(s)
    return np.concatenate(starts) if len(starts) != 1 else starts[0]


def _run_ids(flat: np.ndarray, starts: np.ndarray, raw: bool) -> np.ndarray:
    """The ids (int64) of the runs; ``raw``: the map holds decoded PNG pixels (mask the id bits)."""
    v = flat[starts]
    if raw:
        v &= ID_MASK
    elif v.dtype.kind == "u" and v.size and int(v.max()) > np.iinfo(np.int64).max:
        raise ValueError("segment ids must be < 2^63")
    return v.astype(np.int64, copy=False)


def _index(values: np.ndarray, segs: SegmentsInfo) -> np.ndarray:
    """Index (0 unknown, 1 VOID, 2 + k segment k) of each id in ``values`` (int64).

    A table of 2^16 entries keyed by 16 bits of the id (the low ones, else the next ones
    that tell VOID and this image's segment ids apart) gives a candidate index per value,
    which is kept only if its id is the value: one lookup and one comparison per value,
    whatever the ids. If no 16 bits tell the ids apart (or there are more than 65534
    segments): binary search in the sorted ids."""
    ids = segs.ids
    k = len(ids)
    if 0 < k <= _LUT_MAX_SEGMENTS:
        mask = (1 << _HASH_BITS) - 1
        by_index = segs.by_index  # [-1 (never matches), 0 (VOID), segment ids]: the id of each index
        for shift in range(0, max(1, int(ids[-1]).bit_length() - 8), 8):  # windows that add high bits
            table = np.zeros(1 << _HASH_BITS, np.uint16)
            table[(by_index[1:] >> shift) & mask] = np.arange(1, k + 2, dtype=np.uint16)
            if int(np.count_nonzero(table)) <= k:
                continue  # two ids (or an id and VOID) share these bits: try the next ones
            index = table[(values >> shift) & mask]
            index *= by_index[index] == values
            return index
    if k == 0:
        return np.where(values == 0, _VOID_INDEX, _UNKNOWN)
    pos = np.searchsorted(ids, values)
    np.minimum(pos, k - 1, out=pos)
    return np.where(ids[pos] == values, pos + 2, np.where(values == 0, _VOID_INDEX, _UNKNOWN))


def _count_pairs(gt_map: np.ndarray, gt: SegmentsInfo, pred_map: np.ndarray, pred: SegmentsInfo,
                 raw: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(gt index, pred index, pixel count) of every (gt, pred) index pair that occurs, in
    ascending (gt, pred) order; indices as in :func:`_index`. One pass over the pixels
    (:func:`_runs`), then work per run."""
    gt_flat, pred_flat = gt_map.reshape(-1), pred_map.reshape(-1)
    n = gt_flat.size
    if n == 0:
        empty = np.zeros(0, np.int64)
        return empty, empty, empty
    starts = _runs(gt_flat, pred_flat)
    lengths = np.empty_like(starts)
    np.subtract(starts[1:], starts[:-1], out=lengths[:-1])
    lengths[-1] = n - starts[-1]
    width = len(pred.ids) + 2
    cells = (len(gt.ids) + 2) * width
    code = _index(_run_ids(gt_flat, starts, raw), gt).astype(np.intp)
    code *= width
    code += _index(_run_ids(pred_flat, starts, raw), pred)
    if cells <= max(_DENSE_MAX_CELLS, code.size):
        # lengths as float64 weights: exact (< 2^53) and bincount's fast path
        counts = np.bincount(code, weights=lengths, minlength=cells)
        cell = np.flatnonzero(counts)
        cnt = counts[cell]
    else:  # many segments, few runs: sort the codes instead of a huge table
        cell, inverse = np.unique(code, return_inverse=True)
        cnt = np.bincount(inverse, weights=lengths, minlength=cell.size)
    return cell // width, cell % width, cnt.astype(np.int64)


def _pq_one(gt_map: np.ndarray, gt: SegmentsInfo, pred_map: np.ndarray, pred: SegmentsInfo,
            where_gt: str, where_pred: str, image: str, raw: bool = False) -> PQStat:
    """The PQStat of one image; ``raw``: the maps are decoded PNG pixels (:func:`decode_panoptic_png`)."""
    if gt_map.shape != pred_map.shape:
        raise DataError(where_pred, f"{image}: the prediction is {pred_map.shape[1]}x{pred_map.shape[0]} pixels "
                        f"but the ground truth is {gt_map.shape[1]}x{gt_map.shape[0]}",
                        "predict at the resolution of the ground truth")
    kg, kp = len(gt.ids), len(pred.ids)
    g, p, cnt = _count_pairs(gt_map, gt, pred_map, pred, raw)
    if len(g) and g[0] == _UNKNOWN:  # pairs are sorted: unknown gt ids come first
        raise unknown_ids_error(gt_map & ID_MASK if raw else gt_map, gt, where_gt, image)
    if np.any(p == _UNKNOWN):
        raise unknown_ids_error(pred_map & ID_MASK if raw else pred_map, pred, where_pred, image)
    g -= 1  # from here on: 0 = VOID, 1 + k = segment k
    p -= 1

    gt_area = np.bincount(g, weights=cnt, minlength=kg + 1).astype(np.int64)[1:]
    pred_area = np.bincount(p, weights=cnt, minlength=kp + 1).astype(np.int64)[1:]
    for area, segs, where in ((gt_area, gt, where_gt), (pred_area, pred, where_pred)):
        if np.any(area == 0):
            raise DataError(where, f"{image}: segment ids {format_ids(segs.ids[area == 0])} are in segments_info "
                            "but not in the PNG", "remove them from segments_info or paint them into the PNG")
    on_void = g == 0
    pred_void = np.bincount(p[on_void], weights=cnt[on_void], minlength=kp + 1).astype(np.int64)[1:]

    # pairs of two real segments, in (gt id, pred id) order as panopticapi walks them
    both = (g > 0) & (p > 0)
    g, p, cnt = g[both] - 1, p[both] - 1, cnt[both]
    gcat, pcat = gt.cats[g], pred.cats[p]
    same = gcat == pcat
    union = pred_area[p] + gt_area[g] - cnt - pred_void[p]
    iou = cnt / union
    match = same & ~gt.crowd[g] & (iou > 0.5)

    gt_matched = np.zeros(kg, bool)
    gt_matched[g[match]] = True
    pred_matched = np.zeros(kp, bool)
    pred_matched[p[match]] = True

    # ignored area of each prediction: VOID plus the crowd region of its own category
    crowd_same = same & gt.crowd[g]
    ignored = pred_void + np.bincount(p[crowd_same], weights=cnt[crowd_same], minlength=kp).astype(np.int64)
    fp = ~pred_matched & ~(ignored / pred_area > 0.5)
    fn = ~gt_matched & ~gt.crowd

    stat = PQStat()
    tp_cats, tp_iou = gcat[match], iou[match]
    cats = np.unique(np.concatenate([tp_cats, gt.cats[fn], pred.cats[fp]]))
    if cats.size:
        k = len(cats)
        tp_pos = np.searchsorted(cats, tp_cats)
        tp_n = np.bincount(tp_pos, minlength=k)
        tp_s = np.bincount(tp_pos, weights=tp_iou, minlength=k)
        fn_n = np.bincount(np.searchsorted(cats, gt.cats[fn]), minlength=k)
        fp_n = np.bincount(np.searchsorted(cats, pred.cats[fp]), minlength=k)
        for c, a, b, d, s in zip(cats.tolist(), tp_n.tolist(), fp_n.tolist(), fn_n.tolist(), tp_s.tolist()):
            stat._stats[c] = [a, b, d, s]
    return stat


def pq_single_image(gt_ids: Any, gt_segments: Sequence[Mapping[str, Any]], pred_ids: Any,
                    pred_segments: Sequence[Mapping[str, Any]], categories: Any,
                    *, image_id: object = None) -> PQStat:
    """PQ counts of one image from in-memory id maps.

    Args:
        gt_ids, pred_ids: integer arrays (H, W) of segment ids (0 = VOID), e.g.
            ``rgb2id(png)``; numpy arrays or CPU tensors.
        gt_segments, pred_segments: the ``segments_info`` lists: ``{id, category_id,
            iscrowd}`` (iscrowd defaults to 0; it matters only in the ground truth).
        categories: the known categories (the JSON ``categories`` list, ``{id: info}`` or
            plain ids).
        image_id: named in error messages.

    Returns:
        a :class:`PQStat` to add up over images.

    Raises:
        DataError: an id in a map that is not in its segments, a segment absent from its
            map, an unknown category id, a duplicate or non-positive segment id, or maps of
            different sizes.
    """
    cat_ids = set(category_table(categories))
    image = "the image" if image_id is None else f"image {image_id}"
    gt_map = _as_id_map(gt_ids, "gt_ids")
    pred_map = _as_id_map(pred_ids, "pred_ids")
    gt = SegmentsInfo(gt_segments, cat_ids, "ground truth", image)
    pred = SegmentsInfo(pred_segments, cat_ids, "prediction", image)
    return _pq_one(gt_map, gt, pred_map, pred, "ground truth", "prediction", image)


# ---------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------


def _default_folder(path: Path | None, folder: Any, what: str) -> Path:
    if folder is not None:
        return Path(folder)
    if path is None:
        raise ValueError(f"{what}_folder is required when {what}_json is an already loaded dict")
    return path.with_suffix("") if path.suffix == ".json" else path


def _evaluate_chunk(args: tuple) -> list[PQStat] | tuple:
    """Worker: the PQStat of each (gt annotation, prediction annotation) pair of a chunk.

    One PQStat per image (a few numbers each) so that the parent adds them up in image
    order and the result is bit-identical whatever the number of workers. DataError does
    not survive pickling (its __init__ takes three arguments), so an error comes back as a
    tuple that the parent raises again."""
    pairs, gt_folder, pred_folder, gt_label, pred_label, cat_ids = args
    stats = []
    try:
        for gt_ann, pred_ann in pairs:
            image = f"image {gt_ann['image_id']!r}"
            gt = SegmentsInfo(gt_ann["segments_info"], cat_ids, gt_label, image)
            pred = SegmentsInfo(pred_ann["segments_info"], cat_ids, pred_label, image)
            gt_png = os.path.join(gt_folder, gt_ann["file_name"])  # str: cheaper than pathlib per image
            pred_png = os.path.join(pred_folder, pred_ann["file_name"])
            stats.append(_pq_one(decode_panoptic_png(gt_png), gt, decode_panoptic_png(pred_png), pred,
                                 f"{gt_png} ({gt_label})", f"{pred_png} ({pred_label})", image, raw=True))
    except DataError as e:
        return ("DataError", e.path, e.problem, e.fix)
    return stats


def _sum_into(stat: PQStat, results: Iterable[list[PQStat] | tuple]) -> None:
    for r in results:
        if isinstance(r, tuple):
            raise DataError(*r[1:])
        for s in r:
            stat += s


_IMAGES_PER_THREAD = 4  # with workers=None, a thread for every 4 images (a thread starts in ~0.1 ms)
_THREAD_CHUNK = 4  # images per thread task: small for balance, large enough that queueing costs nothing


def _default_workers() -> int:
    """Threads for ``workers=None``: the CPUs not busy with other work (this process's own
    thread counts as free), at most 8. On a machine whose other processes keep every core
    busy, threads only add GIL hand-overs (measured 10-25 % slower than one thread at load
    10 on 2 cores), so one thread then."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    try:
        idle = round(n - os.getloadavg()[0] + 1)  # the 1-minute load includes this thread (~1.0 of it)
    except (AttributeError, OSError):  # no load average (Windows)
        idle = n
    return max(1, min(n, idle, 8))


def pq_compute(gt_json: Any, pred_json: Any, gt_folder: Any = None, pred_folder: Any = None,
               workers: int | None = None) -> dict[str, Any]:
    """Panoptic quality of a COCO panoptic prediction against its ground truth (panopticapi's
    ``pq_compute``).

    Args:
        gt_json, pred_json: paths of the COCO panoptic JSON files, or the loaded dicts. The
            categories (with ``isthing``) come from the ground truth.
        gt_folder, pred_folder: the PNG folders; by default the JSON path without ``.json``
            (``panoptic_val2017.json`` -> ``panoptic_val2017/``), as in panopticapi.
        workers: None (default) = threads in this process, one per idle CPU (at most 8, one
            per 4 images): PNG decoding and the NumPy passes release the GIL, so threads run in
            parallel without the start-up of processes (starting one costs about as much as
            evaluating 10 images) or pickling. An int = that many worker processes (1 = in
            this process, no thread). Each thread or process decodes its own PNG pairs and
            returns a small :class:`PQStat` per image; they are summed in image order, so the
            result is bit-identical whatever the workers, and memory does not grow with the
            number of images.

    Returns:
        ``{"All", "Things", "Stuff": {"pq", "sq", "rq", "n"}, "per_class": {category id:
        {"pq", "sq", "rq", "tp", "fp", "fn", "iou_sum"}}}`` (values in 0..1); print it with
        :func:`format_pq_table`. Images are matched by ``image_id``; predictions for images
        that are not in the ground truth are ignored.

    Raises:
        DataError: missing or malformed files, a ground-truth image without prediction,
            and every per-image problem of :func:`pq_single_image` (naming file and image).
    """
    if workers is not None and (not isinstance(workers, int) or workers < 1):
        raise ValueError(f"workers must be None or a positive integer, got {workers!r}")
    gt_data, gt_label, gt_path = load_panoptic_json(gt_json, "ground-truth")
    pred_data, pred_label, pred_path = load_panoptic_json(pred_json, "prediction")
    gt_dir = _default_folder(gt_path, gt_folder, "gt")
    pred_dir = _default_folder(pred_path, pred_folder, "pred")

    categories = json_category_table(gt_data, gt_label, "the ground-truth JSON must list the categories "
                                      "with id and isthing")
    for cid, info in categories.items():
        if "isthing" not in info:
            raise DataError(gt_label, f"category {cid} has no 'isthing'", "mark every category isthing 0 or 1")

    for d, what in ((gt_dir, "ground-truth"), (pred_dir, "prediction")):
        if not d.is_dir():
            raise DataError(d, f"folder with the {what} PNGs does not exist",
                            f"pass {'gt' if what == 'ground-truth' else 'pred'}_folder")

    gt_anns = annotations_by_image(gt_data, gt_label)
    pred_anns = annotations_by_image(pred_data, pred_label)
    pairs = []
    for iid, gt_ann in gt_anns.items():
        pred_ann = pred_anns.get(iid)
        if pred_ann is None:
            raise DataError(pred_label, f"no prediction for the image with id {iid!r} ({gt_ann['file_name']})",
                            "the prediction JSON needs one annotation for every ground-truth image")
        pairs.append((gt_ann, pred_ann))

    threads = workers is None
    if threads:
        workers = min(_default_workers(), len(pairs) // _IMAGES_PER_THREAD)
    n_workers = min(workers, max(1, len(pairs)))
    cat_ids = frozenset(categories)
    stat = PQStat()
    if n_workers <= 1:
        size = max(1, len(pairs))
    elif threads:
        size = _THREAD_CHUNK
    else:
        size = max(1, math.ceil(len(pairs) / (4 * n_workers)))
    tasks = ((pairs[i:i + size], gt_dir, pred_dir, gt_label, pred_label, cat_ids) for i in range(0, len(pairs), size))

    if n_workers <= 1:
        _sum_into(stat, map(_evaluate_chunk, tasks))
    elif threads:
        pool = ThreadPoolExecutor(n_workers, thread_name_prefix="pq_compute")
        try:
            _sum_into(stat, pool.map(_evaluate_chunk, tasks))  # in order: a deterministic sum
        finally:  # on an error, the images not started yet are not evaluated
            pool.shutdown(wait=True, cancel_futures=True)
    else:
        with multiprocessing.get_context().Pool(n_workers) as pool:
            _sum_into(stat, pool.imap(_evaluate_chunk, tasks))  # in order: a deterministic sum
    return stat.results(categories)
