"""SegNet (SPEC §2): unpooling with indices, the VGG16-BN encoder, the mirrored decoder."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.vgg import cfgs, make_layers

from pixelwise.models import build_model, list_models
from pixelwise.models.backbones.vgg import VGG16_STAGES
from pixelwise.models.segnet import SegNet, SegNetBasic, SegNetDecoderStage

SMALL = 1 / 16  # channel multiplier that keeps the tests CPU-cheap


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny convolutions on a shared 2-core machine: one thread avoids OpenMP contention
    (10x faster here); restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _identity_stage(channels: int) -> SegNetDecoderStage:
    """A decoder stage whose conv + BN + ReLU is the identity on non-negative inputs."""
    stage = SegNetDecoderStage(channels, [channels]).eval()
    conv, bn = stage.convs[0][0], stage.convs[0][1]
    with torch.no_grad():
        conv.weight.zero_()
        for c in range(channels):
            conv.weight[c, c, 1, 1] = 1.0
        bn.running_mean.zero_()
        bn.running_var.fill_(1.0 - bn.eps)
        bn.weight.fill_(1.0)
        bn.bias.zero_()
    return stage


# --- max-unpooling ---------------------------------------------------------------------------


def test_lecture_unpool_example_through_the_decoder_stage() -> None:
    # 4x4 map; the maxima a, b, c, d of the four 2x2 windows sit at known places.
    a, b, c, d = 5.0, 6.0, 7.0, 8.0
    x = torch.tensor([
        [1.0, a, 2.0, 1.0],
        [0.5, 1.0, 3.0, b],
        [2.0, 1.0, 0.0, 1.5],
        [c, 0.5, d, 1.0],
    ]).view(1, 1, 4, 4)
    pooled, idx = F.max_pool2d(x, 2, 2, ceil_mode=True, return_indices=True)
    assert pooled.flatten().tolist() == [a, b, c, d]
    expected = torch.zeros(4, 4)
    expected[0, 1], expected[1, 3], expected[3, 0], expected[3, 2] = a, b, c, d

    stage = _identity_stage(1)
    # the stage's own unpooling: each value back at its argmax, zeros elsewhere (a sparse map)
    assert torch.equal(stage.unpool(pooled, idx, (4, 4))[0, 0], expected)
    # and the whole stage (unpool -> identity conv+BN+ReLU) keeps it
    with torch.no_grad():
        assert torch.allclose(stage(pooled, idx, (4, 4))[0, 0], expected, atol=1e-6)


def test_unpool_restores_odd_pre_pool_sizes() -> None:
    torch.manual_seed(0)
    stage = _identity_stage(2)
    x = torch.rand(1, 2, 5, 7)
    pooled, idx = F.max_pool2d(x, 2, 2, ceil_mode=True, return_indices=True)
    assert pooled.shape[-2:] == (3, 4)
    up = stage.unpool(pooled, idx, x.shape[-2:])
    assert up.shape == x.shape
    # non-zeros exactly at the argmax positions, with the max values; pooling again is lossless
    assert int((up != 0).sum()) == pooled.numel()
    assert torch.equal(up[up != 0], x[up != 0])
    assert torch.equal(F.max_pool2d(up, 2, 2, ceil_mode=True), pooled)


# --- architecture ----------------------------------------------------------------------------


def test_registered() -> None:
    assert {"segnet", "segnet_basic"} <= set(list_models())
    m = build_model("segnet", 7, width=SMALL, in_channels=1)
    assert m.pixelwise_spec == {"name": "segnet", "num_classes": 7, "kwargs": {"width": SMALL, "in_channels": 1}}


def test_no_transposed_convolution_anywhere() -> None:
    with torch.device("meta"):
        models = [build_model("segnet", 21), build_model("segnet_basic", 12)]
    for m in models:
        assert not any(isinstance(mod, nn.ConvTranspose2d) for mod in m.modules())
        assert not any(isinstance(mod, nn.Upsample) for mod in m.modules())


def test_encoder_is_vgg16_bn_convs_with_14_7m_parameters() -> None:
    with torch.device("meta"):
        m = build_model("segnet", 21)
    convs = [x for x in m.encoder.modules() if isinstance(x, nn.Conv2d)]
    bns = [x for x in m.encoder.modules() if isinstance(x, nn.BatchNorm2d)]
    assert len(convs) == 13 and len(bns) == 13
    assert not any(isinstance(x, nn.Linear) for x in m.modules())  # no fully connected layers
    # by formula: 13 x (3x3 conv with bias + BN scale/shift)
    expected, cin = 0, 3
    for stage in VGG16_STAGES:
        for cout in stage:
            expected += 9 * cin * cout + cout + 2 * cout
            cin = cout
    n_enc = _n_params(m.encoder)
    assert n_enc == expected == 14_723_136
    assert abs(n_enc - 14.7e6) / 14.7e6 < 0.01


def test_decoder_mirrors_the_encoder() -> None:
    with torch.device("meta"):
        m = build_model("segnet", 11)
    stages = list(m.decoder.stages)
    assert all(isinstance(s, SegNetDecoderStage) for s in stages) and len(stages) == 5
    per_stage = [[c.out_channels for c in s.modules() if isinstance(c, nn.Conv2d)] for s in stages]
    assert per_stage == [[512, 512, 512], [512, 512, 256], [256, 256, 128], [128, 64], [64]]
    for s in stages:  # every decoder conv: 3x3 + BN + ReLU
        assert all(c.kernel_size == (3, 3) for c in s.modules() if isinstance(c, nn.Conv2d))
        assert sum(isinstance(x, nn.BatchNorm2d) for x in s.modules()) == len(s.convs)
        assert sum(isinstance(x, nn.ReLU) for x in s.modules()) == len(s.convs)
    assert m.classifier.in_channels == 64 and m.classifier.out_channels == 11


def test_output_at_odd_sizes() -> None:
    torch.manual_seed(0)
    for in_ch, size in ((3, (97, 131)), (1, (33, 20)), (3, (1, 1))):
        m = build_model("segnet", 5, width=SMALL, in_channels=in_ch).eval()
        with torch.no_grad():
            y = m(torch.randn(2, in_ch, *size))
        assert y.shape == (2, 5, *size) and torch.isfinite(y).all()
    basic = build_model("segnet_basic", 4, channels=8).eval()
    with torch.no_grad():
        assert basic(torch.randn(1, 3, 97, 131)).shape == (1, 4, 97, 131)


def test_decoder_gets_indices_not_encoder_features() -> None:
    torch.manual_seed(0)
    m = build_model("segnet", 3, width=SMALL).eval()
    enc_out = {}
    orig = m.encoder.forward_with_indices

    def spy(x):
        feats, indices, sizes = orig(x)
        enc_out.update(feats=feats, indices=indices, sizes=sizes)
        return feats, indices, sizes

    m.encoder.forward_with_indices = spy  # type: ignore[method-assign]
    seen: list[tuple] = []
    handles = [
        s.register_forward_pre_hook(lambda mod, args: seen.append(args)) for s in m.decoder.stages
    ]
    dec_args: list[tuple] = []
    handles.append(m.decoder.register_forward_pre_hook(lambda mod, args: dec_args.append(args)))
    with torch.no_grad():
        m(torch.randn(1, 3, 45, 70))
    for h in handles:
        h.remove()

    feats, indices = enc_out["feats"], enc_out["indices"]
    # the decoder as a whole gets the deepest map, the pooling indices and the pre-pool sizes
    (bottom, idx_arg, sizes_arg), = dec_args
    assert bottom is feats[-1]
    assert all(i is j for i, j in zip(idx_arg, indices)) and list(sizes_arg) == enc_out["sizes"]
    # each stage: the previous stage's output (never c1..c4) and the matching pool's indices
    feat_ptrs = {f.data_ptr() for f in feats[:-1]}
    for k, (x, idx, size) in enumerate(seen):
        assert x.data_ptr() not in feat_ptrs
        assert idx is indices[-1 - k] and idx.dtype == torch.int64
        assert x.shape == idx.shape  # unpooling input and its indices match cell for cell
        assert tuple(size) == tuple(enc_out["sizes"][-1 - k])
    assert seen[0][0] is feats[-1]


def test_backbone_weights_load_a_torchvision_vgg16_bn_state_dict(tmp_path) -> None:
    torch.manual_seed(0)
    features = make_layers(cfgs["D"], batch_norm=True)  # torchvision vgg16_bn.features
    sd = {f"features.{k}": v for k, v in features.state_dict().items()}
    path = tmp_path / "vgg16_bn.pth"
    torch.save(sd, path)
    m = SegNet(4, backbone_weights=str(path))
    ours = [x for x in m.encoder.modules() if isinstance(x, nn.Conv2d)]
    theirs = [x for x in features.modules() if isinstance(x, nn.Conv2d)]
    assert len(ours) == len(theirs) == 13
    assert all(torch.equal(a.weight, b.weight) for a, b in zip(ours, theirs))


def test_one_training_step() -> None:
    torch.manual_seed(0)
    for m in (SegNet(3, width=SMALL), SegNetBasic(3, channels=8)):
        m.train()
        opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
        x = torch.randn(2, 3, 32, 48)
        y = torch.randint(0, 3, (2, 32, 48))
        y[0, :4] = 255  # ignored pixels
        before = [p.detach().clone() for p in m.parameters()]
        loss = F.cross_entropy(m(x), y, ignore_index=255)
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
        opt.step()
        assert torch.isfinite(loss)
        assert any(not torch.equal(a, b) for a, b in zip(before, m.parameters()))
