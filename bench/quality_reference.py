"""The reference side of ``bench/quality.py``: what a user would write instead of pixelwise.

Two standard training loops, run as ``python -m bench.quality_reference semantic|maskrcnn ...``
in their own process (one torch thread) so that they share nothing with pixelwise:

* ``semantic``: ``smp.Unet`` / ``smp.DeepLabV3Plus`` on a ResNet-34 encoder from scratch
  (``encoder_weights=None``) with the recipe of smp's examples: Adam 1e-3, cross-entropy +
  Dice, random crops and horizontal flips, inputs normalised by the training set's
  mean/std, the whole val images padded to a multiple of 32 at evaluation.
* ``maskrcnn``: torchvision's ``MaskRCNN`` on ``resnet_fpn_backbone("resnet18",
  weights=None, trainable_layers=5)`` with its defaults, trained with torchvision's detection
  tutorial loop (SGD lr 0.005, momentum 0.9, weight decay 5e-4, batch 2, linear warm-up over
  the first epoch but at least 100 iterations, horizontal flips), scored by pycocotools' COCOeval. One change from the defaults:
  ``min_size``/``max_size`` are the images' own size, so both tools see the same pixels (the
  default 800 would upsample 128 px images 6x and spend the budget on empty pixels).

Both train for ``--budget`` seconds of wall clock (counted from the first step, as
pixelwise's ``time_limit``), then evaluate the final weights on the val split the dataset
defines, and print one JSON line.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def voc_split(data: Path, split: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """(image, mask) arrays of a VOC folder's ``ImageSets/Segmentation/<split>.txt`` (a user's
    own reader: PIL, no pixelwise)."""
    names = (data / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()
    out = []
    for n in names:
        img = next(p for p in (data / "JPEGImages").glob(f"{n}.*"))
        out.append((np.asarray(Image.open(img)), np.asarray(Image.open(data / "SegmentationClass" / f"{n}.png"))))
    return out


def confusion(pred: np.ndarray, gt: np.ndarray, k: int, ignore: int = 255) -> np.ndarray:
    """(k, k) counts, rows = ground truth, columns = prediction; ``ignore`` pixels left out."""
    keep = gt != ignore
    return np.bincount(gt[keep].astype(np.int64) * k + pred[keep], minlength=k * k).reshape(k, k)


def iou_per_class(cm: np.ndarray) -> list[float]:
    """FCN §5's IU per class: n_ii / (t_i + sum_j n_ji - n_ii); NaN where the class is absent from both."""
    inter = np.diag(cm).astype(float)
    union = cm.sum(0) + cm.sum(1) - inter
    return [float(i / u) if u else float("nan") for i, u in zip(inter, union)]


def _to_tensor(img: np.ndarray, mean: np.ndarray, std: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(img.astype(np.float32) / 255.0)
    x = x[None] if x.ndim == 2 else x.permute(2, 0, 1)
    return (x - torch.from_numpy(mean)[:, None, None]) / torch.from_numpy(std)[:, None, None]


def semantic(a: argparse.Namespace) -> dict:
    import segmentation_models_pytorch as smp

    torch.manual_seed(a.seed)
    rng = np.random.default_rng(a.seed)
    train, val = voc_split(Path(a.data), "train"), voc_split(Path(a.data), "val")
    k = a.classes
    chans = 1 if train[0][0].ndim == 2 else 3
    pixels = np.concatenate([im.reshape(-1, chans) for im, _ in train]).astype(np.float64) / 255.0
    mean, std = pixels.mean(0).astype(np.float32), pixels.std(0).astype(np.float32)
    net = {"unet": smp.Unet, "deeplabv3plus": smp.DeepLabV3Plus}[a.arch]
    model = net("resnet34", encoder_weights=None, in_channels=chans, classes=k)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    dice = smp.losses.DiceLoss(mode="multiclass", from_logits=True, ignore_index=255)
    ce = torch.nn.CrossEntropyLoss(ignore_index=255)

    def batch() -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = [], []
        for i in rng.integers(0, len(train), a.batch_size):
            im, m = train[i]
            y0, x0 = rng.integers(0, m.shape[0] - a.crop + 1), rng.integers(0, m.shape[1] - a.crop + 1)
            im, m = im[y0:y0 + a.crop, x0:x0 + a.crop], m[y0:y0 + a.crop, x0:x0 + a.crop]
            if rng.random() < 0.5:
                im, m = im[:, ::-1], m[:, ::-1]
            xs.append(_to_tensor(np.ascontiguousarray(im), mean, std))
            ys.append(torch.from_numpy(np.ascontiguousarray(m).astype(np.int64)))
        return torch.stack(xs), torch.stack(ys)

    model.train()
    t0, steps = time.time(), 0
    while time.time() - t0 < a.budget:
        x, y = batch()
        logits = model(x)
        loss = ce(logits, y) + dice(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        steps += 1
    train_seconds = time.time() - t0
    model.eval()
    cm = np.zeros((k, k), np.int64)
    with torch.no_grad():
        for im, m in val:
            x = _to_tensor(im, mean, std)[None]
            h, w = x.shape[-2:]
            ph, pw = (-h) % 32, (-w) % 32  # smp's encoders need sizes divisible by 32
            logits = model(F.pad(x, (0, pw, 0, ph), mode="reflect"))[..., :h, :w]
            cm += confusion(logits.argmax(1)[0].numpy(), m, k)
    return {"iou": iou_per_class(cm), "steps": steps, "train_seconds": train_seconds}


def _coco_samples(data: Path, split: str):
    """(COCO index, sorted category ids, [(image id, RGB array, torchvision target)]) of a split."""
    from pycocotools.coco import COCO

    coco = COCO(str(data / "annotations" / f"instances_{split}.json"))
    cats = sorted(coco.getCatIds())
    label_of = {c: i + 1 for i, c in enumerate(cats)}  # torchvision: 0 = background
    samples = []
    for img_id in sorted(coco.getImgIds()):
        info = coco.loadImgs(img_id)[0]
        img = np.asarray(Image.open(data / info["file_name"]).convert("RGB"))
        anns = [x for x in coco.loadAnns(coco.getAnnIds(imgIds=img_id)) if not x.get("iscrowd", 0)]
        masks = np.stack([coco.annToMask(x) for x in anns]) if anns else np.zeros((0, *img.shape[:2]), np.uint8)
        boxes = np.array([[x["bbox"][0], x["bbox"][1], x["bbox"][0] + x["bbox"][2], x["bbox"][1] + x["bbox"][3]]
                          for x in anns], np.float32).reshape(-1, 4)
        samples.append((img_id, img, {"boxes": torch.from_numpy(boxes),
                                      "labels": torch.tensor([label_of[x["category_id"]] for x in anns], dtype=torch.int64),
                                      "masks": torch.from_numpy(masks)}))
    return coco, cats, samples


def maskrcnn(a: argparse.Namespace) -> dict:
    from pycocotools import mask as mask_utils
    from pycocotools.cocoeval import COCOeval
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    torch.manual_seed(a.seed)
    rng = np.random.default_rng(a.seed)
    data = Path(a.data)
    _, cats, train = _coco_samples(data, "train")
    coco_val, _, val = _coco_samples(data, "val")
    size = max(max(im.shape[:2]) for _, im, _ in train + val)
    backbone = resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=5)
    model = MaskRCNN(backbone, num_classes=len(cats) + 1, min_size=size, max_size=size)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.005, momentum=0.9, weight_decay=0.0005)
    # the tutorial's first-epoch linear warm-up from lr / 1000, but at least 100 iterations: with 3
    # training images its one iteration of warm-up diverges (NaN loss at step 4 from scratch)
    warmup = max(100, min(1000, len(train) // 2 - 1))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 if s >= warmup else 0.001 + (1 - 0.001) * s / warmup)

    def flipped(img: np.ndarray, t: dict) -> tuple[torch.Tensor, dict]:
        x = torch.from_numpy(img.astype(np.float32) / 255.0).permute(2, 0, 1)
        if rng.random() < 0.5:
            w = x.shape[-1]
            b = t["boxes"].clone()
            b[:, [0, 2]] = w - t["boxes"][:, [2, 0]]
            return x.flip(-1), {"boxes": b, "labels": t["labels"], "masks": t["masks"].flip(-1)}
        return x, t

    model.train()
    t0, steps = time.time(), 0
    order: list[int] = []
    while time.time() - t0 < a.budget:
        if len(order) < 2:
            order += list(rng.permutation(len(train)))
        picks, order = order[:2], order[2:]
        xs, ts = zip(*(flipped(train[i][1], train[i][2]) for i in picks))
        losses = model(list(xs), list(ts))
        loss = sum(losses.values())
        if not torch.isfinite(loss):
            raise SystemExit(f"reference loss became {float(loss)} at step {steps}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        steps += 1
    train_seconds = time.time() - t0
    model.eval()
    results = []
    with torch.no_grad():
        for img_id, img, _ in val:
            out = model([torch.from_numpy(img.astype(np.float32) / 255.0).permute(2, 0, 1)])[0]
            masks = (out["masks"][:, 0] > 0.5).numpy().astype(np.uint8)
            for m, b, l, s in zip(masks, out["boxes"].tolist(), out["labels"].tolist(), out["scores"].tolist()):
                rle = mask_utils.encode(np.asfortranarray(m))
                rle["counts"] = rle["counts"].decode()
                results.append({"image_id": img_id, "category_id": cats[l - 1], "segmentation": rle,
                                "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "score": s})
    stats = {}
    for iou_type in ("segm", "bbox"):
        if not results:
            stats[iou_type] = [0.0] * 12
            continue
        ev = COCOeval(coco_val, coco_val.loadRes(results), iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
        stats[iou_type] = [float(v) for v in ev.stats]
    return {"mask_ap": stats["segm"][0], "mask_ap50": stats["segm"][1], "box_ap": stats["bbox"][0],
            "steps": steps, "train_seconds": train_seconds}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.quality_reference")
    sub = ap.add_subparsers(dest="kind", required=True)
    s = sub.add_parser("semantic")
    s.add_argument("--arch", choices=["unet", "deeplabv3plus"], required=True)
    s.add_argument("--classes", type=int, required=True)
    s.add_argument("--crop", type=int, required=True)
    s.add_argument("--batch-size", type=int, required=True)
    m = sub.add_parser("maskrcnn")
    for p in (s, m):
        p.add_argument("--data", required=True)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--budget", type=float, required=True, help="training seconds")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    result = semantic(a) if a.kind == "semantic" else maskrcnn(a)
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
