"""timm encoders (``backbone="timm:<name>"``) in every encoder-based model: shapes, strides,
output stride 8/16 by dilation, and local weight files loaded bit-equal (nothing downloaded)."""
import math

import pytest
import torch

timm = pytest.importorskip("timm")

from pixelwise.engine.checkpoint import model_from_checkpoint  # noqa: E402
from pixelwise.errors import CheckpointError  # noqa: E402
from pixelwise.models import build_model  # noqa: E402
from pixelwise.models.backbones import TimmEncoder, build_encoder  # noqa: E402
from pixelwise.models.registry import ModelOptionError  # noqa: E402

H, W = 97, 131  # odd sizes: ceil and floor differ at every stride
# resnet18: stride-2 feature, ceil-sized; efficientnet_b0: depthwise family; convnext_atto: no
# stride-2 feature (empty c1) and floor-sized (patchify stem), so the encoder pads and crops
BACKBONES = ["timm:resnet18", "timm:efficientnet_b0", "timm:convnext_atto"]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("model", ["deeplabv3plus", "deeplabv3", "unet", "pspnet", "fcn8s"])
def test_forward_gives_logits_of_the_input_size(model, backbone):
    m = build_model(model, 3, backbone=backbone).eval()
    with torch.no_grad():
        y = m(torch.rand(1, 3, H, W))
    assert tuple(y.shape) == (1, 3, H, W)
    assert torch.isfinite(y).all()


def test_maskrcnn_on_a_timm_encoder_trains_and_predicts():
    m = build_model("maskrcnn", 3, preset="cpu", backbone="timm:resnet18")
    img = torch.rand(3, 96, 128)
    target = {"boxes": torch.tensor([[10.0, 10.0, 60.0, 50.0]]), "labels": torch.tensor([1]),
              "masks": torch.zeros(1, 96, 128, dtype=torch.uint8)}
    target["masks"][0, 10:50, 10:60] = 1
    losses = m([img], [target])
    assert all(torch.isfinite(v) for v in losses.values())
    m.eval()
    with torch.no_grad():
        out = m([img])
    assert set(out[0]) >= {"boxes", "labels", "scores", "masks"}


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("output_stride", [32, 16, 8])
def test_features_are_ceil_sized_at_the_encoders_strides(backbone, output_stride):
    enc = build_encoder(backbone, output_stride=output_stride).eval()
    expected = tuple(min(s, output_stride) for s in (2, 4, 8, 16, 32))
    assert enc.output_strides == expected
    with torch.no_grad():
        feats = enc(torch.rand(1, 3, H, W))
    assert len(feats) == 5
    for f, s, c in zip(feats, enc.output_strides, enc.out_channels):
        assert tuple(f.shape[1:]) == (c, math.ceil(H / s), math.ceil(W / s)), (backbone, s)
    if backbone == "timm:convnext_atto":
        assert enc.out_channels[0] == 0 and enc.pad_to == 32  # no stride-2 feature; floors without padding
    else:
        assert enc.pad_to == 0


@pytest.mark.parametrize(("model", "default_os"), [("deeplabv3", 16), ("deeplabv3plus", 16), ("pspnet", 8)])
def test_atrous_models_dilate_timm_encoders(model, default_os):
    """The paper's output stride by default (as for resnet*), and an explicit one is honoured."""
    m = build_model(model, 2, backbone="timm:resnet18")
    assert m.encoder.output_strides[-1] == default_os
    m = build_model(model, 2, backbone="timm:resnet18", output_stride=32 if default_os != 32 else 16)
    assert m.encoder.output_strides[-1] == (32 if default_os != 32 else 16)


def _save_random_timm(tmp_path, name: str, **kw):
    full = timm.create_model(name, pretrained=False, **kw)
    sd = full.state_dict()
    path = tmp_path / f"{name}.pth"
    torch.save(sd, path)
    return path, sd


def _norm(key: str) -> str:
    return key.replace("_", ".")  # timm's features_only wrapper flattens stem.0 into stem_0


@pytest.mark.parametrize("name", ["resnet18", "convnext_atto"])
def test_a_timm_state_dict_file_loads_bit_equal(tmp_path, name):
    path, sd = _save_random_timm(tmp_path, name)
    ref = {_norm(k): v for k, v in sd.items()}
    enc = build_encoder(f"timm:{name}", weights_path=str(path))
    mine = enc.model.state_dict()
    assert len(mine) > 20
    for k, v in mine.items():
        assert torch.equal(v, ref[_norm(k)]), k
    # the same through a model's keyword, at a dilated output stride (same parameters)
    m = build_model("deeplabv3plus", 3, backbone=f"timm:{name}", backbone_weights=str(path))
    for k, v in m.encoder.model.state_dict().items():
        assert torch.equal(v, ref[_norm(k)]), k
    # and the features are those of the timm model the file came from
    full = timm.create_model(name, pretrained=False)
    full.load_state_dict(sd)
    x = torch.rand(1, 3, 64, 96)  # multiples of 32: no padding
    with torch.no_grad():
        ours = enc.eval()(x)
        theirs = full.eval().forward_intermediates(x, intermediates_only=True)
    for a, b in zip(ours[-4:], theirs[-4:], strict=True):  # strides 4..32
        assert torch.equal(a, b)


def test_grey_input_adapts_the_first_conv_as_timm_does(tmp_path):
    path, sd = _save_random_timm(tmp_path, "resnet18")
    enc = build_encoder("timm:resnet18", in_channels=1, weights_path=str(path))
    w = enc.model.state_dict()["conv1.weight"]
    assert w.shape[1] == 1
    torch.testing.assert_close(w, sd["conv1.weight"].sum(dim=1, keepdim=True), rtol=0, atol=1e-6)


@pytest.mark.parametrize("other", ["resnet34", "resnet18d", "convnext_atto"])
def test_weights_of_another_model_are_one_line_naming_the_file(tmp_path, other):
    """resnet34 holds every resnet18 key (timm alone would load it in part, silently)."""
    path, _ = _save_random_timm(tmp_path, other)
    with pytest.raises(CheckpointError) as e:
        build_model("unet", 2, backbone="timm:resnet18", backbone_weights=str(path))
    assert str(path) in str(e.value) and "timm model 'resnet18'" in str(e.value)
    assert "\n" not in str(e.value)


def test_a_file_without_the_classifier_loads(tmp_path):
    path, sd = _save_random_timm(tmp_path, "resnet18")
    torch.save({k: v for k, v in sd.items() if not k.startswith("fc.")}, path)
    enc = build_encoder("timm:resnet18", weights_path=str(path))
    assert torch.equal(enc.model.state_dict()["layer4.1.bn2.weight"], sd["layer4.1.bn2.weight"])


def test_clear_errors():
    with pytest.raises(ModelOptionError, match="unknown timm model 'resnet7'"):
        build_model("unet", 2, backbone="timm:resnet7")
    with pytest.raises(ModelOptionError, match="downloads nothing"):
        build_model("deeplabv3plus", 2, backbone="timm:resnet18", pretrained="imagenet")
    with pytest.raises(ModelOptionError, match="needs one feature map at each of the strides"):
        build_model("unet", 2, backbone="timm:vit_tiny_patch16_224")
    with pytest.raises(ValueError, match="multi_grid is only for resnet"):
        build_encoder("timm:resnet18", multi_grid=(1, 2, 4))


def test_a_checkpoint_of_a_timm_model_rebuilds_it(tmp_path):
    m = build_model("unet", 2, backbone="timm:efficientnet_b0").eval()
    ck = {"model": m.pixelwise_spec, "state_dict": m.state_dict()}
    again = model_from_checkpoint(ck).eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(m(x), again(x))
    assert isinstance(again.encoder, TimmEncoder)


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_b0", "convnext_atto"])
def test_maskrcnn_from_a_timm_weight_file_freezes_its_first_stages(tmp_path, name):
    """With encoder weights Mask R-CNN trains res3..res5 only (trainable_stages 3), for timm
    encoders too: their stages cover every parameter once, in order."""
    path, _ = _save_random_timm(tmp_path, name)
    m = build_model("maskrcnn", 3, preset="cpu", backbone=f"timm:{name}", backbone_weights=str(path))
    enc = m.backbone.encoder
    stages = enc.stage_modules()
    params = [p for g in stages for mod in g for p in mod.parameters()]
    assert len(params) == len(list(enc.parameters())) == len({id(p) for p in params})
    trainable = [any(p.requires_grad for mod in g for p in mod.parameters()) for g in stages]
    assert trainable[2:] == [True, True, True] and not any(trainable[:2])
