"""BatchNormAct1d/2d/3d: nn.BatchNorm1d/2d/3d followed by an activation, as one fused op, with
an optional residual added before the activation.

They subclass the PyTorch modules, so state_dict keys, train/eval, num_batches_tracked,
momentum=None, track_running_stats=False and affine=False behave as there.
"""
from typing import Optional

from torch import Tensor, nn

from .activations import activation_kwargs as full_activation_kwargs
from .activations import activation_spec
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
        return spec

    def forward(self, input: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        """activation(batch_norm(input) + residual); residual: None, or a tensor of input's
        shape, dtype and device, in any layout."""
        # nn.BatchNorm's forward, with every check ahead of any state change, and the
        # num_batches_tracked update (and momentum=None's 1 / num_batches_tracked) left to
        # the statistics kernel on the device.
        self._check_input_dim(input)
        spec = self._activation_spec()
        weight, bias = _fetch(self, self._parameters, "weight", "bias")
        running_mean, running_var, tracked = _fetch(self, self._buffers, "running_mean",
                                                    "running_var", "num_batches_tracked")
        training = self.training
        bn_training = training or (running_mean is None and running_var is None)
        if not training:
            tracked = None
        elif not self.track_running_stats:
            running_mean = running_var = tracked = None
        check_inputs(input, running_mean, running_var, weight, bias, bn_training, residual)
        return forward_checked(input, running_mean, running_var, weight, bias, bn_training,
                               self.momentum, self.eps, spec, tracked, residual)


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
