"""Triton kernels for fused BatchNorm + activation, installed as ``tritonbn.kernels``."""
from .backward import grad_input, grad_reduce, normalize_act_backward
from .forward import batch_stats, normalize_act

__all__ = ["batch_stats", "grad_input", "grad_reduce", "normalize_act",
           "normalize_act_backward"]
