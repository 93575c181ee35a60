"""Every registered semantic model: learns on a fixed tiny batch, and evaluates at an odd size."""
import pytest
import torch
import torch.nn.functional as F

import pixelwise
from pixelwise.models.registry import model_info

# Small settings so each model runs in well under a second per step on one CPU thread.
SMALL = {
    "fcn8s": dict(width=0.125, backbone="vgg16_bn"),
    "fcn16s": dict(width=0.125, backbone="vgg16_bn"),
    "fcn32s": dict(width=0.125, backbone="vgg16_bn"),
    "segnet": dict(width=0.125),
    "segnet_basic": dict(channels=16),
    "unet": dict(width=0.125),
    "unet_original": dict(width=0.0625),
    "pspnet": dict(backbone="resnet18", ppm_channels=16, head_channels=32, aux_channels=16),
    "deeplabv3": dict(backbone="resnet18", aspp_channels=32),
    "deeplabv3plus": dict(backbone="resnet18", aspp_channels=32, decoder_channels=32),
}
SEMANTIC = pixelwise.list_models(task="semantic")


def test_every_semantic_model_has_a_small_setting():
    assert set(SEMANTIC) <= set(SMALL), set(SEMANTIC) - set(SMALL)
    assert {"fcn8s", "segnet", "unet", "unet_original", "pspnet", "deeplabv3", "deeplabv3plus"} <= set(SEMANTIC)


def _logits(out):
    return out["out"] if isinstance(out, dict) else out


@pytest.mark.parametrize("name", SEMANTIC)
def test_a_few_steps_lower_the_loss_on_a_fixed_batch(name):
    torch.manual_seed(0)
    model = pixelwise.build_model(name, 3, **SMALL[name])
    size = 188 if name == "unet_original" else 64  # 188 is a valid unpadded U-Net tile (-> 4 px out at depth 4)
    x = torch.randn(2, 3, size, size)
    y = torch.zeros(2, size, size, dtype=torch.long)
    y[:, : size // 2] = 1
    y[:, :, : size // 3] = 2
    if hasattr(model, "crop_target"):
        y = model.crop_target(y)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    losses = []
    for _ in range(8):
        out = model(x)
        loss = F.cross_entropy(_logits(out), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.95, losses


@pytest.mark.parametrize("name", SEMANTIC)
def test_eval_forward_at_97x131(name):
    model = pixelwise.build_model(name, 4, **SMALL[name]).eval()
    x = torch.randn(1, 3, 97, 131)
    if name == "unet_original":  # the paper's unpadded net only takes valid tile sizes, and says so
        with pytest.raises(ValueError, match="valid"):
            model(x)
        return
    with torch.no_grad():
        y = model(x)
    assert isinstance(y, torch.Tensor) and y.shape == (1, 4, 97, 131)


@pytest.mark.parametrize("name", SEMANTIC)
def test_registry_entry_cites_the_paper(name):
    assert model_info(name).paper, name


def test_models_table_has_every_model_with_gflops():
    from pixelwise.models.summary import models_table

    from pixelwise.tasks import task_for_model

    table = models_table(size=64, batch_input=lambda n: not task_for_model(n).image_list_input)
    for name in pixelwise.list_models():
        row = next(line for line in table.splitlines() if line.split()[0] == name)
        assert "n/a" not in row, row
