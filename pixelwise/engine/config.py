"""Training configuration: one flat set of keys shared by YAML config files and CLI flags.

Precedence: built-in defaults < ``--config FILE.yaml`` < explicit command-line flags
(``--model-arg`` merges into ``model_kwargs``) < ``--set KEY=VALUE`` (:func:`apply_overrides`;
any key, dotted keys reach into mappings: ``--set model_kwargs.backbone=resnet18``). The
resolved config is saved as ``RUN/config.json`` and in every checkpoint (``config``).
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from pixelwise.errors import PixelwiseError

__all__ = ["TrainConfig", "load_config", "apply_overrides", "parse_set"]


@dataclass
class TrainConfig:
    model: str = "fcn8s"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    data: str = ""
    out: str = "runs/train"
    train_split: str = "train"
    val_split: str = "val"
    val_fraction: float = 0.2  # share of the images held out as val where the data has no split (a fixed seed: same split every run)
    colors: str | None = None  # colour table of RGB masks: JSON {"name": [r, g, b]} or CVAT labelmap.txt
    epochs: int = 10
    batch_size: int = 8
    lr: float = 0.01
    optimizer: str = "sgd"  # sgd | adamw
    momentum: float = 0.9
    weight_decay: float = 1e-4
    poly_power: float = 0.9  # poly LR: lr * (1 - step / total_steps) ** power
    warmup_steps: int = 0
    loss: str = "ce"  # ce | weighted_ce | dice | ce_dice
    class_weights: Any = None  # None | "median_frequency" | list of floats
    aux_weight: float = 0.4
    crop_size: int | None = None
    scale_min: float = 0.5
    scale_max: float = 2.0
    flip: bool = True
    elastic: Any = None  # None | true (U-Net: 3x3 grid, std 10 px) | {sigma, grid, p, interpolation}
    weight_map: dict[str, Any] | None = None  # U-Net border weights {w0: 10, sigma: 5, class_balance: balanced}
    repeat: int = 1  # visit every training image this many times per epoch (few large images)
    image_mode: str = "RGB"  # RGB | L
    mean: list[float] | None = None
    std: list[float] | None = None
    num_workers: int | None = None  # DataLoader workers; None = auto (inference.default_num_workers: min(2, cores - 1))
    seed: int = 0
    time_limit: float | None = None  # seconds of training; it stops at the first step past it (then evaluates)
    time_schedule: bool = True  # with a time_limit, the poly LR reaches 0 at the limit if that comes before the last step
    eval_every: int = 1
    device: str = "auto"  # auto | cpu | cuda
    threads: int | None = None
    resume: bool = False
    checkpoint_every: int = 0  # also write step_{N}.pt (and last.pt) every N steps; 0 = at epoch ends only
    keep_last: int = 3  # step checkpoints kept (the newest); 0 keeps all
    deterministic: bool = False  # deterministic kernels: a resumed run ends like an uninterrupted one
    amp: bool = True  # bf16 autocast on CUDA (no effect on the CPU)
    grad_clip: float | None = None  # max gradient norm; null = the task's default (instance/panoptic 10, semantic off); 0 = off
    skip_bad_samples: bool = False  # leave out (and count) samples whose files raise a DataError
    tensorboard: bool = False  # also log scalars and a few images to RUN/tensorboard (engine/loggers.py)
    progress: bool = True
    overwrite: bool = False  # train into a folder that holds another run, replacing it
    init_from: str | None = None  # start from foreign weights: "torchvision:ARCH:WEIGHTS.pth" (fine-tuning)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Defaults, then the YAML file, then ``overrides`` (keys with value None are skipped)."""
    values: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise PixelwiseError(f"{p}: cannot read config ({e})") from None
        if not isinstance(loaded, dict):
            raise PixelwiseError(f"{p}: a config must be a mapping of keys to values")
        values.update(loaded)
    for k, v in (overrides or {}).items():
        if v is not None:
            values[k] = v
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise PixelwiseError(f"unknown config key(s): {', '.join(unknown)}; valid keys: {', '.join(sorted(known))}")
    return TrainConfig(**values)


_NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def parse_set(text: str) -> tuple[list[str], Any]:
    """``"KEY=VALUE"`` -> (key path, value). The key is split at dots
    (``model_kwargs.backbone``); the value is read as YAML: ``0.02``, ``1e-3``, ``true``,
    ``null`` (or nothing), ``[2, 4, 6]``, ``{w0: 10, sigma: 5}``, else a string."""
    if "=" not in text:
        raise PixelwiseError(f"--set {text!r}: expected KEY=VALUE, e.g. --set lr=0.02")
    key, raw = text.split("=", 1)
    path = [k.strip() for k in key.strip().split(".")]
    if not all(path):
        raise PixelwiseError(f"--set {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise PixelwiseError(f"--set {text!r}: the value is not valid YAML ({str(e).splitlines()[0]})") from None
    if isinstance(value, str) and _NUMBER.match(value.strip()):  # YAML 1.1 reads 1e-3 as a string
        value = float(value)
    return path, value


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else None  # type: ignore[misc]


def _typed(name: str, value: Any, default: Any, text: str) -> Any:
    """``value`` checked against the type of the key's default (keys whose default is None take anything)."""
    def bad(kind: str) -> PixelwiseError:
        return PixelwiseError(f"--set {text}: {name} takes {kind}, got {value!r}")

    if default is None:
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise bad("a whole number")
        return int(value)
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        return float(value)
    if isinstance(default, str):
        if isinstance(value, (dict, list)) or value is None:
            raise bad("a string")
        return value if isinstance(value, str) else str(value)
    if isinstance(default, dict) and not isinstance(value, dict):
        raise bad("a mapping, e.g. {backbone: resnet18}")
    return value


def apply_overrides(cfg: TrainConfig, sets: Sequence[str]) -> TrainConfig:
    """A copy of ``cfg`` with ``--set KEY=VALUE`` overrides applied in order (the last word
    of the precedence chain). ``KEY`` is any :class:`TrainConfig` key, or a dotted path into
    a mapping-valued key (``model_kwargs.backbone=resnet18``, ``weight_map.w0=5``; missing
    mappings are created). Unknown keys and values of the wrong type are rejected."""
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    values = cfg.to_dict()
    for text in sets:
        path, value = parse_set(text)
        name = path[0]
        if name not in fields:
            raise PixelwiseError(f"--set {text}: unknown config key {name!r}; valid keys: {', '.join(sorted(fields))}")
        if len(path) == 1:
            values[name] = _typed(name, value, _default_of(fields[name]), text)
            continue
        node = values
        for depth, key in enumerate(path[:-1]):
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            if not isinstance(child, dict):
                where = ".".join(path[: depth + 1])
                raise PixelwiseError(f"--set {text}: {where} is {child!r}, not a mapping; set it whole "
                                     f"(--set {where}=VALUE)")
            node = child
        node[path[-1]] = value
    return TrainConfig(**values)
