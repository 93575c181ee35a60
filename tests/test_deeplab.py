"""DeepLab v3 / v3+ (SPEC §5): ASPP rates, atrous backbone strides and multi-grid, the v3+
stride-4 decoder path, image pooling with a batch of one, any input size, learning, the
EfficientNet-Lite0 backbone, and equivalence of the v3 head with torchvision's."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from pixelwise.losses import CrossEntropyLoss
from pixelwise.models import build_model, list_models
from pixelwise.models.deeplab import ASPP, ASPPConv, ASPPPooling, DeepLabV3, DeepLabV3Plus, default_atrous_rates

from helpers import toy_batch  # noqa: E402

SMALL = dict(backbone="resnet18", aspp_channels=16)
SMALL_PLUS = dict(SMALL, decoder_channels=16, low_level_channels=8)



def _aspp_rates(aspp: ASPP) -> list[tuple[int, int]]:
    convs = [b[0] for b in aspp.branches if isinstance(b, ASPPConv)]
    assert all(c.kernel_size == (3, 3) and c.padding == c.dilation for c in convs)  # 'same' size
    return [c.dilation for c in convs]


def test_registered() -> None:
    assert {"deeplabv3", "deeplabv3plus"} <= set(list_models())
    assert isinstance(build_model("deeplabv3", 2, **SMALL), DeepLabV3)
    assert isinstance(build_model("deeplabv3plus", 2, **SMALL_PLUS), DeepLabV3Plus)


@pytest.mark.parametrize("cls", [DeepLabV3, DeepLabV3Plus])
def test_aspp_rates_follow_the_output_stride(cls) -> None:
    m16 = cls(3, backbone="resnet18")
    assert m16.output_stride == 16
    assert _aspp_rates(m16.aspp) == [(6, 6), (12, 12), (18, 18)]
    m8 = cls(3, backbone="resnet18", output_stride=8)
    assert _aspp_rates(m8.aspp) == [(12, 12), (24, 24), (36, 36)]
    mx = cls(3, backbone="resnet18", atrous_rates=(1, 2, 3, 4))
    assert _aspp_rates(mx.aspp) == [(1, 1), (2, 2), (3, 3), (4, 4)]
    assert default_atrous_rates(32) == (3, 6, 9)


def test_aspp_structure() -> None:
    aspp = DeepLabV3(3, backbone="resnet18").aspp
    assert aspp.in_channels == 512 and aspp.out_channels == 256
    one, *atrous, pool = aspp.branches
    assert one[0].kernel_size == (1, 1) and isinstance(one[1], nn.BatchNorm2d)
    assert len(atrous) == 3 and isinstance(pool, ASPPPooling)
    for b in (one, *atrous):
        assert b[0].out_channels == 256 and isinstance(b[1], nn.BatchNorm2d) and isinstance(b[2], nn.ReLU)
    assert pool.conv.out_channels == 256 and pool.conv.kernel_size == (1, 1)
    assert aspp.project[0][0].in_channels == 5 * 256 and aspp.project[0][0].out_channels == 256
    assert aspp.project[1].p == 0.5
    assert DeepLabV3Plus(3, backbone="resnet18").aspp.project[1].p == 0.1


def test_backbone_dilations_and_strides() -> None:
    def dil(layer):
        return [blk.conv2.dilation[0] for blk in layer]

    m16 = DeepLabV3(3, backbone="resnet50")
    assert dil(m16.encoder.layer3) == [1] * 6 and dil(m16.encoder.layer4) == [2, 2, 2]
    m8 = DeepLabV3(3, backbone="resnet50", output_stride=8)
    assert dil(m8.encoder.layer3) == [2] * 6 and dil(m8.encoder.layer4) == [4, 4, 4]
    mg16 = DeepLabV3Plus(3, backbone="resnet50", multi_grid=(1, 2, 4))
    assert dil(mg16.encoder.layer4) == [2, 4, 8]
    mg8 = DeepLabV3(3, backbone="resnet50", output_stride=8, multi_grid=(1, 2, 4))
    assert dil(mg8.encoder.layer4) == [4, 8, 16]
    with pytest.raises(ValueError):
        DeepLabV3(3, backbone="resnet18", multi_grid=(1, 2, 4))  # resnet18's layer4 has 2 blocks

    # actual stride of the ASPP input (resnet18: fast)
    for os_, mg in ((16, None), (8, None), (16, (1, 2))):
        m = DeepLabV3(3, output_stride=os_, multi_grid=mg, **SMALL).eval()
        seen = []
        m.aspp.register_forward_hook(lambda _m, i, _o: seen.append(tuple(i[0].shape)))
        with torch.no_grad():
            m(torch.randn(1, 3, 97, 131))
        assert seen == [(1, 512, math.ceil(97 / os_), math.ceil(131 / os_))]


@pytest.mark.parametrize("size", [(64, 64), (97, 131)])
def test_v3plus_low_level_path_at_stride_4(size: tuple[int, int]) -> None:
    h, w = size
    m = DeepLabV3Plus(3, **SMALL_PLUS).eval()
    seen: dict[str, tuple[int, ...]] = {}
    m.decoder.low_level_project.register_forward_hook(
        lambda _m, i, o: seen.update(low_in=tuple(i[0].shape), low_out=tuple(o.shape))
    )
    m.decoder.fuse.register_forward_hook(lambda _m, i, _o: seen.update(fuse_in=tuple(i[0].shape)))
    m.aspp.register_forward_hook(lambda _m, _i, o: seen.update(aspp_out=tuple(o.shape)))
    with torch.no_grad():
        y = m(torch.randn(1, 3, h, w))
    h4, w4 = math.ceil(h / 4), math.ceil(w / 4)
    assert seen["low_in"] == (1, 64, h4, w4)  # resnet18 layer1, 1/4 of the input
    assert seen["low_out"] == (1, 8, h4, w4)
    assert seen["aspp_out"] == (1, 16, math.ceil(h / 16), math.ceil(w / 16))
    assert seen["fuse_in"] == (1, 16 + 8, h4, w4)  # ASPP output upsampled x4 and concatenated
    assert y.shape == (1, 3, h, w)


def test_v3plus_default_widths() -> None:
    m = DeepLabV3Plus(5, backbone="resnet18")
    proj = m.decoder.low_level_project[0]
    assert (proj.in_channels, proj.out_channels, proj.kernel_size) == (64, 48, (1, 1))
    convs = [blk[0] for blk in m.decoder.fuse]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [(304, 256, (3, 3)), (256, 256, (3, 3))]
    assert (m.classifier.in_channels, m.classifier.out_channels) == (256, 5)


def test_image_pooling_batch_of_one_in_training() -> None:
    pool = ASPPPooling(8, 4).train()
    mean0, var0 = pool.bn.running_mean.clone(), pool.bn.running_var.clone()
    x = torch.randn(1, 8, 5, 7)
    y = pool(x)  # plain BatchNorm2d raises here
    assert y.shape == (1, 4, 5, 7) and torch.isfinite(y).all()
    assert torch.allclose(y, pool.eval()(x))  # normalised with the running statistics
    assert torch.equal(pool.bn.running_mean, mean0) and torch.equal(pool.bn.running_var, var0)
    pool.train()(torch.randn(3, 8, 5, 7))  # a real batch: ordinary batch norm, stats update
    assert not torch.equal(pool.bn.running_mean, mean0)


@pytest.mark.parametrize("cls, kw", [(DeepLabV3, SMALL), (DeepLabV3Plus, SMALL_PLUS)])
def test_training_step_with_batch_of_one(cls, kw) -> None:
    torch.manual_seed(0)
    m = cls(3, **kw).train()
    x, y = toy_batch(n=1, h=40, w=56)
    loss = CrossEntropyLoss(3)(m(x), y)
    loss.backward()
    torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9).step()
    assert torch.isfinite(loss)
    pool = m.aspp.branches[-1]
    assert pool.conv.weight.grad is not None and pool.conv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("cls, kw", [(DeepLabV3, SMALL), (DeepLabV3Plus, SMALL_PLUS)])
@pytest.mark.parametrize("output_stride", [8, 16])
def test_output_at_input_size(cls, kw, output_stride: int) -> None:
    m = cls(3, output_stride=output_stride, **kw)
    x = torch.randn(2, 3, 97, 131)
    assert m.train()(x).shape == (2, 3, 97, 131)
    with torch.no_grad():
        assert m.eval()(x).shape == (2, 3, 97, 131)


@pytest.mark.parametrize("cls, kw", [(DeepLabV3, SMALL), (DeepLabV3Plus, SMALL_PLUS)])
def test_few_steps_lower_the_loss(cls, kw) -> None:
    torch.manual_seed(0)
    m = cls(3, dropout=0.0, **kw).train()
    x, y = toy_batch(n=2)
    crit = CrossEntropyLoss(3)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(6):
        opt.zero_grad()
        loss = crit(m(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.parametrize("cls", [DeepLabV3, DeepLabV3Plus])
def test_efficientnet_lite0_backbone(cls) -> None:
    m = cls(3, backbone="efficientnet_lite0", aspp_channels=16)
    assert m.output_stride == 32 and _aspp_rates(m.aspp) == [(3, 3), (6, 6), (9, 9)]
    x = torch.randn(2, 3, 97, 131)
    assert m.train()(x).shape == (2, 3, 97, 131)
    with torch.no_grad():
        assert m.eval()(x[:1]).shape == (1, 3, 97, 131)
    with pytest.raises(ValueError, match="atrous"):
        cls(3, backbone="efficientnet_lite0", output_stride=16)


def test_v3_resnet50_matches_torchvision() -> None:
    """Same parameters, in the same order, as torchvision's deeplabv3_resnet50 (no aux); with
    its weights and torchvision's dilation convention (first block of a dilated layer keeps
    the previous rate) the two give the same logits."""
    tv_seg = pytest.importorskip("torchvision.models.segmentation")
    torch.manual_seed(0)
    tv = tv_seg.deeplabv3_resnet50(weights=None, weights_backbone=None, aux_loss=False, num_classes=21).eval()
    ours = DeepLabV3(21, backbone="resnet50", output_stride=8).eval()
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(ours) == count(tv) == 39_638_869
    sd_tv, sd_ours = tv.state_dict(), ours.state_dict()
    assert [v.shape for v in sd_tv.values()] == [v.shape for v in sd_ours.values()]
    ours.load_state_dict(dict(zip(sd_ours, sd_tv.values())))
    for layer, rate in ((ours.encoder.layer3, 1), (ours.encoder.layer4, 2)):
        layer[0].conv2.dilation = layer[0].conv2.padding = (rate, rate)
    x = torch.randn(1, 3, 41, 37)
    with torch.no_grad():
        assert torch.allclose(ours(x), tv(x)["out"], atol=1e-4, rtol=1e-4)
