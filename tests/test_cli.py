"""The CLI end to end on a tiny synthetic set: synth -> train -> evaluate -> predict -> resume,
and the one-line errors for bad input."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pixelwise.cli import main

TINY_MODEL = ["--model", "fcn8s", "--model-arg", "width=0.125", "--model-arg", "backbone=vgg16_bn"]


def run(*args: str) -> int:
    return main([str(a) for a in args])


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("shapes") / "data"
    assert run("data", "synth", "--out", d, "--num-train", 8, "--num-val", 4, "--size", 48, "--seed", 1) == 0
    return d


def train_args(data: Path, out: Path, epochs: int = 1, *extra: str) -> list:
    return ["train", *TINY_MODEL, "--data", data, "--out", out, "--epochs", epochs, "--batch-size", 4,
            "--lr", "0.001", "--optimizer", "adamw", "--num-workers", 0, "--quiet", *extra]


def test_help_on_every_subcommand():
    for cmd in (["--help"], ["train", "--help"], ["evaluate", "--help"], ["predict", "--help"],
                ["models", "--help"], ["data", "--help"], ["data", "synth", "--help"], ["demo", "--help"]):
        r = subprocess.run([sys.executable, "-m", "pixelwise", *cmd], capture_output=True, text=True)
        assert r.returncode == 0, (cmd, r.stderr)
        assert "usage:" in r.stdout


def test_train_evaluate_predict(tiny_data, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert run(*train_args(tiny_data, run_dir, 2)) == 0
    for f in ("last.pt", "best.pt", "metrics.jsonl", "config.json"):
        assert (run_dir / f).is_file(), f
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [0, 1]
    assert all(0 <= r["miou"] <= 1 for r in lines)
    assert not list(run_dir.glob("*.tmp")) and not list(run_dir.glob(".*.tmp"))

    ck = torch.load(run_dir / "last.pt", weights_only=False)
    assert ck["model"]["name"] == "fcn8s" and ck["model"]["kwargs"]["width"] == 0.125
    assert [c["name"] for c in ck["classes"]][:3] == ["sky", "grass", "water"]
    assert ck["epoch"] == 1 and "optimizer" in ck and "rng" in ck

    out_json = tmp_path / "metrics.json"
    assert run("evaluate", "--checkpoint", run_dir / "best.pt", "--data", tiny_data, "--out", out_json, "--quiet") == 0
    m = json.loads(out_json.read_text())
    for k in ("pixel_accuracy", "mean_accuracy", "miou", "fwiou", "iou", "confusion"):
        assert k in m
    assert "mIoU" in capsys.readouterr().out
    assert np.array(m["confusion"]).sum() > 0

    img = next((tiny_data / "JPEGImages").iterdir())
    pred_dir = tmp_path / "pred"
    assert run("predict", "--checkpoint", run_dir / "best.pt", img, "--out", pred_dir, "--quiet") == 0
    label = Image.open(pred_dir / f"{img.stem}.png")
    assert label.mode == "P" and label.size == Image.open(img).size
    assert np.asarray(label).max() < 6
    ov = Image.open(pred_dir / f"{img.stem}_overlay.png")
    assert ov.mode == "RGB" and ov.size == label.size


def test_resume_extends_a_finished_run(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    assert run(*train_args(tiny_data, run_dir, 1, "--seed", 3)) == 0
    assert torch.load(run_dir / "last.pt", weights_only=False)["epoch"] == 0
    assert run(*train_args(tiny_data, run_dir, 2, "--seed", 3, "--resume")) == 0
    ck = torch.load(run_dir / "last.pt", weights_only=False)
    assert ck["epoch"] == 1 and ck["step"] == 4  # 8 images / batch 4 = 2 steps per epoch
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [0, 1]


def test_resume_is_bit_exact_when_stopped_by_time_limit(tiny_data, tmp_path):
    """A run interrupted after epoch 1 of 2 and resumed ends with the same weights as an uninterrupted one."""
    torch.set_num_threads(1)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert run(*train_args(tiny_data, straight, 2, "--seed", 5)) == 0
    cfg = tmp_path / "c.yaml"  # the same settings through a config file
    cfg.write_text("epochs: 2\nbatch_size: 4\nlr: 0.001\noptimizer: adamw\nnum_workers: 0\nseed: 5\n")
    from pixelwise.engine.config import load_config
    from pixelwise.engine.train import train

    c = load_config(cfg, {"model": "fcn8s", "model_kwargs": {"width": 0.125, "backbone": "vgg16_bn"},
                          "data": str(tiny_data), "out": str(resumed), "progress": False})
    _train_one_epoch_of(c, train)
    assert torch.load(resumed / "last.pt", weights_only=False)["epoch"] == 0
    c.resume = True
    result = train(c)
    assert result["steps_run"] == result["steps"] // 2  # only epoch 2 ran: --resume was not ignored
    a = torch.load(straight / "last.pt", weights_only=False)["state_dict"]
    b = torch.load(resumed / "last.pt", weights_only=False)["state_dict"]
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _train_one_epoch_of(cfg, train_fn):
    """Run the 2-epoch config but crash (KeyboardInterrupt) right after the epoch-0 checkpoint."""
    import pixelwise.engine.fit as t

    real_save = t.save_epoch

    def save_then_crash(*args):
        real_save(*args)
        raise KeyboardInterrupt

    t.save_epoch = save_then_crash
    try:
        with pytest.raises(KeyboardInterrupt):
            train_fn(cfg)
    finally:
        t.save_epoch = real_save


def cli_error(*args) -> str:
    r = subprocess.run([sys.executable, "-m", "pixelwise", *map(str, args)], capture_output=True, text=True)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    return lines[0]


def test_unknown_model_is_one_line(tiny_data, tmp_path):
    msg = cli_error("train", "--model", "fcn9s", "--data", tiny_data, "--out", tmp_path / "r")
    assert "unknown model 'fcn9s'" in msg and "fcn8s" in msg


def test_corrupt_image_names_the_file(tiny_data, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_data, bad)
    victim = sorted((bad / "JPEGImages").iterdir())[0]
    victim.write_bytes(victim.read_bytes()[:100])
    msg = cli_error("train", *TINY_MODEL, "--data", bad, "--out", tmp_path / "r", "--epochs", 1,
                    "--num-workers", 0, "--quiet")
    assert victim.name in msg


def test_label_out_of_range_names_the_file(tiny_data, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_data, bad)
    victim = sorted((bad / "SegmentationClass").iterdir())[0]
    im = Image.open(victim)
    a = np.asarray(im).copy()
    a[0, 0] = 17
    out = Image.fromarray(a)
    out.putpalette(im.getpalette())
    out.save(victim)
    msg = cli_error("evaluate", "--checkpoint", _any_checkpoint(tiny_data, tmp_path), "--data", bad,
                    "--split", _split_of(bad, victim.stem), "--quiet")
    assert victim.name in msg and "17" in msg


def test_empty_split_and_missing_checkpoint(tiny_data, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_data, bad)
    (bad / "ImageSets" / "Segmentation" / "val.txt").write_text("")
    msg = cli_error("evaluate", "--checkpoint", _any_checkpoint(tiny_data, tmp_path), "--data", bad, "--quiet")
    assert "val" in msg and "empty" in msg
    msg = cli_error("evaluate", "--checkpoint", tmp_path / "nope.pt", "--data", tiny_data)
    assert "nope.pt" in msg and "not found" in msg


def test_checkpoint_from_another_model(tiny_data, tmp_path):
    ck = _any_checkpoint(tiny_data, tmp_path)
    run_dir = ck.parent
    msg = cli_error("train", "--model", "fcn32s", "--model-arg", "width=0.125", "--data", tiny_data,
                    "--out", run_dir, "--resume", "--epochs", 2, "--quiet", "--num-workers", 0)
    assert "fcn8s" in msg and "fcn32s" in msg
    # weights of another architecture under a valid header
    data = torch.load(ck, weights_only=False)
    data["model"]["name"] = "fcn32s"
    torch.save(data, tmp_path / "mixed.pt")
    msg = cli_error("evaluate", "--checkpoint", tmp_path / "mixed.pt", "--data", tiny_data, "--quiet")
    assert "mixed.pt" in msg and "another model" in msg
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    msg = cli_error("predict", "--checkpoint", tmp_path / "garbage.pt", tiny_data / "JPEGImages", "--out", tmp_path / "p")
    assert "garbage.pt" in msg


def test_models_table_lists_fcn():
    r = subprocess.run([sys.executable, "-m", "pixelwise", "models", "--size", "64"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    row = next(line for line in r.stdout.splitlines() if line.startswith("fcn8s "))
    assert "134.3" in row  # parameters (M) of the paper's FCN-8s with 21 classes


def _any_checkpoint(data: Path, tmp_path: Path) -> Path:
    run_dir = tmp_path / "ckrun"
    if not (run_dir / "last.pt").is_file():
        assert run(*train_args(data, run_dir, 1)) == 0
    return run_dir / "last.pt"


def _split_of(root: Path, sample_id: str) -> str:
    for split in ("train", "val"):
        if sample_id in (root / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split():
            return split
    raise AssertionError(sample_id)


def test_data_stats_prints_frequencies_and_median_frequency_weights(tiny_data, capsys):
    assert run("data", "stats", tiny_data) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines()[1:]]
    assert [r[1] for r in rows] == ["sky", "grass", "water", "circle", "rectangle", "triangle"]
    shares = [float(r[2]) for r in rows]
    weights = [float(r[3]) for r in rows]
    assert abs(sum(shares) - 1) < 1e-3
    # median-frequency balancing: the median class has weight ~1, rarer classes weigh more
    assert min(weights) < 1 < max(weights)
    assert weights[shares.index(min(shares))] == max(weights)


def test_median_frequency_class_weights_train(tiny_data, tmp_path):
    assert run(*train_args(tiny_data, tmp_path / "r", 1, "--class-weights", "median_frequency")) == 0
    assert (tmp_path / "r" / "best.pt").is_file()


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_checkpoint(tiny_data, tmp_path, monkeypatch):
    import pixelwise.engine.train as t
    import pixelwise.tasks.semantic as sem
    from pixelwise.errors import PixelwiseError

    run_dir = tmp_path / "run"
    assert run(*train_args(tiny_data, run_dir, 1)) == 0
    before = (run_dir / "last.pt").read_bytes()
    real_build_loss = sem.build_loss

    class NanLoss(torch.nn.Module):
        def __init__(self, criterion):
            super().__init__()
            self.criterion = criterion

        def forward(self, outputs, target, pixel_weights=None):
            return self.criterion(outputs, target) * float("nan")

    def nan_loss(*args, **kwargs):
        return NanLoss(real_build_loss(*args, **kwargs))

    monkeypatch.setattr(sem, "build_loss", nan_loss)
    from pixelwise.engine.config import load_config

    cfg = load_config(None, {"model": "fcn8s", "model_kwargs": {"width": 0.125, "backbone": "vgg16_bn"},
                             "data": str(tiny_data), "out": str(run_dir), "epochs": 2, "batch_size": 4,
                             "num_workers": 0, "progress": False, "resume": True})
    with pytest.raises(PixelwiseError, match="loss became nan at epoch 2"):
        t.train(cfg)
    assert (run_dir / "last.pt").read_bytes() == before
