"""torchvision checkpoints in (issue 16, item 4): ``pixelwise.from_torchvision(arch, weights)``
gives a pixelwise model whose eval outputs equal torchvision's forward on the same weights.

Nothing can be downloaded here, so the references are RANDOMLY initialised torchvision
models whose BatchNorm statistics and affine parameters are randomised too (with BN at its
init values - mean 0, var 1, weight 1, bias 0 - BN would be an identity and a wrong BN
mapping could go unnoticed).
"""
from __future__ import annotations

import pytest
import torch
import torchvision
from torchvision.models import detection as tvdet
from torchvision.models import segmentation as tvseg
from torchvision.models.detection import MaskRCNN, maskrcnn_resnet50_fpn
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.ops.misc import FrozenBatchNorm2d

import pixelwise
from pixelwise.errors import CheckpointError, PixelwiseError
from pixelwise.models.backbones.resnet import ResNetEncoder
from pixelwise.models.registry import build_model
from pixelwise.models.torchvision import (
    TORCHVISION_ARCHS,
    convert_torchvision,
    map_torchvision_keys,
)

TOL = 1e-4
MEAN = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
STD = torch.tensor([0.229, 0.224, 0.225])[:, None, None]


def _randomise_bn(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.BatchNorm2d, FrozenBatchNorm2d)):
                m.running_mean.uniform_(-0.5, 0.5, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.uniform_(-0.2, 0.2, generator=g)
    return model.eval()


def _tv_semantic(arch: str, num_classes: int = 5, aux: bool = True) -> torch.nn.Module:
    torch.manual_seed(0)
    model = getattr(tvseg, arch)(weights=None, weights_backbone=None, num_classes=num_classes, aux_loss=aux)
    return _randomise_bn(model)


_SEMANTIC_REFS: dict[tuple[str, bool], torch.nn.Module] = {}


def _ref(arch: str, aux: bool = True) -> torch.nn.Module:
    if (arch, aux) not in _SEMANTIC_REFS:
        _SEMANTIC_REFS[(arch, aux)] = _tv_semantic(arch, aux=aux)
    return _SEMANTIC_REFS[(arch, aux)]


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


# ----------------------------------------------------------------------------- semantic


@pytest.mark.parametrize("arch", ["fcn_resnet50", "deeplabv3_resnet50", "fcn_resnet101", "deeplabv3_resnet101"])
def test_semantic_outputs_equal_torchvision(arch):
    tv = _ref(arch)
    model = pixelwise.from_torchvision(arch, tv.state_dict())
    assert not model.training
    x = torch.randn(2, 3, 67, 85, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = tv(x)
        got = model.forward_dict(x)
        plain = model(x)
    assert set(got) == {"out", "aux"}
    assert ref["out"].shape == (2, 5, 67, 85)
    assert ref["out"].std() > 0.1  # not a degenerate reference
    assert _max_diff(ref["out"], got["out"]) <= TOL
    assert _max_diff(ref["aux"], got["aux"]) <= TOL
    assert _max_diff(ref["out"], plain) <= TOL  # eval forward: the logits tensor


def test_semantic_spec_names_the_torchvision_options():
    model = pixelwise.from_torchvision("deeplabv3_resnet50", _ref("deeplabv3_resnet50").state_dict())
    assert model.pixelwise_spec == {
        "name": "deeplabv3", "num_classes": 5,
        "kwargs": {"backbone": "resnet50", "output_stride": 8, "dilation_style": "torchvision", "aux": True},
    }


def test_without_aux_classifier_the_model_has_no_aux_head():
    tv = _ref("fcn_resnet50", aux=False)
    model = pixelwise.from_torchvision("fcn_resnet50", tv.state_dict())
    assert model.aux_head is None and model.pixelwise_spec["kwargs"]["aux"] is False
    x = torch.randn(1, 3, 40, 52)
    with torch.no_grad():
        assert _max_diff(tv(x)["out"], model(x)) <= TOL
        assert set(model.forward_dict(x)) == {"out"}


def test_dilation_style_matters():
    """With DeepLab's dilation (every block of a dilated layer at the new rate) the same
    weights give other logits: the option is what makes the outputs equal."""
    tv = _ref("fcn_resnet50")
    model = pixelwise.from_torchvision("fcn_resnet50", tv.state_dict())
    model.encoder.set_output_stride(8, dilation_style="all")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert _max_diff(tv(x)["out"], model(x)) > 1e-2


def test_torchvision_dilation_rates_are_torchvisions():
    tv = torchvision.models.resnet50(weights=None, replace_stride_with_dilation=[False, True, True])
    enc = ResNetEncoder(50, output_stride=8, dilation_style="torchvision")
    for layer in ("layer1", "layer2", "layer3", "layer4"):
        for a, b in zip(getattr(tv, layer).modules(), getattr(enc, layer).modules()):
            if isinstance(a, torch.nn.Conv2d):
                assert (a.stride, a.dilation, a.padding) == (b.stride, b.dilation, b.padding)
    assert enc.layer3[0].conv2.dilation == (1, 1) and enc.layer3[1].conv2.dilation == (2, 2)
    assert enc.layer4[0].conv2.dilation == (2, 2) and enc.layer4[2].conv2.dilation == (4, 4)
    # switching back gives DeepLab's rates, as a fresh encoder has them
    enc.set_output_stride(8)
    fresh = ResNetEncoder(50, output_stride=8)
    assert [m.dilation for m in enc.modules() if isinstance(m, torch.nn.Conv2d)] == \
        [m.dilation for m in fresh.modules() if isinstance(m, torch.nn.Conv2d)]
    with pytest.raises(ValueError, match="multi_grid"):
        ResNetEncoder(50, output_stride=16, multi_grid=(1, 2, 4), dilation_style="torchvision")


def test_converted_model_trains_and_its_spec_rebuilds_it(tmp_path):
    from pixelwise.engine.checkpoint import (
        load_checkpoint,
        model_from_checkpoint,
        save_checkpoint,
    )
    from pixelwise.losses import build_loss

    conv = convert_torchvision("fcn_resnet50", _ref("fcn_resnet50").state_dict())
    assert conv.task == "semantic" and conv.normalization["mean"] == [0.485, 0.456, 0.406]
    assert [c["id"] for c in conv.classes] == list(range(5))
    path = save_checkpoint(tmp_path / "tv.pt", conv.checkpoint())
    rebuilt = model_from_checkpoint(load_checkpoint(path), path).eval()
    x = torch.randn(1, 3, 48, 40)
    with torch.no_grad():
        assert _max_diff(rebuilt(x), conv.model(x)) == 0.0

    model = conv.model.train()
    out = model(torch.randn(2, 3, 48, 40))
    assert set(out) == {"out", "aux"}  # the aux head is trained, as in torchvision
    loss = build_loss("ce", num_classes=5)(out, torch.randint(0, 5, (2, 48, 40)))
    loss.backward()
    assert model.aux_head[0].weight.grad is not None and model.head[0].weight.grad is not None


def test_voc_class_names_for_21_classes():
    tv = _tv_semantic("fcn_resnet50", num_classes=21, aux=False)
    conv = convert_torchvision("fcn_resnet50", tv.state_dict())
    assert conv.classes[0]["name"] == "__background__" and conv.classes[15]["name"] == "person"


def test_exports_to_onnx_with_equal_logits(tmp_path):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from pixelwise.export import export_onnx

    tv = _ref("deeplabv3_resnet50")
    model = pixelwise.from_torchvision("deeplabv3_resnet50", tv.state_dict())
    path = export_onnx(model, tmp_path / "m.onnx", size=64)
    x = torch.randn(1, 3, 72, 56)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    y = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        assert _max_diff(tv(x)["out"], torch.from_numpy(y)) <= 1e-3  # BN folded into the convs


def test_file_path_is_read_like_a_state_dict(tmp_path):
    tv = _ref("fcn_resnet50", aux=False)
    path = tmp_path / "fcn.pth"
    torch.save(tv.state_dict(), path)
    model = pixelwise.from_torchvision("fcn_resnet50", path)
    x = torch.randn(1, 3, 33, 47)
    with torch.no_grad():
        assert _max_diff(tv(x)["out"], model(x)) <= TOL


# ----------------------------------------------------------------------------- errors


def test_wrong_architecture_is_one_line_listing_the_keys():
    with pytest.raises(CheckpointError) as e:
        pixelwise.from_torchvision("fcn_resnet50", _ref("deeplabv3_resnet50").state_dict())
    msg = str(e.value)
    assert "\n" not in msg and "not a torchvision fcn_resnet50 state dict" in msg
    assert "missing keys" in msg and "unexpected keys" in msg and "classifier.0.convs.0.0.weight" in msg


def test_resnet50_weights_for_resnet101_name_the_missing_blocks():
    with pytest.raises(CheckpointError, match=r"missing keys .*encoder\.layer3\.6\."):
        pixelwise.from_torchvision("fcn_resnet101", _ref("fcn_resnet50").state_dict())


def test_shape_mismatch_and_bad_inputs(tmp_path):
    sd = dict(_ref("fcn_resnet50", aux=False).state_dict())
    sd["classifier.0.weight"] = sd["classifier.0.weight"][:, :7]
    with pytest.raises(CheckpointError, match=r"shape mismatch: classifier\.0\.weight \(file"):
        pixelwise.from_torchvision("fcn_resnet50", sd)
    with pytest.raises(CheckpointError, match="unknown torchvision architecture 'unet'.*fcn_resnet50"):
        pixelwise.from_torchvision("unet", sd)
    with pytest.raises(CheckpointError, match="no 'classifier.4.weight'"):
        pixelwise.from_torchvision("deeplabv3_resnet50", {"fc.weight": torch.zeros(2, 2)})
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(PixelwiseError, match="bad.pth"):
        pixelwise.from_torchvision("fcn_resnet50", bad)


# ----------------------------------------------------------------------------- Mask R-CNN


def _tv_maskrcnn(frozen: bool, num_classes: int = 4, **kw) -> torch.nn.Module:
    """torchvision's maskrcnn_resnet50_fpn as built for pretrained weights (frozen BN,
    ``is_trained``) or from scratch (``nn.BatchNorm2d``)."""
    torch.manual_seed(0)
    if frozen:
        body = torchvision.models.resnet50(weights=None, norm_layer=FrozenBatchNorm2d)
        model = MaskRCNN(_resnet_fpn_extractor(body, 3), num_classes=num_classes, **kw)
    else:
        model = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=num_classes, **kw)
    return _randomise_bn(model)


@pytest.fixture(scope="module")
def maskrcnn_refs():
    return {frozen: _tv_maskrcnn(frozen, min_size=160, max_size=256) for frozen in (True, False)}


@pytest.mark.parametrize("frozen", [True, False], ids=["pretrained_frozen_bn", "scratch_bn"])
def test_maskrcnn_detections_equal_torchvision(maskrcnn_refs, frozen):
    tv = maskrcnn_refs[frozen]
    model = pixelwise.from_torchvision("maskrcnn_resnet50_fpn", tv.state_dict(), min_size=160, max_size=256)
    assert model.options["frozen_bn"] is frozen and model.options["aligned"] is False
    x = torch.rand(3, 150, 190, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = tv([x])[0]
        got = model([(x - MEAN) / STD])[0]  # pixelwise normalises in its data pipeline
    assert len(ref["boxes"]) >= 20 and ref["masks"].shape[-2:] == (150, 190)
    for key in ("boxes", "labels", "scores", "masks"):
        assert _max_diff(ref[key], got[key]) <= TOL, key


def test_maskrcnn_at_torchvision_default_size():
    """800/1333 resizing, the thresholds of the paper preset (= torchvision's defaults)."""
    tv = _tv_maskrcnn(True, num_classes=3)
    with torch.no_grad():  # random heads favour the background: let ~50 RoIs pass the 0.05 score threshold
        tv.roi_heads.box_predictor.cls_score.bias[0] -= 5
    conv = convert_torchvision("maskrcnn_resnet50_fpn", tv.state_dict())
    model = conv.model
    assert (model.transform.min_size, model.transform.max_size) == (tv.transform.min_size, tv.transform.max_size)
    assert conv.extras == {"category_ids": [0, 1, 2]} and conv.task == "instance"
    x = torch.rand(3, 120, 171, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = tv([x])[0]
        got = model([(x - MEAN) / STD])[0]
    assert len(ref["boxes"]) >= 20
    for key in ("boxes", "labels", "scores", "masks"):
        assert _max_diff(ref[key], got[key]) <= TOL, key


def test_maskrcnn_spec_rebuilds_and_trains(maskrcnn_refs):
    conv = convert_torchvision("maskrcnn_resnet50_fpn", maskrcnn_refs[True].state_dict(), min_size=160, max_size=256)
    spec = conv.spec
    rebuilt = build_model(spec["name"], spec["num_classes"], **spec["kwargs"])
    rebuilt.load_state_dict(conv.model.state_dict())
    assert rebuilt.options["trainable_stages"] == 3
    rebuilt.train()
    x = torch.rand(3, 96, 128)
    target = {"boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0]]), "labels": torch.tensor([2]),
              "masks": torch.zeros(1, 96, 128, dtype=torch.uint8)}
    target["masks"][0, 12:70, 10:60] = 1
    losses = rebuilt([(x - MEAN) / STD], [target])
    assert {"loss_mask", "loss_classifier", "loss_box_reg"} <= set(losses)
    sum(losses.values()).backward()
    assert rebuilt.roi_heads.mask_predictor.mask_fcn_logits.weight.grad is not None


def test_old_torchvision_key_names_load():
    """Files saved by torchvision < 0.13 name the FPN, RPN and mask-head convs differently."""
    sd = dict(_tv_maskrcnn(True, num_classes=3).state_dict())
    old = {}
    for k, v in sd.items():
        k2 = k.replace("inner_blocks.0.0.", "inner_blocks.0.").replace("layer_blocks.3.0.", "layer_blocks.3.")
        k2 = k2.replace("rpn.head.conv.0.0.", "rpn.head.conv.")
        for i in range(4):
            k2 = k2.replace(f"roi_heads.mask_head.{i}.0.", f"roi_heads.mask_head.mask_fcn{i + 1}.")
        old[k2] = v
    assert "roi_heads.mask_head.mask_fcn4.weight" in old and "rpn.head.conv.weight" in old
    new_model = pixelwise.from_torchvision("maskrcnn_resnet50_fpn", sd)
    old_model = pixelwise.from_torchvision("maskrcnn_resnet50_fpn", old)
    a, b = new_model.state_dict(), old_model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_key_table_covers_every_torchvision_key():
    for arch in TORCHVISION_ARCHS:
        if arch.startswith("maskrcnn"):
            tv = getattr(tvdet, arch)(weights=None, weights_backbone=None, num_classes=3)
        else:
            tv = getattr(tvseg, arch)(weights=None, weights_backbone=None, num_classes=3, aux_loss=True)
        mapped, unmatched = map_torchvision_keys(arch, tv.state_dict())
        assert unmatched == [] and len(mapped) == len(tv.state_dict()), arch


def test_maskrcnn_v2_detections_equal_torchvision():
    """v2: BN in the FPN and heads, a 2-conv RPN head, a 4conv1fc box head."""
    torch.manual_seed(0)
    tv = _randomise_bn(tvdet.maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None, num_classes=4,
                                                       min_size=160, max_size=256))
    with torch.no_grad():  # random heads favour the background: let RoIs pass the 0.05 score threshold
        tv.roi_heads.box_predictor.cls_score.bias[0] -= 5
    conv = convert_torchvision("maskrcnn_resnet50_fpn_v2", tv.state_dict(), min_size=160, max_size=256)
    assert {k: conv.spec["kwargs"][k] for k in ("fpn_norm", "rpn_conv_depth", "box_head_convs", "head_norm")} == \
        {"fpn_norm": True, "rpn_conv_depth": 2, "box_head_convs": 4, "head_norm": True}
    x = torch.rand(3, 150, 190, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = tv([x])[0]
        got = conv.model([(x - MEAN) / STD])[0]
    assert len(ref["boxes"]) >= 20
    for key in ("boxes", "labels", "scores", "masks"):
        assert _max_diff(ref[key], got[key]) <= TOL, key
    with pytest.raises(CheckpointError, match="not a torchvision maskrcnn_resnet50_fpn state dict"):
        pixelwise.from_torchvision("maskrcnn_resnet50_fpn", tv.state_dict())


def test_other_class_count_keeps_all_but_the_class_layers():
    """Fine-tuning on 3 classes from a 5-class file: every weight but the class-dependent
    last layers is torchvision's; those are freshly initialised with the new shape."""
    tv = _ref("deeplabv3_resnet50")
    model = pixelwise.from_torchvision("deeplabv3_resnet50", tv.state_dict(), num_classes=3)
    assert model.pixelwise_spec["num_classes"] == 3
    mapped, _ = map_torchvision_keys("deeplabv3_resnet50", tv.state_dict())
    own = model.state_dict()
    fresh = {"head.2.weight", "head.2.bias", "aux_head.4.weight", "aux_head.4.bias"}
    assert all(own[k].shape[0] == 3 for k in fresh)
    assert all(torch.equal(own[k], v) for k, v in mapped.items() if k not in fresh)
    x = torch.randn(1, 3, 40, 40)
    with torch.no_grad():  # the features feeding the new classifier are torchvision's
        ref = torch.nn.Sequential(*list(tv.classifier)[:4])(tv.backbone(x)["out"])
        got = torch.nn.Sequential(*list(model.head)[:2])(model.encoder(x)[4])
        assert _max_diff(ref, got) <= TOL

    conv = convert_torchvision("maskrcnn_resnet50_fpn", _tv_maskrcnn(True).state_dict(), num_classes=2)
    assert conv.model.roi_heads.box_predictor.cls_score.out_features == 2
    assert conv.model.roi_heads.mask_predictor.mask_fcn_logits.out_channels == 2
    assert conv.extras == {"category_ids": [0, 1]} and len(conv.classes) == 2


def _measure() -> None:
    """Print the max abs differences per architecture (the figures of the issue's closing note)."""
    x = torch.randn(2, 3, 67, 85, generator=torch.Generator().manual_seed(2))
    for arch in ("fcn_resnet50", "fcn_resnet101", "deeplabv3_resnet50", "deeplabv3_resnet101"):
        tv = _ref(arch)
        model = pixelwise.from_torchvision(arch, tv.state_dict())
        with torch.no_grad():
            ref, got = tv(x), model.forward_dict(x)
        print(f"{arch:28s} out {_max_diff(ref['out'], got['out']):.3g}  aux {_max_diff(ref['aux'], got['aux']):.3g}"
              f"  (|out| max {ref['out'].abs().max().item():.3g})")
    img = torch.rand(3, 150, 190, generator=torch.Generator().manual_seed(3))
    builds = {
        "maskrcnn_resnet50_fpn (frozen BN)": ("maskrcnn_resnet50_fpn", lambda kw: _tv_maskrcnn(True, **kw)),
        "maskrcnn_resnet50_fpn (BN)": ("maskrcnn_resnet50_fpn", lambda kw: _tv_maskrcnn(False, **kw)),
        "maskrcnn_resnet50_fpn_v2": ("maskrcnn_resnet50_fpn_v2", lambda kw: _randomise_bn(
            tvdet.maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None, num_classes=4, **kw))),
    }
    for label, (arch, build) in builds.items():
        for size in ((800, 1333), (160, 256)):
            kw = {"min_size": size[0], "max_size": size[1]}
            tv = build(kw)
            with torch.no_grad():
                tv.roi_heads.box_predictor.cls_score.bias[0] -= 5
            model = pixelwise.from_torchvision(arch, tv.state_dict(), **kw)
            with torch.no_grad():
                ref, got = tv([img])[0], model([(img - MEAN) / STD])[0]
            diffs = "  ".join(f"{k} {_max_diff(ref[k], got[k]):.3g}" for k in ("boxes", "labels", "scores", "masks"))
            print(f"{label:34s} min_size {size[0]:4d}: {len(ref['boxes'])} detections  {diffs}")


if __name__ == "__main__":
    _measure()


def test_new_model_options_on_other_backbones_and_their_errors():
    """``aux`` works on any FCN / DeepLab v3; the torchvision options refuse what they cannot do."""
    m = build_model("fcn8s", 3, width=0.125, backbone="vgg16_bn", aux=True).train()
    out = m(torch.randn(2, 3, 64, 48))
    assert set(out) == {"out", "aux"} and out["aux"].shape == (2, 3, 64, 48)
    assert isinstance(m.eval()(torch.randn(1, 3, 64, 48)), torch.Tensor)
    d = build_model("deeplabv3", 3, backbone="resnet18", aspp_channels=16, aux=True, dilation_style="torchvision")
    assert d.encoder.layer4[0].conv1.dilation == (1, 1) and d.encoder.layer4[1].conv1.dilation == (2, 2)
    assert set(d.train()(torch.randn(2, 3, 40, 40))) == {"out", "aux"}
    with pytest.raises(ValueError, match="use fcn32s"):
        build_model("fcn8s", 3, backbone="resnet18", head="torchvision")
    with pytest.raises(ValueError, match="resnet\\* backbones only"):
        build_model("fcn32s", 3, width=0.125, head="torchvision", output_stride=32, dilation_style="torchvision")
    with pytest.raises(ValueError, match="output_stride=32"):
        build_model("fcn8s", 3, backbone="resnet18", output_stride=8)
    with pytest.raises(ValueError, match="dilation_style must be"):
        build_model("deeplabv3", 3, backbone="resnet18", dilation_style="caffe")


def test_maskrcnn_exports_to_onnx_with_equal_detections(tmp_path):
    """Exported like any pixelwise Mask R-CNN; the graph must not keep the example image's
    RoI count per FPN level (it did: onnxruntime failed on other images)."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from pixelwise.export import export_onnx, open_onnx

    tv = _tv_maskrcnn(False, num_classes=91, min_size=200, max_size=333)
    with torch.no_grad():
        tv.roi_heads.box_predictor.cls_score.bias[0] -= 5
    model = pixelwise.from_torchvision("maskrcnn_resnet50_fpn", tv.state_dict(), min_size=200, max_size=333)
    seg = open_onnx(export_onnx(model, tmp_path / "mr.onnx", dynamic=True, size=512))  # the CLI default
    for seed, (h, w) in enumerate([(90, 120), (150, 110)]):
        x = torch.rand(3, h, w, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            ref = tv([x])[0]
        got = seg.outputs(((x - MEAN) / STD).numpy())
        assert len(ref["boxes"]) >= 20 and len(got["boxes"]) == len(ref["boxes"])
        # folded BN and other kernels reorder near-tied scores: match each of the 50 best
        # torch detections to an ONNX one of the same label (boxes to 1e-2 px)
        boxes, labels = torch.from_numpy(got["boxes"]), torch.from_numpy(got["labels"]).long()
        for box, label in zip(ref["boxes"][:50], ref["labels"][:50]):
            dist = (boxes - box).abs().amax(dim=1) + 1e9 * (labels != label)
            assert dist.min().item() <= 1e-2


def test_pretrained_folder_loads_and_predicts_like_torchvision(tmp_path):
    """What `pixelwise convert torchvision ARCH WEIGHTS --out DIR` writes: a pretrained folder
    (safetensors + config.json) that `pixelwise.load(DIR).predict(image)` runs."""
    import numpy as np

    from pixelwise.api import Segmenter

    tv = _ref("deeplabv3_resnet50")
    conv = convert_torchvision("deeplabv3_resnet50", tv.state_dict())
    assert "state_dict" not in conv.info() and conv.checkpoint().keys() == {*conv.info(), "state_dict"}
    Segmenter(conv.model, conv.info()).save_pretrained(tmp_path / "pre")
    image = (np.random.RandomState(0).rand(45, 61, 3) * 255).astype(np.uint8)
    labels = pixelwise.load(tmp_path / "pre").predict(image).labels
    x = (torch.from_numpy(image).permute(2, 0, 1).float() / 255 - MEAN) / STD
    with torch.no_grad():
        ref = tv(x[None])["out"][0].argmax(0).numpy()
    assert labels.shape == (45, 61) and (labels == ref).mean() == 1.0


def test_cli_convert_writes_a_pretrained_folder_and_train_fine_tunes_from_the_file(tmp_path, capsys):
    """`pixelwise convert torchvision` -> a folder that loads; `train --init-from` starts from the
    converted weights (every layer but the fresh class layers equals torchvision's)."""
    import torchvision

    from pixelwise.cli import main
    from pixelwise.data.synthetic import generate_shapes
    from pixelwise.engine.checkpoint import load_checkpoint

    tv = torchvision.models.segmentation.fcn_resnet50(weights=None, weights_backbone=None, num_classes=21,
                                                      aux_loss=True).eval()
    weights = tmp_path / "fcn.pth"
    torch.save(tv.state_dict(), weights)
    assert main(["convert", "torchvision", "fcn_resnet50", str(weights), "--out", str(tmp_path / "pre")]) == 0
    assert "wrote fcn32s" in capsys.readouterr().out
    x = torch.rand(1, 3, 64, 80)
    import pixelwise

    seg = pixelwise.load(tmp_path / "pre")
    with torch.no_grad():
        assert torch.equal(seg.model(x)[0].argmax(0) if seg.model(x).dim() == 4 else seg.model(x),
                           tv(x)["out"][0].argmax(0))

    data = generate_shapes(tmp_path / "shapes", num_train=4, num_val=2, size=64, seed=0)
    assert main(["train", "--model", "fcn32s", "--init-from", f"torchvision:fcn_resnet50:{weights}", "--data",
                 str(data), "--out", str(tmp_path / "run"), "--epochs", "1", "--batch-size", "2", "--lr", "0",
                 "--num-workers", "0", "--quiet", "--no-report"]) == 0
    sd = load_checkpoint(tmp_path / "run" / "last.pt")["state_dict"]
    tv_sd = tv.state_dict()
    assert sd["encoder.layer1.0.conv1.weight"].shape == tv_sd["backbone.layer1.0.conv1.weight"].shape
    assert torch.equal(sd["encoder.layer1.0.conv1.weight"], tv_sd["backbone.layer1.0.conv1.weight"])
