"""bn_act(): the checks and argument order of torch.nn.functional.batch_norm, plus activation.

Every check runs before any kernel and before any state changes, so a rejected call leaves
the running statistics (and a module's num_batches_tracked) as they were.

forward_checked picks the path (docs/DESIGN.md, "Kernels or the composite path"): the
registered ops under torch.compile and torch.export, the kernels in eager mode, and the
composite path of PyTorch's own ops (tritonbn.composite) for CPU tensors that do not run the
kernels, under torch.jit.trace (and so the ONNX exporter's TorchScript mode) and inside
torch.func transforms.
"""
import warnings
from typing import Optional

import torch
from torch import Tensor

from . import composite, dispatch, ops
from ._docs import ACTIVATION_ARGS
from .eager import EagerBatchNormAct
from .activations import ActivationSpec, activation_spec
from .kernels.dtypes import SUPPORTED_DTYPES

# torch.jit.trace warns that the checks' comparisons of sizes become constants: for checks that
# passed, that is what they are.
warnings.filterwarnings("ignore", category=torch.jit.TracerWarning, module=__name__)


def check_inputs(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                 weight: Optional[Tensor], bias: Optional[Tensor], training: bool,
                 residual: Optional[Tensor] = None) -> None:
    """Raise ValueError/TypeError for anything batch_norm (or the residual add) would reject;
    change nothing."""
    if not 2 <= input.dim() <= 5:
        raise ValueError(f"expected 2D to 5D input (got {input.dim()}D input)")
    if input.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"expected a floating-point input (float16, bfloat16, float32 or "
                        f"float64), got {input.dtype}")
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together")
    if not training and running_mean is None:
        raise ValueError("running_mean and running_var are required when training=False")
    C, device = input.shape[1], input.device
    for name, t in (("running_mean", running_mean), ("running_var", running_var),
                    ("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if t.dim() != 1 or t.numel() != C:
            raise ValueError(f"{name} should contain {C} elements (one per channel of the "
                             f"input) not {t.numel()} (shape {tuple(t.shape)})")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {t.dtype}")
        if t.device != device:
            raise ValueError(f"expected all tensors on one device: input is on {device}, "
                             f"{name} on {t.device}")
    if residual is not None:
        if not isinstance(residual, Tensor):
            raise TypeError(f"residual must be a Tensor, got {type(residual).__name__}")
        if residual.shape != input.shape:
            raise ValueError(f"residual must have the input's shape {tuple(input.shape)}, got "
                             f"{tuple(residual.shape)}")
        if residual.dtype != input.dtype:
            raise TypeError(f"residual must have the input's dtype {input.dtype}, got "
                            f"{residual.dtype}")
        if residual.device != device:
            raise ValueError(f"expected all tensors on one device: input is on {device}, "
                             f"residual on {residual.device}")
    if training and input.numel() > 0 and input.numel() // C == 1:
        raise ValueError("Expected more than 1 value per channel when training, "
                         f"got input size {input.shape}")


def forward_checked(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                    weight: Optional[Tensor], bias: Optional[Tensor], training: bool,
                    momentum: Optional[float], eps: float, activation: ActivationSpec,
                    num_batches_tracked: Optional[Tensor] = None,
                    residual: Optional[Tensor] = None) -> Tensor:
    """bn_act after check_inputs. A given num_batches_tracked is counted up on the device with
    the running statistics; momentum=None then means their cumulative average. An empty batch
    returns an empty output and counts in num_batches_tracked alone, as in nn.BatchNorm."""
    if input.numel() == 0:
        if num_batches_tracked is not None:
            num_batches_tracked.add_(1)
        return input.clone() if residual is None else input + residual
    code, param = activation
    if torch.compiler.is_compiling():  # the registered ops: traceable, no graph break
        if torch.compiler.is_exporting():
            if training:
                # A training graph exports as nn.BatchNorm's: the statistics op mutates
                # buffers, which export cannot decompose to core ATen.
                return composite.bn_act(input, running_mean, running_var, weight, bias,
                                        training, momentum, eps, code, param,
                                        num_batches_tracked, residual)
            if not torch.compiler.is_dynamo_compiling():  # strict export: see there
                ops.register_export_decomposition()
        mean, var = running_mean, running_var
        if training:
            mean, var = ops.batch_stats(input.detach(), running_mean, running_var,
                                        num_batches_tracked, momentum)
        return ops.normalize_act(input, mean, var, weight, bias, residual, eps, training, code,
                                 param)
    if (not dispatch.runs_triton(input) or torch._C._get_tracing_state() is not None
            or torch._C._are_functorch_transforms_active()):
        return composite.bn_act(input, running_mean, running_var, weight, bias, training,
                                momentum, eps, code, param, num_batches_tracked, residual)
    return EagerBatchNormAct.apply(input, weight, bias, residual, (
        running_mean, running_var, num_batches_tracked, training, momentum, eps, code, param))


def bn_act(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
           weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
           training: bool = False, momentum: Optional[float] = 0.1, eps: float = 1e-5,
           activation: str = "relu", activation_kwargs: Optional[dict] = None,
           residual: Optional[Tensor] = None) -> Tensor:
    """Batch normalization, an optional residual add and an activation, as one fused op.

    The functional form of ``BatchNormAct1d/2d/3d``: the arguments and checks of
    ``torch.nn.functional.batch_norm``, then the residual and the activation. It computes::

        y = act((x - mean) / sqrt(var + eps) * weight + bias [+ residual])

    per channel, where ``mean`` and ``var`` are the batch's own statistics over every dimension
    but the channel one (the biased variance) when ``training=True``, and ``running_mean`` and
    ``running_var`` when ``training=False``. The result equals
    ``act(F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    + residual)``. Every check runs before anything is computed or updated: a rejected call
    raises ValueError or TypeError and leaves the running statistics as they were. Gradients
    flow to input, weight, bias and residual; the running statistics get none.

    Args:
        input: the tensor to normalize, (N, C) or (N, C, *) with 2 to 5 dims in all, of
            dtype float16, bfloat16, float32 or float64.
        running_mean: the per-channel running mean, shape (C,), or ``None``. With
            ``training=True`` it is updated in place; with ``training=False`` it is what the
            input is normalized with. ``running_mean`` and ``running_var`` go together: both
            or neither.
        running_var: the per-channel running variance, shape (C,), or ``None``; updated in
            place with the batch's unbiased variance when ``training=True``.
        weight: the per-channel scale, shape (C,), or ``None`` for no scaling.
            Default: ``None``
        bias: the per-channel shift, shape (C,), or ``None`` for no shift. Default: ``None``
        training: ``True`` normalizes with the batch's statistics (the running ones, if given,
            are updated); ``False`` normalizes with the running statistics, which must then be
            given. Default: ``False``
        momentum: how much of the current batch goes into the running statistics:
            ``running = (1 - momentum) * running + momentum * batch``. ``None`` leaves them
            unchanged (there is no batch count here to average over; F.batch_norm rejects
            ``None``). Default: 0.1
        eps: added to the variance before its square root, for numerical stability.
            Default: 1e-5
        {activation_args}
        residual: ``None``, or a tensor of input's shape, dtype and device, in any memory
            layout (it is not broadcast), added before the activation. Default: ``None``

    Returns:
        A tensor of the input's shape and dtype.

    Shape:
        - Input: (N, C) or (N, C, *), 2D to 5D
        - running_mean, running_var, weight, bias: (C,)
        - Residual: the input's shape
        - Output: the input's shape

    Examples::

        >>> import torch
        >>> import torch.nn.functional as F
        >>> from tritonbn import bn_act
        >>> _ = torch.manual_seed(0)
        >>> x = torch.randn(2, 3, 4, 4)
        >>> weight, bias = torch.rand(3) + 0.5, torch.randn(3)
        >>> # Training: the batch's statistics; the running ones are updated in place
        >>> mean, var = torch.zeros(3), torch.ones(3)
        >>> y = bn_act(x, mean, var, weight, bias, training=True, activation="gelu")
        >>> y.shape
        torch.Size([2, 3, 4, 4])
        >>> ref_mean, ref_var = torch.zeros(3), torch.ones(3)
        >>> ref = F.gelu(F.batch_norm(x, ref_mean, ref_var, weight, bias, training=True))
        >>> torch.allclose(y, ref, atol=1e-6), torch.allclose(var, ref_var)
        (True, True)
        >>> # Eval: the running statistics, and a residual added before the ReLU
        >>> r = torch.randn(2, 3, 4, 4)
        >>> y = bn_act(x, mean, var, weight, bias, residual=r)
        >>> torch.allclose(y, F.relu(F.batch_norm(x, mean, var, weight, bias) + r), atol=1e-6)
        True
    """
    spec = activation_spec(activation, activation_kwargs)
    check_inputs(input, running_mean, running_var, weight, bias, training, residual)
    return forward_checked(input, running_mean, running_var, weight, bias, training, momentum,
                           eps, spec, residual=residual)


bn_act.__doc__ = bn_act.__doc__.format(activation_args=ACTIVATION_ARGS)
