"""Test-suite settings: one torch thread (tiny tensors on 2 shared cores run faster that way)."""
import os

import torch

os.environ.setdefault("PIXELWISE_TEST", "1")
torch.set_num_threads(1)
