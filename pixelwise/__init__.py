"""pixelwise: CNN image segmentation - train, evaluate, predict and export the classic networks."""
from pixelwise.models.registry import build_model, list_models
from pixelwise.models.torchvision import from_torchvision

__version__ = "0.1.0"
__all__ = ["build_model", "list_models", "from_torchvision", "__version__"]
