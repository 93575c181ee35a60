"""Panoptic FPN merge (SPEC §7): hand-made cases and a randomized property test."""
import numpy as np
import pytest
import torch

from pixelwise.postprocess_panoptic import merge_panoptic, scaled_stuff_area

THING = 0  # semantic 'other/thing' class in these tests


def _box(h, w, y0, y1, x0, x1):
    m = torch.zeros(h, w, dtype=torch.bool)
    m[y0:y1, x0:x1] = True
    return m


def _merge(masks, scores, labels, sem, **kw):
    kw.setdefault("thing_class", THING)
    kw.setdefault("stuff_area_min", 0)
    return merge_panoptic(masks, torch.tensor(scores, dtype=torch.float32),
                          torch.tensor(labels), sem, **kw)


def test_overlap_lower_score_keeps_only_free_pixels():
    sem = torch.zeros(10, 10, dtype=torch.int64)
    a = _box(10, 10, 0, 4, 0, 4)     # 16 px, score 0.9
    b = _box(10, 10, 0, 4, 2, 8)     # 24 px, 8 overlap with a (33%), score 0.8
    pan, segs = _merge(torch.stack([b, a]), [0.8, 0.9], [7, 3], sem)
    assert isinstance(pan, torch.Tensor) and pan.dtype == torch.int32
    assert [s["category_id"] for s in segs] == [3, 7]        # paste order = by score
    assert [s["id"] for s in segs] == [1, 2]
    assert [s["instance_index"] for s in segs] == [1, 0]
    assert segs[0]["score"] == pytest.approx(0.9) and segs[0]["isthing"]
    assert (pan[a] == 1).all()                                 # higher score keeps all
    assert (pan[b & ~a] == 2).all() and segs[1]["area"] == 16  # lower keeps free pixels
    assert int((pan == 2).sum()) == 16 and segs[0]["area"] == 16
    assert int((pan == 0).sum()) == 100 - 32                   # thing class: void


def test_instance_more_than_half_covered_is_dropped_exactly_half_kept():
    sem = torch.zeros(10, 10, dtype=torch.int64)
    a = _box(10, 10, 0, 4, 0, 4)           # 16 px
    over = _box(10, 10, 0, 4, 1, 5)        # 16 px, 12 covered (75%) -> dropped
    half = _box(10, 10, 2, 6, 0, 4)        # 16 px, rows 2-3 covered by a: 50% -> kept
    pan, segs = _merge(torch.stack([a, over, half]), [0.9, 0.8, 0.7], [1, 2, 3], sem)
    assert [s["category_id"] for s in segs] == [1, 3]
    assert segs[1]["area"] == 8 and int((pan == 2).sum()) == 8
    # a stricter overlap threshold drops the 50% one too
    _, segs = _merge(torch.stack([a, over, half]), [0.9, 0.8, 0.7], [1, 2, 3], sem,
                     overlap_threshold=0.4)
    assert [s["category_id"] for s in segs] == [1]


def test_score_threshold_and_empty_masks():
    sem = torch.zeros(8, 8, dtype=torch.int64)
    m = torch.stack([_box(8, 8, 0, 2, 0, 2), _box(8, 8, 4, 6, 4, 6),
                     _box(8, 8, 6, 8, 0, 2), torch.zeros(8, 8, dtype=torch.bool)])
    pan, segs = _merge(m, [0.49, 0.5, 0.95, 0.99], [1, 2, 3, 4], sem)
    # 0.49 < 0.5 dropped, exactly 0.5 kept, the empty mask dropped
    assert [s["category_id"] for s in segs] == [3, 2]
    assert set(torch.unique(pan).tolist()) == {0, 1, 2}
    _, segs = _merge(m, [0.49, 0.5, 0.95, 0.99], [1, 2, 3, 4], sem, score_threshold=0.9)
    assert [s["category_id"] for s in segs] == [3]


def test_float_probability_masks_thresholded():
    sem = torch.zeros(4, 4, dtype=torch.int64)
    probs = torch.zeros(1, 4, 4)
    probs[0, 0, :] = 0.9
    probs[0, 1, :] = 0.5
    probs[0, 2, :] = 0.3
    pan, segs = _merge(probs, [0.9], [5], sem)
    assert segs[0]["area"] == 8 and (pan[:2] == 1).all() and (pan[2:] == 0).all()
    _, segs = _merge(probs, [0.9], [5], sem, mask_threshold=0.2)
    assert segs[0]["area"] == 12
    _, segs = _merge(probs[:, None], [0.9], [5], sem)   # (K, 1, H, W) accepted
    assert segs[0]["area"] == 8


def test_stuff_fill_small_regions_removed_and_thing_class_never_emitted():
    sem = torch.zeros(100, 100, dtype=torch.int64)   # thing class 0 in the top row band
    sem[10:] = 1                                      # 9000 px of class 1
    sem[10:40, 0:10] = 2                              # 300 px of class 2
    sem[90:, 90:] = 3                                 # 100 px of class 3
    inst = _box(100, 100, 50, 60, 50, 60)             # covers 100 px of class 1
    pan, segs = merge_panoptic(inst[None], torch.tensor([0.9]), torch.tensor([9]), sem,
                               thing_class=THING, stuff_area_min=200)
    assert [(s["category_id"], s["isthing"]) for s in segs] == [(9, True), (1, False), (2, False)]
    assert [s["id"] for s in segs] == [1, 2, 3]
    assert segs[1]["area"] == 9000 - 300 - 100 - 100 and "score" not in segs[1]
    assert segs[2]["area"] == 300
    assert (pan[:10] == 0).all()                      # thing class -> void
    assert (pan[90:, 90:] == 0).all()                 # class 3 below 200 px -> void
    assert (pan[50:60, 50:60] == 1).all()             # instance wins over stuff
    # default 4096 px: class 2 (300 px) is dropped too
    _, segs = merge_panoptic(inst[None], torch.tensor([0.9]), torch.tensor([9]), sem,
                             thing_class=THING)
    assert [s["category_id"] for s in segs] == [9, 1]
    # stuff mapping: semantic id -> category id; unmapped classes are void
    pan, segs = merge_panoptic(inst[None], torch.tensor([0.9]), torch.tensor([9]), sem,
                               thing_class=THING, stuff_classes={1: 101, 3: 103, 0: 100},
                               stuff_area_min=50)
    assert [s["category_id"] for s in segs] == [9, 101, 103]
    assert (pan[10:40, 0:10] == 0).all()


def test_stuff_area_scale_keeps_small_image_regions():
    sem = torch.ones(128, 128, dtype=torch.int64)
    sem[:10, :10] = 2                                 # 100 px
    sem[20:27, 20:27] = 3                             # 49 px
    none = (torch.zeros(0, 128, 128, dtype=torch.bool), torch.zeros(0), torch.zeros(0))
    _, segs = merge_panoptic(*none, sem, thing_class=THING)
    assert [s["category_id"] for s in segs] == [1]   # 4096 px wipes the small ones out
    scale = 128 * 128 / (800 * 1333)
    pan, segs = merge_panoptic(*none, sem, thing_class=THING, stuff_area_scale=scale)
    assert [s["category_id"] for s in segs] == [1, 2]  # threshold ~62.9 px
    assert (pan[20:27, 20:27] == 0).all()
    thr = scaled_stuff_area(128, 128)
    assert thr == pytest.approx(4096 * scale) and 62 < thr < 63
    _, segs2 = merge_panoptic(*none, sem, thing_class=THING, stuff_area_min=thr)
    assert segs2 == segs
    assert scaled_stuff_area(800, 1333) == pytest.approx(4096)
    assert scaled_stuff_area(10, 10, reference=(10, 20), min_area=100) == pytest.approx(50)
    with pytest.raises(ValueError):
        scaled_stuff_area(0, 5)


def test_void_where_nothing_assigned_and_empty_inputs():
    sem = torch.full((16, 16), THING, dtype=torch.int64)
    sem[:, 8:] = 4                                    # 128 px of stuff class 4
    # no instances at all (several spellings)
    for masks, scores, labels in [(None, None, None), (torch.zeros(0, 16, 16), [], []),
                                  (np.zeros((0,)), np.zeros(0), np.zeros(0, dtype=int))]:
        pan, segs = merge_panoptic(masks, scores, labels, sem, thing_class=THING,
                                   stuff_area_min=100)
        assert segs == [{"id": 1, "category_id": 4, "isthing": False, "area": 128}]
        assert (pan[:, :8] == 0).all() and (pan[:, 8:] == 1).all()
    # no instances and all stuff below threshold: everything void
    pan, segs = merge_panoptic(None, None, None, sem, thing_class=THING)
    assert segs == [] and pan.dtype == torch.int32 and (pan == 0).all()
    # all instances below the score threshold
    pan, segs = merge_panoptic(torch.ones(2, 16, 16, dtype=torch.bool), [0.1, 0.2], [1, 2],
                               sem, thing_class=THING)
    assert segs == [] and (pan == 0).all()


def test_numpy_input_gives_numpy_output_same_result():
    rng = np.random.default_rng(0)
    sem = rng.integers(0, 3, size=(12, 12))
    masks = rng.random((3, 12, 12))
    scores = np.array([0.7, 0.9, 0.6])
    labels = np.array([5, 6, 7])
    pan_np, segs_np = merge_panoptic(masks, scores, labels, sem, thing_class=0, stuff_area_min=5)
    assert isinstance(pan_np, np.ndarray) and pan_np.dtype == np.int32
    assert pan_np.shape == (12, 12)
    pan_t, segs_t = merge_panoptic(torch.from_numpy(masks), torch.from_numpy(scores),
                                   torch.from_numpy(labels), torch.from_numpy(sem),
                                   thing_class=0, stuff_area_min=5)
    assert isinstance(pan_t, torch.Tensor)
    np.testing.assert_array_equal(pan_np, pan_t.numpy())
    assert segs_np == segs_t
    assert all(isinstance(v, (int, float, bool)) for s in segs_np for v in s.values())


def test_bad_shapes_raise():
    sem = torch.zeros(4, 4, dtype=torch.int64)
    with pytest.raises(ValueError):
        merge_panoptic(torch.zeros(2, 4, 5, dtype=torch.bool), [0.9, 0.9], [1, 1], sem,
                       thing_class=0)
    with pytest.raises(ValueError):
        merge_panoptic(torch.zeros(2, 4, 4, dtype=torch.bool), [0.9], [1, 1], sem,
                       thing_class=0)
    with pytest.raises(ValueError):
        merge_panoptic(None, None, None, sem.float(), thing_class=0)


@pytest.mark.parametrize("seed", range(25))
def test_property_segments_disjoint_and_areas_add_up(seed):
    g = torch.Generator().manual_seed(seed)
    H, W = 24, 32
    K = int(torch.randint(0, 8, (1,), generator=g))
    masks = torch.rand(K, H, W, generator=g) ** 2      # float probs, blobs of varying size
    if K:
        masks = torch.nn.functional.avg_pool2d(masks[:, None], 5, 1, 2)[:, 0] * 2
    scores = torch.rand(K, generator=g)
    labels = torch.randint(10, 20, (K,), generator=g)
    n_cls = 5
    thing = int(torch.randint(0, n_cls, (1,), generator=g))
    sem = torch.randint(0, n_cls, (H // 4, W // 4), generator=g)
    sem = sem.repeat_interleave(4, 0).repeat_interleave(4, 1)
    min_area = float(torch.randint(0, 200, (1,), generator=g))
    pan, segs = merge_panoptic(masks, scores, labels, sem, thing_class=thing,
                               stuff_area_min=min_area, overlap_threshold=0.5)
    ids = [s["id"] for s in segs]
    assert ids == list(range(1, len(segs) + 1))
    # things come first, then stuff; thing scores non-increasing and >= threshold
    isthing = [s["isthing"] for s in segs]
    assert isthing == sorted(isthing, reverse=True)
    th_scores = [s["score"] for s in segs if s["isthing"]]
    assert th_scores == sorted(th_scores, reverse=True) and all(x >= 0.5 for x in th_scores)
    # each pixel has one id; areas match and sum to the non-void count
    assert set(torch.unique(pan).tolist()) <= {0, *ids}
    for s in segs:
        assert int((pan == s["id"]).sum()) == s["area"] > 0
    assert sum(s["area"] for s in segs) == int((pan != 0).sum())
    # each kept instance lies inside its own (thresholded) mask; at least half of it kept
    binm = masks >= 0.5
    for s in segs:
        if s["isthing"]:
            own = binm[s["instance_index"]]
            assert not ((pan == s["id"]) & ~own).any()
            assert s["area"] >= 0.5 * int(own.sum())
            assert s["category_id"] == int(labels[s["instance_index"]])
    # stuff: never the thing class, one per class, area >= threshold, matches semantic
    stuff_cats = [s["category_id"] for s in segs if not s["isthing"]]
    assert thing not in stuff_cats and len(set(stuff_cats)) == len(stuff_cats)
    for s in segs:
        if not s["isthing"]:
            assert s["area"] >= min_area
            assert (sem[pan == s["id"]] == s["category_id"]).all()
    # void pixels in stuff classes are only from dropped (too small) classes or thing class
    for c in torch.unique(sem[(pan == 0)]).tolist():
        assert c == thing or c not in stuff_cats
