"""Shared by the export tests: a model whose outputs exercise every weight."""
from __future__ import annotations

import torch
from torch import nn

import pixelwise


def eval_model(name: str, num_classes: int = 3, **kw) -> nn.Module:
    """``name`` built with seed 0, in eval mode, with non-trivial BatchNorm statistics and no
    all-zero conv (FCN zero-initialises its score layers), so that an export that drops or
    mistranslates a layer shows in the outputs."""
    torch.manual_seed(0)
    m = pixelwise.build_model(name, num_classes, **kw)
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 2.0)
        elif isinstance(mod, (nn.Conv2d, nn.ConvTranspose2d)) and not mod.weight.abs().sum():
            nn.init.normal_(mod.weight, 0, 0.1)
    return m.eval()
