"""The detection loop (Mask R-CNN, Panoptic FPN) as the semantic one: 2 CPU ranks (gloo) train
with identical weights and evaluate sharded with exactly the 1-process metrics (mask AP, PQ: of
the trained models, and of a fixed 'oracle' whose metrics are neither 0 nor 1);
step checkpoints + mid-epoch resume end as an uninterrupted run; TensorBoard events from rank 0;
bad samples skipped in training and evaluation."""
import json
import os
import shutil
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

pytest.importorskip("pycocotools")

WORLD = 2
TINY = dict(preset="cpu", fpn_channels=16, mask_head_channels=8, box_head_dim=32, min_size=64, max_size=64,
            rpn_pre_nms_top_n_train=100, rpn_post_nms_top_n_train=50, rpn_pre_nms_top_n_test=50,
            rpn_post_nms_top_n_test=20, box_batch_size_per_image=32, rpn_batch_size_per_image=32,
            anchor_sizes=(8, 16, 32, 64, 128))
TINY_KW = {"maskrcnn": TINY, "panoptic_fpn": {**TINY, "semantic_channels": 32}}
NUM_TRAIN, NUM_VAL = 4, 3  # 2 ranks x batch 1 -> 2 steps; val blocks of 1 and 2 images


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from pixelwise.data.synthetic import generate_shapes

    return generate_shapes(tmp_path_factory.mktemp("det") / "shapes", num_train=NUM_TRAIN, num_val=NUM_VAL,
                           size=64, seed=1)


def config(model: str, data: Path, out: Path, **kw):
    from pixelwise.engine.config import load_config

    return load_config(None, {"model": model, "model_kwargs": TINY_KW[model], "data": str(data), "out": str(out),
                              "epochs": 1, "batch_size": 1, "lr": 0.005, "num_workers": 0, "progress": False,
                              "threads": 1, "device": "cpu", **kw})


def val_set(task: str, data: Path):
    from pixelwise.data.transforms import build_transforms
    from pixelwise.engine.common import normalization_for

    norm = normalization_for("RGB", None, None)
    tf = build_transforms(train=False, mean=norm["mean"], std=norm["std"])
    if task == "maskrcnn":
        from pixelwise.data.formats.coco import CocoInstances

        return CocoInstances(data, "val", transforms=tf)
    from pixelwise.data.formats.coco_panoptic import CocoPanoptic

    return CocoPanoptic(data, "val", transforms=tf)


class Oracle(torch.nn.Module):
    """A fixed 'model' with metrics neither 0 nor 1: it answers each val image (recognised by its
    pixels) with the image's ground truth, degraded image by image: masks shifted by 0-2 px,
    an instance / a segment left out, a confident false positive."""

    def __init__(self, ds, panoptic: bool) -> None:
        super().__init__()
        self.answers = {self.key(ds[i]["image"]): (self._panoptic if panoptic else self._instances)(ds, i)
                        for i in range(len(ds))}

    @staticmethod
    def key(image: torch.Tensor) -> bytes:
        return image.cpu().numpy().tobytes()

    @staticmethod
    def _detections(masks: torch.Tensor, labels: list[int], i: int) -> dict:
        masks = [torch.roll(m, k % 3, dims=1) for k, m in enumerate(masks) if (i + k) % 4 != 3]
        labels = [lab for k, lab in enumerate(labels) if (i + k) % 4 != 3]
        masks.append(torch.roll(masks[0], 12, dims=0))  # a confident false positive
        labels.append(labels[0] % 3 + 1)
        boxes = []
        for m in masks:
            ys, xs = torch.nonzero(m, as_tuple=True)
            boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        scores = [0.9 - 0.1 * k for k in range(len(masks) - 1)] + [0.99]
        return {"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor(labels),
                "scores": torch.tensor(scores), "masks": torch.stack(masks)[:, None].float()}

    def _instances(self, ds, i: int) -> dict:
        inst = ds.load(i)["instances"]
        return self._detections(inst["masks"], inst["labels"].tolist(), i)

    def _panoptic(self, ds, i: int) -> dict:
        raw = ds.load(i)
        isthing = {int(c["id"]): bool(c["isthing"]) for c in ds.categories}
        ids = torch.roll(raw["panoptic"], 1 + i % 2, dims=1)
        segments = [dict(s) for s in raw["segments"]]
        dropped = segments.pop((2 * i) % len(segments))
        ids[ids == dropped["id"]] = 0
        thing_ids = [int(c["id"]) for c in ds.categories if c["isthing"]]
        ids[:6, :6] = 1000  # a false thing segment in a corner
        segments.append({"id": 1000, "category_id": thing_ids[0]})
        info = [{"id": int(s["id"]), "category_id": int(s["category_id"]), "isthing": isthing[int(s["category_id"])]}
                for s in segments if (ids == int(s["id"])).any()]
        things = [s for s in info if s["isthing"]]
        out = self._detections(torch.stack([ids == s["id"] for s in things]),
                               [thing_ids.index(s["category_id"]) + 1 for s in things], i)
        return {**out, "panoptic": ids, "segments_info": info}

    def forward(self, images: list[torch.Tensor]) -> list[dict]:
        return [self.answers[self.key(im)] for im in images]


def evaluate_fixed(task: str, data: Path, sharded: bool) -> dict:
    from pixelwise.engine import distributed as dist
    from pixelwise.engine.instance import _loader, evaluate_instance_model
    from pixelwise.engine.panoptic import evaluate_panoptic_model

    ds = val_set(task, data)
    loader = _loader(ds, 2, False, 0, sampler=dist.shard_sampler(ds) if sharded else None)
    model = Oracle(ds, panoptic=task == "panoptic_fpn")
    if task == "maskrcnn":
        m = evaluate_instance_model(model, loader, ds.category_ids, ds.annotation_file, "cpu")
    else:
        m = evaluate_panoptic_model(model, loader, ds.categories, "cpu")
    m.pop("seconds_per_image")
    return m


def _rank_main(rank: int, port: int, data: str, work: str) -> None:
    """One of the 2 ranks: a DDP training of each model, and sharded evaluations of fixed models."""
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(WORLD),
                       "LOCAL_WORLD_SIZE": str(WORLD), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    import pixelwise.engine.fit as inst
    from pixelwise.engine import distributed as dist
    from pixelwise.engine.train import train

    work_dir, data_dir = Path(work), Path(data)
    dist.init_distributed("cpu")
    r: dict = {}
    real_build = inst.build_model
    for model in ("maskrcnn", "panoptic_fpn"):
        built = []
        inst.build_model = lambda *a, **k: built.append(real_build(*a, **k)) or built[-1]
        r[model] = train(config(model, data_dir, work_dir / model, checkpoint_every=1, keep_last=0,
                                tensorboard=model == "panoptic_fpn"))
        r[f"{model}_state"] = {k: v.clone() for k, v in built[0].state_dict().items()}
        r[f"{model}_fixed"] = evaluate_fixed(model, data_dir, sharded=True)
    inst.build_model = real_build
    torch.save(r, work_dir / f"rank{rank}.pt")
    dist.barrier()
    dist.cleanup()


@pytest.fixture(scope="module")
def two_ranks(data, tmp_path_factory) -> list[dict]:
    work = tmp_path_factory.mktemp("ddp_det")
    mp.start_processes(_rank_main, args=(free_port(), str(data), str(work)), nprocs=WORLD, join=True,
                       start_method="fork")
    return [torch.load(work / f"rank{r}.pt", weights_only=False) | {"work": work} for r in range(WORLD)]


def without_times(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in ("time", "seconds_per_image")}


@pytest.mark.parametrize("model", ["maskrcnn", "panoptic_fpn"])
def test_ddp_training_keeps_ranks_identical_and_rank0_writes(two_ranks, model):
    a, b = two_ranks
    assert a[model]["steps"] == b[model]["steps"] == 2  # 4 images / 2 ranks / batch 1
    for k, v in a[f"{model}_state"].items():
        assert torch.equal(v, b[f"{model}_state"][k]), k  # parameters and BN statistics
    run = a["work"] / model
    ck = torch.load(run / "last.pt", weights_only=False)
    assert not any(k.startswith("module.") for k in ck["state_dict"])
    for k, v in a[f"{model}_state"].items():
        assert torch.equal(ck["state_dict"][k], v), k
    assert sorted(p.name for p in run.glob("step_*.pt")) == ["step_1.pt", "step_2.pt"]
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["step"] == 2
    # both ranks logged the same mean losses and got the metrics of the whole val split
    assert without_times(a[model]["last"]) == without_times(b[model]["last"])


def test_ddp_validation_metrics_equal_one_process_on_the_saved_model(two_ranks, data):
    from pixelwise.engine.evaluate import evaluate_checkpoint

    run = two_ranks[0]["work"]
    rec = two_ranks[0]["panoptic_fpn"]["last"]
    m = evaluate_checkpoint(run / "panoptic_fpn" / "last.pt", data, "val", batch_size=1, num_workers=0,
                            device="cpu", progress=False)
    p = m["panoptic"]
    assert [rec[k] for k in ("pq", "sq", "rq", "pq_th", "pq_st")] == [
        p["All"]["pq"], p["All"]["sq"], p["All"]["rq"], p["Things"]["pq"], p["Stuff"]["pq"]]
    assert rec["mask_AP"] == m["segm"]["AP"]
    rec = two_ranks[0]["maskrcnn"]["last"]
    m = evaluate_checkpoint(run / "maskrcnn" / "last.pt", data, "val", batch_size=1, num_workers=0, device="cpu",
                            progress=False)
    assert {k: rec[f"mask_{k}"] for k in m["segm"]} == m["segm"]
    assert {k: rec[f"box_{k}"] for k in m["bbox"]} == m["bbox"]


@pytest.mark.parametrize("model", ["maskrcnn", "panoptic_fpn"])
def test_sharded_evaluation_of_a_fixed_model_equals_one_process_exactly(two_ranks, data, model):
    single = evaluate_fixed(model, data, sharded=False)
    assert single["num_images"] == NUM_VAL
    assert 0.1 < single["segm"]["AP"] < 0.9  # neither 0 nor 1: every image counts
    if model == "panoptic_fpn":
        assert 0.1 < single["panoptic"]["All"]["pq"] < 0.9
        stat = single["stat"]
        assert sum(stat["tp"]) > 0 and sum(stat["fp"]) > 0 and sum(stat["fn"]) > 0
    for res in two_ranks:  # json: NaN == NaN
        assert json.dumps(res[f"{model}_fixed"], sort_keys=True) == json.dumps(single, sort_keys=True)


def test_rank0_writes_tensorboard_events(two_ranks):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = two_ranks[0]["work"] / "panoptic_fpn" / "tensorboard"
    assert len(list(tb.glob("events.out.tfevents.*"))) == 1  # rank 0 only
    acc = EventAccumulator(str(tb), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    rec = json.loads((two_ranks[0]["work"] / "panoptic_fpn" / "metrics.jsonl").read_text())
    for key, tag in (("train_loss", "train/loss"), ("train_loss_semantic", "train/loss_semantic"), ("pq", "val/pq"),
                     ("mask_AP", "val/mask_AP")):
        assert [(e.step, e.value) for e in acc.Scalars(tag)] == [(2, pytest.approx(rec[key]))], tag
    assert set(acc.Tags()["images"]) == {f"val/predictions/{i}" for i in range(NUM_VAL)}
    im = acc.Images("val/predictions/0")[0]
    assert (im.step, im.width, im.height) == (2, 2 * 64 + 4, 64)  # image | prediction


def test_the_detection_loop_rejects_a_padding_sampler_in_evaluation(data):
    from torch.utils.data import DistributedSampler

    from pixelwise.engine.instance import _loader, evaluate_instance_model

    ds = val_set("maskrcnn", data)
    loader = _loader(ds, 1, False, 0, sampler=DistributedSampler(ds, num_replicas=2, rank=0, shuffle=False))
    with pytest.raises(ValueError, match="shard_sampler"):
        evaluate_instance_model(Oracle(ds, panoptic=False), loader, ds.category_ids, ds.annotation_file)


# ---------------------------------------------------------------------------------------
# step checkpoints and mid-epoch resume (one process)
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory) -> Path:
    """Mask R-CNN, 2 epochs x 2 steps, a step checkpoint every step, TensorBoard on."""
    from pixelwise.engine.train import train

    out = tmp_path_factory.mktemp("straight") / "run"
    result = train(config("maskrcnn", data, out, epochs=2, batch_size=2, checkpoint_every=1, keep_last=3,
                          tensorboard=True))
    assert result["steps"] == 4
    return out


def records(run: Path) -> list[dict]:
    return [without_times(json.loads(x)) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_resume_from_a_mid_epoch_step_checkpoint_gives_the_uninterrupted_result(straight, data, tmp_path):
    from pixelwise.engine.checkpoint import load_checkpoint, step_checkpoints
    from pixelwise.engine.train import train

    assert [n for n, _ in step_checkpoints(straight)] == [2, 3, 4]  # keep_last = 3
    mid = load_checkpoint(straight / "step_3.pt")
    assert mid["epoch"] == 1 and mid["epoch_progress"]["batches"] == 1  # the middle of epoch 2
    # the run as killed right after writing step_3.pt (last.pt still the end of epoch 1)
    killed = tmp_path / "killed"
    killed.mkdir()
    shutil.copy(straight / "step_3.pt", killed / "step_3.pt")
    shutil.copy(straight / "config.json", killed / "config.json")
    (killed / "metrics.jsonl").write_text((straight / "metrics.jsonl").read_text().splitlines()[0] + "\n")
    result = train(config("maskrcnn", data, killed, epochs=2, batch_size=2, checkpoint_every=1, keep_last=3,
                          resume=True))
    assert result["steps"] == 4
    a, b = load_checkpoint(straight / "last.pt"), load_checkpoint(killed / "last.pt")
    assert b["step"] == 4 and "epoch_progress" not in b
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k
    assert records(killed) == records(straight)  # the same losses (running sums restored) and metrics
    assert [n for n, _ in step_checkpoints(killed)] == [3, 4]


def test_detection_run_writes_tensorboard_events(straight):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(straight / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    recs = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    assert [(e.step, e.value) for e in acc.Scalars("train/loss_mask")] == [
        (r["step"], pytest.approx(r["train_loss_mask"])) for r in recs]
    assert [e.step for e in acc.Scalars("val/mask_AP")] == [2, 4]
    assert [e.step for e in acc.Images("val/predictions/2")] == [2, 4]


# ---------------------------------------------------------------------------------------
# bad samples
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def broken(data, tmp_path_factory) -> Path:
    """The data with one truncated train image and one truncated val image."""
    root = tmp_path_factory.mktemp("broken") / "shapes"
    shutil.copytree(data, root)
    for name in ("train_00001.png", "val_00001.png"):
        f = root / "JPEGImages" / name
        f.write_bytes(f.read_bytes()[:60])
    return root


def test_detection_training_skips_bad_samples(broken, tmp_path):
    from pixelwise.engine.train import train
    from pixelwise.errors import DataError

    with pytest.raises(DataError, match="train_00001.png"):  # default: the first bad sample stops training
        train(config("maskrcnn", broken, tmp_path / "strict"))
    out = tmp_path / "skip"
    result = train(config("maskrcnn", broken, out, skip_bad_samples=True))
    assert result["steps"] == NUM_TRAIN - 1
    report = json.loads((out / "skipped_samples.json").read_text())
    assert report["train"]["count"] == 1 and report["val"]["count"] == 1
    assert report["val"]["samples"][0]["file"].endswith("val_00001.png")


@pytest.mark.parametrize("model", ["maskrcnn", "panoptic_fpn"])
def test_detection_evaluation_skips_bad_samples(two_ranks, broken, model, tmp_path):
    from pixelwise.engine.evaluate import evaluate_checkpoint
    from pixelwise.errors import DataError

    ckpt = two_ranks[0]["work"] / model / "last.pt"
    kw = dict(batch_size=1, num_workers=0, device="cpu", progress=False)
    with pytest.raises(DataError, match="val_00001.png"):
        evaluate_checkpoint(ckpt, broken, "val", out=tmp_path / "strict.json", **kw)
    m = evaluate_checkpoint(ckpt, broken, "val", out=tmp_path / "m.json", skip_bad_samples=True, **kw)
    assert m["num_images"] == NUM_VAL - 1
    assert m["skipped_samples"]["count"] == 1 and m["skipped_samples"]["total"] == NUM_VAL
    assert json.loads((tmp_path / "m.json").read_text())["skipped_samples"]["count"] == 1


# ---------------------------------------------------------------------------------------
# mixed precision
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["unet", "maskrcnn"])
@pytest.mark.parametrize("amp", [True, False])
def test_every_training_step_runs_under_the_amp_context(data, tmp_path, monkeypatch, model, amp):
    """Both loops run each forward + loss inside ``dist.autocast(device, cfg.amp)`` (bf16 on
    CUDA, nothing on the CPU), so ``amp`` reaches every step of every task."""
    from pixelwise.engine import distributed as dist
    from pixelwise.engine.train import train

    calls = []
    real = dist.autocast

    def spy(device, enabled=True):
        calls.append((torch.device(device).type, enabled))
        return real(device, enabled)

    monkeypatch.setattr(dist, "autocast", spy)
    if model == "unet":
        from pixelwise.engine.config import load_config

        cfg = load_config(None, {"model": "unet", "model_kwargs": {"width": 0.0625}, "data": str(data),
                                 "out": str(tmp_path / "run"), "epochs": 1, "batch_size": 2, "num_workers": 0,
                                 "progress": False, "threads": 1, "device": "cpu", "amp": amp})
    else:
        cfg = config(model, data, tmp_path / "run", amp=amp)
    result = train(cfg)
    assert result["steps"] >= 1
    assert calls == [("cpu", amp)] * result["steps"]  # once per step, and only there
