"""FCN casts VGG16's fully connected fc6/fc7 into convolutions (FCN §3.1; issue 17 item 2):
with a torchvision-format VGG16 state dict, ``classifier.0`` (4096 x 25088) becomes the 7x7
fc6 conv (4096 x 512 x 7 x 7) and ``classifier.3`` the 1x1 fc7 conv; on a 7 x 7 pool5 map the
convs give what torchvision's linear layers give."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

from pixelwise.errors import CheckpointError
from pixelwise.models import build_model
from pixelwise.models.backbones.vgg import load_fc6_fc7, vgg_fc_as_conv

torchvision = pytest.importorskip("torchvision")


@pytest.fixture(scope="module")
def vgg16_file(tmp_path_factory):
    """A randomly initialised torchvision vgg16 (the ImageNet file's format), saved."""
    torch.manual_seed(0)
    net = torchvision.models.vgg16(weights=None).eval()
    path = tmp_path_factory.mktemp("vgg") / "vgg16-random.pth"
    torch.save(net.state_dict(), path)
    return net, path


def test_fc6_fc7_convs_equal_the_linear_layers(vgg16_file):
    net, path = vgg16_file
    torch.manual_seed(1)
    fcn = build_model("fcn32s", 3, weights_path=str(path)).eval()
    fc6, fc7 = fcn.head[0], fcn.head[3]
    assert tuple(fc6.weight.shape) == (4096, 512, 7, 7) and tuple(fc7.weight.shape) == (4096, 4096, 1, 1)
    with torch.no_grad():
        x = torch.randn(2, 512, 7, 7)
        lin6 = net.classifier[0](x.flatten(1))
        conv6 = fc6(x)[:, :, 3, 3]  # 'same' padding 3: the centre sees the whole 7 x 7 map
        torch.testing.assert_close(conv6, lin6, atol=1e-5, rtol=1e-5)
        h = torch.relu(lin6)
        torch.testing.assert_close(fc7(h[:, :, None, None])[:, :, 0, 0], net.classifier[3](h), atol=1e-5, rtol=1e-5)
        # end to end on a 224 x 224 image: pool5 is 7 x 7 and fc7's output at its centre is
        # torchvision's classifier up to fc7 + ReLU (dropout off in eval)
        img = torch.randn(1, 3, 224, 224)
        ours = nn.Sequential(*list(fcn.head)[:5])(fcn.encoder(img)[4])[:, :, 3, 3]
        theirs = net.classifier[:5](torch.flatten(net.avgpool(net.features(img)), 1))
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)


def test_reduced_fc_width_says_in_one_line_it_cannot_convert(vgg16_file):
    _, path = vgg16_file
    with pytest.warns(UserWarning, match=r"fc6/fc7 cannot be converted.*64/64 channels.*4096/4096") as rec:
        fcn = build_model("fcn32s", 3, weights_path=str(path), fc_channels=64)
    assert all("\n" not in str(w.message) for w in rec)
    assert fcn.head[0].out_channels == 64
    # the encoder still got the ImageNet-format features
    torch.testing.assert_close(fcn.encoder.stages[0][0].weight, vgg16_file[0].features[0].weight)


def test_without_weights_fc6_fc7_stay_random_and_untouched():
    torch.manual_seed(3)
    a = build_model("fcn32s", 3, width=0.125)
    torch.manual_seed(3)
    b = build_model("fcn32s", 3, width=0.125)
    assert torch.equal(a.head[0].weight, b.head[0].weight)


def test_vgg_fc_as_conv_checks_the_file():
    w6, b6 = torch.randn(16, 512 * 49), torch.randn(16)
    w7, b7 = torch.randn(8, 16), torch.randn(8)
    full = {"classifier.0.weight": w6, "classifier.0.bias": b6, "classifier.3.weight": w7, "classifier.3.bias": b7}
    convs = vgg_fc_as_conv(full)
    assert torch.equal(convs["fc6.weight"].flatten(1), w6) and convs["fc7.weight"].shape == (8, 16, 1, 1)
    assert vgg_fc_as_conv({"features.0.weight": torch.zeros(1)}) is None
    with pytest.raises(CheckpointError, match=r"vgg\.pth: .*not classifier\.3\.bias"):
        vgg_fc_as_conv({k: v for k, v in full.items() if k != "classifier.3.bias"}, source="vgg.pth")
    with pytest.raises(CheckpointError, match=r"vgg\.pth: classifier\.0 \(fc6\) has shape \(16, 100\)"):
        vgg_fc_as_conv({**full, "classifier.0.weight": torch.zeros(16, 100)}, source="vgg.pth")
    fc6, fc7 = nn.Conv2d(512, 16, 7, padding=3), nn.Conv2d(16, 8, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_fc6_fc7(fc6, fc7, full)
    assert torch.equal(fc6.weight.flatten(1), w6) and torch.equal(fc7.bias, b7)
    with pytest.warns(UserWarning, match="no classifier"):
        assert not load_fc6_fc7(fc6, fc7, {})
