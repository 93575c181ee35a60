"""Never lose work: SIGKILL a training at a random moment, check every checkpoint loads, resume,
and end with the weights and metrics of an uninterrupted run (``--deterministic``); step
checkpoints every N steps, the last K kept; the resume picks the newest readable checkpoint."""
import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pixelwise.cli import main
from pixelwise.engine.checkpoint import (
    latest_checkpoint, load_checkpoint, save_checkpoint, save_step, step_checkpoints,
)
from pixelwise.errors import CheckpointError

EPOCHS, STEPS_PER_EPOCH = 3, 4  # 8 images, batch 2
ARGS = {"model": "unet", "model_arg": ["width=0.0625"], "epochs": EPOCHS, "batch_size": 2, "optimizer": "adamw",
        "lr": 0.01, "seed": 7, "checkpoint_every": 1, "keep_last": 2, "threads": 1, "device": "cpu"}


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("shapes") / "data"
    assert main(["data", "synth", "--out", str(d), "--num-train", "8", "--num-val", "3", "--size", "40",
                 "--seed", "4"]) == 0
    return d


@pytest.fixture
def deterministic_off_afterwards():
    yield
    torch.use_deterministic_algorithms(False)  # --deterministic is process-wide; do not leak into other tests


def cli_args(data: Path, out: Path, num_workers: int, *extra: str) -> list[str]:
    args = ["train", "--data", str(data), "--out", str(out), "--num-workers", str(num_workers), "--quiet",
            "--no-report", "--deterministic"]
    for k, v in ARGS.items():
        for item in (v if isinstance(v, list) else [v]):
            args += [f"--{k.replace('_', '-')}", str(item)]
    return args + list(extra)


def records(run: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock times."""
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if k != "time"} for x in lines]


def test_kill_9_at_a_random_moment_then_resume_gives_the_uninterrupted_result(tiny_data, tmp_path,
                                                                               deterministic_off_afterwards, capsys):
    total = EPOCHS * STEPS_PER_EPOCH
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert main(cli_args(tiny_data, straight, 0)) == 0  # uninterrupted, in this process
    assert [n for n, _ in step_checkpoints(straight)] == [total - 1, total]  # keep_last = 2
    assert load_checkpoint(straight / "last.pt")["step"] == total

    # the same run in a subprocess (one DataLoader worker: the data must not depend on it), killed
    # kill after step_K (K <= half the steps) plus up to 2 steps' time: always before the run ends
    step_time = json.loads((straight / "metrics.jsonl").read_text().splitlines()[-1])["time"] / total
    rng = random.Random()
    after_step, delay = rng.randint(1, total // 2), rng.uniform(0.0, 2 * step_time)
    proc = subprocess.Popen([sys.executable, "-m", "pixelwise", *cli_args(tiny_data, killed, 1)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while not any(n >= after_step for n, _ in step_checkpoints(killed)):
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.monotonic() < deadline, "no step checkpoint within 300 s"
        time.sleep(0.005)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    where = f"killed {delay:.3f}s after step_{after_step}.pt appeared"
    assert proc.returncode == -signal.SIGKILL, f"the run ended before the kill ({where})"

    files = [p for p in killed.iterdir() if p.suffix == ".pt"]
    assert files, where
    for p in files:  # no checkpoint is ever corrupt
        load_checkpoint(p)
    reached = latest_checkpoint(killed)[1]["step"]
    assert after_step <= reached < total, where

    capsys.readouterr()
    assert main(cli_args(tiny_data, killed, 0, "--resume")) == 0
    # the resumed process ran only the steps after the checkpoint (not a silent retraining from 0)
    assert f"trained {total} steps ({total - reached} of them in this process, resumed)" in capsys.readouterr().out
    a = load_checkpoint(straight / "last.pt")
    b = load_checkpoint(killed / "last.pt")
    assert b["step"] == total
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), f"{k} ({where})"
    assert records(killed) == records(straight), where
    assert not list(killed.glob(".*.tmp"))


def _ckpt(step: int, epoch: int = 0) -> dict:
    return {"model": {"name": "unet", "num_classes": 2}, "state_dict": {"w": torch.full((2,), float(step))},
            "step": step, "epoch": epoch}


def test_step_checkpoints_keep_the_last_k_and_last_pt_is_the_newest(tmp_path):
    for step in range(1, 6):
        save_step(tmp_path, _ckpt(step), keep_last=3)
        assert load_checkpoint(tmp_path / "last.pt")["step"] == step
    assert [n for n, _ in step_checkpoints(tmp_path)] == [3, 4, 5]
    save_step(tmp_path, _ckpt(6), keep_last=0)  # 0 keeps them all
    assert [n for n, _ in step_checkpoints(tmp_path)] == [3, 4, 5, 6]
    assert not list(tmp_path.glob(".*.tmp"))


def test_resume_picks_the_newest_readable_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="nothing to resume"):
        latest_checkpoint(tmp_path)
    save_step(tmp_path, _ckpt(4), keep_last=0)
    save_checkpoint(tmp_path / "last.pt", _ckpt(4, epoch=1))  # the epoch end at the same step wins the tie
    path, ck = latest_checkpoint(tmp_path)
    assert path.name == "last.pt" and ck["epoch"] == 1
    save_checkpoint(tmp_path / "step_5.pt", _ckpt(5))  # killed before last.pt pointed to it
    assert latest_checkpoint(tmp_path)[0].name == "step_5.pt"
    (tmp_path / "step_5.pt").write_bytes(b"truncated")  # damaged by something else than pixelwise
    (tmp_path / "last.pt").write_bytes(b"")
    path, ck = latest_checkpoint(tmp_path)
    assert path.name == "step_4.pt" and ck["step"] == 4


def test_a_write_interrupted_midway_leaves_the_old_checkpoint(tmp_path, monkeypatch):
    save_checkpoint(tmp_path / "last.pt", _ckpt(1))
    before = (tmp_path / "last.pt").read_bytes()
    real_save = torch.save

    def half_then_crash(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        f.truncate(100)
        raise KeyboardInterrupt  # the process is stopped in the middle of the write

    monkeypatch.setattr(torch, "save", half_then_crash)
    with pytest.raises(KeyboardInterrupt):
        save_step(tmp_path, _ckpt(2))
    assert (tmp_path / "last.pt").read_bytes() == before
    assert not list(tmp_path.glob("step_*.pt")) and not list(tmp_path.glob(".*.tmp"))


def test_a_nan_loss_stops_and_keeps_the_last_step_checkpoint(tiny_data, tmp_path, monkeypatch):
    import pixelwise.engine.train as t
    import pixelwise.tasks.semantic as sem
    from pixelwise.engine.config import load_config
    from pixelwise.errors import PixelwiseError

    real_build_loss = sem.build_loss

    class NanAtThirdStep(torch.nn.Module):
        def __init__(self, criterion):
            super().__init__()
            self.criterion, self.calls = criterion, 0

        def forward(self, outputs, target, pixel_weights=None):
            self.calls += 1
            value = self.criterion(outputs, target, pixel_weights=pixel_weights)
            return value * float("nan") if self.calls == 3 else value

    monkeypatch.setattr(sem, "build_loss", lambda *a, **k: NanAtThirdStep(real_build_loss(*a, **k)))
    cfg = load_config(None, {"model": "unet", "model_kwargs": {"width": 0.0625}, "data": str(tiny_data),
                             "out": str(tmp_path), "epochs": 1, "batch_size": 2, "num_workers": 0,
                             "progress": False, "checkpoint_every": 1})
    with pytest.raises(PixelwiseError, match="loss became nan at epoch 1, step 2"):
        t.train(cfg)
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 2
    assert [n for n, _ in step_checkpoints(tmp_path)] == [1, 2]
