"""Eager mode's autograd node: the launchers without torch.library's dispatch.

torch.library's per-op dispatch costs tens of microseconds of host time per call, more than
the kernels themselves take on small tensors, so eager calls on tensors the kernels run come
here; torch.compile and torch.export (eval) take the registered ops (tritonbn.ops), and the
other tracers the composite path (tritonbn.functional.forward_checked chooses). This node and
the registered ops share the autograd formula, in ops.
"""
import torch

from . import composite
from . import dispatch
from .dispatch import run_normalize_act_backward, walkable
from .ops import _gradients, _setup_context


class EagerBatchNormAct(torch.autograd.Function):
    """batch_stats then normalize_act for eager mode, in one autograd node: the same launchers
    and autograd formula as the registered ops, minus torch.library's dispatch, whose per-call
    host cost (tens of microseconds per op) exceeds the kernels' own time on small tensors.

    apply(x, weight, bias, residual, state), state = (running_mean, running_var,
    num_batches_tracked, training, momentum, eps, activation, activation_param): none of it
    differentiable, and one argument rather than eight because Function.apply's cost grows
    with its argument count.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, residual, state):
        (running_mean, running_var, num_batches_tracked, training, momentum, eps, activation,
         activation_param) = state
        launchers, walked_x, walked_residual = dispatch.backend(x), walkable(x), walkable(residual)
        mean, var = running_mean, running_var
        if training:
            mean, var = launchers.batch_stats(walked_x, running_mean, running_var, momentum,
                                              num_batches_tracked)
        # x and residual as given: a double backward differentiates through them.
        _setup_context(ctx, (x, mean, var, weight, bias, residual, eps, training, activation,
                             activation_param), None)
        return launchers.normalize_act(walked_x, mean, var, weight, bias, walked_residual, eps,
                                       activation, activation_param)

    @staticmethod
    def backward(ctx, dy):
        if torch.is_grad_enabled():  # create_graph=True
            return _differentiable_backward(ctx, dy)
        return _gradients(ctx, dy, run_normalize_act_backward) + (None,)


def _differentiable_backward(ctx, dy):
    """The gradients as a graph a further backward can differentiate: the kernels have no
    backward of their own, so the forward is recomputed on the composite path (from the saved
    statistics in eval, from x again in training) and differentiated with create_graph."""
    x, mean, var, weight, bias, residual = ctx.saved_tensors
    # Each input through a view of its own: the gradient is then taken at that input alone,
    # not summed over every path to it (a residual that is x itself, or that x depends on).
    x, weight, bias, residual = (None if t is None else t.view_as(t)
                                 for t in (x, weight, bias, residual))
    inputs = (x, weight, bias, residual)
    wanted = [t for t, needed in zip(inputs, ctx.needs_input_grad) if needed]
    stats = (None, None) if ctx.training else (mean, var)
    y = composite.bn_act(x, *stats, weight, bias, ctx.training, 0.0, ctx.eps, ctx.activation,
                         ctx.activation_param, residual=residual)
    grads = iter(torch.autograd.grad(y, wanted, dy, create_graph=True))
    return tuple(next(grads) if needed else None
                 for needed in ctx.needs_input_grad[:4]) + (None,)
