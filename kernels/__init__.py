"""Triton kernels for fused BatchNorm + activation, installed as ``tritonbn.kernels``."""
from .activations import ACTIVATIONS
from .backward import batch_norm_backward
from .forward import batch_norm_forward

__all__ = ["ACTIVATIONS", "batch_norm_backward", "batch_norm_forward"]
