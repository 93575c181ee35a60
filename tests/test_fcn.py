"""FCN-32s/16s/8s (SPEC §1): shapes on odd sizes, bilinear-initialised upsamplers, zero-initialised
score layers, sum fusion, parameter count of the paper's VGG16 net."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import pixelwise
from pixelwise.models.fcn import BilinearUpsampler, bilinear_kernel


@pytest.mark.parametrize("name", ["fcn32s", "fcn16s", "fcn8s"])
@pytest.mark.parametrize("size", [(97, 131), (32, 32), (1, 1), (64, 45)])
def test_output_at_input_resolution(name, size):
    model = pixelwise.build_model(name, 5, width=0.125).eval()
    with torch.no_grad():
        y = model(torch.randn(2, 3, *size))
    assert y.shape == (2, 5, *size)


def test_bilinear_kernel_formula():
    # k=4: f=2, c=1.5 -> 1-D weights 0.25, 0.75, 0.75, 0.25
    k = bilinear_kernel(4)
    w = torch.tensor([0.25, 0.75, 0.75, 0.25])
    assert torch.allclose(k, w[:, None] * w[None, :])
    # odd k=3: f=2, c=1 -> 0.5, 1, 0.5
    w3 = torch.tensor([0.5, 1.0, 0.5])
    assert torch.allclose(bilinear_kernel(3), w3[:, None] * w3[None, :])


@pytest.mark.parametrize("factor", [2, 8, 16, 32])
def test_upsampler_init_is_bilinear_interpolation_in_the_interior(factor):
    torch.manual_seed(0)
    c, h, w = 3, 6, 7
    x = torch.randn(1, c, h, w)
    up = BilinearUpsampler(c, factor)
    with torch.no_grad():
        y = up(x, (h * factor, w * factor))
    ref = F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False)
    b = factor  # borders differ: transposed conv sees zeros outside, interpolate clamps
    assert torch.allclose(y[..., b:-b, b:-b], ref[..., b:-b, b:-b], atol=1e-5)
    # one kernel per class: a one-hot class map stays in its own channel
    onehot = torch.zeros(1, c, h, w)
    onehot[0, 1] = 1
    with torch.no_grad():
        z = up(onehot, (h * factor, w * factor))
    assert z[0, 0].abs().max() == 0 and z[0, 2].abs().max() == 0 and z[0, 1].max() > 0
    assert up.bias is None


def test_score_layers_zero_initialised_and_final_upsampler_fixed():
    m = pixelwise.build_model("fcn8s", 4, width=0.125)
    for layer in (m.head[-1], m.score_pool4, m.score_pool3):
        assert layer.weight.abs().sum() == 0 and layer.bias.abs().sum() == 0
    assert not m.up_final.weight.requires_grad
    assert m.up_pool4.weight.requires_grad and m.up_pool5.weight.requires_grad
    # zero scores -> zero logits at init whatever the input
    with torch.no_grad():
        assert m.eval()(torch.randn(1, 3, 40, 40)).abs().max() == 0


def test_fusion_is_a_sum_of_skip_scores():
    torch.manual_seed(0)
    m = pixelwise.build_model("fcn16s", 3, width=0.125).eval()
    nn.init.normal_(m.score_pool4.weight)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        _, _, _, pool4, pool5 = m.encoder(x)
        s = m.head(pool5)
        expected = m.up_final(m.up_pool5(s, pool4.shape[-2:]) + m.score_pool4(pool4), (64, 64))
        assert torch.allclose(m(x), expected)


def test_parameter_count_matches_paper_vgg16_fcn8s():
    # VGG16 convs 14.71M + fc6 (7x7x512x4096) 102.76M + fc7 16.78M + scores/upsamplers ~ 134M
    with torch.device("meta"):
        m = pixelwise.build_model("fcn8s", 21)
    n = sum(p.numel() for p in m.parameters())
    assert 134.0e6 < n < 134.6e6, n


def test_fcn_on_resnet_backbone():
    m = pixelwise.build_model("fcn8s", 3, backbone="resnet18").eval()
    with torch.no_grad():
        assert m(torch.randn(1, 3, 50, 70)).shape == (1, 3, 50, 70)


def test_unknown_stride_and_width_errors():
    from pixelwise.models.fcn import FCN

    with pytest.raises(ValueError, match="stride"):
        FCN(3, stride=4, width=0.125)
    with pytest.raises(ValueError, match="width"):
        FCN(3, backbone="resnet18", width=0.5)
