"""Model zoo. Importing this package registers every architecture."""
from pixelwise.models.registry import build_model, list_models, model_info, register_model

# Architecture modules register themselves on import. Keep this list in one place.
from pixelwise.models import fcn  # noqa: F401,E402
from pixelwise.models import segnet, unet  # noqa: F401,E402
from pixelwise.models import deeplab, pspnet  # noqa: F401,E402
from pixelwise.models import maskrcnn  # noqa: F401,E402
from pixelwise.models import panoptic_fpn  # noqa: F401,E402

__all__ = ["build_model", "list_models", "model_info", "register_model"]
