"""The registered ops, in the ``tritonbn`` namespace, with fake and autograd registrations.

- ``batch_stats(x, running_mean!, running_var!, num_batches_tracked!, momentum) -> (mean, var)``:
  the batch statistics, updating the running ones and the batch count in place (momentum=None:
  the cumulative average over the count); mean comes as [2, C], a shift and the mean minus it
  (kernels/forward.py says why). Not differentiable: the backward of
  ``normalize_act`` with training=True already carries the statistics' dependence on x.
- ``normalize_act(x, mean, var, weight, bias, residual, eps, training, activation,
  activation_param) -> y``: functional and differentiable in x, weight, bias and residual; its
  backward is ``normalize_act_backward``.

The mutation lives in an op of its own because torch.library registers autograd only for
functional ops. Once a graph is exported, ``normalize_act`` also has a CompositeImplicitAutograd
decomposition into PyTorch ops (tritonbn.composite), which only export's decompositions take:
``ep.run_decompositions()`` gives core ATen, and the ONNX exporter translates that;
torch.compile and plain torch.export keep the op (register_export_decomposition).
torch.compile traces these ops; eager calls take tritonbn.eager, the same launchers without the
dispatcher's per-call cost. Where the kernels are compiled for a GPU the ops are
``torch.library.triton_op``s: torch.compile traces into them, and Inductor launches the kernels
from its own code, without a dispatch per op. Under Triton's interpreter (tracing a triton_op
compiles its kernels for a GPU), without Triton, or with ``TRITONBN_TRITON_OP=0``, they are
``custom_op``s, which torch.compile calls as opaque functions. Both run the same bodies, which
tritonbn.dispatch sends to the kernels or the reference.
"""
import functools
from typing import Optional

import torch
from torch import Tensor

from . import composite
from .dispatch import (TRITON_OPS, run_batch_stats, run_normalize_act,
                       run_normalize_act_backward, walkable)
from .kernels.dtypes import accumulate_dtype


def _register(name: str, mutates_args=()):
    """The op decorator: triton_op, its body's launches traced (kernels.launch), where
    TRITON_OPS; custom_op otherwise."""
    if not TRITON_OPS:
        return torch.library.custom_op(name, mutates_args=mutates_args)
    from .kernels import backward, forward, launch  # noqa: F401  (their kernels: LAUNCHERS)

    def register(fn):
        @functools.wraps(fn)  # the schema is read from fn's signature
        def body(*args, **kwargs):
            with launch.traced_launches():
                return fn(*args, **kwargs)
        op = torch.library.triton_op(name, body, mutates_args=mutates_args)
        # torch.compile's caches key a graph on the source of the kernels its triton_ops
        # list, which torch finds by reading the body: behind the wrapper it finds none, and
        # an edited or upgraded kernel would be served from a stale cache.
        listed = getattr(torch._library.triton, "triton_ops_to_kernels", None)
        if listed is not None:
            listed[name] = [launcher.jit_fn for launcher in launch.LAUNCHERS]
        return op
    return register


@_register("tritonbn::batch_stats",
           mutates_args=("running_mean", "running_var", "num_batches_tracked"))
def batch_stats(x: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                num_batches_tracked: Optional[Tensor],
                momentum: Optional[float]) -> tuple[Tensor, Tensor]:
    """(mean, biased var) per channel, float32 (float64 for float64 x); mean is [2, C], a
    shift and the mean minus it."""
    return run_batch_stats(x, running_mean, running_var, momentum, num_batches_tracked)


@batch_stats.register_fake
def _(x, running_mean, running_var, num_batches_tracked, momentum):
    var = x.new_empty(x.shape[1], dtype=accumulate_dtype(x.dtype))
    return x.new_empty((2, x.shape[1]), dtype=var.dtype), var


@_register("tritonbn::normalize_act")
def normalize_act(x: Tensor, mean: Tensor, var: Tensor, weight: Optional[Tensor],
                  bias: Optional[Tensor], residual: Optional[Tensor], eps: float,
                  training: bool, activation: int, activation_param: float) -> Tensor:
    """act((x - mean) / sqrt(var + eps) * weight + bias [+ residual]); training says mean/var
    are x's own."""
    return run_normalize_act(x, mean, var, weight, bias, residual, eps, activation,
                             activation_param)


@normalize_act.register_fake
def _(x, mean, var, weight, bias, residual, eps, training, activation, activation_param):
    return torch.empty_like(walkable(x))


@_register("tritonbn::normalize_act_backward")
def normalize_act_backward(dy: Tensor, x: Tensor, mean: Tensor, var: Tensor,
                           weight: Optional[Tensor], bias: Optional[Tensor],
                           residual: Optional[Tensor], eps: float, training: bool,
                           activation: int, activation_param: float
                           ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias, dresidual); dweight/dbias in the parameters' dtype (accumulate
    when None); dresidual empty without a residual."""
    dx, dweight, dbias, dresidual = run_normalize_act_backward(
        dy, x, mean, var, weight, bias, residual, eps, training, activation, activation_param)
    return dx, dweight, dbias, x.new_empty(0) if dresidual is None else dresidual


@normalize_act_backward.register_fake
def _(dy, x, mean, var, weight, bias, residual, eps, training, activation, activation_param):
    acc = accumulate_dtype(x.dtype)
    dweight = x.new_empty(x.shape[1], dtype=acc if weight is None else weight.dtype)
    dbias = x.new_empty(x.shape[1], dtype=acc if bias is None else bias.dtype)
    dresidual = x.new_empty(0) if residual is None else torch.empty_like(walkable(residual))
    return torch.empty_like(walkable(x)), dweight, dbias, dresidual


def _setup_context(ctx, inputs, output):
    x, mean, var, weight, bias, residual, eps, training, activation, activation_param = inputs
    ctx.save_for_backward(x, mean, var, weight, bias, residual)
    ctx.eps, ctx.training = eps, training
    ctx.activation, ctx.activation_param = activation, activation_param


def _gradients(ctx, dy, backward_fn):
    """(dx, dweight, dbias, dresidual), None for an absent parameter or residual."""
    x, mean, var, weight, bias, residual = ctx.saved_tensors
    dx, dweight, dbias, dresidual = backward_fn(dy, x, mean, var, weight, bias, residual,
                                                ctx.eps, ctx.training, ctx.activation,
                                                ctx.activation_param)
    return (dx, dweight if weight is not None else None, dbias if bias is not None else None,
            dresidual if residual is not None else None)


def _normalize_act_backward(ctx, dy):
    dx, dweight, dbias, dresidual = _gradients(ctx, dy, normalize_act_backward)
    return dx, None, None, dweight, dbias, dresidual, None, None, None, None


normalize_act.register_autograd(_normalize_act_backward, setup_context=_setup_context)


_export_decomposition_registered = False


def register_export_decomposition() -> None:
    """Gives normalize_act a CompositeImplicitAutograd kernel (Python dispatcher only) that
    returns the composite computation while torch.export decomposes, so that
    ``ep.run_decompositions()`` and the ONNX exporter find it in their default table.

    Called the first time a graph is exported, not at import: Inductor builds its own table of
    decompositions once, from the same source, and an op found there cannot fall back to its
    kernels. Inductor's table is built first, here, so torch.compile keeps calling the op.
    An export with strict=True traces with Dynamo, which cannot run this: call it beforehand.
    """
    global _export_decomposition_registered
    if _export_decomposition_registered:
        return
    import torch._inductor.decomposition  # noqa: F401  (its table, without this op)
    normalize_act._opoverload.py_impl(torch._C.DispatchKey.CompositeImplicitAutograd)(
        _decomposed_normalize_act)
    _export_decomposition_registered = True


def _decomposed_normalize_act(x, mean, var, weight, bias, residual, eps, training, activation,
                              activation_param):
    # Every tracer asks an op with such a kernel for its decomposition; only export's
    # decomposition pass is given one.
    if not torch.compiler.is_exporting():
        return NotImplemented
    if mean.dim() == 2:  # the shifted form
        mean = mean[0] + mean[1]
    return composite.bn_act(x, mean, var, weight, bias, False, 0.0, eps, activation,
                            activation_param, residual=residual)
