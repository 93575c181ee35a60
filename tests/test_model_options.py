"""Model options: one keyword for encoder weights (``backbone_weights``, with ``weights_path`` as a
deprecated alias) and one-line errors naming the model and its valid options, for every model."""
import inspect
import warnings

import pytest
import torch
import torchvision

from pixelwise.cli import main
from pixelwise.errors import PixelwiseError
from pixelwise.models import build_model, list_models
from pixelwise.models.registry import (
    _REGISTRY, ModelInfo, ModelOptionError, UnknownModelOptionError, model_options,
)

ALL = list_models()
# models built on an encoder, with the smallest settings that build them
ENCODER_MODELS = {
    "fcn8s": {}, "fcn16s": {}, "fcn32s": {}, "unet": {}, "deeplabv3": {}, "deeplabv3plus": {}, "pspnet": {},
    "maskrcnn": {"preset": "cpu"}, "panoptic_fpn": {"preset": "cpu", "num_things": 2},
}


def test_every_registered_model_is_covered():
    assert set(ENCODER_MODELS) | {"segnet", "segnet_basic", "unet_original"} == set(ALL)


@pytest.mark.parametrize("name", ALL)
def test_unknown_option_is_one_line_naming_the_model_and_its_options(name):
    valid = model_options(name)
    assert valid, name  # every model's options are known before building it
    with pytest.raises(UnknownModelOptionError) as e:
        build_model(name, 3, widht=0.25)
    msg = str(e.value)
    assert isinstance(e.value, PixelwiseError) and isinstance(e.value, TypeError)
    assert "\n" not in msg
    assert msg.startswith(f"unknown {name} option 'widht'")
    assert msg.endswith("valid options: " + ", ".join(valid))
    if "width" in valid:
        assert "did you mean 'width'?" in msg


@pytest.mark.parametrize("name", ALL)
def test_listed_options_are_the_builders_parameters(name):
    """The list is not padded: every listed option is a parameter of the builder, of the class
    it builds, or of build_encoder (where the class forwards **encoder_kwargs)."""
    from pixelwise.models.backbones import build_encoder
    from pixelwise.models.maskrcnn import PAPER, build_maskrcnn
    from pixelwise.models.panoptic_fpn import build_panoptic_fpn

    params = set(inspect.signature(build_encoder).parameters) - {"weights_path"}
    for obj in vars(inspect.getmodule(_REGISTRY[name].builder)).values():
        if inspect.isclass(obj) and issubclass(obj, torch.nn.Module):
            params |= set(inspect.signature(obj.__init__).parameters)
    params |= set(inspect.signature(_REGISTRY[name].builder).parameters)
    params |= set(PAPER) | set(inspect.signature(build_maskrcnn).parameters)
    params |= set(inspect.signature(build_panoptic_fpn).parameters)
    assert set(model_options(name)) <= params - {"self", "num_classes", "kw", "kwargs"}
    assert "weights_path" not in model_options(name)


def test_a_bad_value_is_a_one_line_model_option_error():
    with pytest.raises(ModelOptionError, match=r"^model 'fcn8s': FCN 'width' applies to VGG backbones only$"):
        build_model("fcn8s", 3, backbone="resnet18", width=0.5)
    assert "stride" not in model_options("fcn8s")  # fcn8s passes stride=8 itself
    with pytest.raises(ValueError):  # still a ValueError for callers that caught one
        build_model("unet", 3, backbone="resnet7")


def test_an_option_refused_below_the_builder_is_still_one_line(monkeypatch):
    """A builder whose options cannot be introspected: the TypeError of the constructor becomes
    the same one-line error."""

    def opaque(num_classes: int, **kw):
        return torch.nn.Conv2d(3, num_classes, 1, **kw)

    monkeypatch.setitem(_REGISTRY, "opaque", ModelInfo("opaque", opaque, "semantic", ""))
    assert model_options("opaque") is None
    with pytest.raises(UnknownModelOptionError, match=r"^unknown opaque option 'widht'$"):
        build_model("opaque", 3, widht=2)


def test_cli_prints_one_line_without_traceback(tmp_path, capsys):
    data = tmp_path / "data"
    assert main(["data", "synth", "--out", str(data), "--num-train", 2, "--num-val", 1, "--size", 32]) == 0
    capsys.readouterr()
    for model in ("fcn8s", "maskrcnn"):
        rc = main(["train", "--model", model, "--model-arg", "widht=0.25", "--data", str(data), "--out",
                   str(tmp_path / model), "--epochs", "1", "--num-workers", "0", "--quiet"])
        err = capsys.readouterr().err
        assert rc != 0
        assert err.strip().splitlines() == [err.strip()] and "Traceback" not in err
        assert f"unknown {model} option 'widht'" in err and "valid options: " in err


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory):
    torch.manual_seed(0)
    sd = torchvision.models.resnet18().state_dict()
    path = tmp_path_factory.mktemp("w") / "resnet18.pth"
    torch.save(sd, path)
    return path, sd


def _encoder(model):
    m = getattr(model, "instance", model)  # Panoptic FPN holds its Mask R-CNN
    return m.backbone.encoder if hasattr(m, "roi_heads") else m.encoder


@pytest.mark.parametrize("name", sorted(ENCODER_MODELS))
def test_backbone_weights_loads_the_file_in_every_encoder_model(name, resnet18_file):
    path, sd = resnet18_file
    assert "backbone_weights" in model_options(name)
    kw = {**ENCODER_MODELS[name], "backbone": "resnet18"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the current keyword gives no warning
        model = build_model(name, 3, backbone_weights=str(path), **kw)
    enc = _encoder(model).state_dict()
    assert torch.equal(enc["layer3.1.conv2.weight"], sd["layer3.1.conv2.weight"])
    assert torch.equal(enc["bn1.running_var"], sd["bn1.running_var"])
    assert model.pixelwise_spec["kwargs"]["backbone_weights"] == str(path)


@pytest.mark.parametrize("name", ["maskrcnn", "panoptic_fpn", "fcn8s", "unet"])
def test_weights_path_is_a_deprecated_alias(name, resnet18_file):
    path, sd = resnet18_file
    kw = {**ENCODER_MODELS[name], "backbone": "resnet18"}
    with pytest.warns(FutureWarning, match="weights_path is deprecated, use backbone_weights"):
        model = build_model(name, 3, weights_path=str(path), **kw)
    assert torch.equal(_encoder(model).state_dict()["layer4.0.conv1.weight"], sd["layer4.0.conv1.weight"])
    assert model.pixelwise_spec["kwargs"]["backbone_weights"] == str(path)  # checkpoints keep the new name
    assert "weights_path" not in model.pixelwise_spec["kwargs"]
    with pytest.raises(ModelOptionError, match="not also its old name weights_path"):
        build_model(name, 3, weights_path=str(path), backbone_weights=str(path), **kw)


def test_build_maskrcnn_directly_takes_the_alias_too(resnet18_file):
    from pixelwise.models.maskrcnn import build_maskrcnn

    path, sd = resnet18_file
    with pytest.warns(FutureWarning, match="weights_path is deprecated"):
        m = build_maskrcnn(3, preset="cpu", backbone="resnet18", weights_path=str(path))
    assert torch.equal(m.backbone.encoder.state_dict()["conv1.weight"], sd["conv1.weight"])
    assert m.options["backbone_weights"] == str(path) and "weights_path" not in m.options


@pytest.mark.parametrize("name", sorted(ENCODER_MODELS))
def test_no_model_reads_its_weight_file_while_rebuilt_for_a_checkpoint(name, tmp_path):
    """model_from_checkpoint rebuilds inside weight_files_skipped: every model, FCN's own
    fc6/fc7 read included, must then leave the (possibly absent) file alone."""
    from pixelwise.errors import CheckpointError
    from pixelwise.models.backbones import weight_files_skipped

    missing = str(tmp_path / "not-here.pth")
    kw = {**ENCODER_MODELS[name], "backbone": "vgg16" if name.startswith("fcn") else "resnet18"}
    if name.startswith("fcn"):
        kw["width"] = 0.125
    with weight_files_skipped():
        build_model(name, 3, backbone_weights=missing, **kw)
    with pytest.raises(CheckpointError, match="weights file not found"):
        build_model(name, 3, backbone_weights=missing, **kw)


def test_fcn_casts_fc6_fc7_from_the_file_given_as_backbone_weights(tmp_path):
    """FCN reads fc6/fc7 from the VGG16 file too; the current keyword must reach that read."""
    torch.manual_seed(0)
    net = torchvision.models.vgg16(weights=None)
    path = tmp_path / "vgg16.pth"
    torch.save(net.state_dict(), path)
    fcn = build_model("fcn32s", 3, backbone_weights=str(path))
    assert torch.equal(fcn.head[0].weight.flatten(1), net.classifier[0].weight)
    assert torch.equal(fcn.encoder.stages[0][0].weight, net.features[0].weight)
