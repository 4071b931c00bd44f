"""l2bn: L2BN (Wang et al.) — batch normalization on per-sample l2-equalised features."""
from .convert import convert_to_bn, convert_to_l2bn
from .distributed import SyncL2BatchNorm, convert_sync_l2bn, revert_sync_l2bn
from .functional import l2_batch_norm
from .layers import L2BatchNorm1d, L2BatchNorm2d, L2BatchNorm3d

__version__ = "0.1.0"

__all__ = [
    "L2BatchNorm1d",
    "L2BatchNorm2d",
    "L2BatchNorm3d",
    "SyncL2BatchNorm",
    "convert_sync_l2bn",
    "revert_sync_l2bn",
    "convert_to_bn",
    "convert_to_l2bn",
    "l2_batch_norm",
]
