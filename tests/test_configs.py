"""configs/: every YAML loads, names a registered model whose options it builds with; every
registered model has a shapes config (built and run once on a tiny input), a paper-recipe
config, and configs for the real datasets where it fits."""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from pixelwise.engine.config import load_config
from pixelwise.models import build_model, list_models, model_info

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
ALL = sorted(CONFIGS.rglob("*.yaml"))
SHAPES = sorted(CONFIGS.glob("*_shapes.yaml"))
PAPER = sorted((CONFIGS / "paper").glob("*.yaml"))
SHAPES_STUFF = 3  # sky, grass, water (pixelwise.data.synthetic); things: circle, rectangle, triangle


def _kwargs(cfg) -> dict:
    kw = dict(cfg.model_kwargs)
    if cfg.image_mode == "L":  # as the training loops do
        kw.setdefault("in_channels", 1)
    if model_info(cfg.model).task == "panoptic":  # the engine derives these from the dataset
        kw.setdefault("num_stuff", SHAPES_STUFF)
    return kw


def _name(p: Path) -> str:
    return str(p.relative_to(CONFIGS))


def test_the_config_folder_is_complete():
    assert len(ALL) >= 40 and len(PAPER) == len(list_models())
    models = list_models()
    for m in models:
        assert (CONFIGS / f"{m}_shapes.yaml").is_file(), f"no configs/{m}_shapes.yaml"
        assert (CONFIGS / "paper" / f"{m}.yaml").is_file(), f"no configs/paper/{m}.yaml"
    # the real importers: every semantic model and Mask R-CNN on both (panoptic data: not imported yet)
    for m in list_models("semantic") + ["maskrcnn"]:
        for data in ("stardist", "histolytics"):
            assert (CONFIGS / f"{m}_{data}.yaml").is_file(), f"no configs/{m}_{data}.yaml"


@pytest.mark.parametrize("path", ALL, ids=_name)
def test_every_config_loads_and_builds(path):
    """load_config accepts it, the model is registered, and its options build the model
    (on the meta device: no memory, no weights, milliseconds even for ResNet-101)."""
    cfg = load_config(path)
    assert cfg.model in list_models(), f"{path.name}: unknown model {cfg.model!r}"
    text = path.read_text()
    assert text.startswith("#"), f"{path.name}: starts without a comment saying what it is"
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")  # packaged ImageNet weights copied into meta tensors: a no-op
        model = build_model(cfg.model, 6, **_kwargs(cfg))
    assert sum(p.numel() for p in model.parameters()) > 0


@pytest.mark.parametrize("path", PAPER, ids=_name)
def test_paper_configs_cite_the_paper_and_name_the_data_to_set(path):
    cfg = load_config(path)
    header = "".join(line for line in path.read_text().splitlines(keepends=True) if line.startswith("#"))
    assert path.stem == cfg.model
    assert "Paper recipe" in header and "§" in header, "cite the paper and its section"
    assert "--set data=" in header and cfg.data.startswith("/path/to/"), "say which dataset path to set"
    assert cfg.out == f"runs/paper/{cfg.model}"
    assert cfg.batch_size >= 1 and cfg.epochs >= 1 and cfg.lr > 0 and cfg.optimizer == "sgd"


@pytest.mark.parametrize("path", SHAPES, ids=_name)
def test_shapes_configs_build_and_run_one_forward(path):
    cfg = load_config(path)
    model = build_model(cfg.model, 6, **_kwargs(cfg)).eval()
    task = model_info(cfg.model).task
    torch.manual_seed(0)
    with torch.inference_mode():
        if task == "semantic":
            size = 64
            if hasattr(model, "valid_input_sizes"):  # unet_original: a valid tile, output = its valid centre
                size = model.valid_input_sizes(model.output_margin + 16, model.output_margin + 200)[0]
            out = model(torch.rand(1, 3, size, size))
            out = out["out"] if isinstance(out, dict) else out
            side = model.output_size(size) if hasattr(model, "output_size") else size
            assert out.shape == (1, 6, side, side) and torch.isfinite(out).all()
        else:
            (out,) = model([torch.rand(3, 64, 64)])
            assert {"boxes", "labels", "scores", "masks"} <= set(out)
            assert out["masks"].shape[-2:] == (64, 64)
            if task == "panoptic":
                assert out["panoptic"].shape == (64, 64) and isinstance(out["segments_info"], list)
