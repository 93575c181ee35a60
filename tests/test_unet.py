"""U-Net (SPEC §3): the unpadded original (sizes, crops, parameters, init), the padded
variant at any size, U-Net decoders on encoders, and that they learn."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pixelwise.models import build_model, list_models
from pixelwise.models.unet import EncoderUNet, InvalidTileSizeError, UNet, UNetOriginal, UNetUp, center_crop

SMALL = 1 / 16  # channel multiplier that keeps the tests CPU-cheap


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny convolutions on a shared 2-core machine: one thread avoids OpenMP contention;
    restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _paper_param_count(in_channels: int, num_classes: int, depth: int = 4, base: int = 64) -> int:
    """Parameters of the paper's U-Net by formula: 3x3 convs and 2x2 up-convs with biases."""
    conv3 = lambda cin, cout: 9 * cin * cout + cout  # noqa: E731
    up2 = lambda cin, cout: 4 * cin * cout + cout  # noqa: E731
    ch = [base * 2**i for i in range(depth + 1)]
    n = conv3(in_channels, ch[0]) + conv3(ch[0], ch[0])
    for i in range(1, depth + 1):  # contracting
        n += conv3(ch[i - 1], ch[i]) + conv3(ch[i], ch[i])
    for i in range(depth, 0, -1):  # expanding: up-conv halves, concat doubles, two convs
        n += up2(ch[i], ch[i - 1]) + conv3(2 * ch[i - 1], ch[i - 1]) + conv3(ch[i - 1], ch[i - 1])
    return n + ch[0] * num_classes + num_classes  # final 1x1


# --- unet_original: the paper's network -------------------------------------------------------


def test_registered() -> None:
    assert {"unet", "unet_original"} <= set(list_models())


def test_original_572_gives_388_with_the_papers_crops() -> None:
    torch.manual_seed(0)
    m = build_model("unet_original", 2, in_channels=1, width=SMALL).eval()
    with torch.no_grad():
        y = m(torch.randn(1, 1, 572, 572))
    assert y.shape == (1, 2, 388, 388)
    # the crops actually done in the forward (deepest first) and the same by arithmetic
    paper = [(64, 56), (136, 104), (280, 200), (568, 392)]
    assert [u.last_crop for u in m.ups] == [((s, s), (c, c)) for s, c in paper]
    assert m.crop_sizes(572) == paper
    assert m.output_size(572) == 388 and m.output_size((572, 636)) == (388, 452)
    assert m.input_size_for(388) == 572 and m.output_margin == 184


def test_original_structure_and_31_03m_parameters() -> None:
    with torch.device("meta"):
        m = build_model("unet_original", 2, in_channels=1)
    expected = _paper_param_count(1, 2)
    assert _n_params(m) == expected == 31_030_658
    assert round(expected / 1e6, 2) == 31.03
    convs = [x for x in m.modules() if isinstance(x, (nn.Conv2d, nn.ConvTranspose2d))]
    assert len(convs) == 23
    assert all(c.padding == (0, 0) for c in convs)  # unpadded
    ups = [c for c in convs if isinstance(c, nn.ConvTranspose2d)]
    assert len(ups) == 4
    assert all(c.kernel_size == (2, 2) and c.stride == (2, 2) and c.out_channels * 2 == c.in_channels for c in ups)
    assert [c.out_channels for c in convs if isinstance(c, nn.Conv2d) and c.kernel_size == (3, 3)][:10] == [
        64, 64, 128, 128, 256, 256, 512, 512, 1024, 1024]
    assert convs[-1].kernel_size == (1, 1) and convs[-1].out_channels == 2
    assert not any(isinstance(x, nn.BatchNorm2d) for x in m.modules())
    assert any(isinstance(x, nn.Dropout) for x in m.modules())
    # the other input channels / class counts follow the same formula
    with torch.device("meta"):
        assert _n_params(build_model("unet_original", 21)) == _paper_param_count(3, 21)


def test_original_init_is_he_normal() -> None:
    torch.manual_seed(0)
    m = UNetOriginal(2, in_channels=1, width=0.25)
    conv = m.downs[2][1][1][0]  # 3x3 conv 128 -> 128 (width 0.25 of 512 -> 512)
    assert isinstance(conv, nn.Conv2d) and conv.in_channels == 128
    assert abs(conv.weight.std().item() / math.sqrt(2 / (9 * 128)) - 1) < 0.02
    assert abs(conv.weight.mean().item()) < 1e-3 and torch.all(conv.bias == 0)
    up = m.ups[0].up  # 2x2/2 up-conv: each output pixel sees one input pixel x C_in
    assert abs(up.weight.std().item() / math.sqrt(2 / up.in_channels) - 1) < 0.05


def test_valid_sizes() -> None:
    m = UNetOriginal(2, width=SMALL)

    def valid(n: int) -> bool:  # every map before a pool even; every map non-empty
        for _ in range(4):
            n -= 4
            if n < 1 or n % 2:
                return False
            n //= 2
        n -= 4
        for _ in range(4):
            n = 2 * n - 4
            if n < 1:
                return False
        return n >= 1

    sizes = m.valid_input_sizes(1, 1000)
    assert sizes == [n for n in range(1, 1001) if valid(n)]
    assert sizes[0] == 188 and 572 in sizes and set(n % 16 for n in sizes) == {572 % 16}
    assert all(m.output_size(n) == n - 184 for n in sizes)
    assert all(m.input_size_for(n - 184) == n for n in sizes)
    assert m.valid_input_sizes(500, 600) == [508, 524, 540, 556, 572, 588]
    assert m.table_input_size(512) == 508 and m.table_input_size(572) == 572 and m.table_input_size(10) == 188
    # depth is an option; its margin follows
    m3 = UNetOriginal(2, width=SMALL, depth=3)
    assert m3.output_margin == 88 and all(m3.output_size(n) == n - 88 for n in m3.valid_input_sizes(1, 300))


def test_invalid_size_error_names_the_nearest_valid_sizes() -> None:
    m = UNetOriginal(2, width=SMALL)
    with pytest.raises(ValueError, match=r"500.*492 \(output 308\), 508 \(output 324\)"):
        m(torch.zeros(1, 3, 500, 572))
    with pytest.raises(InvalidTileSizeError, match="width 571.*556.*572"):
        m(torch.zeros(1, 3, 572, 571))
    with pytest.raises(ValueError, match="valid centre, 184 px smaller"):
        m.output_size(100)
    with pytest.raises(ValueError, match="388, 404"):
        m.input_size_for(390)


def test_crop_target_and_center_crop() -> None:
    m = UNetOriginal(2, width=SMALL)
    t = torch.arange(572 * 588).view(1, 572, 588)
    c = m.crop_target(t)
    assert c.shape == (1, 388, 404) and c[0, 0, 0] == t[0, 92, 92]
    assert torch.equal(center_crop(torch.arange(25).view(5, 5), (2, 2)), torch.tensor([[6, 7], [11, 12]]))


# --- the padded U-Net -------------------------------------------------------------------------


def test_padded_unet_default_is_the_classic_topology() -> None:
    with torch.device("meta"):
        m = build_model("unet", 21)
    assert isinstance(m, UNet)
    assert m.channels == (64, 128, 256, 512, 1024)
    assert sum(isinstance(x, nn.BatchNorm2d) for x in m.modules()) == 18
    assert sum(isinstance(x, nn.ConvTranspose2d) for x in m.modules()) == 4
    assert UNet(2, base_channels=8, width=0.5).channels == (4, 8, 16, 32, 64)


@pytest.mark.parametrize("size", [(97, 131), (33, 20), (5, 3), (1, 1), (64, 64)])
def test_padded_unet_any_size(size) -> None:
    torch.manual_seed(0)
    for in_ch in (3, 1):
        m = build_model("unet", 4, in_channels=in_ch, base_channels=4).eval()
        with torch.no_grad():
            y = m(torch.randn(2, in_ch, *size))
        assert y.shape == (2, 4, *size) and torch.isfinite(y).all()


def test_padded_up_step_trims_the_upsampled_map_to_the_skip() -> None:
    up = UNetUp(8, 4, padded=True)
    y = up(torch.randn(1, 8, 49, 66), torch.randn(1, 4, 97, 131))
    assert y.shape == (1, 4, 97, 131) and up.last_crop == ((97, 131), (97, 131))


# --- U-Net on encoders ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "backbone, kw",
    [
        ("resnet18", {}),
        ("efficientnet_lite0", {"in_channels": 1}),
        ("vgg16_bn", {"width": SMALL}),
        ("resnet18", {"output_stride": 8}),
    ],
)
def test_unet_with_encoder_any_size(backbone, kw) -> None:
    torch.manual_seed(0)
    m = build_model("unet", 3, backbone=backbone, decoder_channels=(32, 16, 16, 8, 8), **kw).eval()
    assert isinstance(m, EncoderUNet)
    in_ch = kw.get("in_channels", 3)
    for size in ((97, 131), (32, 32)):
        with torch.no_grad():
            y = m(torch.randn(1, in_ch, *size))
        assert y.shape == (1, 3, *size) and torch.isfinite(y).all()


def test_unet_with_encoder_uses_c1_to_c5_as_skips() -> None:
    m = build_model("unet", 3, backbone="resnet18", decoder_channels=(32, 16, 16, 8, 8)).eval()
    enc = m.encoder.out_channels  # (64, 64, 128, 256, 512)
    first_convs = [s.conv[0][0] for s in m.decoder]
    assert [c.in_channels for c in first_convs] == [enc[4] + enc[3], 32 + enc[2], 16 + enc[1], 16 + enc[0], 8]
    assert m.pixelwise_spec["kwargs"]["backbone"] == "resnet18"


def test_unet_encoder_pretrained_errors_are_clear() -> None:
    with pytest.raises(ValueError, match="weights_path"):
        build_model("unet", 3, backbone="resnet34", pretrained=True)
    with pytest.raises(ValueError, match="unknown encoder"):
        build_model("unet", 3, backbone="resnet7")


# --- they learn -------------------------------------------------------------------------------


def _toy_batch(size: int, n: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Bright squares on a dark noisy background; label 1 inside the squares."""
    g = torch.Generator().manual_seed(0)
    x = 0.1 * torch.randn(n, 1, size, size, generator=g)
    y = torch.zeros(n, size, size, dtype=torch.long)
    for i in range(n):
        r, c = 4 + 5 * i, 6 + 3 * i
        x[i, 0, r:r + size // 3, c:c + size // 3] += 1.0
        y[i, r:r + size // 3, c:c + size // 3] = 1
    return x, y


def _train(m: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float) -> list[float]:
    opt = torch.optim.Adam(m.parameters(), lr=lr)
    losses = []
    m.train()
    for _ in range(steps):
        out = m(x)
        target = m.crop_target(y) if isinstance(m, UNetOriginal) else y
        loss = F.cross_entropy(out, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_padded_unet_lowers_the_loss() -> None:
    torch.manual_seed(0)
    x, y = _toy_batch(40)
    losses = _train(build_model("unet", 2, in_channels=1, base_channels=4), x, y, steps=15, lr=1e-2)
    assert losses[-1] < 0.6 * losses[0]


def test_original_unet_lowers_the_loss() -> None:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x = 0.1 * torch.randn(1, 1, 188, 188, generator=g)  # smallest valid tile: 4 x 4 output
    y = torch.zeros(1, 188, 188, dtype=torch.long)
    x[..., 80:94, 80:95] += 1.0  # an object covering part of the valid centre [92, 96)
    y[..., 80:94, 80:95] = 1
    m = build_model("unet_original", 2, in_channels=1, width=SMALL, dropout=0.0)
    assert m(x).shape[-2:] == (4, 4) and m.crop_target(y).sum() == 6
    losses = _train(m, x, y, steps=10, lr=3e-3)
    assert losses[-1] < 0.7 * losses[0]
