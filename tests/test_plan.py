"""CPU-sized training without a config (engine/plan.py) and runs that never replace each other."""
from __future__ import annotations

from pathlib import Path

import pytest

from pixelwise.cli import main
from pixelwise.engine.config import TrainConfig
from pixelwise.engine.plan import CPU_MODEL_OPTIONS, parse_memory, plan_training
from pixelwise.errors import PixelwiseError


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    from pixelwise.data.synthetic import generate_shapes

    return generate_shapes(tmp_path_factory.mktemp("plan") / "d", num_train=8, num_val=2, size=96, seed=2)


def test_parse_memory():
    assert parse_memory("4GB") == 4 * 2 ** 30 and parse_memory("1500M") == 1500 * 2 ** 20
    assert parse_memory("2.5G") == int(2.5 * 2 ** 30) and parse_memory(None) is None and parse_memory("123") == 123
    with pytest.raises(PixelwiseError, match="--max-memory"):
        parse_memory("lots")


def test_the_plan_sizes_the_run_for_the_cpu_and_keeps_what_the_user_set(shapes):
    cfg = TrainConfig(model="unet", data=str(shapes), device="cpu", num_workers=0)
    planned, line = plan_training(cfg, explicit={"model", "data"})
    assert planned.model_kwargs == CPU_MODEL_OPTIONS["unet"]
    assert planned.crop_size == 96 and 1 <= planned.batch_size <= 4  # largest multiple of 32 <= 96 px images
    assert planned.optimizer == "adamw" and planned.epochs >= 1 and planned.time_limit > 0
    assert 3 <= planned.epochs <= 10 and planned.repeat >= 1
    assert planned.epochs * (8 * planned.repeat // planned.batch_size) >= 30  # at least 30 steps in all
    assert line.startswith("plan: unet (width 0.125), crop 96, batch ") and "GB budget" in line and "\n" not in line

    mine = TrainConfig(model="unet", data=str(shapes), device="cpu", num_workers=0, batch_size=2, crop_size=64,
                       model_kwargs={"width": 0.5})
    planned, _ = plan_training(mine, explicit={"batch_size", "crop_size", "model_kwargs.width"})
    assert planned.batch_size == 2 and planned.crop_size == 64 and planned.model_kwargs["width"] == 0.5


def test_the_batch_follows_the_memory_budget(shapes):
    cfg = TrainConfig(model="unet", data=str(shapes), device="cpu", num_workers=0)
    roomy, _ = plan_training(cfg, set(), max_memory=64 * 2 ** 30)
    assert roomy.batch_size == 4
    with pytest.raises(PixelwiseError, match="over the memory budget") as e:
        plan_training(cfg, set(), max_memory=1)
    assert "\n" not in str(e.value)


def test_no_plan_on_a_gpu_or_for_detection_models(shapes):
    cfg = TrainConfig(model="maskrcnn", data=str(shapes), device="cpu")
    assert plan_training(cfg, set()) == (cfg, None)


def test_train_without_a_config_prints_the_plan(shapes, tmp_path, capsys):
    assert main(["train", "--model", "unet", "--data", str(shapes), "--out", str(tmp_path / "r"), "--plan",
                 "--epochs", "1", "--time-limit", "3", "--num-workers", "0", "--quiet", "--no-report"]) == 0
    out = capsys.readouterr().out
    assert "plan: unet (width 0.125), crop 96" in out and "trained" in out


def test_train_refuses_a_folder_that_holds_a_run(shapes, tmp_path, capsys):
    args = ["train", "--model", "fcn8s", "--model-arg", "width=0.125", "--model-arg", "backbone=vgg16_bn",
            "--data", str(shapes), "--out", str(tmp_path / "r"), "--epochs", "1", "--batch-size", "4",
            "--num-workers", "0", "--quiet", "--no-report"]
    assert main(args) == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "r").iterdir() if p.is_file()}
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds a training run" in err[0] and "--resume" in err[0] and "--overwrite" in err[0]
    assert {p.name: p.read_bytes() for p in (tmp_path / "r").iterdir() if p.is_file()} == before  # untouched
    assert main([*args, "--overwrite"]) == 0
