"""bn_act(): the checks and argument order of torch.nn.functional.batch_norm, plus activation.

Every check runs before any kernel and before any state changes, so a rejected call leaves
the running statistics (and a module's num_batches_tracked) as they were.
"""
from typing import Optional

import torch
from torch import Tensor

from . import ops
from .kernels.activations import ACTIVATIONS

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def activation_code(activation: str) -> int:
    try:
        return ACTIVATIONS[activation]
    except (KeyError, TypeError):
        raise ValueError(f"unknown activation {activation!r}; supported: "
                         f"{', '.join(ACTIVATIONS)}") from None


def check_inputs(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                 weight: Optional[Tensor], bias: Optional[Tensor], training: bool) -> None:
    """Raise ValueError/TypeError for anything batch_norm would reject; change nothing."""
    if not 2 <= input.dim() <= 5:
        raise ValueError(f"expected 2D to 5D input (got {input.dim()}D input)")
    if input.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"expected a floating-point input (float16, bfloat16, float32 or "
                        f"float64), got {input.dtype}")
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together")
    if not training and running_mean is None:
        raise ValueError("running_mean and running_var are required when training=False")
    C = input.shape[1]
    for name, t in (("running_mean", running_mean), ("running_var", running_var),
                    ("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if t.dim() != 1 or t.numel() != C:
            raise ValueError(f"{name} should contain {C} elements (one per channel of the "
                             f"input) not {t.numel()} (shape {tuple(t.shape)})")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {t.dtype}")
        if t.device != input.device:
            raise ValueError(f"expected all tensors on one device: input is on {input.device}, "
                             f"{name} on {t.device}")
    if training and input.numel() > 0 and input.numel() // C == 1:
        raise ValueError("Expected more than 1 value per channel when training, "
                         f"got input size {input.shape}")


def forward_checked(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                    weight: Optional[Tensor], bias: Optional[Tensor], training: bool,
                    momentum: Optional[float], eps: float, code: int,
                    num_batches_tracked: Optional[Tensor] = None) -> Tensor:
    """bn_act after check_inputs: an empty batch returns an empty output, stats untouched.

    A given num_batches_tracked is counted up on the device with the running statistics;
    momentum=None then means their cumulative average.
    """
    if input.numel() == 0:
        return input.clone()
    if torch.compiler.is_compiling():  # the registered ops: traceable, no graph break
        mean, var = running_mean, running_var
        if training:
            mean, var = ops.batch_stats(input.detach(), running_mean, running_var,
                                        num_batches_tracked, momentum)
        return ops.normalize_act(input, mean, var, weight, bias, eps, training, code)
    return ops.EagerBatchNormAct.apply(input, weight, bias, (
        running_mean, running_var, num_batches_tracked, training, momentum, eps, code))


def bn_act(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
           weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
           training: bool = False, momentum: float = 0.1, eps: float = 1e-5,
           activation: str = "relu") -> Tensor:
    """activation(F.batch_norm(input, running_mean, running_var, weight, bias, training,
    momentum, eps)) in one fused op. activation is one of "identity", "relu", "sigmoid"."""
    code = activation_code(activation)
    check_inputs(input, running_mean, running_var, weight, bias, training)
    return forward_checked(input, running_mean, running_var, weight, bias, training, momentum,
                           eps, code)
