"""tritonbn: fused BatchNorm + activation for PyTorch, written in Triton."""
from . import ops  # registers the tritonbn:: ops
from .convert import fuse_bn_act
from .functional import SUPPORTED_DTYPES, bn_act
from .kernels.activations import ACTIVATIONS
from .modules import BatchNormAct1d, BatchNormAct2d, BatchNormAct3d

SUPPORTED_ACTIVATIONS = tuple(ACTIVATIONS)

__all__ = ["BatchNormAct1d", "BatchNormAct2d", "BatchNormAct3d", "SUPPORTED_ACTIVATIONS",
           "SUPPORTED_DTYPES", "bn_act", "fuse_bn_act", "ops"]
