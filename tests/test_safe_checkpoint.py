"""Checkpoints cannot run code: every load is weights-only, every write stays loadable that way,
and a malicious or legacy file is refused with one line by every command that reads one."""
import pickle
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pixelwise.cli import main
from pixelwise.engine.checkpoint import (
    UnsafeCheckpointError, latest_checkpoint, load_checkpoint, rng_state, safe_value, save_checkpoint, save_step,
    set_rng_state, upgrade_checkpoint,
)
from pixelwise.errors import CheckpointError
from pixelwise.models import build_model

MODEL_KW = {"width": 0.125, "backbone": "vgg16_bn"}
CLASSES = [{"id": i, "name": n, "color": [i * 40, 0, 0]} for i, n in enumerate(["bg", "a", "b", "c", "d", "e"])]


class WritesMarker:
    """Unpickling this object opens (creates) the marker file: what a malicious checkpoint does."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def valid_checkpoint() -> dict:
    torch.manual_seed(0)
    model = build_model("fcn8s", len(CLASSES), **MODEL_KW)
    return {"model": model.pixelwise_spec, "state_dict": model.state_dict(), "classes": CLASSES,
            "normalization": {"mean": [0.5] * 3, "std": [0.25] * 3, "image_mode": "RGB"},
            "config": {}, "epoch": 0, "step": 2, "rng": rng_state(), "metrics": {"miou": 0.5}, "best_miou": 0.5,
            "task": "semantic"}


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("shapes") / "data"
    assert main(["data", "synth", "--out", str(d), "--num-train", 4, "--num-val", 2, "--size", 48, "--seed", 1]) == 0
    return d


@pytest.fixture
def evil(tmp_path) -> tuple[Path, Path]:
    """(checkpoint, marker): a working checkpoint plus one object that writes the marker when unpickled."""
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil" / "last.pt"
    path.parent.mkdir()
    torch.save({**valid_checkpoint(), "payload": WritesMarker(marker)}, path)
    return path, marker


def assert_refused(err: str, path: Path) -> None:
    lines = [x for x in err.strip().splitlines() if x.strip()]
    assert len(lines) == 1, err
    assert str(path) in lines[0] and "non-weight Python objects" in lines[0] and "was not loaded" in lines[0]
    assert "pixelwise checkpoint upgrade" in lines[0] and "--trust-this-file" in lines[0]
    assert "Traceback" not in err


def test_the_malicious_checkpoint_does_run_code_under_an_unsafe_load(evil):
    """Control: the file used below really is harmful, so its marker's absence means something."""
    path, marker = evil
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_load_checkpoint_refuses_it_without_running_it(evil):
    path, marker = evil
    with pytest.raises(UnsafeCheckpointError) as e:
        load_checkpoint(path)
    assert not marker.exists()
    assert_refused(str(e.value), path)
    assert "open" in str(e.value)  # names what it would have called


@pytest.mark.parametrize("command", ["predict", "evaluate", "export", "report"])
def test_no_command_runs_it(command, evil, tiny_data, tmp_path, capsys):
    path, marker = evil
    img = next((tiny_data / "JPEGImages").iterdir())
    argv = {
        "predict": ["predict", "--checkpoint", path, img, "--out", tmp_path / "pred", "--quiet"],
        "evaluate": ["evaluate", "--checkpoint", path, "--data", tiny_data, "--quiet"],
        "export": ["export", "--checkpoint", path, "--out", tmp_path / "m.onnx"],
        "report": ["report", path.parent, "--data", tiny_data],
    }[command]
    path.with_name("best.pt").write_bytes(path.read_bytes())  # `report` reads best.pt
    assert main([str(a) for a in argv]) != 0
    assert not marker.exists()
    assert_refused(capsys.readouterr().err, path if command != "report" else path.with_name("best.pt"))


def test_train_resume_does_not_run_it(evil, tiny_data, capsys):
    path, marker = evil
    run_dir = path.parent
    torch.save(valid_checkpoint() | {"step": 1}, run_dir / "step_1.pt")  # an older good one must not hide it
    argv = ["train", "--model", "fcn8s", "--model-arg", "width=0.125", "--model-arg", "backbone=vgg16_bn",
            "--data", tiny_data, "--out", run_dir, "--epochs", 1, "--batch-size", 2, "--num-workers", 0,
            "--quiet", "--resume"]
    assert main([str(a) for a in argv]) != 0
    assert not marker.exists()
    assert_refused(capsys.readouterr().err, path)


def test_serve_predictor_does_not_run_it(evil):
    from pixelwise.serve import Predictor

    path, marker = evil
    with pytest.raises(UnsafeCheckpointError):
        Predictor(path, device="cpu")
    assert not marker.exists()


def test_pixelwise_load_does_not_run_it(evil):
    """The Python API, from the file and from its run folder (best.pt, else last.pt)."""
    import pixelwise

    path, marker = evil
    for source in (path, path.parent):
        with pytest.raises(UnsafeCheckpointError) as e:
            pixelwise.load(source)
        assert_refused(str(e.value), path)
    assert not marker.exists()


@pytest.mark.parametrize("command", ["export", "serve"])
def test_a_subprocess_exits_non_zero_with_one_line(command, evil, tmp_path):
    """Through ``python -m pixelwise``; ``serve`` in a subprocess too, since a serve that loaded
    the file would block (the timeout then fails the test)."""
    path, marker = evil
    extra = ["--out", str(tmp_path / "m.onnx")] if command == "export" else ["--port", "0", "--quiet"]
    r = subprocess.run([sys.executable, "-m", "pixelwise", command, "--checkpoint", str(path), *extra],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert not marker.exists()
    assert_refused(r.stderr, path)


@pytest.mark.parametrize("kind", ["torch_legacy_format", "plain_pickle"])
def test_legacy_pickles_are_refused_without_running(kind, tmp_path):
    marker = tmp_path / "PWNED"
    path = tmp_path / "old.pt"
    obj = {**valid_checkpoint(), "payload": WritesMarker(marker)}
    if kind == "plain_pickle":
        path.write_bytes(pickle.dumps(obj, protocol=2))
    else:
        torch.save(obj, path, _use_new_zipfile_serialization=False)
    with pytest.raises(UnsafeCheckpointError) as e:
        load_checkpoint(path)
    assert not marker.exists()
    assert_refused(str(e.value), path)


def test_latest_checkpoint_reports_an_unsafe_last_pt_instead_of_falling_back(evil):
    path, marker = evil
    torch.save(valid_checkpoint() | {"step": 5}, path.with_name("step_5.pt"))
    with pytest.raises(UnsafeCheckpointError):
        latest_checkpoint(path.parent)
    assert not marker.exists()


def test_corrupt_file_is_a_plain_checkpoint_error(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(bad)
    assert not isinstance(e.value, UnsafeCheckpointError)
    assert str(bad) in str(e.value) and "\n" not in str(e.value)


def _draws() -> tuple:
    return (random.random(), random.getrandbits(64), np.random.rand(3).tolist(), np.random.normal(),
            torch.rand(3).tolist())


def test_rng_state_round_trips_exactly_through_a_weights_only_file(tmp_path):
    random.seed(3)
    np.random.seed(3)
    torch.manual_seed(3)
    _draws()  # its one np.random.normal() leaves a cached Gaussian (has_gauss = 1) in NumPy's state
    state = rng_state()
    assert state["numpy"]["has_gauss"] == 1
    expected = _draws()
    path = save_checkpoint(tmp_path / "c.pt", {**valid_checkpoint(), "rng": state})
    loaded = torch.load(path, weights_only=True)  # the plain loader, not ours
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    set_rng_state(loaded["rng"])
    assert _draws() == expected


def test_save_checkpoint_stores_only_weights_only_types(tmp_path):
    ck = valid_checkpoint() | {"metrics": {"miou": np.float64(0.25), "iou": np.array([0.5, 0.0]),
                                           "n": np.int64(3)}, "config": {"data": tmp_path}}
    path = save_checkpoint(tmp_path / "c.pt", ck)
    back = torch.load(path, weights_only=True)
    assert back["metrics"] == {"miou": 0.25, "iou": [0.5, 0.0], "n": 3}
    assert type(back["metrics"]["miou"]) is float and back["config"]["data"] == str(tmp_path)
    for k, v in ck["state_dict"].items():
        assert torch.equal(back["state_dict"][k], v), k

    with pytest.raises(CheckpointError, match=r"\['metrics'\]\['oops'\].*WritesMarker"):
        save_checkpoint(tmp_path / "d.pt", ck | {"metrics": {"oops": WritesMarker(tmp_path / "m")}})
    assert not (tmp_path / "d.pt").exists()
    assert safe_value({"a": (1, [2.0, None])}) == {"a": (1, [2.0, None])}


def test_step_checkpoints_of_training_load_safely(tmp_path):
    """What save_step writes (optimizer/scheduler states included) is read back by the safe loader."""
    ck = valid_checkpoint()
    model = build_model("fcn8s", len(CLASSES), **MODEL_KW)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / 10)
    model(torch.rand(1, 3, 32, 32)).sum().backward()
    opt.step()
    sched.step()
    save_step(tmp_path, ck | {"optimizer": opt.state_dict(), "scheduler": sched.state_dict()})
    back = load_checkpoint(tmp_path / "last.pt")
    opt2 = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt2.load_state_dict(back["optimizer"])
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def test_upgrade_rewrites_an_old_pixelwise_checkpoint(tmp_path):
    """A checkpoint of the old format (NumPy's RNG state as an ndarray tuple) is refused, then
    upgraded once on request; the upgraded RNG state continues the same random streams."""
    np.random.seed(7)
    np.random.normal()
    old = valid_checkpoint()
    old["rng"] = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    expected = np.random.rand(4).tolist()
    src, dst = tmp_path / "old.pt", tmp_path / "new.pt"
    torch.save(old, src)
    with pytest.raises(UnsafeCheckpointError, match="numpy"):
        load_checkpoint(src)
    assert upgrade_checkpoint(src, dst) == dst
    new = load_checkpoint(dst)
    np.random.seed(0)
    set_rng_state(new["rng"])
    assert np.random.rand(4).tolist() == expected
    for k, v in old["state_dict"].items():
        assert torch.equal(new["state_dict"][k], v), k
    with pytest.raises(CheckpointError, match="not a pixelwise checkpoint"):
        torch.save({"x": 1}, tmp_path / "foreign.pt")
        upgrade_checkpoint(tmp_path / "foreign.pt", tmp_path / "f2.pt")


@pytest.mark.parametrize(("name", "kw"), [("deeplabv3plus", {"backbone": "resnet18"}),
                                          ("maskrcnn", {"preset": "cpu", "backbone": "resnet18"}),
                                          ("unet", {"backbone": "timm:resnet18"})])
def test_a_checkpoint_loads_where_its_encoder_weight_file_is_absent(name, kw, tmp_path):
    """The encoder file a model was trained from is recorded in its options, but the checkpoint
    holds the weights: rebuilding it elsewhere must not need (or read) that file."""
    from pixelwise.engine.checkpoint import model_from_checkpoint

    if kw["backbone"].startswith("timm:"):
        timm = pytest.importorskip("timm")
        sd = timm.create_model("resnet18").state_dict()
    else:
        import torchvision

        sd = torchvision.models.resnet18().state_dict()
    weights = tmp_path / "encoder.pth"
    torch.save(sd, weights)
    model = build_model(name, 3, backbone_weights=str(weights), **kw)
    path = save_checkpoint(tmp_path / "c.pt", {**valid_checkpoint(), "model": model.pixelwise_spec,
                                               "state_dict": model.state_dict()})
    weights.unlink()
    again = model_from_checkpoint(load_checkpoint(path), path)
    for k, v in model.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k
    with pytest.raises(CheckpointError, match="weights file not found"):  # outside a rebuild it is read
        build_model(name, 3, backbone_weights=str(weights), **kw)


def test_cli_upgrade_needs_the_trust_flag_and_then_writes_a_safe_file(tmp_path, capsys):
    from pixelwise.cli import main

    old = valid_checkpoint()
    old["rng"] = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    src, dst = tmp_path / "old.pt", tmp_path / "new.pt"
    torch.save(old, src)
    assert main(["checkpoint", "upgrade", str(src), "--out", str(dst)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--trust-this-file" in err[0] and not dst.exists()
    assert main(["checkpoint", "upgrade", str(src), "--out", str(dst), "--trust-this-file"]) == 0
    assert "weights-only" in capsys.readouterr().out and "state_dict" in load_checkpoint(dst)
