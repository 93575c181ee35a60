"""The plain loop `pixelwise predict` is measured against (issue 18): PIL decode -> normalise ->
model -> argmax -> palette PNG, one image at a time. ``python bench/plain_predict.py CKPT SRC OUT``."""
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pixelwise.data.classes import palette_bytes
from pixelwise.engine.checkpoint import load_checkpoint, model_from_checkpoint

ckpt_path, src, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
ck = load_checkpoint(ckpt_path)
model = model_from_checkpoint(ck, ckpt_path).eval()
mean, std = np.float32(ck["normalization"]["mean"]), np.float32(ck["normalization"]["std"])
pal = palette_bytes(None)
out.mkdir(parents=True, exist_ok=True)
with torch.inference_mode():
    for f in sorted(src.iterdir()):
        a = (np.asarray(Image.open(f).convert("RGB"), np.float32) / 255 - mean) / std
        logits = model(torch.from_numpy(a).permute(2, 0, 1)[None])
        im = Image.fromarray(logits.argmax(1)[0].numpy().astype(np.uint8))
        im.putpalette(pal)
        im.save(out / f"{f.stem}.png")
