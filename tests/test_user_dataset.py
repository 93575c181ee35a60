"""Your Dataset, your transforms (issue 15 item 5): any map-style dataset of (image, mask) pairs trains."""
from __future__ import annotations


import numpy as np
import pytest
import torch
from PIL import Image

import pixelwise
from pixelwise.data.user import (UserSegmentation, albumentations_transform, split_indices, to_image_array,
                                 to_mask_array, torchvision_transform)
from pixelwise.errors import DataError


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> list[tuple[Image.Image, np.ndarray]]:
    """The shapes scenes as a user would have them in memory: PIL images and NumPy masks."""
    from pixelwise.data.synthetic import generate_shapes

    root = generate_shapes(tmp_path_factory.mktemp("user") / "d", num_train=10, num_val=2, size=64, seed=4)
    out = []
    for f in sorted((root / "JPEGImages").iterdir()):
        mask = np.asarray(Image.open(root / "SegmentationClass" / f"{f.stem}.png")).copy()
        out.append((Image.open(f).convert("RGB"), mask))
    return out


def test_conversions_of_images_and_masks():
    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    assert np.array_equal(to_image_array(Image.fromarray(rgb)), rgb)
    assert np.array_equal(to_image_array(torch.from_numpy(rgb).permute(2, 0, 1).float() / 255), rgb)
    assert to_image_array(np.zeros((5, 7))).shape == (5, 7, 1)
    assert np.array_equal(to_mask_array(torch.tensor([[0, 1], [255, 2]])), [[0, 1], [255, 2]])
    with pytest.raises(DataError, match="not \\[0, 1\\]"):
        to_image_array(np.full((2, 2, 3), 7.0))
    with pytest.raises(DataError, match="whole numbers"):
        to_mask_array(np.full((2, 2), 0.5))


def test_items_become_samples_and_bad_values_are_one_line(pairs):
    ds = UserSegmentation(pairs, classes=["sky", "grass", "water", "circle", "rectangle", "triangle"])
    s = ds[3]
    assert s["image"].shape == (3, 64, 64) and s["semantic"].dtype == torch.int64
    assert torch.equal(s["semantic"], torch.from_numpy(pairs[3][1].astype(np.int64)))
    dicts = UserSegmentation([{"image": np.asarray(im), "mask": m} for im, m in pairs], classes=ds.classes)
    assert torch.equal(dicts[3]["image"], s["image"])
    with pytest.raises(DataError) as e:
        UserSegmentation(pairs, classes=["a", "b"])[0]  # masks hold values up to 5
    assert "not classes 0..1" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(DataError, match="differ in size"):
        UserSegmentation([(np.zeros((4, 4, 3), np.uint8), np.zeros((5, 4), np.int64))], classes=["a", "b"])[0]


def test_the_split_is_seeded_and_disjoint():
    a, b = split_indices(10, 0.2, seed=0)
    assert (a, b) == split_indices(10, 0.2, seed=0) and len(b) == 2 and not set(a) & set(b)
    assert sorted(a + b) == list(range(10)) and split_indices(10, 0.2, seed=1) != (a, b)


def test_torchvision_v2_moves_masks_by_nearest_neighbour(pairs):
    from torchvision.transforms import v2

    joint = torchvision_transform(v2.Compose([v2.Resize((45, 37)), v2.RandomRotation(30)]))
    image, mask = joint(np.asarray(pairs[0][0]), pairs[0][1].astype(np.int64))
    assert tuple(image.shape) == (3, 45, 37) and tuple(mask.shape) == (45, 37)
    assert set(np.unique(mask.numpy())) <= set(np.unique(pairs[0][1])) | {0}  # no blended label values


def test_albumentations_style_pipelines_are_called_with_keywords():
    seen = {}

    def pipeline(*, image, mask):
        seen.update(image=image.shape, mask=mask.shape)
        return {"image": image[:, ::-1], "mask": mask[:, ::-1]}

    image, mask = albumentations_transform(pipeline)(np.zeros((4, 6, 3), np.uint8), np.arange(24).reshape(4, 6))
    assert seen == {"image": (4, 6, 3), "mask": (4, 6)} and mask[0, 0] == 5


def test_train_on_a_python_dataset_with_and_without_a_transform(pairs, tmp_path):
    names = ["sky", "grass", "water", "circle", "rectangle", "triangle"]
    common = dict(model_kwargs={"width": 0.125, "backbone": "vgg16_bn"}, epochs=1, batch_size=4, num_workers=0,
                  progress=False, optimizer="adamw", lr=0.002)
    r = pixelwise.train("fcn8s", pairs, classes=names, out=str(tmp_path / "a"), crop_size=48, **common)
    assert r["steps"] == 2 and "miou" in r["best"]  # 8 of 10 train (seeded hold-out of 2), batch 4
    from pixelwise.engine.checkpoint import load_checkpoint

    ck = load_checkpoint(tmp_path / "a" / "best.pt")
    assert [c["name"] for c in ck["classes"]] == names

    calls = []

    def flip(image, mask):
        calls.append(image.shape)
        return image[:, ::-1].copy(), mask[:, ::-1].copy()

    r = pixelwise.train("fcn8s", pairs[:8], pairs[8:], classes=names, transform=flip, out=str(tmp_path / "b"),
                        **common)
    assert r["steps"] == 2 and len(calls) == 8  # the user's transform ran on every training item...
    ds = UserSegmentation(pairs, classes=names, transform=flip)
    from pixelwise.data.transforms import build_transforms

    ds.transforms = build_transforms(train=True, crop_size=32)  # ...and pixelwise's crop did not
    s = ds[0]
    assert s["image"].shape == (3, 64, 64) and abs(float(s["image"].mean())) < 2.5  # normalised, full size


def test_detection_models_refuse_python_datasets(pairs, tmp_path):
    from pixelwise.errors import PixelwiseError

    with pytest.raises(PixelwiseError, match="semantic models"):
        pixelwise.train("maskrcnn", pairs, out=str(tmp_path / "m"), epochs=1)
