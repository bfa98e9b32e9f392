"""tritonbn: fused BatchNorm + activation for PyTorch, written in Triton."""
from . import ops  # registers the tritonbn:: ops
from ._version import __version__
from .activations import SUPPORTED_ACTIVATIONS
from .convert import fuse_bn_act
from .kernels.dtypes import SUPPORTED_DTYPES
from .environment import backend_for
from .frozen import FrozenBatchNormAct2d, freeze_batch_norm
from .functional import bn_act
from .modules import BatchNormAct1d, BatchNormAct2d, BatchNormAct3d
from .selfcheck import check
from .sync import SyncBatchNormAct, convert_sync_batchnorm

__all__ = ["BatchNormAct1d", "BatchNormAct2d", "BatchNormAct3d", "FrozenBatchNormAct2d",
           "SUPPORTED_ACTIVATIONS", "SUPPORTED_DTYPES", "SyncBatchNormAct", "__version__",
           "backend_for", "bn_act", "check", "convert_sync_batchnorm", "freeze_batch_norm",
           "fuse_bn_act", "ops"]
