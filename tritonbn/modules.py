"""BatchNormAct1d/2d/3d: nn.BatchNorm1d/2d/3d followed by an activation, as one fused op, with
an optional residual added before the activation.

They subclass the PyTorch modules, so state_dict keys, train/eval, num_batches_tracked,
momentum=None, track_running_stats=False and affine=False behave as there.

Their forward is one call of ``run_layer``, which torch.fx records as a single node taking the
layer itself: a traced model runs the kernels, and reads the layer's mode when it runs, not
when it was traced. TorchScript compiles the composite path instead (``_scripted_forward``).
"""
from typing import Optional

import torch
from torch import Tensor, nn

from . import composite
from .activations import activation_kwargs as full_activation_kwargs
from .activations import activation_spec, apply_activation
from .functional import check_inputs, forward_checked


class _BatchNormActMixin:
    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True,
                 activation: str = "relu", activation_kwargs: Optional[dict] = None,
                 device=None, dtype=None, **kwargs) -> None:
        """activation: a name from tritonbn.SUPPORTED_ACTIVATIONS; activation_kwargs: its
        keyword arguments as torch.nn.functional takes them. kwargs: further keyword
        arguments of nn.BatchNorm*d (bias= where PyTorch has it)."""
        full_kwargs = full_activation_kwargs(activation, activation_kwargs)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype,
                         **kwargs)
        self.activation = activation
        self.activation_kwargs = full_kwargs
        self._spec = (activation, dict(full_kwargs), activation_spec(activation, full_kwargs))
        self._activation_code, self._activation_param = self._spec[2]

    def extra_repr(self) -> str:
        kwargs = "".join(f", {key}={value!r}" for key, value in self.activation_kwargs.items())
        return f"{super().extra_repr()}, activation={self.activation}{kwargs}"

    def _activation_spec(self):
        """activation_spec of the current activation and kwargs, recomputed only when they
        change (it is the costlier part of a forward's host time)."""
        name, kwargs, spec = self._spec
        if name != self.activation or kwargs != self.activation_kwargs:
            spec = activation_spec(self.activation, self.activation_kwargs)
            self._spec = (self.activation, dict(self.activation_kwargs), spec)
            self._activation_code, self._activation_param = spec
        return spec

    def forward(self, input: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        """activation(batch_norm(input) + residual); residual: None, or a tensor of input's
        shape, dtype and device, in any layout."""
        if torch.jit.is_scripting():
            return self._scripted_forward(input, residual)
        return run_layer(self, input, residual)

    def _bn_act(self, input: Tensor, residual: Optional[Tensor]) -> Tensor:
        # nn.BatchNorm's forward, with every check ahead of any state change, and the
        # num_batches_tracked update (and momentum=None's 1 / num_batches_tracked) left to
        # the statistics kernel on the device.
        self._check_input_dim(input)
        spec = self._activation_spec()
        weight, bias = _fetch(self, self._parameters, "weight", "bias")
        bn_training, running_mean, running_var, tracked = layer_statistics(
            self.training, self.track_running_stats,
            *_fetch(self, self._buffers, "running_mean", "running_var", "num_batches_tracked"))
        check_layer_inputs(self, input, running_mean, running_var, weight, bias, bn_training,
                           residual)
        return forward_checked(input, running_mean, running_var, weight, bias, bn_training,
                               self.momentum, self.eps, spec, tracked, residual)

    def __prepare_scriptable__(self) -> nn.Module:
        self._activation_spec()  # the activation attributes TorchScript reads, up to date
        return self

    def _scripted_forward(self, input: Tensor, residual: Optional[Tensor]) -> Tensor:
        """forward as TorchScript compiles it: nn.BatchNorm's checks, then the composite path
        (a scripted SyncBatchNormAct does not synchronise)."""
        self._check_input_dim(input)
        bn_training, running_mean, running_var, tracked = layer_statistics(
            self.training, self.track_running_stats, self.running_mean, self.running_var,
            self.num_batches_tracked)
        z = composite.batch_norm(input, running_mean, running_var, self.weight, self.bias,
                                 bn_training, self.momentum, self.eps, tracked, residual)
        return apply_activation(z, self._activation_code, self._activation_param)


@torch.fx.wrap
def run_layer(layer: nn.Module, input: Tensor, residual: Optional[Tensor]) -> Tensor:
    """layer's forward. torch.fx does not trace into it (its checks would branch on traced
    values) but records the call, with the layer as an argument."""
    return layer._bn_act(input, residual)


def layer_statistics(training: bool, track_running_stats: bool, running_mean: Optional[Tensor],
                     running_var: Optional[Tensor], num_batches_tracked: Optional[Tensor]
                     ) -> tuple[bool, Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """(bn_training, running_mean, running_var, num_batches_tracked) as nn.BatchNorm's forward
    passes them to batch_norm in a layer's current mode; the count only where it counts."""
    bn_training = training or (running_mean is None and running_var is None)
    if not training:
        return bn_training, running_mean, running_var, None
    if not track_running_stats:
        return bn_training, None, None, None
    return bn_training, running_mean, running_var, num_batches_tracked


def check_layer_inputs(layer: nn.Module, input: Tensor, running_mean: Optional[Tensor],
                       running_var: Optional[Tensor], weight: Optional[Tensor],
                       bias: Optional[Tensor], training: bool, residual: Optional[Tensor]):
    """functional.check_inputs, whose error for a wrong channel count names the layer's."""
    try:
        check_inputs(input, running_mean, running_var, weight, bias, training, residual)
    except ValueError as error:
        per_channel = (running_mean, running_var, weight, bias)
        if (input.dim() < 2 or input.shape[1] == layer.num_features
                or all(t is None for t in per_channel)):  # then any channel count will do
            raise
        raise ValueError(f"{type(layer).__name__} expects input with num_features="
                         f"{layer.num_features} channels, got {input.shape[1]} channels "
                         f"(input shape {tuple(input.shape)})") from error


def _fetch(module, registered: dict, *names):
    """module.<name> for each name, from the dict nn.Module keeps them in: reading them as
    attributes goes through nn.Module.__getattr__, a microsecond each. A name missing there
    (a parametrization replaces the parameter with a property) is read as an attribute."""
    return [registered[name] if name in registered else getattr(module, name)
            for name in names]


class BatchNormAct1d(_BatchNormActMixin, nn.BatchNorm1d):
    """nn.BatchNorm1d + activation over (N, C) or (N, C, L) input."""


class BatchNormAct2d(_BatchNormActMixin, nn.BatchNorm2d):
    """nn.BatchNorm2d + activation over (N, C, H, W) input."""


class BatchNormAct3d(_BatchNormActMixin, nn.BatchNorm3d):
    """nn.BatchNorm3d + activation over (N, C, D, H, W) input."""
