"""Pure-PyTorch BatchNorm + activation: the CPU path without Triton, and the tests' yardstick.

Same contract as the Triton launchers in ``tritonbn.kernels``: statistics in float32 (float64
for float64 input), running statistics updated in place, saved mean and rstd returned.
"""
import torch

from .kernels.activations import ACTIVATIONS
from .kernels.forward import accumulate_dtype


def _per_channel(t: torch.Tensor, ndim: int) -> torch.Tensor:
    return t.reshape((1, -1) + (1,) * (ndim - 2))


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


def _pre_activation(x, weight, bias, mean, rstd):
    """z = (x - mean) * rstd * weight + bias in the accumulate dtype, broadcast per channel."""
    acc = mean.dtype
    scale = rstd if weight is None else rstd * weight.to(acc)
    z = (x.to(acc) - _per_channel(mean, x.dim())) * _per_channel(scale, x.dim())
    if bias is not None:
        z = z + _per_channel(bias.to(acc), x.dim())
    return z


def forward(x, weight, bias, running_mean, running_var, training, momentum, eps, activation):
    """Returns (y, mean, rstd); updates running_mean/running_var in place when training."""
    acc = accumulate_dtype(x.dtype)
    if training:
        dims = [0] + list(range(2, x.dim()))
        var, mean = torch.var_mean(x.to(acc), dim=dims, correction=0)
        if running_mean is not None:
            count = x.numel() // x.shape[1]
            unbiased = var * count / (count - 1)
            running_mean.copy_(momentum * mean + (1 - momentum) * running_mean.to(acc))
            running_var.copy_(momentum * unbiased + (1 - momentum) * running_var.to(acc))
    else:
        mean, var = running_mean.to(acc), running_var.to(acc)
    rstd = torch.rsqrt(var + eps)
    z = _pre_activation(x, weight, bias, mean, rstd)
    # Round z to x's dtype first, as eager BatchNorm followed by a separate activation does.
    y = _activation(z.to(x.dtype).to(acc), activation).to(x.dtype)
    return y, mean.contiguous(), rstd.contiguous()


def backward(dy, x, weight, bias, mean, rstd, training, activation):
    """Returns (dx, dweight, dbias); dweight/dbias in the accumulate dtype."""
    acc = mean.dtype
    z = _pre_activation(x, weight, bias, mean, rstd).to(x.dtype).to(acc)
    g = _activation_grad(z, dy.to(acc), activation, x.dtype)
    dims = [0] + list(range(2, x.dim()))
    xhat = (x.to(acc) - _per_channel(mean, x.dim())) * _per_channel(rstd, x.dim())
    dbias = g.sum(dims)
    dweight = (g * xhat).sum(dims)
    scale = rstd if weight is None else rstd * weight.to(acc)
    if training:
        count = x.numel() // x.shape[1]
        g = g - _per_channel(dbias / count, x.dim()) - xhat * _per_channel(dweight / count, x.dim())
    dx = (g * _per_channel(scale, x.dim())).to(x.dtype)
    return dx, dweight, dbias

