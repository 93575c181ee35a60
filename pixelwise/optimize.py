"""Fast inference: :func:`optimize` turns a trained model into an inference-only one.

What it does, each step optional and each checked:

1. ``eval()`` and ``requires_grad_(False)`` (dropout off, BatchNorm on running statistics).
2. Conv + BatchNorm folding. Pairs are found by *running* the model once on a probe input
   with hooks: a ``BatchNorm2d`` whose input tensor is exactly the output of a ``Conv2d``
   (each called once) is folded into that conv (``w' = w * g / sqrt(v + eps)``,
   ``b' = (b - m) * g / sqrt(v + eps) + beta``) and replaced by ``nn.Identity``. This
   finds the pairs of every architecture - ``nn.Sequential`` blocks, ResNet bottlenecks,
   ASPP branches - without knowing their code.
3. ``channels_last`` weights and inputs (oneDNN's fast layout for CPU convolutions).
4. Optionally ``torch.compile`` (inductor); any failure (no compiler, an unsupported op,
   a compiled output that differs) falls back to the eager optimized model with a warning.
5. Every forward runs under ``torch.inference_mode``.

The optimized model's outputs equal the eager model's within ``atol`` (1e-4 by default):
:func:`optimize` verifies that on the probe input and undoes a step whose output differs
(a conv output also used elsewhere than by its BatchNorm, say), so it is safe on any model.
"""
from __future__ import annotations

import copy
import warnings
from typing import Any, Iterable

import torch
import torch.nn as nn

__all__ = ["optimize", "OptimizedModel", "fold_conv_bn", "find_conv_bn_pairs", "probe_input", "max_abs_diff"]


def _in_channels(model: nn.Module) -> int:
    ch = getattr(model, "in_channels", None)
    if isinstance(ch, int):
        return ch
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return m.in_channels
    return 3


def probe_input(model: nn.Module, size: int = 64, batch: int = 1) -> Any:
    """A small random input the model accepts: (batch, C, size, size) - for ``unet_original``
    the nearest valid tile size - or a list of images for detection models."""
    g = torch.Generator().manual_seed(0)
    p = next(model.parameters(), None)
    device, dtype = (p.device, p.dtype) if p is not None else (torch.device("cpu"), torch.float32)
    from pixelwise.tasks import get_task

    if get_task(getattr(model, "pixelwise_task", "semantic")).image_list_input:
        return [torch.rand(3, size * 2, size * 2, generator=g).to(device, dtype) for _ in range(batch)]
    if hasattr(model, "valid_input_sizes") and hasattr(model, "output_margin"):
        valid = model.valid_input_sizes(min_size=size, max_size=max(1024, size * 8))
        size = int(valid[0])
    return torch.randn(batch, _in_channels(model), size, size, generator=g).to(device, dtype)


# --- comparing outputs ------------------------------------------------------------------------


def _leaves(x: Any) -> Iterable[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, dict):
        for k in sorted(x, key=str):
            yield from _leaves(x[k])
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _leaves(v)


def max_abs_diff(a: Any, b: Any) -> float:
    """Largest absolute difference between two (nested) outputs; ``inf`` if their structure or
    shapes differ."""
    la, lb = list(_leaves(a)), list(_leaves(b))
    if len(la) != len(lb):
        return float("inf")
    worst = 0.0
    for x, y in zip(la, lb):
        if x.shape != y.shape:
            return float("inf")
        if x.numel():
            worst = max(worst, float((x.float() - y.float()).abs().max()))
    return worst


def _to_channels_last(x: Any) -> Any:
    if isinstance(x, torch.Tensor) and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x


def _contiguous(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.contiguous()
    if isinstance(x, dict):
        return {k: _contiguous(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_contiguous(v) for v in x]
    if isinstance(x, tuple):
        return tuple(_contiguous(v) for v in x)
    return x


# --- conv + BN folding ------------------------------------------------------------------------


def find_conv_bn_pairs(model: nn.Module, example: Any) -> list[tuple[nn.Conv2d, nn.BatchNorm2d]]:
    """(conv, bn) pairs where the BatchNorm's input is the conv's output tensor, found by one
    forward pass of ``example`` with hooks. Modules called more than once are left out."""
    produced: dict[int, tuple[nn.Module, torch.Tensor]] = {}
    calls: dict[nn.Module, int] = {}
    fed: dict[nn.Module, nn.Module | None] = {}  # bn -> conv
    handles = []

    def conv_hook(mod, args, out):
        calls[mod] = calls.get(mod, 0) + 1
        if isinstance(out, torch.Tensor):
            produced[id(out)] = (mod, out)  # keep the tensor alive: its id stays unique

    def bn_pre_hook(mod, args):
        calls[mod] = calls.get(mod, 0) + 1
        x = args[0] if args else None
        hit = produced.get(id(x)) if isinstance(x, torch.Tensor) else None
        fed[mod] = hit[0] if hit is not None and hit[1] is x else None

    for m in model.modules():
        if type(m) is nn.Conv2d or (isinstance(m, nn.Conv2d) and type(m).forward is nn.Conv2d.forward):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.BatchNorm2d):
            handles.append(m.register_forward_pre_hook(bn_pre_hook))
    try:
        with torch.inference_mode():
            model(example)
    finally:
        for h in handles:
            h.remove()
    pairs = []
    used: set[nn.Module] = set()
    for bn, conv in fed.items():
        if conv is None or calls.get(bn) != 1 or calls.get(conv) != 1 or conv in used:
            continue
        if bn.running_mean is None or bn.running_var is None:
            continue
        used.add(conv)
        pairs.append((conv, bn))
    return pairs


@torch.no_grad()
def _fold_into(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    scale = (bn.weight if bn.weight is not None else torch.ones_like(bn.running_var)) / torch.sqrt(
        bn.running_var + bn.eps)
    shift = bn.bias if bn.bias is not None else torch.zeros_like(bn.running_mean)
    w = conv.weight.double() * scale.double().view(-1, 1, 1, 1)
    b = conv.bias.double() if conv.bias is not None else torch.zeros_like(bn.running_mean, dtype=torch.float64)
    b = (b - bn.running_mean.double()) * scale.double() + shift.double()
    conv.weight = nn.Parameter(w.to(conv.weight.dtype), requires_grad=False)
    conv.bias = nn.Parameter(b.to(conv.weight.dtype), requires_grad=False)


def _replace_module(root: nn.Module, target: nn.Module, new: nn.Module) -> int:
    n = 0
    for parent in root.modules():
        for name, child in list(parent.named_children()):
            if child is target:
                setattr(parent, name, new)
                n += 1
    return n


def fold_conv_bn(model: nn.Module, example: Any | None = None) -> int:
    """Fold every BatchNorm that directly follows a conv into it, in place (model in eval
    mode). Returns the number of folded pairs. ``example``: an input for the probe pass
    (default :func:`probe_input`)."""
    if model.training:
        raise ValueError("fold_conv_bn needs a model in eval mode (BatchNorm on running statistics)")
    example = probe_input(model) if example is None else example
    pairs = find_conv_bn_pairs(model, example)
    for conv, bn in pairs:
        _fold_into(conv, bn)
        _replace_module(model, bn, nn.Identity())
    return len(pairs)


# --- the optimized model ----------------------------------------------------------------------


class OptimizedModel(nn.Module):
    """An inference-only wrapper: inputs go channels_last, the forward runs under
    ``torch.inference_mode``, outputs come back contiguous. Attributes the engine reads
    (``output_margin``, ``valid_input_sizes``, ``pixelwise_spec``...) are those of the
    wrapped model. ``report`` says what was applied."""

    def __init__(self, model: nn.Module, runner: Any, channels_last: bool, report: dict[str, Any]):
        super().__init__()
        self.model = model
        object.__setattr__(self, "_runner", runner)  # compiled callable or the model itself
        self.channels_last = channels_last
        self.report = report

    def forward(self, x: Any) -> Any:
        with torch.inference_mode():
            if self.channels_last:
                x = _to_channels_last(x)
            return _contiguous(self._runner(x))

    def train(self, mode: bool = True) -> "OptimizedModel":
        if mode:
            raise RuntimeError("an optimized model is for inference only; optimize() a fresh model after training")
        return super().train(False)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            model = super().__getattr__("model")
            return getattr(model, name)


def optimize(model: nn.Module, *, example: Any | None = None, fold: bool = True, channels_last: bool = True,
             compile: bool | str = False, inplace: bool = False, check: bool = True,
             atol: float = 1e-4) -> OptimizedModel:
    """An inference-optimized version of ``model`` (see the module docstring).

    Args:
        example: an input for the probe/verification pass (default :func:`probe_input`; give
            one of the size you will run when you compile, so the compiled graph is warmed).
        fold: fold Conv + BatchNorm pairs.
        channels_last: NHWC weights and inputs.
        compile: ``True``/``"auto"`` tries ``torch.compile`` (falls back cleanly); ``False``
            (default) stays eager - compiling takes minutes on a small CPU.
        inplace: modify ``model`` itself instead of a deep copy.
        check: compare with the eager output on ``example`` and undo steps that differ by
            more than ``atol`` (times the largest output magnitude when that exceeds 1).
    """
    report: dict[str, Any] = {"folded": 0, "channels_last": False, "compiled": False, "fallbacks": []}
    base = model if inplace else copy.deepcopy(model)
    for attr in ("pixelwise_spec", "pixelwise_task"):
        if hasattr(model, attr) and not hasattr(base, attr):
            setattr(base, attr, getattr(model, attr))
    base.eval().requires_grad_(False)
    example = probe_input(base) if example is None else example
    reference = None
    if check:
        with torch.inference_mode():
            reference = _contiguous(base(example))

    # ``atol`` is absolute for outputs of magnitude <= 1 and relative to the largest output
    # beyond (an untrained deep network's logits reach the hundreds; float32 rounding scales).
    tol = atol * max(1.0, max((float(t.abs().max()) for t in _leaves(reference) if t.numel()), default=1.0))

    def ok(out: Any) -> bool:
        return reference is None or max_abs_diff(out, reference) <= tol

    if fold:
        backup = copy.deepcopy(base) if check else None
        n = fold_conv_bn(base, example)
        with torch.inference_mode():
            good = ok(base(example))
        if good:
            report["folded"] = n
        else:
            report["fallbacks"].append("conv+bn folding changed the output; kept BatchNorm")
            base = backup  # type: ignore[assignment]
    if channels_last:
        base = base.to(memory_format=torch.channels_last)
        with torch.inference_mode():
            good = ok(base(_to_channels_last(example)))
        if good:
            report["channels_last"] = True
        else:
            report["fallbacks"].append("channels_last changed the output; kept NCHW")
            base = base.to(memory_format=torch.contiguous_format)
            channels_last = False
    runner: Any = base
    if compile:
        try:
            compiled = torch.compile(base, dynamic=False)
            with torch.inference_mode():
                x = _to_channels_last(example) if channels_last else example
                out = compiled(x)
            if not ok(out):
                raise RuntimeError(f"compiled output differs by {max_abs_diff(out, reference):.2e}")
            runner = compiled
            report["compiled"] = True
        except Exception as e:  # no C++ compiler, unsupported op, ... : stay eager
            msg = f"torch.compile unavailable, running eager ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
            report["fallbacks"].append(msg)
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
    wrapped = OptimizedModel(base, runner, channels_last, report)
    for attr in ("pixelwise_spec", "pixelwise_task"):
        if hasattr(base, attr):
            object.__setattr__(wrapped, attr, getattr(base, attr))
    return wrapped.eval()
