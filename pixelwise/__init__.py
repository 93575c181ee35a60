"""pixelwise: CNN image segmentation - train, evaluate, predict and export the classic networks.

Three lines::

    import pixelwise
    seg = pixelwise.load("runs/demo/run")     # run folder, checkpoint, pretrained folder or hub id
    result = seg.predict("image.png")          # typed result: .labels / .masks / .id_map, .overlay(), .save()
"""
__version__ = "0.1.0"

from pixelwise.api import Segmenter, load  # noqa: E402  (after __version__: the API reads it)
from pixelwise.models.registry import build_model, list_models  # noqa: E402

__all__ = ["build_model", "list_models", "load", "Segmenter", "__version__"]
