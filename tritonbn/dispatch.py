"""Which code runs a tensor: the Triton kernels (tritonbn.kernels) or PyTorch's reference
(tritonbn.reference), and the launcher calls both take.

CUDA tensors run the Triton kernels. CPU tensors run the same kernels through Triton's
interpreter when TRITON_INTERPRET=1 was set before triton was imported, and the reference
otherwise (also where Triton is not installed). Tensors whose spatial dims do not collapse into
one stride (``kernels.layout.strides_ncs``) are copied to contiguous first; every layout
PyTorch names collapses.
"""
import os
from typing import Optional

from torch import Tensor

from . import kernels, reference
from .kernels.layout import strides_ncs

# Triton is optional where it has no wheel: CPU tensors then take the reference path.
try:
    import triton  # noqa: F401
    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False
INTERPRETING = HAS_TRITON and kernels.INTERPRETING
# The ops are triton_ops (torch.compile traces into them) where the kernels compile for a GPU.
TRITON_OPS = (HAS_TRITON and not INTERPRETING
              and os.environ.get("TRITONBN_TRITON_OP", "1") != "0")


def runs_triton(x: Tensor) -> bool:
    return x.is_cuda or (INTERPRETING and x.is_cpu)


def backend(x: Tensor):
    """The module whose launchers run x: tritonbn.kernels or tritonbn.reference."""
    if not runs_triton(x):
        return reference
    if not HAS_TRITON:
        raise RuntimeError("tritonbn runs CUDA tensors with Triton kernels, and the triton "
                           "package is not installed: pip install triton")
    return kernels


def walkable(t: Optional[Tensor]) -> Optional[Tensor]:
    return t if t is None or strides_ncs(t) is not None else t.contiguous()


def run_batch_stats(x, running_mean, running_var, momentum, num_batches_tracked=None):
    return backend(x).batch_stats(walkable(x), running_mean, running_var, momentum,
                                  num_batches_tracked)


def run_normalize_act(x, mean, var, weight, bias, residual, eps, activation, activation_param):
    return backend(x).normalize_act(walkable(x), mean, var, weight, bias, walkable(residual),
                                    eps, activation, activation_param)


def run_normalize_act_backward(dy, x, mean, var, weight, bias, residual, eps, training,
                               activation, activation_param):
    return backend(x).normalize_act_backward(walkable(dy), walkable(x), mean, var, weight,
                                             bias, walkable(residual), eps, training,
                                             activation, activation_param)
