"""``pixelwise models``: a table of registered models, their parameters and GFLOPs."""
from __future__ import annotations

from typing import Callable

import torch

from pixelwise.models.registry import build_model, list_models, model_info

__all__ = ["count_parameters", "count_flops", "models_table"]


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_flops(model: torch.nn.Module, size: int | tuple[int, int], in_channels: int = 3) -> float:
    """FLOPs (2 x multiply-adds) of one eval forward of a (1, C, H, W) input, via torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    h, w = (size, size) if isinstance(size, int) else size
    dev = next(model.parameters()).device
    x = torch.zeros(1, in_channels, h, w, device=dev)
    model.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return float(counter.get_total_flops())


def models_table(size: int = 512, flops: bool = True, num_classes: int = 21,
                 batch_input: Callable[[str], bool] | None = None) -> str:
    """One line per registered model: name, task, parameters (M), GFLOPs at ``size`` (meta device: no
    compute) for the models that ``batch_input(name)`` says take a (1, C, H, W) batch (all when None)."""
    rows = [f"{'model':<18}{'task':<10}{'params (M)':>11}{'GFLOPs':>10}  {'input':<9} paper"]
    for name in list_models():
        info = model_info(name)
        with torch.device("meta"):
            model = build_model(name, num_classes)
        insize = getattr(model, "table_input_size", lambda s: s)(size)
        g = "-"
        if flops and (batch_input is None or batch_input(name)):
            try:
                g = f"{count_flops(model, insize, getattr(model, 'in_channels', 3)) / 1e9:.1f}"
            except Exception:  # an op without a meta kernel: report it instead of failing the table
                g = "n/a"
        rows.append(f"{name:<18}{info.task:<10}{count_parameters(model) / 1e6:>11.2f}{g:>10}  "
                    f"{f'{insize}x{insize}':<9} {info.paper}")
    return "\n".join(rows)
