"""Data-parallel training on this CPU: 2 processes, gloo, a free 127.0.0.1 port.

One spawn of 2 ranks runs the helper checks, a sharded evaluation and a short DDP training
(its results go to files the tests below read); a second test starts two ``torchrun
--nnodes=2`` launchers (two 'nodes' on 127.0.0.1) that train through the CLI.
"""
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from pixelwise.cli import main

WORLD = 2
TINY = {"model": "unet", "model_kwargs": {"width": 0.0625}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("shapes") / "data"
    # 5 val images: 2 ranks get blocks of 2 and 3, so a padding sampler would count one twice
    assert main(["data", "synth", "--out", str(d), "--num-train", "8", "--num-val", "5", "--size", "40",
                 "--seed", "2"]) == 0
    return d


def train_config(data: Path, out: Path, **kw):
    from pixelwise.engine.config import load_config

    return load_config(None, {**TINY, "data": str(data), "out": str(out), "epochs": 1, "batch_size": 2,
                              "lr": 0.01, "optimizer": "adamw", "num_workers": 0, "progress": False,
                              "threads": 1, **kw})


def fixed_model():
    from pixelwise.models.registry import build_model

    torch.manual_seed(0)
    return build_model(TINY["model"], 6, **TINY["model_kwargs"]).eval()


def val_loader(data: Path, sampler=None):
    from pixelwise.data.transforms import build_transforms
    from pixelwise.engine.common import make_loader, normalization_for, open_dataset

    norm = normalization_for("RGB", None, None)
    ds = open_dataset(data, "val", build_transforms(train=False, mean=norm["mean"], std=norm["std"]),
                      with_instances=True)
    return ds, make_loader(ds, 1, shuffle=False, num_workers=0, sampler=sampler)


def _rank_main(rank: int, port: int, data: str, work: str) -> None:
    """One of the 2 ranks: helpers, sharded evaluation, a DDP training; results to WORK/rank{r}_*.pt."""
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(WORLD),
                       "LOCAL_WORLD_SIZE": str(WORLD), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    from pixelwise.engine import distributed as dist
    from pixelwise.engine.evaluate import evaluate_model

    work_dir, data_dir = Path(work), Path(data)
    device = dist.init_distributed("cpu")
    r: dict = {"device": str(device), "rank": dist.rank(), "world": dist.world_size(), "main": dist.is_main(),
               "backend": torch.distributed.get_backend()}
    r["sum"] = dist.all_reduce_sum(torch.tensor([rank + 1.0, 10.0])).tolist()
    r["gathered"] = dist.gather_objects([{"r": rank}] * (rank + 1))
    r["broadcast"] = dist.broadcast_object({"from": rank})
    r["shard"] = list(dist.shard_sampler(range(5)))
    s = dist.distributed_sampler(range(10), shuffle=True, seed=3)
    s.set_epoch(0)
    r["epoch0"] = list(s)
    s.set_epoch(1)
    r["epoch1"] = list(s)
    s.set_epoch(1, skip=2)
    r["epoch1_skip2"] = list(s)
    r["step_sync"] = dist.step_sync(torch.tensor(float(rank)), stop=rank == 1)
    r["step_sync_nan"] = dist.step_sync(torch.tensor(float("nan") if rank == 1 else 1.0))

    # evaluation of a fixed model, each rank on its block of the val split
    _, loader = val_loader(data_dir, dist.shard_sampler(val_loader(data_dir)[0]))
    r["eval"] = evaluate_model(fixed_model(), loader, 6, device, instance_f1=True)

    # DDP training through train(): capture the bare model the loop builds
    import pixelwise.engine.fit as t

    built = []
    real_build = t.build_model

    def capture(*a, **k):
        built.append(real_build(*a, **k))
        return built[-1]

    t.build_model = capture
    r["train"] = t.fit(train_config(data_dir, work_dir / "run", checkpoint_every=1, keep_last=0))
    t.build_model = real_build
    r["state_dict"] = {k: v.clone() for k, v in built[0].state_dict().items()}
    torch.save(r, work_dir / f"rank{rank}.pt")
    dist.barrier()
    dist.cleanup()


@pytest.fixture(scope="module")
def two_ranks(tiny_data, tmp_path_factory) -> list[dict]:
    work = tmp_path_factory.mktemp("ddp")
    # fork: the ranks start with torch and pixelwise already imported (seconds each on 2 busy cores)
    mp.start_processes(_rank_main, args=(free_port(), str(tiny_data), str(work)), nprocs=WORLD, join=True,
                       start_method="fork")
    return [torch.load(work / f"rank{r}.pt", weights_only=False) | {"work": work} for r in range(WORLD)]


def test_process_group_on_cpu_is_gloo(two_ranks):
    for r, res in enumerate(two_ranks):
        assert (res["rank"], res["world"], res["main"]) == (r, WORLD, r == 0)
        assert res["device"] == "cpu" and res["backend"] == "gloo"


def test_all_reduce_gather_broadcast(two_ranks):
    for res in two_ranks:
        assert res["sum"] == [3.0, 20.0]
        assert res["gathered"] == [{"r": 0}, {"r": 1}, {"r": 1}]  # rank order
        assert res["broadcast"] == {"from": 0}


def test_step_sync_averages_the_loss_and_spreads_a_stop_and_a_nan(two_ranks):
    for res in two_ranks:
        assert res["step_sync"] == (0.5, True)
        loss, stop = res["step_sync_nan"]
        assert math.isnan(loss) and stop is False


def test_shard_sampler_visits_every_sample_once_in_order(two_ranks):
    assert two_ranks[0]["shard"] + two_ranks[1]["shard"] == [0, 1, 2, 3, 4]


def test_distributed_sampler_splits_each_epoch_and_skips(two_ranks):
    a, b = two_ranks
    for key in ("epoch0", "epoch1"):
        assert len(a[key]) == len(b[key]) == 5
        assert sorted(a[key] + b[key]) == list(range(10))  # disjoint shares of one permutation
    assert a["epoch0"] != a["epoch1"]  # set_epoch reshuffles
    for res in two_ranks:
        assert res["epoch1_skip2"] == res["epoch1"][2:]


def test_sharded_evaluation_equals_one_process_exactly(two_ranks, tiny_data):
    from pixelwise.engine.evaluate import evaluate_model

    _, loader = val_loader(tiny_data)
    single = evaluate_model(fixed_model(), loader, 6, "cpu", instance_f1=True)
    assert single["num_pixels"] > 0 and single["instance"]["num_gt"] > 0
    for res in two_ranks:  # json: NaN == NaN for absent classes
        assert json.dumps(res["eval"], sort_keys=True) == json.dumps(single, sort_keys=True)


def test_sharded_evaluation_refuses_a_padding_sampler(tiny_data):
    from torch.utils.data import DistributedSampler

    from pixelwise.engine.evaluate import evaluate_model

    ds, _ = val_loader(tiny_data)
    _, loader = val_loader(tiny_data, DistributedSampler(ds, num_replicas=2, rank=0, shuffle=False))
    with pytest.raises(ValueError, match="shard_sampler"):
        evaluate_model(fixed_model(), loader, 6, "cpu")


def test_ddp_training_keeps_ranks_identical_and_rank0_writes(two_ranks):
    a, b = two_ranks
    assert a["train"]["steps"] == b["train"]["steps"] == 2  # 8 images / 2 ranks / batch 2
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k  # parameters and BN statistics
    run = a["work"] / "run"
    ck = torch.load(run / "last.pt", weights_only=False)
    assert not any(k.startswith("module.") for k in ck["state_dict"])  # saved without DDP's prefix
    for k, v in a["state_dict"].items():
        assert torch.equal(ck["state_dict"][k], v), k
    assert sorted(p.name for p in run.glob("step_*.pt")) == ["step_1.pt", "step_2.pt"]
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["step"] == 2
    assert a["train"]["best"]["miou"] == b["train"]["best"]["miou"]  # both ranks saw the whole val split


def test_two_torchrun_nodes_train_through_the_cli(tiny_data, tmp_path):
    """Two `torchrun --nnodes=2` launchers on 127.0.0.1 (c10d rendezvous), one process each."""
    port, out = free_port(), tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launchers = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={node}", "--nproc-per-node=1",
         "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=pixelwise-test",
         "-m", "pixelwise", "train", "--model", "unet", "--model-arg", "width=0.0625", "--data", str(tiny_data),
         "--out", str(out), "--epochs", "2", "--batch-size", "2", "--optimizer", "adamw", "--lr", "0.01",
         "--num-workers", "0", "--threads", "1", "--device", "cpu", "--quiet", "--no-report"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) for node in (0, 1)]
    outputs = [p.communicate(timeout=240)[0] for p in launchers]
    for p, text in zip(launchers, outputs):
        assert p.returncode == 0, text[-3000:]
    ck = torch.load(out / "last.pt", weights_only=False)
    assert ck["epoch"] == 1 and ck["step"] == 4  # 2 epochs x (8 images / 2 nodes / batch 2)
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1] and all(0 <= r["miou"] <= 1 for r in records)
    assert sum("trained 4 steps" in text for text in outputs) == 1  # rank 0 reports, once


def test_without_torchrun_everything_is_one_process(monkeypatch):
    from pixelwise.engine import distributed as dist

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    model = torch.nn.Conv2d(1, 1, 1)
    assert dist.init_distributed("cpu") == torch.device("cpu") and not dist.is_distributed()
    assert (dist.rank(), dist.world_size(), dist.is_main()) == (0, 1, True)
    assert dist.wrap_model(model, torch.device("cpu")) is model
    assert dist.gather_objects((1, 2)) == [1, 2] and dist.step_sync(torch.tensor(2.5), True) == (2.5, True)
    with dist.autocast(torch.device("cpu")):  # bf16 autocast only on CUDA
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    assert isinstance(dist.autocast(torch.device("cuda")), torch.autocast)


def test_torchrun_environment_errors_are_one_line(monkeypatch, tiny_data, tmp_path):
    from pixelwise.engine import distributed as dist
    from pixelwise.engine.train import start_run
    from pixelwise.errors import PixelwiseError

    monkeypatch.setenv("WORLD_SIZE", "2")
    for k in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(PixelwiseError, match="MASTER_ADDR, MASTER_PORT not set: start distributed training with"):
        dist.init_distributed("cpu")
    # a loop that does not declare torchrun support (start_run without distributed=True) refuses N writers
    with pytest.raises(PixelwiseError, match="runs as one process; start it without torchrun"):
        start_run(train_config(tiny_data, tmp_path / "run", model="maskrcnn"))
