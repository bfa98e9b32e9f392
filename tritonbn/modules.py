"""BatchNormAct1d/2d/3d: nn.BatchNorm1d/2d/3d followed by an activation, as one fused op.

They subclass the PyTorch modules, so state_dict keys, train/eval, num_batches_tracked,
momentum=None, track_running_stats=False and affine=False behave as there, with one deliberate
difference: an empty batch leaves num_batches_tracked as it was (PyTorch counts it).
"""
from torch import Tensor, nn

from .functional import activation_code, check_inputs, forward_checked


class _BatchNormActMixin:
    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True,
                 activation: str = "relu", device=None, dtype=None, **kwargs) -> None:
        """kwargs: further keyword arguments of nn.BatchNorm*d (bias= where PyTorch has it)."""
        activation_code(activation)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype,
                         **kwargs)
        self.activation = activation

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={self.activation}"

    def forward(self, input: Tensor) -> Tensor:
        # nn.BatchNorm's forward, with every check moved ahead of the num_batches_tracked update.
        # Parameters and buffers are read once: each read goes through nn.Module.__getattr__.
        self._check_input_dim(input)
        code = activation_code(self.activation)
        training, momentum, track = self.training, self.momentum, self.track_running_stats
        running_mean, running_var = self.running_mean, self.running_var
        weight, bias = self.weight, self.bias
        bn_training = training or (running_mean is None and running_var is None)
        if training and not track:
            running_mean = running_var = None
        check_inputs(input, running_mean, running_var, weight, bias, bn_training)
        factor = 0.0 if momentum is None else momentum
        tracked = self.num_batches_tracked
        if training and track and tracked is not None and input.numel() > 0:
            tracked.add_(1)
            if momentum is None:  # cumulative moving average
                factor = 1.0 / float(tracked)
        return forward_checked(input, running_mean, running_var, weight, bias, bn_training,
                               factor, self.eps, code)


class BatchNormAct1d(_BatchNormActMixin, nn.BatchNorm1d):
    """nn.BatchNorm1d + activation over (N, C) or (N, C, L) input."""


class BatchNormAct2d(_BatchNormActMixin, nn.BatchNorm2d):
    """nn.BatchNorm2d + activation over (N, C, H, W) input."""


class BatchNormAct3d(_BatchNormActMixin, nn.BatchNorm3d):
    """nn.BatchNorm3d + activation over (N, C, D, H, W) input."""
