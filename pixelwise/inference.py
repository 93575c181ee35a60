"""Former name of :mod:`pixelwise.optimize` (the conv+BN folding inference optimiser); the
DataLoader worker helpers moved to :mod:`pixelwise.data.loading`. Kept so existing imports work."""
from pixelwise.data.loading import default_num_workers, resolve_num_workers  # noqa: F401
from pixelwise.optimize import *  # noqa: F401,F403
from pixelwise.optimize import _in_channels  # noqa: F401
