"""PSPNet (SPEC §4): pyramid pooling bins and widths, auxiliary head, any input size,
training with a batch of one, and that it learns."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from pixelwise.losses import CrossEntropyLoss
from pixelwise.models import build_model, list_models
from pixelwise.models.pspnet import PooledBatchNorm2d, PSPNet, PyramidPoolingModule

from helpers import toy_batch  # noqa: E402

SMALL = dict(backbone="resnet18", ppm_channels=16, head_channels=32, aux_channels=16)



def test_registered() -> None:
    assert "pspnet" in list_models()
    m = build_model("pspnet", 5, **SMALL)
    assert isinstance(m, PSPNet) and m.pixelwise_spec["name"] == "pspnet"


def test_dilated_backbone_output_stride_8() -> None:
    m = PSPNet(3, **SMALL)
    assert m.output_stride == 8 and m.encoder.output_strides == (2, 4, 8, 8, 8)
    assert {b.conv1.dilation for b in m.encoder.layer3} == {(2, 2)}
    assert {b.conv1.dilation for b in m.encoder.layer4} == {(4, 4)}


def test_pyramid_pools_to_bins_1_2_3_6() -> None:
    m = PSPNet(3, **SMALL).eval()
    pools = [mod for mod in m.ppm.modules() if isinstance(mod, nn.AdaptiveAvgPool2d)]
    assert len(pools) == 4
    seen: list[tuple[int, ...]] = []
    hooks = [p.register_forward_hook(lambda _m, _i, o: seen.append(tuple(o.shape[-2:]))) for p in pools]
    with torch.no_grad():
        m(torch.randn(1, 3, 97, 131))  # stride-8 map 13 x 17: not a multiple of any bin
    for h in hooks:
        h.remove()
    assert seen == [(1, 1), (2, 2), (3, 3), (6, 6)]
    # average pooling, not max
    assert all(isinstance(p, nn.AdaptiveAvgPool2d) for p in pools)


def test_resnet50_channel_counts() -> None:
    m = PSPNet(21).eval()  # the paper's widths: resnet50, OS 8
    assert m.ppm.bins == (1, 2, 3, 6)
    shapes: dict[str, tuple[int, ...]] = {}

    def rec(name):
        return lambda _m, i, o: shapes.update({name + ".in": tuple(i[0].shape), name + ".out": tuple(o.shape)})

    m.ppm.register_forward_hook(rec("ppm"))
    for k, stage in enumerate(m.ppm.stages):
        stage[1].register_forward_hook(rec(f"branch{k}"))  # the 1x1 conv
        assert stage[1].bias is None and stage[1].kernel_size == (1, 1)
    m.head[0].register_forward_hook(rec("head"))
    with torch.no_grad():
        y = m(torch.randn(1, 3, 33, 33))
    assert shapes["ppm.in"] == (1, 2048, 5, 5)
    for k, b in enumerate((1, 2, 3, 6)):
        assert shapes[f"branch{k}.in"] == (1, 2048, b, b)
        assert shapes[f"branch{k}.out"] == (1, 512, b, b)
    assert shapes["ppm.out"] == (1, 4096, 5, 5)
    assert shapes["head.in"][1] == 4096 and shapes["head.out"][1] == 512
    assert m.aux_head[0][0].in_channels == 1024 and m.aux_head[0][0].out_channels == 256
    assert isinstance(m.head[1], nn.Dropout2d) and m.head[1].p == 0.1
    assert y.shape == (1, 21, 33, 33)


def test_pyramid_module_concatenates_input_first() -> None:
    ppm = PyramidPoolingModule(8, bins=(1, 2), channels=3).eval()
    x = torch.randn(2, 8, 7, 5)
    y = ppm(x)
    assert y.shape == (2, 8 + 2 * 3, 7, 5) and ppm.out_channels == 14
    assert torch.equal(y[:, :8], x)
    assert torch.allclose(y[:, 8:11], y[:, 8:11, :1, :1].expand(-1, -1, 7, 5))  # bin 1 is constant


def test_aux_only_in_training() -> None:
    m = PSPNet(4, **SMALL)
    x = torch.randn(2, 3, 64, 64)
    m.train()
    out = m(x)
    assert isinstance(out, dict) and set(out) == {"out", "aux"}
    assert out["out"].shape == out["aux"].shape == (2, 4, 64, 64)
    m.eval()
    with torch.no_grad():
        out = m(x)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 4, 64, 64)

    no_aux = PSPNet(4, aux=False, **SMALL).train()
    assert no_aux.aux_head is None
    assert isinstance(no_aux(x), torch.Tensor)
    assert sum(p.numel() for p in no_aux.parameters()) < sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("output_stride", [8, 16, 32])
def test_output_at_input_size(output_stride: int) -> None:
    m = PSPNet(3, output_stride=output_stride, **SMALL)
    x = torch.randn(2, 3, 97, 131)
    out = m.train()(x)
    assert out["out"].shape == out["aux"].shape == (2, 3, 97, 131)
    with torch.no_grad():
        assert m.eval()(x).shape == (2, 3, 97, 131)


def test_pooled_batchnorm_batch_of_one() -> None:
    bn = PooledBatchNorm2d(4)
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0, 0.0]))
        bn.running_var.copy_(torch.tensor([2.0, 0.5, 1.0, 3.0]))
    ref = nn.BatchNorm2d(4)
    ref.load_state_dict(bn.state_dict())
    mean0, var0 = bn.running_mean.clone(), bn.running_var.clone()
    x1 = torch.randn(1, 4, 1, 1)
    with pytest.raises(ValueError):
        ref.train()(x1)  # what plain BN does
    y = bn.train()(x1)
    assert torch.allclose(y, ref.eval()(x1))  # running statistics, as in eval mode
    assert torch.equal(bn.running_mean, mean0) and torch.equal(bn.running_var, var0)  # not updated
    x2 = torch.randn(2, 4, 1, 1)
    assert torch.allclose(bn.train()(x2), ref.train()(x2))  # otherwise plain BN
    assert torch.allclose(bn.running_mean, ref.running_mean)


def test_training_step_with_batch_of_one() -> None:
    torch.manual_seed(0)
    m = PSPNet(3, **SMALL).train()
    x, y = toy_batch(n=1, h=48, w=40)
    loss = CrossEntropyLoss(3)(m(x), y)
    loss.backward()
    torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9).step()
    assert torch.isfinite(loss)
    assert m.ppm.stages[0][1].weight.grad is not None  # the bin-1 branch trains too
    assert m.ppm.stages[0][1].weight.grad.abs().sum() > 0


def test_few_steps_lower_the_loss() -> None:
    torch.manual_seed(0)
    m = PSPNet(3, dropout=0.0, **SMALL).train()
    x, y = toy_batch(n=2, h=48, w=48)
    crit = CrossEntropyLoss(3)  # uses the aux output with weight 0.4
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    losses = []
    for _ in range(6):
        opt.zero_grad()
        loss = crit(m(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_efficientnet_backbone_runs_at_stride_32() -> None:
    m = PSPNet(3, backbone="efficientnet_lite0", ppm_channels=16, head_channels=32, aux_channels=16)
    assert m.output_stride == 32 and m.ppm.in_channels == 320
    out = m.train()(torch.randn(2, 3, 97, 131))
    assert out["out"].shape == (2, 3, 97, 131)
    with pytest.raises(ValueError):
        PSPNet(3, backbone="efficientnet_lite0", output_stride=8)
