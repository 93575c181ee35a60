"""COCO mask AP of a SEMANTIC checkpoint's connected components (e.g. U-Net on nuclei), so it
can be compared with an instance model (Mask R-CNN) on the same COCO split.

Each connected component (4-connectivity) of a predicted thing class is one detection; its
score is the mean probability of that class over the component's pixels.

    python scripts/semantic_cc_mask_ap.py --checkpoint runs/unet_stardist/best.pt \
        --data runs/data/stardist --split val [--tile 256]

The dataset needs ``annotations/instances_{split}.json`` (for a VOC-layout dataset, write it
with ``pixelwise.data.formats.coco.voc_to_coco_instances(DIR)``).
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from pixelwise.data.formats.coco import CocoInstances, encode_rle
from pixelwise.data.transforms import build_transforms
from pixelwise.engine.checkpoint import load_checkpoint, model_from_checkpoint
from pixelwise.metrics.instance import coco_evaluate, format_coco_metrics
from pixelwise.postprocess import connected_components, predict_probs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--split", default="val")
    ap.add_argument("--tile", type=int)
    ap.add_argument("--min-size", type=int, default=0, help="drop components smaller than this (pixels)")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    ckpt = load_checkpoint(a.checkpoint)
    model = model_from_checkpoint(ckpt, a.checkpoint).eval()
    norm = ckpt["normalization"]
    ds = CocoInstances(a.data, a.split, build_transforms(train=False, mean=norm["mean"], std=norm["std"]),
                       image_mode=norm.get("image_mode", "RGB"))
    names = [c["name"] for c in ckpt["classes"]]
    cat_of = {names.index(c["name"]): c["id"] for c in ds.categories if c["name"] in names}
    dets, ids = [], []
    with torch.inference_mode():
        for i in range(len(ds)):
            s = ds[i]
            probs = predict_probs(model, s["image"][None], tile=a.tile)[0]
            labels = probs.argmax(0).numpy()
            inst, owner = connected_components(labels, classes=sorted(cat_of), min_size=a.min_size)
            image_id = s["meta"]["image_id"]
            ids.append(image_id)
            for k, cls in enumerate(owner, start=1):
                m = inst == k
                ys, xs = np.nonzero(m)
                dets.append({"image_id": image_id, "category_id": cat_of[cls],
                             "score": float(probs[cls].numpy()[m].mean()), "segmentation": encode_rle(m),
                             "bbox": [float(xs.min()), float(ys.min()), float(xs.max() + 1 - xs.min()),
                                      float(ys.max() + 1 - ys.min())]})
    gt = json.loads(ds.annotation_file.read_text())
    segm = coco_evaluate(gt, dets, "segm", img_ids=ids)
    print(format_coco_metrics(segm, f"{a.checkpoint} (connected components, {len(dets)} instances): mask"))


if __name__ == "__main__":
    main()
