"""U-Net elastic deformation (SPEC §3): 3x3 coarse grid with std 10 px, bicubic field, the same
warp for image and labels, labels by nearest only (never a new value), mirror at the borders,
and its place in the config-driven pipeline."""
import numpy as np
import pytest
import torch

from pixelwise.data.transforms import (
    ElasticDeform, MirrorPad, Normalize, build_transforms, mirror_pad, reflect_index,
)


def labelled_sample(h: int = 40, w: int = 52, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    inst = torch.randint(0, 300, (h // 4, w // 4), generator=g).repeat_interleave(4, 0).repeat_interleave(4, 1)
    inst[0, :] = 255  # ignore values too
    sem = inst % 5
    sem[1, :] = 255
    masks = torch.stack([inst == v for v in (3, 17, 42)])
    return {"image": torch.rand(3, h, w, generator=g), "semantic": sem, "instance_map": inst,
            "panoptic": inst * 7 + 1, "weight_map": torch.rand(h, w, generator=g),
            "instances": {"boxes": torch.zeros(3, 4), "labels": torch.tensor([1, 2, 3]), "masks": masks},
            "meta": {"id": "x"}}


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_labels_never_gain_a_value(interpolation):
    for seed in range(20):
        sample = labelled_sample(seed=seed)
        torch.manual_seed(seed)
        out = ElasticDeform(sigma=10.0 if seed % 2 else 30.0, interpolation=interpolation)(sample)
        for key in ("semantic", "instance_map", "panoptic", "weight_map"):
            assert out[key].dtype == sample[key].dtype and out[key].shape == sample[key].shape
            assert set(out[key].unique().tolist()) <= set(sample[key].unique().tolist()), key
        assert out["instances"]["masks"].dtype == torch.bool
        assert out["meta"] == sample["meta"]


def test_image_and_labels_move_together():
    """Image = (y, x) coordinate ramps (bilinear resampling reproduces a linear ramp exactly),
    label = unique pixel id: after the warp each label names a source pixel within half a
    pixel of the position the image was sampled at."""
    h, w = 37, 45
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    sample = {"image": torch.stack([yy, xx]), "semantic": (yy * w + xx).long()}
    for seed in range(5):
        torch.manual_seed(seed)
        out = ElasticDeform(sigma=10.0)(sample)
        ly, lx = out["semantic"] // w, out["semantic"] % w
        assert (out["image"][0] - ly).abs().max() <= 0.5 + 1e-4
        assert (out["image"][1] - lx).abs().max() <= 0.5 + 1e-4
        moved = (out["image"][0] - yy).abs().max()
        assert moved > 1.0  # it did deform


def test_displacement_field_is_a_bicubic_3x3_grid_with_std_10():
    t = ElasticDeform()
    assert (t.sigma, t.grid, t.interpolation) == (10.0, 3, "bilinear")
    torch.manual_seed(0)
    h = w = 33
    fields = torch.stack([t.displacement(h, w) for _ in range(400)])  # (400, 2, h, w)
    nodes = fields[:, :, ::16, ::16]  # the 3 x 3 coarse grid points: corners, edge middles, centre
    assert nodes.shape[-2:] == (3, 3)
    assert abs(float(nodes.std()) - 10.0) < 0.6
    assert abs(float(nodes.mean())) < 0.6
    # everything in between is the bicubic interpolation of those 9 vectors
    import torch.nn.functional as F

    rebuilt = F.interpolate(nodes, size=(h, w), mode="bicubic", align_corners=True)
    assert torch.allclose(rebuilt, fields, atol=1e-4)
    # the two components are independent draws
    assert not torch.allclose(fields[:, 0], fields[:, 1])


def test_identity_probability_and_bicubic_range():
    sample = labelled_sample()
    assert torch.equal(ElasticDeform(p=0.0)(sample)["image"], sample["image"])
    out = ElasticDeform(sigma=0.0, interpolation="bicubic")(sample)
    assert torch.allclose(out["image"], sample["image"], atol=1e-5)
    torch.manual_seed(3)
    out = ElasticDeform(sigma=20.0, interpolation="bicubic")(sample)
    assert out["image"].min() >= sample["image"].min() and out["image"].max() <= sample["image"].max()
    with pytest.raises(ValueError):
        ElasticDeform(interpolation="nearest")
    with pytest.raises(ValueError):
        ElasticDeform(grid=1)


def test_mirror_padding():
    x = torch.arange(12.0).reshape(1, 3, 4)
    np.testing.assert_array_equal(mirror_pad(x, 1, 2, 3, 1).numpy(),
                                  np.pad(x.numpy(), ((0, 0), (1, 2), (3, 1)), mode="reflect"))
    big = mirror_pad(x, 7, 5, 9, 10)  # larger than the map itself
    np.testing.assert_array_equal(big.numpy(), np.pad(x.numpy(), ((0, 0), (7, 5), (9, 10)), mode="reflect"))
    assert reflect_index(torch.tensor([-1.5, 3.5]), 3).tolist() == [1.5, 0.5]
    s = labelled_sample(8, 12)
    out = MirrorPad(4)(s)
    assert out["image"].shape == (3, 16, 20)
    assert torch.equal(out["image"], mirror_pad(s["image"], 4, 4, 4, 4))
    assert (out["semantic"][:4] == 255).all() and torch.equal(out["semantic"][4:12, 4:16], s["semantic"])
    assert (out["weight_map"][:, :4] == 0).all() and (out["panoptic"][:4] == 0).all()


def test_usable_from_configs():
    names = lambda c: [type(t).__name__ for t in c.transforms]  # noqa: E731
    assert names(build_transforms(True, crop_size=16, elastic=True)) == [
        "RandomScale", "RandomCrop", "ElasticDeform", "RandomHorizontalFlip", "Normalize"]
    c = build_transforms(True, crop_size=16, scale=None, elastic={"sigma": 5, "p": 0.5, "interpolation": "bicubic"},
                         mirror_pad=8)
    assert names(c) == ["MirrorPad", "RandomCrop", "ElasticDeform", "RandomHorizontalFlip", "Normalize"]
    e = c.transforms[2]
    assert (e.sigma, e.grid, e.p, e.interpolation) == (5, 3, 0.5, "bicubic")
    with pytest.raises(ValueError, match="valid keys"):
        build_transforms(True, elastic={"alpha": 3})
    torch.manual_seed(0)
    out = build_transforms(True, crop_size=24, elastic=True)(labelled_sample())
    assert out["image"].shape == (3, 24, 24) and out["weight_map"].shape == (24, 24)
    assert isinstance(build_transforms(False, elastic=True).transforms[0], Normalize)  # eval: no augmentation
