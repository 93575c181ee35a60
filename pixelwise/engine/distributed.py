"""Data-parallel training under ``torchrun``: plain functions over PyTorch's own machinery.

``torchrun --nproc-per-node=N -m pixelwise train ...`` (and ``--nnodes/--rdzv-*`` across
machines) starts N processes with ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``
and ``MASTER_PORT`` in their environment. :func:`init_distributed` reads them, joins the
process group (``nccl`` on CUDA, ``gloo`` on the CPU) and returns the process's device
(``cuda:LOCAL_RANK`` or the CPU). Without those variables every function here is a no-op
that behaves like a world of one process, so a training loop is written once:

- the model: :func:`wrap_model` (``DistributedDataParallel``; ``SyncBatchNorm`` on CUDA
  only, since it has no CPU kernels) and :func:`unwrap_model` for the state dict, which is
  saved without DDP's ``module.`` prefix;
- training data: :func:`distributed_sampler` gives each rank a disjoint, equally long share
  of one seeded permutation per epoch (``set_epoch(epoch, skip=k)`` also starts an epoch
  after the first k samples, to resume mid-epoch);
- evaluation data: :func:`shard_sampler` gives each rank a contiguous block of the split,
  with NO padding (PyTorch's ``DistributedSampler`` repeats samples to even out the ranks,
  which would count them twice in a metric). Rank order = dataset order, so gathered
  per-sample results come back in the order of a single-process run;
- reductions: :func:`all_reduce_sum` (confusion matrices, counts), :func:`gather_objects`
  (COCO results, PQ statistics), :func:`broadcast_object`, :func:`step_sync` (the one sync
  of a training step: loss averaged over ranks + "any rank wants to stop";
  :func:`step_sync_values` for several loss terms at once), :func:`run_on_main` (a
  computation done once, on rank 0, whose result every rank gets);
- :func:`is_main` guards logging, progress bars and checkpoint writes (rank 0 only).
"""
from __future__ import annotations

import atexit
import contextlib
import datetime
import itertools
import os
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DistributedSampler, Sampler

from pixelwise.errors import PixelwiseError

__all__ = [
    "init_distributed", "cleanup", "is_distributed", "rank", "local_rank", "world_size", "is_main", "barrier",
    "wrap_model", "unwrap_model", "sync_buffers", "distributed_sampler", "EpochSampler", "shard_sampler",
    "ShardSampler", "is_sharded_eval", "all_reduce_sum", "gather_objects", "broadcast_object", "step_sync", "step_sync_values",
    "run_on_main", "autocast", "launched_by_torchrun",
]

_OWNED = False  # True when init_distributed created the process group (cleanup then destroys it)


def launched_by_torchrun() -> bool:
    """True when the environment describes a world of more than one process (torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed(device: str | torch.device = "auto", timeout_s: float = 1800.0) -> torch.device:
    """Join the process group described by torchrun's environment and return this process's device.

    ``device``: ``auto`` (CUDA when available), ``cpu`` or ``cuda``. Under torchrun a CUDA
    process uses ``cuda:LOCAL_RANK`` and the ``nccl`` backend; a CPU process uses ``gloo``.
    Without torchrun's variables (``WORLD_SIZE`` unset or 1) nothing is initialised and the
    device is returned as resolved. Calling it again reuses an existing group.
    """
    global _OWNED
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    if not launched_by_torchrun():
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise PixelwiseError("--device cuda under torchrun, but CUDA is not available on this machine")
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise PixelwiseError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {', '.join(missing)} not set: "
                                 "start distributed training with torchrun")
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, init_method="env://",
                                timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=dev if dev.type == "cuda" else None)
        _OWNED = True
        atexit.register(cleanup)  # leave the group cleanly however the process ends
    return dev


def cleanup() -> None:
    """Leave the process group, if :func:`init_distributed` created it."""
    global _OWNED
    if _OWNED and dist.is_initialized():
        dist.destroy_process_group()
    _OWNED = False


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0")) if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Rank 0, the one process that logs and writes files (always True without torchrun)."""
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def wrap_model(model: nn.Module, device: torch.device, find_unused_parameters: bool = False) -> nn.Module:
    """``DistributedDataParallel(model)`` in a group of several processes, else ``model`` itself.

    On CUDA, batch norm layers become ``SyncBatchNorm`` first (statistics over the global
    batch); on the CPU they stay per-process (SyncBatchNorm has no CPU implementation), and
    :func:`sync_buffers` makes their running statistics equal before evaluation/saving.
    Detection models that skip a head on some batches need ``find_unused_parameters=True``.
    """
    if not is_distributed():
        return model
    if device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return nn.parallel.DistributedDataParallel(model, device_ids=[device.index], output_device=device.index,
                                                   find_unused_parameters=find_unused_parameters)
    return nn.parallel.DistributedDataParallel(model, find_unused_parameters=find_unused_parameters)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (its ``state_dict`` has no ``module.`` prefix)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


@torch.no_grad()
def sync_buffers(model: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s buffers (batch-norm running statistics) to every rank.

    DDP broadcasts buffers at the start of each training forward, but the forward itself then
    updates them with the rank's own batch, so after the last step they differ by rank (on
    the CPU, without SyncBatchNorm). Call this before evaluating or saving.
    """
    if not is_distributed():
        return
    for b in unwrap_model(model).buffers():
        dist.broadcast(b, src)


class EpochSampler(DistributedSampler):
    """This rank's share of one seeded permutation per epoch (PyTorch's DistributedSampler),
    optionally starting after the first ``skip`` of its samples (resuming mid-epoch).

    The permutation depends only on ``(seed, epoch)``, so a resumed run sees the same order."""

    def __init__(self, dataset, num_replicas: int, rank: int, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=drop_last)
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Select the epoch's permutation; the next iteration leaves out its first ``skip`` samples."""
        super().set_epoch(epoch)
        if skip < 0 or skip > self.num_samples:
            raise ValueError(f"skip must be in [0, {self.num_samples}], got {skip}")
        self.skip = int(skip)

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(super().__iter__(), self.skip, None)

    def __len__(self) -> int:
        return self.num_samples - self.skip


def distributed_sampler(dataset, shuffle: bool = True, seed: int = 0, drop_last: bool = False) -> EpochSampler:
    """The training sampler of this rank (a world of one without torchrun); call
    ``set_epoch(epoch)`` before each epoch. Every rank gets the same number of samples (the
    permutation is padded by repeating its start, or cut with ``drop_last``), which DDP needs."""
    return EpochSampler(dataset, num_replicas=world_size(), rank=rank(), shuffle=shuffle, seed=seed,
                        drop_last=drop_last)


class ShardSampler(Sampler[int]):
    """Contiguous block ``rank`` of ``num_replicas`` near-equal blocks of ``range(n)``, no padding:
    every index is visited by exactly one rank, and concatenating the ranks' blocks in rank
    order gives ``range(n)``."""

    def __init__(self, n: int, num_replicas: int, rank: int) -> None:
        self.n, self.num_replicas, self.rank = int(n), int(num_replicas), int(rank)
        self.start = self.n * self.rank // self.num_replicas
        self.stop = self.n * (self.rank + 1) // self.num_replicas

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, self.stop))

    def __len__(self) -> int:
        return self.stop - self.start


def shard_sampler(dataset) -> ShardSampler:
    """This rank's evaluation shard of ``dataset`` (all of it without torchrun)."""
    return ShardSampler(len(dataset), world_size(), rank())


def is_sharded_eval(loader: Any, fn: str) -> bool:
    """True when ``loader`` holds this rank's block of the split under torchrun (a
    :class:`ShardSampler`), so the evaluation ``fn`` must combine every rank's part; a padding
    ``DistributedSampler`` (samples counted twice) is refused."""
    sampler = getattr(loader, "sampler", None)
    if isinstance(sampler, DistributedSampler) and sampler.num_replicas > 1:
        raise ValueError(f"{fn}: a DistributedSampler repeats samples to even out the ranks; "
                         "evaluate with pixelwise.engine.distributed.shard_sampler(dataset)")
    return isinstance(sampler, ShardSampler) and is_distributed()


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all ranks, in place (also returned); the identity without torchrun.
    Works for CPU tensors under nccl too (copied to the GPU and back)."""
    if not is_distributed():
        return tensor
    dev = _comm_device()
    if tensor.device == dev:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor
    t = tensor.to(dev)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    tensor.copy_(t)
    return tensor


def gather_objects(items: Sequence[Any]) -> list[Any]:
    """Concatenate every rank's list of picklable objects, in rank order (``items`` itself
    as a list without torchrun). With :func:`shard_sampler` shards this restores dataset order."""
    if not is_distributed():
        return list(items)
    parts: list[Any] = [None] * world_size()
    dist.all_gather_object(parts, list(items))
    return [x for part in parts for x in part]


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (e.g. the checkpoint rank 0 resumes from)."""
    if not is_distributed():
        return obj
    box = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src=src, device=_comm_device())
    return box[0]


def step_sync(loss: torch.Tensor, stop: bool = False) -> tuple[float, bool]:
    """The training step's one host sync: ``(loss averaged over ranks, any rank wants to stop)``.

    Every rank must take the same branch after a NaN loss or a time limit, or the others
    would wait forever in the next all-reduce; a NaN on one rank makes the mean NaN on all.
    """
    if not is_distributed():
        return float(loss.detach()), stop
    t = torch.stack([loss.detach().float().reshape(()), torch.tensor(float(stop), device=loss.device)])
    all_reduce_sum(t)
    total, stops = t.tolist()
    return total / world_size(), stops > 0


def step_sync_values(values: torch.Tensor, stop: bool = False) -> tuple[list[float], bool]:
    """:func:`step_sync` for several numbers at once (e.g. a detection model's loss terms):
    ``(each averaged over ranks, any rank wants to stop)``, still in one host sync."""
    v = values.detach().float().reshape(-1)
    if not is_distributed():
        return v.tolist(), stop
    t = torch.cat([v, torch.tensor([float(stop)], device=v.device)])
    all_reduce_sum(t)
    *totals, stops = t.tolist()
    return [x / world_size() for x in totals], stops > 0


def run_on_main(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` computed on rank 0 only, its result broadcast to every rank (an
    error too: the other ranks raise a PixelwiseError naming it rather than wait forever). E.g.
    COCOeval over the gathered detections, done once instead of once per rank."""
    if not is_distributed():
        return fn(*args, **kwargs)
    if not is_main():
        ok, value = broadcast_object(None)
        if not ok:
            raise PixelwiseError(f"rank 0 failed: {value}")
        return value
    try:
        value = fn(*args, **kwargs)
    except Exception as e:
        broadcast_object((False, f"{type(e).__name__}: {e}"))
        raise
    broadcast_object((True, value))
    return value


def autocast(device: torch.device, enabled: bool = True) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; a no-op context on the CPU (or with ``enabled=False``)."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
