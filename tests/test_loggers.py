"""TensorBoard logger (pixelwise.engine.loggers): event files that TensorBoard's own reader
parses back with the logged scalars and images; a clear error without the package."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from pixelwise.engine.loggers import TensorBoardLogger, scalar_tags
from pixelwise.errors import PixelwiseError


def _records():
    return [
        {"epoch": 0, "step": 10, "train_loss": 1.5, "lr": 0.01, "time": 3.2, "miou": 0.25, "pixel_accuracy": 0.6,
         "iou": [0.5, float("nan"), 0.0], "best": True},
        {"epoch": 1, "step": 20, "train_loss": 0.9, "train_loss_mask": 0.4, "lr": 0.005, "time": 6.1, "miou": 0.4,
         "pixel_accuracy": 0.7, "iou": [0.6, 0.2, 0.4], "pq_per_class": {"sky": 0.1}},
    ]


def test_scalar_tags():
    tags = scalar_tags(_records()[0], ["sky", "grass", "water"])
    assert tags == {"train/loss": 1.5, "train/lr": 0.01, "time/seconds": 3.2, "val/miou": 0.25,
                    "val/pixel_accuracy": 0.6, "val_iou/sky": 0.5, "val_iou/water": 0.0}
    assert scalar_tags(_records()[1])["train/loss_mask"] == 0.4
    assert "val_iou/1" in scalar_tags(_records()[1])  # no class names: indices


def test_events_written_and_read_back(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    grid = np.zeros((20, 30, 3), np.uint8)
    grid[:, :15, 0] = 255
    with TensorBoardLogger(tmp_path, class_names=["sky", "grass", "water"]) as log:
        for rec in _records():
            log.log_epoch(rec, step=rec["step"])
        log.log_images("val/grid", grid, step=20)
        log.log_images("val/samples", [torch.rand(3, 8, 12), np.full((8, 12), 7, np.uint8)], step=20)
    files = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert len(files) == 1

    acc = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    tags = acc.Tags()
    assert {"train/loss", "train/lr", "val/miou", "val_iou/sky", "val_iou/grass"} <= set(tags["scalars"])
    loss = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    assert loss == [(10, pytest.approx(1.5)), (20, pytest.approx(0.9))]
    assert [(e.step, e.value) for e in acc.Scalars("val_iou/grass")] == [(20, pytest.approx(0.2))]  # NaN skipped
    assert set(tags["images"]) == {"val/grid", "val/samples/0", "val/samples/1"}
    (im,) = acc.Images("val/grid")
    assert (im.step, im.width, im.height) == (20, 30, 20)
    from PIL import Image
    import io

    decoded = np.asarray(Image.open(io.BytesIO(im.encoded_image_string)).convert("RGB"))
    assert (decoded == grid).all()


def test_clear_error_without_tensorboard(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    with pytest.raises(PixelwiseError, match=r"pip install 'pixelwise\[tensorboard\]'"):
        TensorBoardLogger(tmp_path)


def test_config_key_and_flag():
    from pixelwise.cli import build_parser
    from pixelwise.engine.config import TrainConfig, load_config

    assert TrainConfig().tensorboard is False
    assert load_config(None, {"tensorboard": True}).tensorboard is True
    a = build_parser().parse_args(["train", "--tensorboard"])
    assert a.tensorboard is True
    assert build_parser().parse_args(["train"]).tensorboard is None  # unset: the config file decides


def test_semantic_training_logs_each_epoch_and_val_pictures(tmp_path):
    """`tensorboard: true` in the semantic loop: the epoch's record as scalars, and the first val
    images beside their prediction overlay at each evaluation."""
    pytest.importorskip("tensorboard")
    import io
    import json

    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from pixelwise.cli import main
    from pixelwise.data.formats.voc import VOCSegmentation
    from pixelwise.engine.config import load_config
    from pixelwise.engine.train import train

    data, out = tmp_path / "data", tmp_path / "run"
    assert main(["data", "synth", "--out", str(data), "--num-train", "4", "--num-val", "2", "--size", "40",
                 "--seed", "3"]) == 0
    result = train(load_config(None, {"model": "unet", "model_kwargs": {"width": 0.0625}, "data": str(data),
                                      "out": str(out), "epochs": 1, "batch_size": 2, "num_workers": 0,
                                      "progress": False, "threads": 1, "tensorboard": True}))
    rec = json.loads((out / "metrics.jsonl").read_text())
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    step = result["steps"]
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(step, pytest.approx(rec["train_loss"]))]
    assert [(e.step, e.value) for e in acc.Scalars("val/miou")] == [(step, pytest.approx(rec["miou"]))]
    ds = VOCSegmentation(data, "val")
    assert f"val_iou/{ds.classes[0].name}" in acc.Tags()["scalars"]
    assert set(acc.Tags()["images"]) == {"val/predictions/0", "val/predictions/1"}
    (im,) = acc.Images("val/predictions/1")
    assert (im.step, im.width, im.height) == (step, 2 * 40 + 4, 40)  # image | prediction overlay
    panel = np.asarray(Image.open(io.BytesIO(im.encoded_image_string)).convert("RGB"))
    raw = (ds.load(1)["image"].clamp(0, 1) * 255 + 0.5).to(torch.uint8).permute(1, 2, 0).numpy()
    assert (panel[:, :40] == raw).all()  # the val image itself, on the left
