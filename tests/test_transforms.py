"""Joint transforms: labels only ever move by nearest neighbour, image and labels stay aligned."""
from __future__ import annotations

import pytest
import torch

from pixelwise.data.transforms import (
    IMAGENET_MEAN,
    ColorJitter,
    Compose,
    ElasticDeform,
    Normalize,
    RandomCrop,
    RandomHorizontalFlip,
    RandomScale,
    Resize,
    build_transforms,
)

LABEL_VALUES = (0, 3, 7, 255)


def make_sample(h: int = 24, w: int = 32, seed: int = 0) -> dict:
    """A sample whose image channel 0 encodes the semantic label (value / 255) exactly."""
    g = torch.Generator().manual_seed(seed)
    semantic = torch.tensor(LABEL_VALUES)[torch.randint(0, len(LABEL_VALUES), (h, w), generator=g)]
    instance_map = torch.randint(0, 5, (h, w), generator=g)
    image = torch.rand(3, h, w, generator=g)
    image[0] = semantic.float() / 255.0
    masks = torch.zeros(2, h, w, dtype=torch.bool)
    masks[0, 2:6, 3:9] = True
    masks[1, 10:20, 20:30] = True
    instances = {"boxes": torch.tensor([[3.0, 2, 9, 6], [20, 10, 30, 20]]), "labels": torch.tensor([1, 2]),
                 "masks": masks}
    return {"image": image, "semantic": semantic, "instance_map": instance_map, "instances": instances,
            "meta": {"id": "x", "file": "x.png", "size": (h, w)}}


GEOMETRIC = [
    RandomScale(0.5, 2.0),
    RandomScale(0.3, 0.6),
    Resize((17, 45)),
    Resize(50),
    RandomCrop(16),
    RandomCrop((40, 50)),
    RandomHorizontalFlip(1.0),
    ElasticDeform(sigma=6.0),
    build_transforms(train=True, crop_size=20, color_jitter=0.3),
]


@pytest.mark.parametrize("transform", GEOMETRIC, ids=lambda t: type(t).__name__)
def test_no_new_label_values(transform) -> None:
    for seed in range(5):
        torch.manual_seed(seed)
        sample = make_sample(seed=seed)
        out = transform(sample)
        h, w = out["image"].shape[-2:]
        for key in ("semantic", "instance_map"):
            assert out[key].shape == (h, w) and out[key].dtype == torch.int64
        assert set(out["semantic"].unique().tolist()) <= set(LABEL_VALUES)
        assert set(out["instance_map"].unique().tolist()) <= set(range(5)) | {255}
        assert out["meta"] == sample["meta"]
        masks = out["instances"]["masks"]
        assert masks.dtype == torch.bool and masks.shape[1:] == (h, w)
        assert len(out["instances"]["labels"]) == len(out["instances"]["boxes"]) == masks.shape[0]


@pytest.mark.parametrize("transform", [Resize((50, 70)), Resize((9, 11)), RandomCrop((30, 40)),
                                       RandomHorizontalFlip(1.0), ElasticDeform(sigma=8.0)],
                         ids=repr)
def test_image_and_labels_stay_aligned(transform) -> None:
    """Nearest-neighbour moves of the label match those of an exactly label-coded image."""
    for seed in range(3):
        torch.manual_seed(seed)
        sample = make_sample(seed=seed)
        if not isinstance(transform, (RandomCrop, RandomHorizontalFlip)):
            # bilinear image resampling blends neighbours: compare only where the image was constant
            sample["semantic"] = torch.full_like(sample["semantic"], 3)
            sample["semantic"][:, sample["semantic"].shape[1] // 2:] = 7
            sample["image"][0] = sample["semantic"].float() / 255.0
        out = transform(sample)
        coded = (out["image"][0] * 255).round().long()
        valid = out["semantic"] != 255
        if isinstance(transform, (RandomCrop, RandomHorizontalFlip)):
            assert torch.equal(coded[valid], out["semantic"][valid])
        else:
            # away from the single vertical edge the two must agree
            agree = (coded == out["semantic"]).float().mean()
            assert agree > 0.9


def test_flip() -> None:
    sample = make_sample()
    out = RandomHorizontalFlip(p=1.0)(sample)
    assert torch.equal(out["image"], sample["image"].flip(-1))
    assert torch.equal(out["semantic"], sample["semantic"].flip(-1))
    assert torch.equal(out["instance_map"], sample["instance_map"].flip(-1))
    w = sample["image"].shape[-1]
    # box [3, 2, 9, 6] mirrored in a 32 px wide image: x from 32 - 9 to 32 - 3
    assert out["instances"]["boxes"][0].tolist() == [w - 9, 2, w - 3, 6]
    same = RandomHorizontalFlip(p=0.0)(sample)
    assert torch.equal(same["image"], sample["image"]) and torch.equal(same["semantic"], sample["semantic"])


def test_crop_pads_with_ignore() -> None:
    torch.manual_seed(0)
    sample = make_sample(10, 12)
    sample["semantic"][sample["semantic"] == 255] = 0  # no 255 before padding
    sample["image"][:] = 0.5
    out = RandomCrop((16, 20))(sample)
    assert out["image"].shape == (3, 16, 20) and out["semantic"].shape == (16, 20)
    padded = out["semantic"] == 255
    assert padded.sum() == 16 * 20 - 10 * 12
    assert torch.all(out["instance_map"][padded] == 255)
    assert torch.all(out["image"][:, padded] == 0) and torch.all(out["image"][:, ~padded] == 0.5)
    assert torch.equal(torch.sort(out["semantic"][~padded]).values, torch.sort(sample["semantic"].flatten()).values)
    custom = RandomCrop(16, fill=-1.0, label_fill=254)(sample)
    assert (custom["semantic"] == 254).any() and (custom["image"] == -1).any()


def test_crop_drops_empty_instances_and_fixes_boxes() -> None:
    sample = make_sample()
    torch.manual_seed(0)
    for _ in range(10):
        out = RandomCrop((8, 8))(sample)
        inst = out["instances"]
        for box, mask in zip(inst["boxes"], inst["masks"]):
            ys, xs = torch.nonzero(mask, as_tuple=True)
            assert box.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
        assert all(m.any() for m in inst["masks"])


def test_scale_changes_size_and_is_seeded() -> None:
    sample = make_sample()
    torch.manual_seed(3)
    a = RandomScale(0.5, 2.0)(sample)
    torch.manual_seed(3)
    b = RandomScale(0.5, 2.0)(sample)
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["semantic"], b["semantic"])
    up = RandomScale(2.0, 2.0)(sample)
    assert up["image"].shape == (3, 48, 64) and up["semantic"].shape == (48, 64)
    # exact 2x nearest upscaling repeats every label pixel in a 2x2 block
    assert torch.equal(up["semantic"], sample["semantic"].repeat_interleave(2, 0).repeat_interleave(2, 1))


def test_resize_labels_optional() -> None:
    sample = make_sample()
    out = Resize(12, resize_labels=False)(sample)
    assert out["image"].shape == (3, 12, 16) and out["semantic"].shape == (24, 32)


def test_normalize_and_jitter() -> None:
    sample = make_sample()
    out = Normalize((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))(sample)
    assert torch.allclose(out["image"], (sample["image"] - 0.5) / 0.25)
    assert out["semantic"] is sample["semantic"]
    gray = {**sample, "image": sample["image"][:1]}
    out = Normalize()(gray)
    assert torch.allclose(out["image"], (gray["image"] - sum(IMAGENET_MEAN) / 3) / (0.678 / 3), atol=1e-4)

    torch.manual_seed(0)
    jittered = ColorJitter(0.4, 0.4, 0.4, hue=0.05)(sample)
    assert jittered["image"].shape == sample["image"].shape
    assert 0 <= jittered["image"].min() and jittered["image"].max() <= 1
    assert not torch.equal(jittered["image"], sample["image"])
    assert torch.equal(jittered["semantic"], sample["semantic"])


def test_elastic_identity_without_displacement() -> None:
    sample = make_sample()
    out = ElasticDeform(sigma=0.0)(sample)
    assert torch.allclose(out["image"], sample["image"], atol=1e-6)
    assert torch.equal(out["semantic"], sample["semantic"])


def test_build_transforms_pipelines() -> None:
    train = build_transforms(train=True, crop_size=16)
    names = [type(t).__name__ for t in train.transforms]
    assert names == ["RandomScale", "RandomCrop", "RandomHorizontalFlip", "Normalize"]
    evaluation = build_transforms(train=False, crop_size=16)
    assert [type(t).__name__ for t in evaluation.transforms] == ["Normalize"]
    assert "RandomCrop(size=(16, 16), fill=0.0, label_fill=255)" in repr(train)
    assert repr(RandomScale(0.5, 2.0)) == "RandomScale(min_scale=0.5, max_scale=2.0)"
    plain = build_transforms(train=True, scale=None, flip=False)
    assert [type(t).__name__ for t in plain.transforms] == ["Normalize"]
    sample = make_sample()
    out = evaluation(sample)
    assert torch.equal(out["semantic"], sample["semantic"]) and out["image"].shape == sample["image"].shape
    torch.manual_seed(0)
    assert train(sample)["image"].shape == (3, 16, 16)
    assert len(Compose([])) == 0 and Compose([])(sample) is sample
