"""Model rows: inference (batch 1, 512x512, 2 threads; eager and optimized) and one training
step (batch 4, 256x256) vs torchvision / segmentation-models-pytorch; achieved GFLOP/s vs a
large matmul; SegNet vs U-Net peak memory; data loading vs model consumption."""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time

import torch

from bench.common import QUICK, Row, fmt_s, median_time, ratio, side_by_side

SIZE = 512


def _pairs():
    import segmentation_models_pytorch as smp
    import torchvision

    import pixelwise

    yield ("deeplabv3 ResNet-50 OS8 vs torchvision deeplabv3_resnet50",
           lambda: pixelwise.build_model("deeplabv3", 21, output_stride=8),
           lambda: torchvision.models.segmentation.deeplabv3_resnet50(weights=None, weights_backbone=None,
                                                                      num_classes=21, aux_loss=False))
    yield ("unet ResNet-34 vs smp Unet('resnet34')",
           lambda: pixelwise.build_model("unet", 21, backbone="resnet34"),
           lambda: smp.Unet("resnet34", encoder_weights=None, classes=21))


def _out(y):
    return y["out"] if isinstance(y, dict) else y


def inference_rows(flops_out: dict) -> list[Row]:
    from pixelwise.optimize import optimize
    from pixelwise.models.summary import count_flops

    torch.set_num_threads(2)
    reps = 3 if QUICK else 5
    x = torch.randn(1, 3, SIZE, SIZE)
    rows = []
    for what, ours_fn, ref_fn in _pairs():
        ours, ref = ours_fn().eval(), ref_fn().eval()
        with torch.inference_mode():
            a, b = side_by_side(lambda: ours(x), lambda: _out(ref(x)), reps)
        fast = optimize(ours, example=x[:, :, :128, :128])
        c, b2 = side_by_side(lambda: fast(x), lambda: _out(ref(x)), reps)
        rows.append(Row(f"inference {what}, eager (1x3x{SIZE}x{SIZE}, 2 threads)", fmt_s(a), fmt_s(b), ratio(a, b)))
        rows.append(Row(f"inference {what}, pixelwise optimize() vs reference eager", fmt_s(c), fmt_s(b2),
                        ratio(c, b2), f"folded {fast.report['folded']} BN, channels_last "
                        f"{fast.report['channels_last']}"))
        try:
            gflop = count_flops(ours, SIZE) / 1e9
        except Exception:
            gflop = float("nan")
        flops_out[what] = (gflop, a, c)
        del ours, ref, fast
    return rows


def train_rows() -> list[Row]:
    torch.set_num_threads(2)
    reps = 3 if QUICK else 5
    x = torch.randn(4, 3, 256, 256)
    y = torch.randint(0, 21, (4, 256, 256))
    rows = []
    for what, ours_fn, ref_fn in _pairs():
        def step_fn(model):
            opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
            model.train()

            def step():
                opt.zero_grad(set_to_none=True)
                loss = torch.nn.functional.cross_entropy(_out(model(x)), y)
                loss.backward()
                opt.step()
            return step
        a, b = side_by_side(step_fn(ours_fn()), step_fn(ref_fn()), reps)
        rows.append(Row(f"train step {what} (batch 4, 256x256, SGD)", fmt_s(a), fmt_s(b), ratio(a, b)))
    return rows


def matmul_gflops() -> float:
    torch.set_num_threads(2)
    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    t = median_time(lambda: torch.matmul(a, b), reps=5)
    return 2 * n ** 3 / t / 1e9


def flops_rows(flops: dict) -> list[Row]:
    peak = matmul_gflops()
    rows = []
    for what, (gflop, eager, fast) in flops.items():
        name = what.split(" vs ")[0]
        rows.append(Row(f"achieved GFLOP/s, {name} ({gflop:.0f} GFLOP at {SIZE}px; eager / optimized) vs 2048^2 "
                        f"fp32 matmul", f"{gflop / eager:.0f} / {gflop / fast:.0f}", f"{peak:.0f}",
                        f"{gflop / fast / peak:.2f}x of matmul"))
    return rows


_MEM_CHILD = r"""
import json, resource, sys, torch
torch.set_num_threads(2)
import pixelwise
name, size = sys.argv[1], int(sys.argv[2])
m = pixelwise.build_model(name, 21).train()
x = torch.randn(1, 3, size, size); y = torch.randint(0, 21, (1, size, size))
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1])
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
base = status("VmRSS")
out = m(x); out = out["out"] if isinstance(out, dict) else out
torch.nn.functional.cross_entropy(out, y).backward()
print(json.dumps({"mib": (status("VmHWM") - base) / 1024}))
"""


def memory_rows() -> list[Row]:
    size = 256 if QUICK else 512
    res = {}
    for name in ("segnet", "unet"):
        p = subprocess.run([sys.executable, "-c", _MEM_CHILD, name, str(size)], capture_output=True, text=True,
                           check=True)
        res[name] = json.loads(p.stdout.strip().splitlines()[-1])["mib"]
    return [Row(f"peak memory of forward+backward, SegNet (VGG-16, 5 levels) vs U-Net (padded, 5 levels), "
                f"1x3x{size}x{size}", f"{res['segnet']:.0f} MiB", f"{res['unet']:.0f} MiB",
                f"{res['segnet'] / res['unet']:.2f}x", "SegNet is pixelwise; U-Net the comparison (peak RSS growth over the forward+backward)")]


def data_rows() -> list[Row]:
    """The built-in dataset (shapes, 128 px, the demo's train transforms) through the training
    DataLoader with the DEFAULT workers (``num_workers=None``: auto) vs the time the demo's
    model (FCN-8s, VGG16-BN at 1/4 width, batch 8, 2 threads) takes per training step. Target:
    loading >= 5x faster than the model consumes it. The note adds the main process's wait
    for data per step when both run together, as in a training loop."""
    import statistics

    import pixelwise
    from pixelwise.data.synthetic import generate_shapes
    from pixelwise.data.transforms import build_transforms
    from pixelwise.demo import DEMO_CONFIG
    from pixelwise.engine.common import make_loader, open_dataset
    from pixelwise.data.loading import resolve_num_workers

    torch.set_num_threads(2)
    n, bs = (64 if QUICK else 160), int(DEMO_CONFIG["batch_size"])
    with tempfile.TemporaryDirectory() as tmp:
        root = generate_shapes(f"{tmp}/shapes", num_train=n, num_val=4, size=128)
        tf = build_transforms(train=True, crop_size=DEMO_CONFIG["crop_size"],
                              scale=(DEMO_CONFIG["scale_min"], DEMO_CONFIG["scale_max"]))
        ds = open_dataset(root, "train", tf)
        workers = resolve_num_workers(None)
        loader = make_loader(ds, bs, shuffle=True)  # num_workers left at its default: auto
        assert loader.num_workers == workers
        t0 = time.perf_counter()
        nb = sum(1 for _ in loader)
        load_per_batch = (time.perf_counter() - t0) / nb  # worker start-up included
        model = pixelwise.build_model(DEMO_CONFIG["model"], len(ds.classes), **DEMO_CONFIG["model_kwargs"]).train()
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)

        def step(batch):
            opt.zero_grad()
            out = model(batch["image"])
            out = out["out"] if isinstance(out, dict) else out
            torch.nn.functional.cross_entropy(out, batch["semantic"], ignore_index=255).backward()
            opt.step()

        first = next(iter(make_loader(ds, bs, shuffle=False, num_workers=0)))
        model_per_batch = median_time(lambda: step(first), reps=3 if QUICK else 5)
        waits = []  # a training loop: the main process computes while the workers load
        it = iter(loader)
        while True:
            t0 = time.perf_counter()
            batch = next(it, None)
            waits.append(time.perf_counter() - t0)
            if batch is None:
                break
            step(batch)
    wait = statistics.median(waits[1:-1]) if len(waits) > 2 else waits[0]  # not the start-up, not the end
    speed = model_per_batch / load_per_batch
    return [Row(f"data loading, built-in shapes 128 px + the demo's train transforms, default workers "
                f"(auto: {workers}) vs the demo's fcn8s (VGG16-BN 1/4) train step (batch {bs}, 2 threads)",
                fmt_s(load_per_batch) + "/batch", fmt_s(model_per_batch) + "/batch",
                f"loads {speed:.1f}x faster than consumed",
                f"target >= 5x: {'met' if speed >= 5 else 'NOT met'}; in a training loop each step waited "
                f"{fmt_s(wait)} (median) for its batch")]


def elastic_rows() -> list[Row]:
    from torchvision.transforms import v2
    from torchvision import tv_tensors

    from pixelwise.data.transforms import ElasticDeform

    torch.set_num_threads(2)
    img = torch.rand(3, 512, 512)
    mask = torch.randint(0, 5, (512, 512))
    ours = ElasticDeform(sigma=10, grid=3)
    ref = v2.ElasticTransform(alpha=50.0, sigma=5.0)
    timg, tmask = tv_tensors.Image(img), tv_tensors.Mask(mask)
    reps = 5 if QUICK else 11
    a, b = side_by_side(lambda: ours({"image": img, "semantic": mask}), lambda: ref(timg, tmask), reps)
    rows = [Row("elastic deformation 512x512 image + mask vs torchvision v2.ElasticTransform", fmt_s(a), fmt_s(b),
                ratio(a, b), "U-Net grid warp (3x3, bicubic field) vs per-pixel Gaussian field")]
    try:
        import albumentations as A
        import numpy as np

        aug = A.ElasticTransform(p=1.0)
        im8, m8 = (img.permute(1, 2, 0).numpy() * 255).astype(np.uint8), mask.numpy().astype(np.uint8)
        a, c = side_by_side(lambda: ours({"image": img, "semantic": mask}), lambda: aug(image=im8, mask=m8), reps)
        rows.append(Row("elastic deformation 512x512 vs albumentations ElasticTransform", fmt_s(a), fmt_s(c), ratio(a, c)))
    except ImportError:
        pass
    return rows
