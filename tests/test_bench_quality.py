"""The quality benchmark's reference side (bench/quality_reference.py) must measure what
pixelwise measures: the same val split, read by its own code, and the FCN §5 IU."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root holds bench/

from bench.quality_reference import confusion, iou_per_class, voc_split  # noqa: E402
from pixelwise.data.formats.voc import VOCSegmentation  # noqa: E402
from pixelwise.metrics.semantic import ConfusionMatrix  # noqa: E402


def test_iou_hand_computed():
    gt = np.array([[0, 0, 1, 1], [0, 2, 255, 1]])
    pred = np.array([[0, 1, 1, 1], [0, 2, 0, 0]])
    cm = confusion(pred, gt, 3)
    # class 0: tp 2, gt 3, pred 3 -> 2 / 4; class 1: tp 2, gt 3, pred 3 -> 2 / 4; class 2: 1 / 1
    assert cm.tolist() == [[2, 1, 0], [1, 2, 0], [0, 0, 1]]
    assert iou_per_class(cm) == [0.5, 0.5, 1.0]
    assert np.isnan(iou_per_class(np.zeros((2, 2), np.int64))).all()


def test_iou_equals_pixelwise(tmp_path):
    rng = np.random.default_rng(0)
    gt, pred = rng.integers(0, 5, (2, 64, 64)), rng.integers(0, 4, (2, 64, 64))
    gt[0, :3] = 255
    ours = ConfusionMatrix(5)
    ref = np.zeros((5, 5), np.int64)
    for g, p in zip(gt, pred):
        ours.update(p, g)
        ref += confusion(p, g, 5)
    np.testing.assert_allclose(iou_per_class(ref), ours.compute()["iou"], rtol=0, atol=1e-12)


def test_reference_reads_the_split_pixelwise_uses(tmp_path):
    from pixelwise.data.synthetic import generate_shapes

    root = generate_shapes(tmp_path / "d", num_train=4, num_val=3, size=32, seed=2)
    for split in ("train", "val"):
        ds = VOCSegmentation(root, split)
        ref = voc_split(Path(root), split)
        assert len(ref) == len(ds)
        for i, (image, mask) in enumerate(ref):
            sample = ds.load(i)
            assert np.array_equal(mask, np.asarray(sample["semantic"]))
            np.testing.assert_allclose(image.astype(np.float32) / 255, np.asarray(sample["image"]).transpose(1, 2, 0),
                                       atol=1e-6)


def test_reference_semantic_loop_runs(tmp_path, capsys):
    """The smp loop end to end on tiny data (no training steps: budget 0), when smp is installed."""
    pytest.importorskip("segmentation_models_pytorch")
    from bench.quality_reference import main
    from pixelwise.data.synthetic import generate_shapes

    root = generate_shapes(tmp_path / "d", num_train=2, num_val=1, size=64, seed=3)
    main(["semantic", "--arch", "unet", "--classes", "7", "--crop", "32", "--batch-size", "2", "--data", str(root),
          "--budget", "0"])
    result = json.loads(capsys.readouterr().out.split("RESULT ", 1)[1])
    assert result["steps"] == 0 and len(result["iou"]) == 7
    assert 0 <= np.nansum(result["iou"]) <= 7
