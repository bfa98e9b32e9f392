"""Pure-PyTorch BatchNorm + activation: the CPU path without Triton, and the tests' yardstick.

The same three functions, with the same contracts, as the Triton launchers in
``tritonbn.kernels``: statistics in float32 (float64 for float64 input), running statistics
updated in place, outputs in x's dtype and strides.
"""
import torch

from .kernels.activations import ACTIVATIONS
from .kernels.forward import accumulate_dtype


def _per_channel(t: torch.Tensor, ndim: int) -> torch.Tensor:
    return t.reshape((1, -1) + (1,) * (ndim - 2))


def _reduce_dims(x: torch.Tensor) -> list[int]:
    return [0] + list(range(2, x.dim()))


def _activation(z: torch.Tensor, activation: int) -> torch.Tensor:
    if activation == ACTIVATIONS["relu"]:
        return torch.relu(z)
    if activation == ACTIVATIONS["sigmoid"]:
        return torch.sigmoid(z)
    return z


def _activation_grad(z, dy, activation: int, out_dtype: torch.dtype) -> torch.Tensor:
    """dy * act'(z), rounded through out_dtype where eager's activation backward rounds."""
    if activation == ACTIVATIONS["relu"]:
        return torch.where(z > 0, dy, torch.zeros_like(dy))
    if activation == ACTIVATIONS["sigmoid"]:
        s = torch.sigmoid(z).to(out_dtype).to(z.dtype)
        return (dy * s * (1 - s)).to(out_dtype).to(z.dtype)
    return dy


def _affine(x, mean, var, weight, bias, eps):
    """(x - mean, rstd, z) in the accumulate dtype, z = (x - mean) * rstd * weight + bias."""
    acc = accumulate_dtype(x.dtype)
    rstd = torch.rsqrt(var.to(acc) + eps)
    scale = rstd if weight is None else rstd * weight.to(acc)
    x_mu = x.to(acc) - _per_channel(mean.to(acc), x.dim())
    z = x_mu * _per_channel(scale, x.dim())
    if bias is not None:
        z = z + _per_channel(bias.to(acc), x.dim())
    # Rounded to x's dtype, as eager BatchNorm writes it before a separate activation.
    return x_mu, rstd, z.to(x.dtype).to(acc), scale


def batch_stats(x, running_mean, running_var, momentum, num_batches_tracked=None):
    acc = accumulate_dtype(x.dtype)
    var, mean = torch.var_mean(x.to(acc), dim=_reduce_dims(x), correction=0)
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    if momentum is None:  # the cumulative average; 0 without a count, as in nn.BatchNorm
        momentum = 0.0 if num_batches_tracked is None else 1.0 / float(num_batches_tracked)
    if running_mean is not None:
        count = x.numel() // x.shape[1]
        unbiased = var * count / (count - 1)
        running_mean.copy_(momentum * mean + (1 - momentum) * running_mean.to(acc))
        running_var.copy_(momentum * unbiased + (1 - momentum) * running_var.to(acc))
    return mean, var


def normalize_act(x, mean, var, weight, bias, eps: float, activation: int):
    _, _, z, _ = _affine(x, mean, var, weight, bias, eps)
    # empty_like + copy_: the same output strides as the Triton launcher's.
    return torch.empty_like(x).copy_(_activation(z, activation))


def normalize_act_backward(dy, x, mean, var, weight, bias, eps: float, training: bool,
                           activation: int):
    x_mu, rstd, z, scale = _affine(x, mean, var, weight, bias, eps)
    g = _activation_grad(z, dy.to(z.dtype), activation, x.dtype)
    xhat = x_mu * _per_channel(rstd, x.dim())
    dims = _reduce_dims(x)
    dbias, dweight = g.sum(dims), (g * xhat).sum(dims)
    if training:
        count = x.numel() // x.shape[1]
        g = g - _per_channel(dbias / count, x.dim()) - xhat * _per_channel(dweight / count, x.dim())
    dx = torch.empty_like(x).copy_(g * _per_channel(scale, x.dim()))
    return (dx, dweight if weight is None else dweight.to(weight.dtype),
            dbias if bias is None else dbias.to(bias.dtype))
