"""Loading weights into encoders: strict loading with actionable errors, first-conv adaptation."""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn as nn

from pixelwise.errors import CheckpointError

__all__ = ["adapt_input_conv_weight", "load_state_dict_checked"]


def adapt_input_conv_weight(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """Turn an RGB first-layer kernel ``(O, 3, k, k)`` into one for ``in_channels`` inputs.

    One channel: the sum over R, G, B (a grey image fed as R = G = B then gives exactly the
    response of the RGB network). Other counts: the RGB kernels repeated cyclically and scaled
    by ``3 / in_channels`` so the expected activation magnitude is kept.
    """
    if weight.ndim != 4:
        raise ValueError(f"expected a 4-D conv weight, got shape {tuple(weight.shape)}")
    if weight.shape[1] == in_channels:
        return weight
    if in_channels == 1:
        return weight.sum(dim=1, keepdim=True)
    reps = math.ceil(in_channels / weight.shape[1])
    return weight.repeat(1, reps, 1, 1)[:, :in_channels] * (weight.shape[1] / in_channels)


def load_state_dict_checked(
    module: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    source: str = "state dict",
    ignore_prefixes: Sequence[str] = (),
) -> None:
    """Load ``state_dict`` into ``module`` strictly, except keys under ``ignore_prefixes``.

    Raises :class:`~pixelwise.errors.CheckpointError` naming ``source`` and every missing,
    unexpected and shape-mismatched key (torch's own message is hard to act on).
    """
    sd = {k: v for k, v in state_dict.items() if not any(k.startswith(p) for p in ignore_prefixes)}
    own = module.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    mismatched = [
        f"{k} (file {tuple(sd[k].shape)}, model {tuple(own[k].shape)})"
        for k in own
        if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)
    ]
    problems = []
    if mismatched:
        problems.append("shape mismatch: " + ", ".join(mismatched))
    if missing:
        problems.append("missing keys: " + _short_list(missing))
    if unexpected:
        problems.append("unexpected keys: " + _short_list(unexpected))
    if problems:
        raise CheckpointError(
            f"{source}: does not fit {type(module).__name__}: " + "; ".join(problems)
        )
    module.load_state_dict(sd, strict=True)


def _short_list(keys: Sequence[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")
