"""pixelwise.optimize.optimize: folded, channels_last, inference-mode models give the eager
outputs (within 1e-4) for every architecture family, and the engine's attributes survive."""
import pytest
import torch
import torch.nn as nn

import pixelwise
from pixelwise.data.loading import default_num_workers
from pixelwise.optimize import OptimizedModel, find_conv_bn_pairs, fold_conv_bn, optimize

SMALL = {
    "fcn8s": dict(width=0.125, backbone="vgg16_bn"),
    "segnet": dict(width=0.125),
    "segnet_basic": dict(channels=8),
    "unet": dict(width=0.125),
    "unet_resnet18": dict(backbone="resnet18", decoder_channels=(16, 16, 8, 8, 8)),
    "unet_original": dict(width=0.0625),
    "pspnet": dict(backbone="resnet18", ppm_channels=16, head_channels=16, aux_channels=8),
    "deeplabv3": dict(backbone="resnet18", aspp_channels=16),
    "deeplabv3plus": dict(backbone="resnet18", aspp_channels=16, decoder_channels=16),
}
# SegNet's unpooling puts values where the max-pool's argmax was: a 1e-7 change of rounding
# (folded weights, another memory layout) can flip a near-tie. Those families are checked
# in float64, where near-ties at float32 rounding are out of reach.
DOUBLE = {"segnet", "segnet_basic"}


def _randomized(name: str) -> nn.Module:
    torch.manual_seed(0)
    model_name = "unet" if name == "unet_resnet18" else name
    m = pixelwise.build_model(model_name, 3, **SMALL[name])
    for mod in m.modules():  # non-trivial BatchNorm statistics, so folding is really tested
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 2.0)
            mod.weight.data.uniform_(0.5, 1.5)
            mod.bias.data.uniform_(-0.2, 0.2)
    return m.eval()


@pytest.mark.parametrize("name", sorted(SMALL))
def test_optimized_model_matches_eager(name):
    m = _randomized(name)
    dtype = torch.float64 if name in DOUBLE else torch.float32
    m = m.to(dtype)
    size = m.valid_input_sizes(60, 400)[0] if name == "unet_original" else 64
    x = torch.randn(1, 3, size, size, dtype=dtype)
    with torch.no_grad():
        ref = m(x)
    opt = optimize(m, example=x)
    assert isinstance(opt, OptimizedModel)
    has_bn = any(isinstance(mod, nn.BatchNorm2d) for mod in m.modules())
    if has_bn:
        assert opt.report["folded"] > 0, opt.report
        # every BatchNorm that runs at inference is gone (PSPNet's training-only aux head keeps its own)
        left = [n for n, mod in opt.model.named_modules() if isinstance(mod, nn.BatchNorm2d) and "aux" not in n]
        assert not left, left
    assert opt.report["channels_last"], opt.report
    # a second input of another size (odd for the padded models), not the probe itself
    if name == "unet_original":
        x2 = torch.randn(2, 3, m.valid_input_sizes(size + 1, 600)[0], size, dtype=dtype)
    else:
        x2 = torch.randn(2, 3, 65, 47, dtype=dtype)
    with torch.no_grad():
        ref2 = m(x2)
    out, out2 = opt(x), opt(x2)
    assert out.shape == ref.shape and out2.shape == ref2.shape
    assert (out - ref).abs().max() <= 1e-4
    assert (out2 - ref2).abs().max() <= 1e-4
    assert out2.is_contiguous() and not out2.requires_grad
    assert m.training is False and any(isinstance(mod, nn.BatchNorm2d) for mod in m.modules()) == has_bn  # copy


def test_attributes_of_the_wrapped_model_are_visible():
    m = _randomized("unet_original")
    opt = optimize(m)
    assert opt.output_margin == m.output_margin and opt.depth == m.depth
    assert opt.valid_input_sizes(60, 300) == m.valid_input_sizes(60, 300)
    assert opt.pixelwise_spec == m.pixelwise_spec
    from pixelwise.postprocess import is_unpadded, predict_probs

    assert is_unpadded(opt)
    x = torch.randn(1, 3, 50, 70)
    assert torch.allclose(predict_probs(opt, x), predict_probs(m, x), atol=1e-5)
    with pytest.raises(RuntimeError):
        opt.train()


def test_folding_finds_only_conv_bn_chains():
    class Shared(nn.Module):  # conv output also used elsewhere: folding must not apply
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)
            self.conv2 = nn.Conv2d(4, 4, 1)
            self.bn2 = nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y + self.bn2(self.conv2(y))

    torch.manual_seed(0)
    m = Shared().eval()
    m.bn.running_mean.uniform_(-1, 1)
    m.bn2.running_var.uniform_(0.5, 2)
    x = torch.randn(1, 3, 8, 8)
    pairs = find_conv_bn_pairs(m, x)
    assert {(c, b) for c, b in pairs} == {(m.conv, m.bn), (m.conv2, m.bn2)}  # the hooks see both chains
    opt = optimize(m, example=x)  # ...but the output check undoes the wrong fold
    assert (opt(x) - m(x)).abs().max() <= 1e-5
    assert "folding" in " ".join(opt.report["fallbacks"])
    m2 = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    with pytest.raises(ValueError):
        fold_conv_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train(), x)
    assert fold_conv_bn(m2, x) == 1 and isinstance(m2[1], nn.Identity)


def test_compile_falls_back_cleanly(monkeypatch):
    m = _randomized("segnet_basic")

    def broken(*a, **k):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(torch, "compile", broken)
    with pytest.warns(RuntimeWarning, match="torch.compile unavailable"):
        opt = optimize(m, compile=True)
    assert opt.report["compiled"] is False
    x = torch.randn(1, 3, 32, 32)
    assert opt(x).shape == (1, 3, 32, 32)


def test_default_num_workers_keeps_two_cores_busy():
    assert default_num_workers(1) == 0
    assert default_num_workers(2) == 1
    assert default_num_workers(3) == 2
    assert default_num_workers(64) == 2


def test_num_workers_none_means_auto_in_every_loader(tmp_path):
    """``num_workers=None`` (TrainConfig's and evaluation's default) resolves to
    default_num_workers() where the loaders are made; explicit values are kept."""
    import inspect

    from pixelwise.engine.common import make_loader
    from pixelwise.engine.config import TrainConfig, load_config
    from pixelwise.engine.evaluate import evaluate_checkpoint
    from pixelwise.engine.instance import _loader
    from pixelwise.data.loading import resolve_num_workers

    assert [resolve_num_workers(None, n) for n in (1, 2, 3, 16)] == [0, 1, 2, 2]
    assert resolve_num_workers(0, 16) == 0 and resolve_num_workers(5, 2) == 5
    from pixelwise.errors import PixelwiseError

    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(PixelwiseError, match="num_workers"):
            resolve_num_workers(bad)
    assert TrainConfig().num_workers is None
    assert inspect.signature(evaluate_checkpoint).parameters["num_workers"].default is None
    cfg = tmp_path / "c.yaml"
    cfg.write_text("num_workers: 0\n")
    assert load_config(cfg).num_workers == 0 and load_config(None).num_workers is None
    ds = [{"image": torch.zeros(3, 4, 4)} for _ in range(3)]
    assert make_loader(ds, 2, False, None).num_workers == default_num_workers()
    assert make_loader(ds, 2, False, 0).num_workers == 0
    assert _loader(ds, 2, False, None).num_workers == default_num_workers()
    assert _loader(ds, 2, False, 0).num_workers == 0
