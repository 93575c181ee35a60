"""Prediction across processes (issue 18 item 2): under torchrun `pixelwise predict` splits the
inputs by rank. Two gloo ranks on this CPU (forked, like tests/test_distributed.py) write the
same files as one process, each file exactly once, and a panoptic run gets one panoptic.json
merged by rank 0."""
from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from pixelwise.cli import main
from pixelwise.data.synthetic import generate_shapes
from tests.predict_helpers import mixed_sizes, semantic_checkpoint, tree_bytes
from tests.test_distributed import free_port
from tests.test_predict_batch import DET

WORLD = 2


def _rank_main(rank: int, port: int, argv: list[str], work: str) -> None:
    """One rank: `pixelwise predict ARGV` with every atomic write recorded (WORK/rank{r}.json)."""
    import pixelwise.fs as fs

    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(WORLD),
                       "LOCAL_WORLD_SIZE": str(WORLD), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    writes: list[str] = []
    real = fs.atomic_open

    @contextlib.contextmanager
    def recording(path, *a, **k):
        writes.append(str(path))
        with real(path, *a, **k) as f:
            yield f

    fs.atomic_open = recording
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(argv)
    fs.atomic_open = real
    Path(work, f"rank{rank}.json").write_text(json.dumps({"code": code, "writes": writes, "stdout": out.getvalue()}))


def _two_ranks(argv: list[str], work: Path) -> list[dict]:
    work.mkdir(parents=True, exist_ok=True)
    mp.start_processes(_rank_main, args=(free_port(), argv, str(work)), nprocs=WORLD, join=True, start_method="fork")
    return [json.loads((work / f"rank{r}.json").read_text()) for r in range(WORLD)]


def _check_once(ranks: list[dict], out: Path) -> None:
    """Every file in OUT was written by exactly one rank, once."""
    writes = [w for r in ranks for w in r["writes"]]
    assert sorted(writes) == sorted(str(out / k) for k in tree_bytes(out))
    assert all(r["writes"] for r in ranks)  # both ranks did work


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_shapes(tmp_path_factory.mktemp("shapes") / "d", num_train=4, num_val=3, size=64, seed=1)


def test_two_ranks_write_what_one_process_writes(data, tmp_path):
    ckpt = semantic_checkpoint(tmp_path / "unet.pt")
    mixed_sizes(data / "JPEGImages", tmp_path / "in" / "a")
    mixed_sizes(data / "JPEGImages", tmp_path / "in" / "b", sizes=((48, 48), (40, 56)))
    base = ["predict", "--checkpoint", str(ckpt), str(tmp_path / "in" / "a"), str(tmp_path / "in" / "b"), "--quiet",
            "--batch-size", "2", "--num-workers", "0", "--device", "cpu"]
    assert main([*base, "--out", str(tmp_path / "one")]) == 0
    ranks = _two_ranks([*base, "--out", str(tmp_path / "two")], tmp_path / "work")
    assert [r["code"] for r in ranks] == [0, 0]
    assert tree_bytes(tmp_path / "two") == tree_bytes(tmp_path / "one")  # 9 images, mirrored under a/ and b/
    assert len(tree_bytes(tmp_path / "one")) == 18
    _check_once(ranks, tmp_path / "two")
    assert ranks[0]["stdout"].strip() == f"wrote 9 label maps and overlays to {tmp_path / 'two'}"
    assert ranks[1]["stdout"] == ""  # rank 0 reports, once


def test_two_ranks_panoptic_one_json_merged_by_rank_0(data, tmp_path):
    run = tmp_path / "run"
    args = ["train", "--model", "panoptic_fpn", "--data", str(data), "--out", str(run), "--epochs", "1",
            "--batch-size", "2", "--lr", "0.005", "--num-workers", "0", "--quiet", "--no-report"]
    for k, v in dict(DET, semantic_channels=32, scale_stuff_area=True).items():
        args += ["--model-arg", f"{k}={list(v) if isinstance(v, tuple) else v}"]
    assert main(args) == 0
    imgs = [str(p) for p in sorted((data / "JPEGImages").glob("val_*.png"))]
    base = ["predict", "--checkpoint", str(run / "last.pt"), *imgs, "--quiet", "--device", "cpu"]
    assert main([*base, "--out", str(tmp_path / "one")]) == 0
    ranks = _two_ranks([*base, "--out", str(tmp_path / "two")], tmp_path / "work")
    assert [r["code"] for r in ranks] == [0, 0]
    one, two = tree_bytes(tmp_path / "one"), tree_bytes(tmp_path / "two")
    assert one == two and "panoptic.json" in two and len(two) == 2 * len(imgs) + 1
    _check_once(ranks, tmp_path / "two")
    assert str(tmp_path / "two" / "panoptic.json") in ranks[0]["writes"]
    doc = json.loads(two["panoptic.json"])
    assert [a["file_name"] for a in doc["annotations"]] == [f"{Path(i).stem}.png" for i in imgs]
