"""pixelwise: CNN image segmentation - train, evaluate, predict and export the classic networks.

Three lines::

    import pixelwise
    seg = pixelwise.load("runs/demo/run")     # run folder, checkpoint, pretrained folder or hub id
    result = seg.predict("image.png")          # typed result: .labels / .masks / .id_map, .overlay(), .save()

and to train on your own Python dataset of (image, mask) pairs::

    pixelwise.train("unet", my_dataset, classes=["background", "cell"], out="runs/cells")
"""
__version__ = "0.1.0"

from pixelwise.api import Segmenter, load  # noqa: E402  (after __version__: the API reads it)
from pixelwise.engine.train import train_on as train  # noqa: E402
from pixelwise.models.registry import build_model, list_models  # noqa: E402
from pixelwise.models.torchvision import from_torchvision  # noqa: E402

__all__ = ["build_model", "list_models", "load", "Segmenter", "train", "from_torchvision", "__version__"]
