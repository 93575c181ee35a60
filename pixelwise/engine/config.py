"""Training configuration: one flat set of keys shared by YAML config files and CLI flags.

Precedence: built-in defaults < ``--config FILE.yaml`` < explicit command-line flags.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pixelwise.errors import PixelwiseError

__all__ = ["TrainConfig", "load_config"]


@dataclass
class TrainConfig:
    model: str = "fcn8s"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    data: str = ""
    out: str = "runs/train"
    train_split: str = "train"
    val_split: str = "val"
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
    num_workers: int = 1
    seed: int = 0
    time_limit: float | None = None  # seconds; training stops after the epoch that passes it
    eval_every: int = 1
    device: str = "auto"  # auto | cpu | cuda
    threads: int | None = None
    resume: bool = False
    progress: bool = True

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
