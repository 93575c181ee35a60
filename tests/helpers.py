"""Shared test data."""
import torch


def toy_batch(n: int = 2, h: int = 48, w: int = 48, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose classes are visible: class 1 = bright left half, class 2 = a dark square."""
    g = torch.Generator().manual_seed(seed)
    x = 0.1 * torch.randn(n, 3, h, w, generator=g)
    y = torch.zeros(n, h, w, dtype=torch.long)
    y[:, :, : w // 2] = 1
    y[:, h // 4 : h // 2, w // 4 : 3 * w // 4] = 2
    x[:, 0] += (y == 1).float()
    x[:, 1] -= (y == 2).float()
    return x, y
