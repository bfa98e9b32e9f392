"""The composite path: BatchNorm + activation by PyTorch's own ops, for every context that cannot
run the kernels.

``F.batch_norm`` with ``nn.BatchNorm``'s momentum and ``num_batches_tracked`` semantics, the
residual add, then the activation as ``torch.nn.functional`` computes it. Exporters, TorchScript,
torch.jit.trace, torch.func transforms and double backward all understand these ops, and on a
CPU without Triton's interpreter they are PyTorch's native kernels. ``batch_norm`` and
``tritonbn.activations.apply_activation`` compile with TorchScript: a scripted layer runs them.
"""
from typing import Optional

import torch.nn.functional as F
from torch import Tensor

from .activations import apply_activation


def batch_norm(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
               weight: Optional[Tensor], bias: Optional[Tensor], training: bool,
               momentum: Optional[float], eps: float, num_batches_tracked: Optional[Tensor] = None,
               residual: Optional[Tensor] = None) -> Tensor:
    """F.batch_norm (+ residual), the momentum as nn.BatchNorm takes it: a given
    num_batches_tracked counts up by one, and momentum=None then means the cumulative average
    1 / num_batches_tracked, read on the host as nn.BatchNorm reads it."""
    factor = 0.0 if momentum is None else momentum
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
        if momentum is None:
            factor = 1.0 / float(num_batches_tracked)
    z = F.batch_norm(input, running_mean, running_var, weight, bias, training, factor, eps)
    if residual is not None:
        z = z + residual
    return z


def bn_act(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
           weight: Optional[Tensor], bias: Optional[Tensor], training: bool,
           momentum: Optional[float], eps: float, activation: int, activation_param: float,
           num_batches_tracked: Optional[Tensor] = None,
           residual: Optional[Tensor] = None) -> Tensor:
    """functional.forward_checked's result: batch_norm above, then the activation of code
    ``activation`` (tritonbn.activations) as torch.nn.functional computes it."""
    z = batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps,
                   num_batches_tracked, residual)
    return apply_activation(z, activation, activation_param)
