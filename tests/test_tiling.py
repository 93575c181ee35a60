"""Overlap-tile and sliding-window inference (no seams), test-time augmentation, connected
components, instance F1, and the engine end to end on a tiny grayscale nuclei set: weighted
CE + elastic training, unet_original training and overlap-tile evaluation, --tile/--tta flags."""
import json

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pixelwise.metrics.instance_f1 import instance_f1, match_instances
from pixelwise.models.unet import InvalidTileSizeError, UNet, UNetOriginal
from pixelwise.postprocess import (
    connected_components, overlap_tile, overlap_tile_plan, predict_probs, probabilities, sliding_window,
)
from pixelwise.data.transforms import mirror_pad

pytest.importorskip("scipy")


class Pointwise(nn.Module):
    """A 1x1 conv: every pixel's output depends on that pixel only (tiling must not change it)."""

    def __init__(self, cin: int = 3, c: int = 4) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(cin, c, 1)

    def forward(self, x):
        return self.conv(x)


def tiny_original(depth: int = 2) -> UNetOriginal:
    torch.manual_seed(0)
    return UNetOriginal(3, in_channels=1, width=1 / 16, depth=depth).eval()


@pytest.mark.parametrize("size,tile,overlap", [((50, 77), 24, 8), ((64, 64), 32, 0), ((41, 130), (20, 36), 10)])
def test_sliding_window_is_exact_for_a_pointwise_model(size, tile, overlap):
    model = Pointwise()
    x = torch.randn(2, 3, *size)
    whole = probabilities(model(x))
    tiled = sliding_window(model, x, tile, overlap)
    assert tiled.shape == whole.shape
    assert torch.allclose(tiled, whole, atol=1e-5)  # weights normalised everywhere: no seams


def test_sliding_window_with_context_agrees_with_whole_image():
    torch.manual_seed(1)
    model = UNet(3, in_channels=3, base_channels=4, depth=2).eval()
    x = torch.randn(1, 3, 96, 120)
    with torch.no_grad():
        whole = probabilities(model(x))
        tiled = sliding_window(model, x, 64, 32)
    assert tiled.shape == whole.shape
    assert (tiled.argmax(1) == whole.argmax(1)).float().mean() > 0.95
    assert torch.allclose(tiled.sum(1), torch.ones(1, 96, 120), atol=1e-5)
    with pytest.raises(ValueError):
        sliding_window(model, x, 32, 32)


@pytest.mark.parametrize("h,w", [(56, 56), (36, 100), (8, 12)])
def test_overlap_tile_equals_one_pass_over_the_mirror_padded_image(h, w):
    """Valid tiles on the pooling grid, stitched, give exactly the network's output for the
    whole mirror-padded image: no seams."""
    model = tiny_original()
    m = model.output_margin // 2
    x = torch.randn(1, 1, h, w)
    with torch.no_grad():
        whole = probabilities(model(mirror_pad(x, m, m, m, m)))  # H + 40 is a valid size for these
        tiled = overlap_tile(model, x, tile=56)  # 16 x 16 outputs: several tiles per side
    plan = overlap_tile_plan(model, (h, w), 56)
    assert plan["input"] == 56 and plan["output"] == 16 and plan["stride"] == 16
    assert tiled.shape == whole.shape == (1, 3, h, w)
    assert torch.allclose(tiled, whole, atol=1e-5)
    assert torch.allclose(overlap_tile(model, x), whole, atol=1e-5)  # default tile


def test_overlap_tile_any_size_and_large_images():
    model = tiny_original(depth=2)
    x = torch.randn(1, 1, 1500, 1500)
    plan = overlap_tile_plan(model, (1500, 1500))
    assert plan["input"] == 572 and plan["tiles_y"] == 3
    with torch.no_grad():
        p = predict_probs(model, x)  # unet_original is tiled automatically
    assert p.shape == (1, 3, 1500, 1500) and torch.isfinite(p).all()
    with pytest.raises(InvalidTileSizeError, match="smallest usable"):
        overlap_tile_plan(model, (100, 100), tile=20)
    with pytest.raises(InvalidTileSizeError):
        model(torch.randn(1, 1, 101, 101))  # a whole image of invalid size cannot run


def test_test_time_augmentation():
    model = Pointwise(1, 2)
    x = torch.randn(1, 1, 30, 42)
    base = predict_probs(model, x)
    assert torch.allclose(predict_probs(model, x, flip=True), base, atol=1e-6)  # pointwise: flip-equivariant
    ms = predict_probs(model, x, scales=(0.5, 1.0, 1.5), flip=True)
    assert ms.shape == base.shape and torch.allclose(ms.sum(1), torch.ones(1, 30, 42), atol=1e-5)
    flat = torch.zeros(1, 1, 30, 42)  # a constant image: every scale predicts the same
    assert torch.allclose(predict_probs(model, flat, scales=(0.75, 1.25)), predict_probs(model, flat), atol=1e-6)
    tiled = predict_probs(model, x, tile=16, overlap=4, flip=True, scales=(1.0, 2.0))
    assert tiled.shape == base.shape
    one = predict_probs(lambda t: t[:, :1] * 0 + 3.0, x)  # single logit: sigmoid
    assert torch.allclose(one, torch.sigmoid(torch.tensor(3.0)).expand_as(one))


def test_connected_components():
    sem = np.zeros((10, 20), np.int64)
    sem[1:5, 1:6] = 1
    sem[1:5, 7:12] = 1  # 1 px gap: two objects
    sem[6:9, 1:4] = 2
    sem[5, 6] = 1  # touches the first two objects only diagonally
    sem[9, 19] = 255
    inst, classes = connected_components(sem)
    assert inst.max() == 4 and classes == [1, 1, 1, 2]
    inst8, classes8 = connected_components(sem, connectivity=8)
    assert inst8.max() == 2 and classes8 == [1, 2]
    inst, classes = connected_components(sem, min_size=5)
    assert inst.max() == 3 and classes == [1, 1, 2] and inst[5, 6] == 0
    inst, classes = connected_components(torch.from_numpy(sem), classes=[2])
    assert classes == [2] and set(np.unique(inst).tolist()) == {0, 1}


def test_instance_f1():
    gt = np.zeros((10, 20), np.int64)
    gt[1:5, 1:6], gt[1:5, 6:11], gt[6:9, 12:18] = 1, 2, 3
    perfect = instance_f1(gt * 5, gt)
    assert perfect["f1"] == 1.0 and perfect["tp"] == 3
    merged = (gt > 0).astype(np.int64)  # three objects predicted as one (IoU <= 1/3 with each)
    merged[5, 6:13] = 1
    merged[0, 15] = 9  # and a spurious one
    r = instance_f1(merged, gt)
    assert (r["tp"], r["fp"], r["fn"]) == (0, 2, 3) and r["f1"] == 0.0
    split, _ = connected_components(np.where(gt > 0, 1, 0))  # objects 1 and 2 touch: one component
    r = instance_f1(split, gt)  # it overlaps object 1 with IoU exactly 0.5: a match (>= threshold)
    assert (r["tp"], r["fp"], r["fn"]) == (2, 0, 1) and r["f1"] == pytest.approx(0.8)
    assert instance_f1(split, gt, threshold=0.51)["tp"] == 1
    both = instance_f1([gt, split], [gt, gt])
    assert (both["tp"], both["fp"], both["fn"]) == (5, 0, 1)
    ign = gt.copy()
    ign[6:9, 12:18] = 255  # ignored ground truth: the prediction there vanishes
    assert instance_f1(gt, ign)["f1"] == 1.0
    shrunk = np.zeros_like(gt)
    shrunk[1:5, 1:3] = 1  # IoU 8/20 = 0.4
    assert match_instances(shrunk, gt, 0.5)["tp"] == 0 and match_instances(shrunk, gt, 0.4)["tp"] == 1
    assert instance_f1(np.zeros_like(gt), np.zeros_like(gt))["f1"] == 1.0


# -------------------------------------------------------------------------------------------
# the engine end to end
# -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nuclei_data(tmp_path_factory):
    tifffile = pytest.importorskip("tifffile")
    from pixelwise.cli import main

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:96, :96]
    mask = np.zeros((96, 96), np.uint16)
    k = 0
    for cy in range(8, 92, 16):
        for cx in range(8, 92, 14):
            k += 1
            mask[(yy - cy) ** 2 + (xx - cx) ** 2 <= 7.5**2] = k
    image = (300 + 2000 * (mask > 0) + rng.normal(0, 80, mask.shape)).clip(0, 5000).astype(np.uint16)
    src = tmp_path_factory.mktemp("src")
    tifffile.imwrite(src / "img2d.tif", image)
    tifffile.imwrite(src / "mask2d.tif", mask)
    out = tmp_path_factory.mktemp("data") / "nuclei"
    assert main(["data", "import", "stardist", "--source", str(src), "--out", str(out), "--crop", "48"]) == 0
    return out


COMMON = ["--image-mode", "L", "--epochs", "2", "--batch-size", "2", "--lr", "0.003", "--optimizer", "adamw",
          "--num-workers", "0", "--repeat", "2", "--quiet"]


def test_weighted_ce_elastic_grayscale_training_evaluate_predict(nuclei_data, tmp_path, capsys):
    from pixelwise.cli import main

    run = tmp_path / "run"
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("model: unet\nmodel_kwargs: {base_channels: 4, depth: 2}\nloss: weighted_ce\n"
                   "weight_map: {w0: 10, sigma: 5}\nelastic: {sigma: 10, grid: 3, p: 1.0}\ncrop_size: 40\n")
    assert main(["train", "--config", str(cfg), "--data", str(nuclei_data), "--out", str(run), *COMMON]) == 0
    assert list(run.glob("weight_map_*.png"))
    saved = json.loads((run / "config.json").read_text())
    assert saved["loss"] == "weighted_ce" and saved["elastic"]["sigma"] == 10
    ck = torch.load(run / "last.pt", weights_only=False)
    assert ck["model"]["kwargs"]["in_channels"] == 1 and ck["normalization"]["image_mode"] == "L"

    out = tmp_path / "m.json"
    assert main(["evaluate", "--checkpoint", str(run / "last.pt"), "--data", str(nuclei_data), "--out", str(out),
                 "--instance-f1", "--tile", "32", "--overlap", "8", "--tta-flip", "--tta-scales", "1,1.5",
                 "--quiet"]) == 0
    m = json.loads(out.read_text())
    assert 0 <= m["instance"]["f1"] <= 1 and m["instance"]["num_gt"] > 0
    assert m["inference"] == {"tile": 32, "overlap": 8, "flip": True, "scales": [1.0, 1.5], "overlap_tile": False}
    assert "instances (connected components)" in capsys.readouterr().out

    pred = tmp_path / "pred"
    images = sorted((nuclei_data / "JPEGImages").iterdir())
    assert main(["predict", "--checkpoint", str(run / "last.pt"), str(images[0]), "--out", str(pred),
                 "--tile", "32", "--tta-flip", "--quiet"]) == 0
    from PIL import Image

    assert Image.open(pred / f"{images[0].stem}.png").size == (48, 48)


def test_unet_original_training_and_overlap_tile_evaluation(nuclei_data, tmp_path, capsys):
    from pixelwise.cli import main

    run = tmp_path / "orig"
    args = ["train", "--model", "unet_original", "--model-arg", "width=0.0625", "--model-arg", "depth=2",
            "--data", str(nuclei_data), "--out", str(run), "--loss", "weighted_ce", "--elastic", *COMMON]
    assert main([*args, "--crop-size", "90"]) == 0  # 90 -> 88, the largest valid size below
    assert json.loads((run / "config.json").read_text())["crop_size"] == 88
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert 0 <= lines[-1]["miou"] <= 1  # validation on 48 x 48 images: overlap-tile, automatically

    out = tmp_path / "m.json"
    assert main(["evaluate", "--checkpoint", str(run / "last.pt"), "--data", str(nuclei_data), "--out", str(out),
                 "--instance-f1", "--min-size", "3", "--quiet"]) == 0
    m = json.loads(out.read_text())
    assert m["inference"]["overlap_tile"] is True and m["num_pixels"] == 48 * 48
    assert m["instance"]["min_size"] == 3

    assert main([*args, "--out", str(tmp_path / "bad"), "--crop-size", "20"]) == 2
    assert "smallest input" in capsys.readouterr().err
    assert main([*args[:-1], "--out", str(tmp_path / "none")]) == 2  # no crop size at all
    assert "needs crop_size" in capsys.readouterr().err


def test_weight_map_needs_a_cross_entropy_loss(nuclei_data, tmp_path, capsys):
    from pixelwise.cli import main

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("weight_map: {w0: 5}\nloss: dice\n")
    assert main(["train", "--config", str(cfg), "--model", "unet", "--data", str(nuclei_data),
                 "--out", str(tmp_path / "r"), *COMMON]) == 2
    assert "weighted_ce" in capsys.readouterr().err
