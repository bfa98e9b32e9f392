"""The registered ops, in the ``tritonbn`` namespace, with fake and autograd registrations.

- ``batch_stats(x, running_mean!, running_var!, num_batches_tracked!, momentum) -> (mean, var)``:
  the batch statistics, updating the running ones and the batch count in place (momentum=None:
  the cumulative average over the count). Not differentiable: the backward of
  ``normalize_act`` with training=True already carries the statistics' dependence on x.
- ``normalize_act(x, mean, var, weight, bias, eps, training, activation) -> y``: functional
  and differentiable; its backward is ``normalize_act_backward``.

The mutation lives in an op of its own because torch.library registers autograd only for
functional ops. torch.compile traces these ops; eager calls take EagerBatchNormAct below, the
same launchers without the dispatcher's per-call cost. CUDA
tensors run the Triton kernels. CPU tensors run the same kernels through
Triton's interpreter when TRITON_INTERPRET=1 was set before triton was imported, and the
PyTorch reference otherwise. Tensors whose spatial dims do not collapse into one stride
(``tiling.strides_ncs``) are copied to contiguous first; every layout PyTorch names collapses.
"""
from typing import Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import kernels, reference
from .kernels.forward import accumulate_dtype
from .kernels.launch import INTERPRETING
from .kernels.tiling import strides_ncs


def runs_triton(x: Tensor) -> bool:
    return x.is_cuda or (INTERPRETING and x.device.type == "cpu")


def _backend(x: Tensor):
    return kernels if runs_triton(x) else reference


def _walkable(t: Tensor) -> Tensor:
    return t if strides_ncs(t) is not None else t.contiguous()


def run_batch_stats(x, running_mean, running_var, momentum, num_batches_tracked=None):
    return _backend(x).batch_stats(_walkable(x), running_mean, running_var, momentum,
                                   num_batches_tracked)


def run_normalize_act(x, mean, var, weight, bias, eps, activation):
    return _backend(x).normalize_act(_walkable(x), mean, var, weight, bias, eps, activation)


def run_normalize_act_backward(dy, x, mean, var, weight, bias, eps, training, activation):
    return _backend(x).normalize_act_backward(_walkable(dy), _walkable(x), mean, var, weight,
                                              bias, eps, training, activation)


@torch.library.custom_op("tritonbn::batch_stats",
                         mutates_args=("running_mean", "running_var", "num_batches_tracked"))
def batch_stats(x: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                num_batches_tracked: Optional[Tensor],
                momentum: Optional[float]) -> tuple[Tensor, Tensor]:
    """(mean, biased var) per channel, float32 (float64 for float64 x)."""
    return run_batch_stats(x, running_mean, running_var, momentum, num_batches_tracked)


@batch_stats.register_fake
def _(x, running_mean, running_var, num_batches_tracked, momentum):
    mean = x.new_empty(x.shape[1], dtype=accumulate_dtype(x.dtype))
    return mean, torch.empty_like(mean)


@torch.library.custom_op("tritonbn::normalize_act", mutates_args=())
def normalize_act(x: Tensor, mean: Tensor, var: Tensor, weight: Optional[Tensor],
                  bias: Optional[Tensor], eps: float, training: bool, activation: int) -> Tensor:
    """act((x - mean) / sqrt(var + eps) * weight + bias); training says mean/var are x's own."""
    return run_normalize_act(x, mean, var, weight, bias, eps, activation)


@normalize_act.register_fake
def _(x, mean, var, weight, bias, eps, training, activation):
    return torch.empty_like(_walkable(x))


@torch.library.custom_op("tritonbn::normalize_act_backward", mutates_args=())
def normalize_act_backward(dy: Tensor, x: Tensor, mean: Tensor, var: Tensor,
                           weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                           training: bool, activation: int) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias); dweight/dbias in the parameters' dtype (accumulate when None)."""
    return run_normalize_act_backward(dy, x, mean, var, weight, bias, eps, training, activation)


@normalize_act_backward.register_fake
def _(dy, x, mean, var, weight, bias, eps, training, activation):
    acc = accumulate_dtype(x.dtype)
    dweight = x.new_empty(x.shape[1], dtype=acc if weight is None else weight.dtype)
    dbias = x.new_empty(x.shape[1], dtype=acc if bias is None else bias.dtype)
    return torch.empty_like(_walkable(x)), dweight, dbias


def _setup_context(ctx, inputs, output):
    x, mean, var, weight, bias, eps, training, activation = inputs
    ctx.save_for_backward(x, mean, var, weight, bias)
    ctx.eps, ctx.training, ctx.activation = eps, training, activation


def _gradients(ctx, dy, backward_fn):
    """(dx, dweight, dbias), None for an absent parameter."""
    x, mean, var, weight, bias = ctx.saved_tensors
    dx, dweight, dbias = backward_fn(dy, x, mean, var, weight, bias, ctx.eps, ctx.training,
                                     ctx.activation)
    return dx, dweight if weight is not None else None, dbias if bias is not None else None


def _normalize_act_backward(ctx, dy):
    dx, dweight, dbias = _gradients(ctx, dy, normalize_act_backward)
    return dx, None, None, dweight, dbias, None, None, None


normalize_act.register_autograd(_normalize_act_backward, setup_context=_setup_context)


class EagerBatchNormAct(torch.autograd.Function):
    """batch_stats then normalize_act for eager mode, in one autograd node: the same launchers
    and autograd formula as the registered ops, minus torch.library's dispatch, whose per-call
    host cost (tens of microseconds per op) exceeds the kernels' own time on small tensors.

    apply(x, weight, bias, state), state = (running_mean, running_var, num_batches_tracked,
    training, momentum, eps, activation): none of it differentiable, and one argument rather
    than seven because Function.apply's cost grows with its argument count.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, state):
        running_mean, running_var, num_batches_tracked, training, momentum, eps, activation = \
            state
        backend, walkable = _backend(x), _walkable(x)
        mean, var = running_mean, running_var
        if training:
            mean, var = backend.batch_stats(walkable, running_mean, running_var, momentum,
                                            num_batches_tracked)
        _setup_context(ctx, (x, mean, var, weight, bias, eps, training, activation), None)
        return backend.normalize_act(walkable, mean, var, weight, bias, eps, activation)

    @staticmethod
    def backward(ctx, dy):
        if torch.is_grad_enabled():  # create_graph=True: differentiating this raises
            return _eager_backward_once_differentiable(ctx, dy)
        return _eager_backward(ctx, dy)


def _eager_backward(ctx, dy):
    return _gradients(ctx, dy, run_normalize_act_backward) + (None,)


# The kernels have no backward of their own: a double backward must fail, not drop terms.
# once_differentiable costs a few microseconds per call, so only create_graph pays for it.
_eager_backward_once_differentiable = once_differentiable(_eager_backward)
