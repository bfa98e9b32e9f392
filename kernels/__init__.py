"""Triton kernels for fused BatchNorm + activation, installed as ``tritonbn.kernels``."""
from .activations import ACTIVATIONS
from .backward import normalize_act_backward
from .forward import batch_stats, normalize_act

__all__ = ["ACTIVATIONS", "batch_stats", "normalize_act", "normalize_act_backward"]
