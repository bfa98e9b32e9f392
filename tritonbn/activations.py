"""The activations tritonbn fuses: names, keyword arguments, and the codes the kernels take.

Names and keyword arguments are torch.nn.functional's, with PyTorch's defaults. The kernels
receive an activation as two numbers, its code and one float parameter (negative_slope for
leaky_relu, alpha for elu, 0 otherwise); gelu's ``approximate`` picks between two codes.
The codes live with the kernels (kernels/activation_codes.py), which import nothing from here;
like that module, this one needs no Triton, so the reference path runs without it.
"""
import functools
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .kernels.activation_codes import (ELU, GELU, GELU_TANH, HARDSIGMOID, HARDSWISH, IDENTITY,
                                        LEAKY_RELU, MISH, RELU, RELU6, SIGMOID, SILU, TANH)


# name -> (code, {keyword: default}); the float parameter is the only keyword's value.
_TABLE = {
    "identity": (IDENTITY, {}),
    "relu": (RELU, {}),
    "relu6": (RELU6, {}),
    "leaky_relu": (LEAKY_RELU, {"negative_slope": 0.01}),
    "elu": (ELU, {"alpha": 1.0}),
    "silu": (SILU, {}),
    "hardswish": (HARDSWISH, {}),
    "hardsigmoid": (HARDSIGMOID, {}),
    "gelu": (GELU, {"approximate": "none"}),
    "mish": (MISH, {}),
    "sigmoid": (SIGMOID, {}),
    "tanh": (TANH, {}),
}
SUPPORTED_ACTIVATIONS = tuple(_TABLE)
GELU_APPROXIMATIONS = {"none": GELU, "tanh": GELU_TANH}


class ActivationSpec(NamedTuple):
    """What the kernels are given: the activation's code and its float parameter."""

    code: int
    param: float


def activation_kwargs(name: str, kwargs: Optional[dict] = None) -> dict:
    """name's full keyword arguments: kwargs over PyTorch's defaults. Raises ValueError for an
    unknown name, a keyword name does not take, or a value of the wrong kind."""
    if not isinstance(name, str) or name not in _TABLE:
        raise ValueError(f"unknown activation {name!r}; supported: "
                         f"{', '.join(SUPPORTED_ACTIVATIONS)}")
    defaults = _TABLE[name][1]
    kwargs = dict(kwargs or {})
    unknown = sorted(set(kwargs) - set(defaults))
    if unknown:
        accepted = ", ".join(defaults) if defaults else "no keyword arguments"
        raise ValueError(f"activation {name!r} takes {accepted}; got {', '.join(unknown)}")
    full = {**defaults, **kwargs}
    for key, value in full.items():
        if key == "approximate":
            if value not in GELU_APPROXIMATIONS:
                raise ValueError(f"gelu's approximate must be one of "
                                 f"{', '.join(map(repr, GELU_APPROXIMATIONS))}, got {value!r}")
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{name}'s {key} must be a number, got {value!r}")
        else:
            full[key] = float(value)
    return full


def activation_spec(name: str, kwargs: Optional[dict] = None) -> ActivationSpec:
    """The (code, param) the kernels take for activation name with kwargs (checked)."""
    full = activation_kwargs(name, kwargs)
    if name == "gelu":
        return ActivationSpec(GELU_APPROXIMATIONS[full["approximate"]], 0.0)
    return ActivationSpec(_TABLE[name][0], next(iter(full.values()), 0.0))


def eager_activation(spec: ActivationSpec):
    """The eager PyTorch function computing the activation spec stands for."""
    code, param = spec
    return functools.partial(apply_activation, activation=code, activation_param=param)


def apply_activation(z: Tensor, activation: int, activation_param: float) -> Tensor:
    """The activation of code ``activation`` as torch.nn.functional computes it. TorchScript
    compiles it (a scripted layer runs it), and TorchScript reads no global constants: the codes
    are written out (a test scripts every one)."""
    if activation == 1:  # RELU
        return F.relu(z)
    if activation == 6:  # SILU
        return F.silu(z)
    if activation == 0:  # IDENTITY
        return z
    if activation == 2:  # SIGMOID
        return z.sigmoid()
    if activation == 3:  # RELU6
        return F.relu6(z)
    if activation == 4:  # LEAKY_RELU
        return F.leaky_relu(z, activation_param)
    if activation == 5:  # ELU
        return F.elu(z, activation_param)
    if activation == 7:  # HARDSWISH
        return F.hardswish(z)
    if activation == 8:  # HARDSIGMOID
        return F.hardsigmoid(z)
    if activation == 9:  # GELU
        return F.gelu(z)
    if activation == 10:  # GELU_TANH
        return F.gelu(z, approximate="tanh")
    if activation == 11:  # MISH
        return F.mish(z)
    if activation == 12:  # TANH
        return z.tanh()
    raise ValueError("unknown activation code")


def eager_activation_grad(spec: ActivationSpec):
    """(dy, z) -> dy * act'(z) as eager autograd computes it, by the backward op PyTorch's
    derivatives.yaml names for the activation (from z, or from y = act(z) where that op takes
    the result). It needs no autograd, which a registered op's body runs without."""
    code, param = spec
    aten = torch.ops.aten
    return {
        IDENTITY: lambda dy, z: dy,
        RELU: lambda dy, z: aten.threshold_backward(dy, F.relu(z), 0),
        SIGMOID: lambda dy, z: aten.sigmoid_backward(dy, torch.sigmoid(z)),
        RELU6: lambda dy, z: aten.hardtanh_backward(dy, z, 0.0, 6.0),
        LEAKY_RELU: lambda dy, z: aten.leaky_relu_backward(dy, z, param, False),
        ELU: lambda dy, z: aten.elu_backward(dy, param, 1, 1, False, z),
        SILU: lambda dy, z: aten.silu_backward(dy, z),
        HARDSWISH: lambda dy, z: aten.hardswish_backward(dy, z),
        HARDSIGMOID: lambda dy, z: aten.hardsigmoid_backward(dy, z),
        GELU: lambda dy, z: aten.gelu_backward(dy, z),
        GELU_TANH: lambda dy, z: aten.gelu_backward(dy, z, approximate="tanh"),
        MISH: lambda dy, z: aten.mish_backward(dy, z),
        TANH: lambda dy, z: aten.tanh_backward(dy, torch.tanh(z)),
    }[code]

