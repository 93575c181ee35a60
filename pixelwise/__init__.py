"""pixelwise: CNN image segmentation - train, evaluate, predict and export the classic networks."""
from pixelwise.models.registry import build_model, list_models

__version__ = "0.1.0"
__all__ = ["build_model", "list_models", "train", "__version__"]


def __getattr__(name: str):
    if name == "train":  # imported on first use: `import pixelwise` stays light
        from pixelwise.engine.train import train_on

        return train_on
    raise AttributeError(f"module 'pixelwise' has no attribute {name!r}")
