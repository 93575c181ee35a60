"""Any timm feature extractor as a pixelwise encoder: ``backbone="timm:<name>"``.

``timm.create_model(name, features_only=True, pretrained=False)`` gives the feature maps of
the network's stages; they become c1..c5 of the :class:`Encoder` contract by their nominal
strides 2, 4, 8, 16, 32. Networks whose first feature is at stride 4 (ConvNeXt, most
transformers with a patch-4 stem) get an empty (0-channel) c1, as smp does, so that every
decoder can be written once. Output stride 16/8 is timm's own ``output_stride=`` (dilation
of the last stages), for the families that support it.

Nothing is downloaded: weights come only from a local file, a state dict of the timm model
(``timm.create_model(name).state_dict()``, classifier included or not) read with
``weights_only=True`` and handed to timm's own loader, which maps the input conv to
``in_channels`` as it does for its hub weights.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from pixelwise.errors import CheckpointError
from pixelwise.models.backbones.base import Encoder

__all__ = ["TimmEncoder", "PREFIX", "timm_name"]

PREFIX = "timm:"
_NOMINAL = (2, 4, 8, 16, 32)


def timm_name(backbone: str) -> str | None:
    """``"resnet18"`` for ``"timm:resnet18"``; None for a pixelwise encoder name."""
    return backbone[len(PREFIX):] if backbone.startswith(PREFIX) else None


def _import_timm() -> Any:
    try:
        import timm
    except ImportError:
        raise ValueError("timm encoders need the timm package: pip install 'pixelwise[timm]'") from None
    return timm


def _check_keys(timm: Any, name: str, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """The file must hold the whole timm model (its classifier may be left out): timm loads a
    ``features_only`` model non-strictly, so a state dict of a sibling (resnet34 into resnet18)
    would otherwise load in part without a word. The reference keys come from the model built
    on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        full = timm.create_model(name, pretrained=False)
    expected = set(full.state_dict())
    heads = full.pretrained_cfg.get("classifier") or ()
    heads = (heads,) if isinstance(heads, str) else tuple(heads)
    optional = {k for k in expected if any(k.startswith(h + ".") for h in heads)}
    missing = sorted(expected - optional - set(state_dict))
    unexpected = sorted(set(state_dict) - expected)
    if missing or unexpected:
        parts = [f"{label} {len(keys)} keys ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"
                 for label, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
        raise CheckpointError(f"{source}: weights do not fit timm model {name!r} (a state dict of "
                              f"timm.create_model({name!r}) is expected): {'; '.join(parts)}")


class TimmEncoder(Encoder):
    """A timm ``features_only`` model as a five-level encoder (see the module docstring).

    Args:
        name: a timm model name (``timm.list_models()``), without the ``timm:`` prefix.
        in_channels: input channels (timm's ``in_chans``).
        output_stride: 32, 16 or 8.
        state_dict: the timm model's weights (already read from ``source``), or None for
            timm's random initialisation.
        source: where ``state_dict`` came from, for error messages.

    Raises:
        ValueError: unknown name, no features at strides 4..32, or an output stride the
            family cannot dilate to.
        CheckpointError: weights that do not fit the model.
    """

    def __init__(self, name: str, in_channels: int = 3, output_stride: int = 32,
                 state_dict: dict[str, torch.Tensor] | None = None, source: str = "weights"):
        super().__init__()
        timm = _import_timm()
        if not timm.is_model(name):
            close = timm.list_models(f"*{name.split('_')[0][:6]}*")[:8]
            hint = f"; similar: {', '.join(close)}" if close else ""
            raise ValueError(f"unknown timm model {name!r} (backbone 'timm:{name}'){hint}")
        kw: dict[str, Any] = {"features_only": True, "in_chans": int(in_channels)}
        if output_stride != 32:
            kw["output_stride"] = int(output_stride)
        if state_dict is not None:
            _check_keys(timm, name, state_dict, source)
            # timm's loader takes the state dict as it takes its hub weights (in_chans adapted,
            # checkpoint filters applied); it may edit the dict, hence the copy
            kw.update(pretrained=True, pretrained_cfg_overlay={"state_dict": dict(state_dict)})
        try:
            model = timm.create_model(name, **kw)
        except RuntimeError as e:
            if state_dict is not None and "state_dict" in str(e):
                lines = [x.strip() for x in str(e).strip().splitlines() if x.strip()]
                raise CheckpointError(f"{source}: weights do not fit timm model {name!r}: "
                                      f"{'; '.join(lines[1:3]) or lines[0]}"[:400]) from None
            raise ValueError(f"timm model {name!r} cannot be built as an encoder: {e}") from None
        except (TypeError, AssertionError, ValueError, NotImplementedError) as e:
            what = f" with output_stride={output_stride} (dilation)" if output_stride != 32 else ""
            raise ValueError(f"timm model {name!r} cannot be built as a feature encoder{what}: "
                             f"{type(e).__name__}: {e}".strip()[:400]) from None
        reductions = list(model.feature_info.reduction())
        channels = list(model.feature_info.channels())
        names = list(model.feature_info.module_name())
        first = reductions[0] if reductions else 0
        nominal = tuple(first * 2 ** i for i in range(len(reductions)))
        if nominal not in (_NOMINAL, _NOMINAL[1:]):
            raise ValueError(f"timm model {name!r} has features at strides {tuple(reductions)}; a pixelwise "
                             "encoder needs one feature map at each of the strides (2,) 4, 8, 16, 32")
        actual = tuple(min(s, output_stride) for s in nominal)
        if tuple(reductions) != actual:
            raise ValueError(f"timm model {name!r} gives features at strides {tuple(reductions)} for "
                             f"output_stride={output_stride}, expected {actual}")
        self.model = model
        self.timm_name = name
        self.in_channels = int(in_channels)
        self.empty_c1 = len(nominal) == 4  # no stride-2 feature: c1 is an empty map
        self.out_channels = tuple(([0] if self.empty_c1 else []) + channels)
        self.output_strides = ((2,) if self.empty_c1 else ()) + actual
        self.names = (("none",) if self.empty_c1 else ()) + tuple(names)
        self.pad_to = 0 if self._ceil_sized() else _NOMINAL[-1]

    def stage_modules(self) -> list[list[nn.Module]]:
        """The modules that produce c1..c5 (an empty c1 has none), in order, for freezing the
        first stages as Mask R-CNN does with a pretrained encoder."""
        def norm(name: str) -> str:  # FeatureListNet flattens ``stages.0`` into ``stages_0``
            return name.replace("_", ".")

        targets = [norm(n) for n in self.names if n != "none"]
        units = list(self.model.named_children())
        while True:  # open the containers that hold a feature module (EfficientNet's ``blocks``)
            i = next((i for i, (n, _) in enumerate(units)
                      if norm(n) not in targets and any(t.startswith(norm(n) + ".") for t in targets)), None)
            if i is None:
                break
            name, mod = units[i]
            units[i:i + 1] = [(f"{name}.{c}", m) for c, m in mod.named_children()]
        stages: list[list[nn.Module]] = [[]] if self.empty_c1 else []
        group: list[nn.Module] = []
        for name, mod in units:
            group.append(mod)
            if len(stages) - self.empty_c1 < len(targets) and norm(name) == targets[len(stages) - self.empty_c1]:
                stages.append(group)
                group = []
        if len(stages) != 5:
            raise ValueError(f"cannot tell the stages of timm model {self.timm_name!r} (for trainable_stages)")
        return stages

    def _ceil_sized(self) -> bool:
        """Whether the network gives ceil(H/s)-sized features (one eval forward of a 65x65 input,
        where ceil and floor differ at every stride)."""
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                feats = self.model(torch.zeros(1, self.in_channels, 65, 65))
        finally:
            self.model.train(was_training)
        strides = self.output_strides[1:] if self.empty_c1 else self.output_strides
        return all(tuple(f.shape[-2:]) == (math.ceil(65 / s),) * 2 for f, s in zip(feats, strides))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h, w = x.shape[-2:]
        if self.pad_to:
            x = F.pad(x, (0, (-w) % self.pad_to, 0, (-h) % self.pad_to))
        feats = list(self.model(x))
        if self.pad_to:
            strides = self.output_strides[1:] if self.empty_c1 else self.output_strides
            feats = [f[..., : math.ceil(h / s), : math.ceil(w / s)] for f, s in zip(feats, strides)]
        if self.empty_c1:
            feats.insert(0, x.new_zeros((x.shape[0], 0, math.ceil(h / 2), math.ceil(w / 2))))
        return feats
