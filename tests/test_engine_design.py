"""The engine's shape (issue 14): one task object per task, one training loop, one evaluation
driver, no import circle, config keys checked per task, and resume that really resumes."""
from __future__ import annotations

import ast
import hashlib
from pathlib import Path

import pytest
import torch

import pixelwise
from pixelwise.engine.config import TrainConfig
from pixelwise.errors import PixelwiseError
from pixelwise.tasks import TASKS, get_task, task_for_model, task_of_checkpoint

PACKAGE = Path(pixelwise.__file__).parent


@pytest.fixture(scope="module")
def shapes_data(tmp_path_factory) -> Path:
    from pixelwise.data.synthetic import generate_shapes

    return generate_shapes(tmp_path_factory.mktemp("shapes") / "d", num_train=16, num_val=4, size=64, seed=1)


@pytest.fixture(scope="module")
def tiny_shapes(tmp_path_factory) -> Path:
    from pixelwise.data.synthetic import generate_shapes

    return generate_shapes(tmp_path_factory.mktemp("tiny") / "d", num_train=8, num_val=2, size=64, seed=0)
TASK_NAMES = {"semantic", "instance", "panoptic"}


def _modules() -> dict[str, Path]:
    out = {}
    for f in PACKAGE.rglob("*.py"):
        parts = list(f.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = f
    return out


def _imports(name: str, path: Path, modules: set[str]) -> set[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = package.split(".")
                base = ".".join(pkg[:len(pkg) - node.level + 1] + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        for t in targets:
            while t and t not in modules:  # pixelwise.data.io.read_image -> pixelwise.data.io
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of two or more modules (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_package_has_no_import_circle():
    mods = _modules()
    graph = {n: _imports(n, p, set(mods)) for n, p in mods.items()}
    # a package's __init__ importing its own submodules is how packages expose names: not a circle
    graph = {n: {t for t in deps if not (mods[n].name == "__init__.py" and t.startswith(n + "."))}
             for n, deps in graph.items()}
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_planted_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_one_backward_call_site():
    sites = [(f.relative_to(PACKAGE), n) for f in PACKAGE.rglob("*.py")
             for n, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1) if ".backward(" in line]
    assert [str(f) for f, _ in sites] == ["engine/fit.py"], sites


def _task_name_branches(path: Path) -> list[int]:
    """Lines comparing something named ``task`` with a task name, or building a ``TASK...``
    table keyed by task names (Python code: the serve page's JavaScript is a string; the
    sample dict's ``"semantic"`` / ``"panoptic"`` keys are data, not task names)."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            consts = [c for c in sides if isinstance(c, ast.Constant)]
            consts += [e for c in sides if isinstance(c, (ast.Tuple, ast.List, ast.Set)) for e in c.elts]
            others = [ast.unparse(c).lower() for c in sides if not isinstance(c, (ast.Constant, ast.Tuple, ast.List,
                                                                                   ast.Set))]
            if any(isinstance(c, ast.Constant) and c.value in TASK_NAMES for c in consts) and \
                    any("task" in o for o in others):
                lines.append(node.lineno)
        elif isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict):
            named = any("task" in ast.unparse(t).lower() for t in node.targets)
            if named and any(isinstance(k, ast.Constant) and k.value in TASK_NAMES for k in node.value.keys):
                lines.append(node.lineno)
    return lines


def test_no_code_outside_the_task_modules_branches_on_the_task_name():
    found = {str(f.relative_to(PACKAGE)): _task_name_branches(f) for f in PACKAGE.rglob("*.py")
             if "tasks" not in f.relative_to(PACKAGE).parts}
    assert {f: lines for f, lines in found.items() if lines} == {}


def test_the_branch_finder_sees_a_branch(tmp_path):
    f = tmp_path / "m.py"
    f.write_text('if ckpt.get("task") == "instance":\n    pass\nTASKS = {"panoptic": 1}\ny = "semantic"\n'
                 'if "semantic" in sample:\n    pass\nif info.task in ("semantic", "x"):\n    pass\n')
    assert sorted(_task_name_branches(f)) == [1, 3, 7]


def test_every_model_has_a_registered_task_and_checkpoints_name_theirs():
    assert set(TASKS) == TASK_NAMES
    for model in pixelwise.list_models():
        assert task_for_model(model) is get_task(pixelwise.models.registry.model_info(model).task)
    assert task_for_model("maskrcnn").name == "instance" and task_for_model("panoptic_fpn").name == "panoptic"
    assert task_of_checkpoint({}).name == "semantic"  # checkpoints from before the task entry
    with pytest.raises(PixelwiseError, match="unknown task"):
        get_task("depth")


@pytest.mark.parametrize("model,key,value", [("maskrcnn", "weight_map", {"w0": 10}), ("panoptic_fpn", "loss", "dice"),
                                             ("maskrcnn", "class_weights", "median_frequency")])
def test_a_config_key_the_task_ignores_is_refused(model, key, value):
    cfg = TrainConfig(model=model, **{key: value})
    with pytest.raises(PixelwiseError) as e:
        task_for_model(model).check_config(cfg, TrainConfig())
    msg = str(e.value)
    assert key in msg and "does not use" in msg and "\n" not in msg


def test_semantic_keys_pass_for_a_semantic_model():
    cfg = TrainConfig(model="unet", loss="weighted_ce", weight_map={"w0": 10}, class_weights="median_frequency")
    task_for_model("unet").check_config(cfg, TrainConfig())  # no error


def test_an_ignored_key_stops_train_with_one_line(shapes_data, tmp_path, capsys):
    from pixelwise.cli import main

    assert main(["train", "--model", "maskrcnn", "--data", str(shapes_data), "--out", str(tmp_path / "r"),
                 "--loss", "dice", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "loss" in err[0] and "does not use" in err[0]
    assert not (tmp_path / "r").exists()  # refused before anything was written


# ---------------------------------------------------------------------------------------
# resume runs only the remaining steps, for every task
# ---------------------------------------------------------------------------------------

RESUME_ARGS = {
    "fcn8s": {"model_kwargs": {"width": 0.125, "backbone": "vgg16_bn"}, "crop_size": 48, "optimizer": "adamw",
              "lr": 0.002},
    "maskrcnn": {"model_kwargs": {"preset": "cpu"}, "lr": 0.01},
    "panoptic_fpn": {"model_kwargs": {"preset": "cpu", "backbone": "resnet18", "fpn_channels": 32,
                                      "semantic_channels": 32}, "lr": 0.01},
}


class _Killed(Exception):
    pass


def _weights_digest(path: Path) -> str:
    from pixelwise.engine.checkpoint import load_checkpoint

    sd = load_checkpoint(path)["state_dict"]
    h = hashlib.sha256()
    for k in sorted(sd):
        h.update(k.encode() + sd[k].contiguous().numpy().tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("model", list(RESUME_ARGS))
def test_resume_runs_only_the_remaining_steps(model, tiny_shapes, tmp_path, monkeypatch):
    """Killed right after the step-3 checkpoint (mid-epoch), the resumed process executes
    exactly the 5 remaining steps and ends with the weights of an uninterrupted run."""
    import pixelwise.engine.fit as fit_mod

    task = task_for_model(model)
    executed: list[int] = []
    real_training = type(task).training

    def counting_training(self, *args, **kwargs):
        setup = real_training(self, *args, **kwargs)
        step = setup.step

        def counted(*a, **k):
            executed.append(1)
            return step(*a, **k)

        setup.step = counted
        return setup

    monkeypatch.setattr(type(task), "training", counting_training)

    def cfg(out: Path, **kw) -> TrainConfig:
        return TrainConfig(model=model, data=str(tiny_shapes), out=str(out), epochs=2, batch_size=2, seed=0,
                           num_workers=0, threads=1, deterministic=True, progress=False, eval_every=2,
                           scale_min=1.0, scale_max=1.0, **RESUME_ARGS[model], **kw)

    whole = fit_mod.fit(cfg(tmp_path / "whole"))
    assert whole["steps"] == 8 and len(executed) == 8  # 8 train images, batch 2: 4 steps per epoch

    executed.clear()
    real_save_step = fit_mod.save_step

    def save_then_die(out, ck, keep_last=3):
        real_save_step(out, ck, keep_last)
        if ck["step"] == 3:
            raise _Killed

    monkeypatch.setattr(fit_mod, "save_step", save_then_die)
    with pytest.raises(_Killed):
        fit_mod.fit(cfg(tmp_path / "cut", checkpoint_every=1))
    assert len(executed) == 3
    monkeypatch.setattr(fit_mod, "save_step", real_save_step)

    executed.clear()
    resumed = fit_mod.fit(cfg(tmp_path / "cut", checkpoint_every=1, resume=True))
    assert len(executed) == 5 and resumed["steps_run"] == 5 and resumed["steps"] == 8
    assert _weights_digest(tmp_path / "cut" / "last.pt") == _weights_digest(tmp_path / "whole" / "last.pt")
    assert resumed["best"][task.best_metric] == whole["best"][task.best_metric]


def test_median_frequency_weights_reach_the_loss(shapes_data, tmp_path, monkeypatch):
    import pixelwise.tasks.semantic as sem
    from pixelwise.data.stats import dataset_class_stats
    from pixelwise.engine.fit import fit

    seen = {}
    real = sem.build_loss

    def spy(name, **kw):
        seen.update(kw)
        return real(name, **kw)

    monkeypatch.setattr(sem, "build_loss", spy)
    fit(TrainConfig(model="fcn8s", model_kwargs={"width": 0.125, "backbone": "vgg16_bn"}, data=str(shapes_data),
                    out=str(tmp_path / "r"), epochs=1, batch_size=8, crop_size=48, num_workers=0, progress=False,
                    class_weights="median_frequency", time_limit=0.001))
    ds = sem.open_dataset(shapes_data, "train")
    expected = [float(w) for w in dataset_class_stats(ds, len(ds.classes))["median_frequency_weights"]]
    assert seen["class_weights"] == pytest.approx(expected, rel=1e-12)
    assert max(expected) > 1.5 * min(expected)  # the weights differ: a test that would see them dropped


def test_eval_mode_restores_the_mode():
    from pixelwise.engine.evaluate import eval_mode

    m = torch.nn.Dropout()
    with eval_mode(m):
        assert not m.training
    assert m.training
    m.eval()
    with pytest.raises(RuntimeError), eval_mode(m):
        raise RuntimeError
    assert not m.training


def test_grad_clip_is_a_config_key_of_every_task(shapes_data, tmp_path, monkeypatch):
    """``grad_clip`` clips in the one loop for any task; null = the task's default (semantic: off,
    instance / panoptic: 10, what their loop always did)."""
    from pixelwise.engine.fit import fit

    calls: list[float] = []
    real = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_",
                        lambda params, max_norm, *a, **k: calls.append(max_norm) or real(params, max_norm, *a, **k))
    base = dict(model="fcn8s", model_kwargs={"width": 0.125, "backbone": "vgg16_bn"}, data=str(shapes_data),
                epochs=1, batch_size=8, crop_size=48, num_workers=0, progress=False)
    fit(TrainConfig(out=str(tmp_path / "a"), **base))
    assert calls == []
    fit(TrainConfig(out=str(tmp_path / "b"), grad_clip=0.5, **base))
    assert calls == [0.5, 0.5]  # 16 images, batch 8: every step clipped
    assert get_task("instance").default_grad_clip == get_task("panoptic").default_grad_clip == 10.0


def test_poly_schedule_follows_the_time_limit():
    """progress = max(step / total, share of the time limit spent): the factor is the poly
    value of whichever is further along."""
    from pixelwise.engine.fit import ScheduleClock, poly_lr_lambda

    clock = ScheduleClock()
    f = poly_lr_lambda(100, 0.9, 0, clock)
    assert f(10) == pytest.approx(0.9 ** 0.9)  # clock at 0: the step count rules
    clock.fraction = 0.5
    assert f(10) == pytest.approx(0.5 ** 0.9)
    assert f(80) == pytest.approx(0.2 ** 0.9)  # steps further along than the clock
    clock.fraction = 1.0
    assert f(10) == 0.0
    assert poly_lr_lambda(100, 0.9)(10) == pytest.approx(0.9 ** 0.9)  # no clock: steps only


def test_a_run_stopped_by_its_time_limit_ends_annealed(shapes_data, tmp_path):
    """With a time limit that ends the run long before its last epoch, the LR still reaches 0 at
    the stop (time_schedule: true, the default) instead of being cut at full LR; off, it is cut."""
    from pixelwise.engine.fit import fit

    base = dict(model="fcn8s", model_kwargs={"width": 0.125, "backbone": "vgg16_bn"}, data=str(shapes_data),
                epochs=200, batch_size=2, crop_size=48, num_workers=0, progress=False, time_limit=2.0, lr=0.01)
    paced = fit(TrainConfig(out=str(tmp_path / "a"), **base))
    assert paced["steps"] < 200 * 8  # the time limit, not the epochs, ended it
    assert paced["last"]["lr"] == 0.0
    cut = fit(TrainConfig(out=str(tmp_path / "b"), time_schedule=False, **base))
    assert cut["last"]["lr"] > 0.009
    det = fit(TrainConfig(out=str(tmp_path / "c"), deterministic=True, **base))  # must not depend on the clock
    assert det["last"]["lr"] > 0.009
