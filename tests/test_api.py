"""`pixelwise.load(...).predict(...)`: every source kind, every input kind, every task, and
pretrained folders (safetensors + JSON) that round-trip exactly and never unpickle."""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import pixelwise
from pixelwise.data.loading import normalization_for
from pixelwise.engine.checkpoint import save_checkpoint
from pixelwise.errors import PixelwiseError
from pixelwise.tasks.instance import InstanceResult
from pixelwise.tasks.semantic import SemanticResult

CLASSES = [{"id": i, "name": n, "isthing": t, "color": c} for i, (n, c, t) in
           enumerate([("background", [0, 0, 0], False), ("circle", [220, 20, 60], True),
                      ("square", [30, 144, 255], True)])]
CATEGORIES = [{"id": 1, "name": "circle", "isthing": 1, "color": [220, 20, 60]},
              {"id": 2, "name": "square", "isthing": 1, "color": [30, 144, 255]},
              {"id": 3, "name": "sky", "isthing": 0, "color": [135, 206, 235]},
              {"id": 4, "name": "grass", "isthing": 0, "color": [34, 139, 34]}]
TINY = dict(preset="cpu", fpn_channels=16, mask_head_channels=8, box_head_dim=32, min_size=64, max_size=64,
            rpn_pre_nms_top_n_test=50, rpn_post_nms_top_n_test=20, anchor_sizes=(8, 16, 32, 64, 128))


def _save(path: Path, model: torch.nn.Module, task: str, classes=CLASSES, **extra) -> Path:
    return save_checkpoint(path, {"model": model.pixelwise_spec, "state_dict": model.state_dict(), "classes": classes,
                                  "normalization": normalization_for("RGB", None, None), "config": {"lr": 0.1},
                                  "optimizer": {}, "epoch": 0, "step": 0, "metrics": {}, "task": task, **extra})


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """One run folder per task (untrained tiny models: their outputs are deterministic)."""
    root = tmp_path_factory.mktemp("runs")
    torch.manual_seed(0)
    sem = pixelwise.build_model("unet", 3, width=0.125)
    with torch.no_grad():  # BatchNorm statistics that are not the identity, so a folded model differs in code
        for m in sem.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    _save(root / "semantic" / "best.pt", sem, "semantic")
    torch.manual_seed(0)
    _save(root / "instance" / "last.pt", pixelwise.build_model("maskrcnn", 3, **TINY), "instance",
          category_ids=[0, 1, 2])
    torch.manual_seed(0)
    pan = pixelwise.build_model("panoptic_fpn", 4, num_things=3, merge_score_threshold=0.3, stuff_area=16.0,
                                scale_stuff_area=False, semantic_channels=32, **TINY)
    _save(root / "panoptic" / "best.pt", pan, "panoptic", classes=CATEGORIES, categories=CATEGORIES,
          thing_ids=[1, 2], stuff_ids=[3, 4])
    return {"semantic": root / "semantic", "instance": root / "instance", "panoptic": root / "panoptic"}


def _image(h: int = 48, w: int = 64, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = (rng.random((h, w, 3)) * 80).astype(np.uint8)
    img[8:30, 6:28] = (220, 40, 60)
    img[20:44, 34:60] = (40, 120, 240)
    return img


def _same(a, b) -> None:
    assert type(a) is type(b)
    if isinstance(a, SemanticResult):
        assert np.array_equal(a.labels, b.labels)
    elif isinstance(a, InstanceResult):
        assert len(a.scores) >= 1  # the test is about something
        for k in ("masks", "boxes", "labels", "scores"):
            assert np.array_equal(getattr(a, k), getattr(b, k)), k
    else:
        assert np.array_equal(a.id_map, b.id_map) and a.segments_info() == b.segments_info()
        assert len(a.segments_info()) >= 2


@pytest.mark.parametrize("task", ["semantic", "instance", "panoptic"])
def test_run_to_pretrained_folder_gives_equal_predictions(runs, task, tmp_path, monkeypatch):
    seg = pixelwise.load(runs[task], device="cpu", score_threshold=0.3)
    assert seg.task.name == task and "best" in seg.source or "last" in seg.source
    img = _image(seed=3)
    before = seg.predict(img)
    out = seg.save_pretrained(tmp_path / "pretrained")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["task"] == task and cfg["model"]["name"] == seg.model_name and cfg["pixelwise_version"]
    assert "optimizer" not in cfg and "config" not in cfg  # training state stays in the run
    # nothing is unpickled on the way back in
    def no_pickle(*a, **k):
        raise AssertionError("a pretrained folder was unpickled")
    monkeypatch.setattr(torch, "load", no_pickle)
    monkeypatch.setattr(pickle, "loads", no_pickle)
    monkeypatch.setattr(pickle, "load", no_pickle)
    again = pixelwise.load(out, device="cpu", score_threshold=0.3)
    _same(before, again.predict(img))
    _same(before, pixelwise.Segmenter.from_pretrained(out, device="cpu", score_threshold=0.3).predict(img))
    _same(before, pixelwise.load(out / "model.safetensors", device="cpu", score_threshold=0.3).predict(img))


def test_every_input_kind_gives_the_same_labels(runs, tmp_path):
    seg = pixelwise.load(runs["semantic"] / "best.pt", device="cpu")
    img = _image()
    Image.fromarray(img).save(tmp_path / "im.png")
    want = seg.predict(img).labels
    chw = torch.from_numpy(img).permute(2, 0, 1)
    inputs = [tmp_path / "im.png", str(tmp_path / "im.png"), Image.fromarray(img), chw, chw.float() / 255,
              img.astype(np.float32) / 255, np.dstack([img, np.full(img.shape[:2], 255, np.uint8)]),
              Image.fromarray(img).convert("RGBA")]
    for i, x in enumerate(inputs):
        assert np.array_equal(seg.predict(x).labels, want), i
    results = seg.predict([img, tmp_path / "im.png"])
    assert isinstance(results, list) and len(results) == 2 and all(np.array_equal(r.labels, want) for r in results)
    batch = seg.predict(torch.stack([chw, chw]))
    assert len(batch) == 2 and np.array_equal(batch[1].labels, want)
    gray = img[..., 0]
    assert np.array_equal(seg.predict(gray).labels, seg.predict(np.repeat(gray[..., None], 3, 2)).labels)
    for bad, words in ((np.zeros((4, 4, 2), np.uint8), "channels"), (np.full((4, 4), 2.0, np.float32), "0..1"),
                       (42, "not an image"), ([], "empty"), (tmp_path / "missing.png", "missing.png")):
        with pytest.raises(PixelwiseError, match=words):
            seg.predict(bad)


def test_semantic_probs_tiling_tta_and_optimize(runs):
    seg = pixelwise.load(runs["semantic"], device="cpu")
    img = _image(64, 80)
    r = seg.predict(img, probs=True)
    assert r.probs is not None and r.probs.shape == (3, 64, 80) and r.probs.dtype == np.float32
    np.testing.assert_allclose(r.probs.sum(0), 1.0, atol=1e-5)
    assert np.array_equal(r.probs.argmax(0), r.labels) and seg.predict(img).probs is None
    # options reach the task: TTA and tiling go through postprocess.predict_probs
    from pixelwise.postprocess import predict_probs
    from pixelwise.data.transforms import normalize_image

    x = normalize_image(img, seg.normalization)[None]
    with torch.no_grad():
        ref = predict_probs(seg.model, x, tile=32, overlap=8, flip=True)[0].numpy()
    got = seg.predict(img, tile=32, overlap=8, flip=True, probs=True).probs
    np.testing.assert_allclose(got, ref, atol=1e-6)
    assert not np.allclose(got, r.probs, atol=1e-4)  # the options changed something
    tiled = pixelwise.load(runs["semantic"], device="cpu", tile=32, overlap=8, flip=True)
    np.testing.assert_allclose(tiled.predict(img, probs=True).probs, ref, atol=1e-6)
    fast = pixelwise.load(runs["semantic"], device="cpu", optimize=True)
    assert fast.optimized and type(fast.model) is not type(seg.model)
    np.testing.assert_allclose(fast.predict(img, probs=True).probs, r.probs, atol=1e-4)
    with pytest.raises(PixelwiseError, match="does not take bogus"):
        seg.predict(img, bogus=1)


def test_results_save_and_overlay(runs, tmp_path):
    img = _image(seed=3)
    sem = pixelwise.load(runs["semantic"], device="cpu").predict(img)
    path = sem.save(tmp_path / "sem.png")
    assert np.array_equal(np.asarray(Image.open(path)), sem.labels) and Image.open(path).mode == "P"
    assert sem.overlay(img).shape == img.shape
    inst = pixelwise.load(runs["instance"], device="cpu", score_threshold=0.3).predict(img)
    path = inst.save(tmp_path / "inst.png")
    ids = np.asarray(Image.open(path))
    meta = json.loads((tmp_path / "inst.json").read_text())["instances"]
    assert len(meta) == len(inst.scores) >= 1 and set(np.unique(ids)) - {0} <= {m["id"] for m in meta}
    assert [m["score"] for m in meta] == pytest.approx(inst.scores.tolist())
    assert (ids == 1).sum() > 0 and inst.overlay(img).shape == img.shape
    pan = pixelwise.load(runs["panoptic"], device="cpu").predict(img)
    path = pan.save(tmp_path / "pan.png")
    rgb = np.asarray(Image.open(path)).astype(np.int64)
    assert np.array_equal(rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2], pan.id_map)
    assert json.loads((tmp_path / "pan.json").read_text())["segments_info"] == pan.segments_info()
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporaries


def test_sources_and_clear_errors(runs, tmp_path, monkeypatch):
    assert pixelwise.load(runs["instance"], device="cpu").source.endswith("last.pt")  # no best.pt: last.pt
    (tmp_path / "empty").mkdir()
    with pytest.raises(PixelwiseError, match="no best.pt, last.pt"):
        pixelwise.load(tmp_path / "empty")
    with pytest.raises(PixelwiseError, match="not found"):
        pixelwise.load(tmp_path / "nope.pt")
    seg = pixelwise.load(runs["semantic"], device="cpu")
    folder = seg.save_pretrained(tmp_path / "p")
    (folder / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(PixelwiseError, match="model.safetensors: not a readable safetensors"):
        pixelwise.load(folder)
    seg.save_pretrained(folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model"]["kwargs"]["width"] = 0.25
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(PixelwiseError, match="weights do not fit model 'unet'"):
        pixelwise.load(folder)


def test_hub_repo_id_resolves_offline_from_the_cache(runs, tmp_path, monkeypatch):
    import huggingface_hub.constants as hc

    seg = pixelwise.load(runs["semantic"], device="cpu")
    cache = tmp_path / "hub"
    snap = cache / "models--someone--tiny-unet" / "snapshots" / ("a" * 40)
    seg.save_pretrained(snap)
    (cache / "models--someone--tiny-unet" / "refs").mkdir()
    (cache / "models--someone--tiny-unet" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    img = _image()
    hub = pixelwise.load("someone/tiny-unet", device="cpu")
    assert np.array_equal(hub.predict(img).labels, seg.predict(img).labels)
    assert np.array_equal(pixelwise.Segmenter.from_pretrained("someone/tiny-unet", device="cpu").predict(img).labels,
                          seg.predict(img).labels)
    with pytest.raises(PixelwiseError, match="not in the local hub cache"):
        pixelwise.load("someone/absent")
