"""Shared fixtures of the tests/test_predict_*.py files: a tiny trained semantic checkpoint and
input folders of several image sizes."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

TINY = {"model": "fcn8s", "model_kwargs": {"width": 0.125, "backbone": "vgg16_bn"}, "epochs": 2, "batch_size": 4,
        "lr": 0.003, "optimizer": "adamw", "num_workers": 0, "progress": False}


def train_semantic(data: Path, out: Path) -> Path:
    """A 2-epoch fcn8s on the synthetic shapes (seconds); returns its last.pt."""
    from pixelwise.engine.config import load_config
    from pixelwise.engine.train import train

    train(load_config(None, {**TINY, "data": str(data), "out": str(out)}))
    return out / "last.pt"


def mixed_sizes(src: Path, dst: Path, sizes=((48, 48), (48, 48), (40, 56), (48, 48), (40, 56), (33, 45),
                                             (48, 48))) -> list[Path]:
    """Images of several sizes (crops of the shapes images, so the model sees shapes) in ``dst``."""
    dst.mkdir(parents=True, exist_ok=True)
    srcs = sorted(src.iterdir())
    files = []
    for k, (h, w) in enumerate(sizes):
        a = np.asarray(Image.open(srcs[k % len(srcs)]).convert("RGB"))
        big = np.pad(a, ((0, max(0, h - a.shape[0])), (0, max(0, w - a.shape[1])), (0, 0)), mode="reflect")
        f = dst / f"im{k}.png"
        Image.fromarray(np.ascontiguousarray(big[:h, :w])).save(f)
        files.append(f)
    return files


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Every file below ``root`` (relative POSIX path -> bytes)."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def semantic_checkpoint(path: Path, num_classes: int = 6) -> Path:
    """A seeded, untrained U-Net (width 1/16) whose BatchNorm layers hold non-trivial statistics,
    so its labels vary over an image and conv+BN folding changes its arithmetic; saved as a
    checkpoint with the shapes classes (no training: a second)."""
    import torch

    from pixelwise.data.synthetic import SHAPES_CLASSES
    from pixelwise.engine.checkpoint import save_checkpoint
    from pixelwise.models.registry import build_model

    torch.manual_seed(0)
    m = build_model("unet", num_classes, width=0.0625).eval()
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.2, 0.2)
                mod.running_var.uniform_(0.5, 2.0)
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.3, 0.3)
    classes = [{"id": c.id, "name": c.name, "color": list(c.color)} for c in SHAPES_CLASSES[:num_classes]]
    save_checkpoint(path, {"model": m.pixelwise_spec, "state_dict": m.state_dict(), "classes": classes,
                           "normalization": {"mean": [0.5] * 3, "std": [0.25] * 3, "image_mode": "RGB"},
                           "config": {}, "epoch": 0, "step": 0, "metrics": {}})
    return path
