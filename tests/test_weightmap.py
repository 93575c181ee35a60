"""U-Net border weight map: exactness against a brute-force reference, the formula's values,
class balancing, speed, the per-image cache, joint transforms, the picture, and weighted-CE
training end to end."""
import math
import time

import numpy as np
import pytest
import torch

pytest.importorskip("scipy")
from scipy import ndimage  # noqa: E402

from pixelwise.data.transforms import ElasticDeform, RandomCrop, RandomHorizontalFlip  # noqa: E402
from pixelwise.data.weightmap import (  # noqa: E402
    WeightMapDataset, border_distances, boundary_weight_map, class_balance_weights, save_weight_map_image,
)


def blobs(h: int = 64, w: int = 64, n: int = 8, seed: int = 0) -> np.ndarray:
    """Touching discs with non-contiguous ids."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    inst = np.zeros((h, w), np.int64)
    for k in range(n):
        cy, cx, r = rng.uniform(8, h - 8), rng.uniform(8, w - 8), rng.uniform(4, 9)
        inst[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 3 * k + 7
    return inst


def brute_force(inst: np.ndarray, w0: float = 10.0, sigma: float = 5.0) -> np.ndarray:
    ids = [i for i in np.unique(inst) if i != 0]
    d = np.sort(np.stack([ndimage.distance_transform_edt(inst != i) for i in ids]), axis=0)
    s = d[0] + d[1]
    fg = (inst > 0).astype(int)
    counts = np.bincount(fg.ravel(), minlength=2)
    wc = (fg.size / (2 * counts))[fg]
    return wc + np.where(fg == 0, w0 * np.exp(-s**2 / (2 * sigma**2)), 0.0)


def test_matches_brute_force_reference():
    for seed in range(3):
        inst = blobs(seed=seed)
        fast = boundary_weight_map(inst)
        assert fast.dtype == np.float32 and fast.shape == inst.shape
        np.testing.assert_allclose(fast, brute_force(inst), atol=2e-4)
        np.testing.assert_allclose(boundary_weight_map(inst, w0=25.0, sigma=3.0), brute_force(inst, 25.0, 3.0),
                                   atol=2e-4)


def test_formula_values_in_a_gap_and_far_away():
    inst = np.zeros((40, 60), np.int64)
    inst[10:30, 10:25] = 1
    inst[10:30, 27:45] = 2  # a 2 px gap: columns 25 and 26
    w = boundary_weight_map(inst, class_balance=None)
    # column 25: d1 = 1 (to object 1), d2 = 2 (to object 2)
    assert w[20, 25] == pytest.approx(1 + 10 * math.exp(-(1 + 2) ** 2 / (2 * 25)), rel=1e-5)
    assert w[20, 26] == pytest.approx(w[20, 25], rel=1e-5)  # symmetric
    assert w[20, 15] == pytest.approx(1.0)  # inside an object: w_c only
    assert w[0, 59] == pytest.approx(1.0, abs=1e-4)  # far from both objects
    assert w[20, 25] > w[5, 25] > w[0, 59]  # largest in the narrow gap
    d1, d2 = border_distances(inst)
    assert d1[20, 25] == 1 and d2[20, 25] == 2 and d1[20, 15] == 0
    d1, d2 = border_distances(np.where(inst == 1, 1, 0))
    assert np.isinf(d2).all()  # one object: no second-nearest
    assert boundary_weight_map(np.where(inst == 1, 1, 0), class_balance=None).max() == pytest.approx(1.0)


def test_separation_line_between_touching_objects_gets_high_weight():
    inst = np.zeros((30, 40), np.int64)
    inst[5:25, 5:20] = 1
    inst[5:25, 20:35] = 2  # touching
    sem = (inst > 0).astype(np.int64)
    sem[5:25, 19] = 0  # the target's 1 px gap (as the stardist importer writes)
    w = boundary_weight_map(inst, sem, class_balance=None)
    assert w[15, 19] == pytest.approx(1 + 10 * math.exp(-4 / 50), rel=1e-5)  # d1 = d2 = 1
    assert w[15, 10] == pytest.approx(1.0)


def test_class_balance_and_ignore():
    inst = blobs(seed=4)
    sem = (inst > 0).astype(np.int64)
    sem[:3] = 255
    w = boundary_weight_map(inst, sem, w0=0.0)
    assert (w[:3] == 0).all()
    valid = sem != 255
    # each class carries the same total weight
    assert w[valid & (sem == 0)].sum() == pytest.approx(w[valid & (sem == 1)].sum(), rel=1e-5)
    np.testing.assert_allclose(class_balance_weights(np.array([0, 0, 0, 1])), [4 / 6, 2.0])
    w = boundary_weight_map(inst, sem, w0=0.0, class_balance=[0.5, 3.0])
    assert set(np.unique(w[valid]).tolist()) == {0.5, 3.0}
    with pytest.raises(ValueError):
        boundary_weight_map(inst, sem, class_balance="median")
    # without a semantic map: 255 in the instance map is ignore
    inst2 = inst.copy()
    inst2[0, :] = 255
    assert (boundary_weight_map(inst2)[0] == 0).all()


def test_fast_on_a_large_map():
    inst = np.zeros((512, 512), np.int64)
    k = 0
    for y in range(10, 500, 40):
        for x in range(10, 500, 40):
            k += 1
            inst[y:y + 30, x:x + 34] = k  # 144 objects, 6 px gaps in x... touching neighbours in y
    t = time.perf_counter()
    w = boundary_weight_map(inst)
    assert time.perf_counter() - t < 2.0
    assert w.max() > 5


def toy_dataset(n: int = 3):
    class Toy(torch.utils.data.Dataset):
        calls = 0

        def __len__(self):
            return n

        def __getitem__(self, i):
            Toy.calls += 1
            inst = torch.from_numpy(blobs(48, 56, 6, seed=i))
            return {"image": torch.rand(1, 48, 56), "semantic": (inst > 0).long(), "instance_map": inst,
                    "meta": {"id": f"toy{i}"}}

    return Toy()


def test_dataset_caches_maps_and_transforms_move_them_like_labels():
    base = toy_dataset()
    ds = WeightMapDataset(base, None)
    assert type(base).calls == 3  # computed once per image, at construction
    s0 = ds[0]
    assert "instance_map" not in s0 and s0["weight_map"].dtype == torch.float32
    assert torch.equal(s0["weight_map"], ds[0]["weight_map"]) and type(base).calls == 5
    expected = boundary_weight_map(base[0]["instance_map"].numpy(), base[0]["semantic"].numpy())
    assert np.array_equal(s0["weight_map"].numpy(), expected)

    flipped = WeightMapDataset(base, RandomHorizontalFlip(1.0))[1]
    assert torch.equal(flipped["weight_map"], ds[1]["weight_map"].flip(-1))

    torch.manual_seed(0)
    crop = WeightMapDataset(base, RandomCrop(64))[2]  # larger than the image: padded
    assert crop["weight_map"].shape == (64, 64)
    assert (crop["weight_map"][crop["semantic"] == 255] == 0).all()

    # elastic: every (label, weight) pair of the output existed at one pixel of the input
    src = ds[2]
    pairs = set(zip(src["semantic"].flatten().tolist(), src["weight_map"].flatten().tolist()))
    for seed in range(3):
        torch.manual_seed(seed)
        out = WeightMapDataset(base, ElasticDeform(sigma=10.0))[2]
        got = set(zip(out["semantic"].flatten().tolist(), out["weight_map"].flatten().tolist()))
        assert got <= pairs


def test_save_weight_map_image(tmp_path):
    from PIL import Image

    w = boundary_weight_map(blobs())
    p = save_weight_map_image(tmp_path / "w.png", w)
    assert Image.open(p).size == (64, 64) and Image.open(p).mode == "RGB"
    p = save_weight_map_image(tmp_path / "wi.png", torch.from_numpy(w), torch.rand(1, 64, 64))
    assert Image.open(p).size[0] > 128  # image | map side by side



def test_cli_saves_weight_map_pictures(tmp_path, capsys):
    from PIL import Image

    from pixelwise.cli import main
    from pixelwise.data.synthetic import generate_shapes

    data = generate_shapes(tmp_path / "shapes", num_train=2, num_val=1, size=48)
    assert main(["data", "weightmap", str(data), "--out", str(tmp_path / "w"), "--limit", "1", "--sigma", "3"]) == 0
    files = list((tmp_path / "w").glob("*_weights.png"))
    assert len(files) == 1 and Image.open(files[0]).size[1] == 48
    assert "max weight" in capsys.readouterr().out
