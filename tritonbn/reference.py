"""Pure-PyTorch BatchNorm + activation: the CPU path without Triton, and a yardstick for tests.

The same functions, with the same contracts, as the Triton launchers in ``tritonbn.kernels``:
statistics in float32 (float64 for float64 input) with the mean in the shifted [2, C] form,
running statistics updated in place, outputs in x's dtype and strides. The activation and its
gradient are eager PyTorch's own, applied to z rounded to x's dtype as eager BatchNorm stores it.
"""
import torch

from .activations import ActivationSpec, eager_activation, eager_activation_grad
from .kernels.dtypes import accumulate_dtype


def _per_channel(t: torch.Tensor, ndim: int) -> torch.Tensor:
    return t.reshape((1, -1) + (1,) * (ndim - 2))


def _reduce_dims(x: torch.Tensor) -> list[int]:
    return [0] + list(range(2, x.dim()))


def _centered(x, mean):
    """x - mean in the accumulate dtype; a [2, C] mean is (shift, mean - shift), applied in
    that order so that x - shift is exact for x near the mean."""
    x = x.to(accumulate_dtype(x.dtype))
    if mean.dim() == 2:
        return (x - _per_channel(mean[0], x.dim())) - _per_channel(mean[1], x.dim())
    return x - _per_channel(mean.to(x.dtype), x.dim())


def _pre_activation(x, mean, var, weight, bias, residual, eps):
    """(x - mean, rstd, scale, z): z = (x - mean) * scale + bias [+ residual] in x's dtype,
    rounded where eager rounds it, scale = rstd * weight."""
    acc = accumulate_dtype(x.dtype)
    rstd = torch.rsqrt(var.to(acc) + eps)
    scale = rstd if weight is None else rstd * weight.to(acc)
    x_mu = _centered(x, mean)
    z = x_mu * _per_channel(scale, x.dim())
    if bias is not None:
        z = z + _per_channel(bias.to(acc), x.dim())
    z = z.to(x.dtype)
    if residual is not None:
        z = z + residual
    return x_mu, rstd, scale, z


def batch_stats(x, running_mean, running_var, momentum, num_batches_tracked=None):
    acc = accumulate_dtype(x.dtype)
    dims = _reduce_dims(x)
    shift = x.to(acc).mean(dims)
    var, mean_d = torch.var_mean(_centered(x, shift), dim=dims, correction=0)
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    if momentum is None:  # the cumulative average; 0 without a count, as in nn.BatchNorm
        momentum = 0.0 if num_batches_tracked is None else 1.0 / float(num_batches_tracked)
    if running_mean is not None:
        count = x.numel() // x.shape[1]
        unbiased = var * count / (count - 1)
        running_mean.copy_(momentum * (shift + mean_d) + (1 - momentum) * running_mean.to(acc))
        running_var.copy_(momentum * unbiased + (1 - momentum) * running_var.to(acc))
    return torch.stack([shift, mean_d]), var


def normalize_act(x, mean, var, weight, bias, residual, eps: float, activation: int,
                  activation_param: float):
    _, _, _, z = _pre_activation(x, mean, var, weight, bias, residual, eps)
    # empty_like + copy_: the same output strides as the Triton launcher's.
    return torch.empty_like(x).copy_(eager_activation(ActivationSpec(activation,
                                                                     activation_param))(z))


def _gradient(dy, x, mean, var, weight, bias, residual, eps, activation, activation_param):
    """(x - mean, rstd, scale, g), g = dy * act'(z) as eager's backward computes it."""
    x_mu, rstd, scale, z = _pre_activation(x, mean, var, weight, bias, residual, eps)
    g = eager_activation_grad(ActivationSpec(activation, activation_param))(dy.to(z.dtype), z)
    return x_mu, rstd, scale, g


def _sums(x_mu, rstd, g):
    """sum(g) and sum(g * xhat) per channel: dbias and dweight."""
    g = g.to(x_mu.dtype)
    dims = _reduce_dims(x_mu)
    return torch.stack([g.sum(dims), (g * x_mu * _per_channel(rstd, g.dim())).sum(dims)])


def _dx(x, x_mu, rstd, scale, g, sums, count):
    """dx for batch statistics over count elements per channel whose totals are sums."""
    ndim = x.dim()
    g = g.to(x_mu.dtype)
    if sums is not None:
        xhat = x_mu * _per_channel(rstd, ndim)
        g = g - _per_channel(sums[0] / count, ndim) - xhat * _per_channel(sums[1] / count, ndim)
    return torch.empty_like(x).copy_(g * _per_channel(scale, ndim))


def _in_dtype_of(t, like):
    """A copy of t in like's dtype (t's without like): a registered op's outputs may not be
    views of one another."""
    return t.to(t.dtype if like is None else like.dtype, copy=True)


def normalize_act_backward(dy, x, mean, var, weight, bias, residual, eps: float,
                           training: bool, activation: int, activation_param: float):
    x_mu, rstd, scale, g = _gradient(dy, x, mean, var, weight, bias, residual, eps, activation,
                                     activation_param)
    sums = _sums(x_mu, rstd, g)
    dx = _dx(x, x_mu, rstd, scale, g, sums if training else None, x.numel() // x.shape[1])
    dresidual = None if residual is None else torch.empty_like(residual).copy_(g)
    return dx, _in_dtype_of(sums[1], weight), _in_dtype_of(sums[0], bias), dresidual


def grad_reduce(dy, x, mean, var, weight, bias, residual, eps: float, activation: int,
                activation_param: float):
    x_mu, rstd, _, g = _gradient(dy, x, mean, var, weight, bias, residual, eps, activation,
                                 activation_param)
    dresidual = None if residual is None else torch.empty_like(residual).copy_(g)
    return _sums(x_mu, rstd, g), dresidual


def grad_input(dy, x, mean, var, weight, bias, residual, dresidual, sums, count: int,
               eps: float, activation: int, activation_param: float):
    if dresidual is None:
        x_mu, rstd, scale, g = _gradient(dy, x, mean, var, weight, bias, residual, eps,
                                         activation, activation_param)
    else:
        x_mu, rstd, scale, _ = _pre_activation(x, mean, var, weight, bias, residual, eps)
        g = dresidual
    return _dx(x, x_mu, rstd, scale, g, sums, count)
