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
from ._docs import STATISTICS_ARGS
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

def _layer_doc(dims: str, over: str, base: str, shape: str, examples: str) -> str:
    """The docstring of BatchNormAct1d/2d/3d, which differ in these words and their
    examples."""
    return _LAYER_DOC.format(dims=dims, over=over, base=base, shape=shape,
                             statistics_args=STATISTICS_ARGS,
                             examples=examples.strip("\n").rstrip())


_LAYER_DOC = """Batch normalization over {dims} input, then an optional residual add and an
    activation, as one fused operation.

    The computation, with the residual only when one is given::

        y = act((x - E[x]) / sqrt(Var[x] + eps) * weight + bias [+ residual])

    E[x] and Var[x] are per-channel statistics {over}.
    While training they are the batch's own (Var the biased variance; running_var is updated
    with the unbiased one); in eval mode they are ``running_mean`` and ``running_var``, or the
    batch's again when ``track_running_stats=False``. ``act`` is the layer's activation, and
    the residual is added after the affine transform, before it.

    The layer subclasses nn.{base}: parameters, buffers, ``state_dict`` keys, train/eval
    modes, the running-statistics update and ``num_batches_tracked`` behave as there, and
    checkpoints load either way. Unlike nn.{base}, it applies ReLU unless told otherwise:
    ``activation="identity"`` gives batch normalization alone.

    ``forward(input, residual=None)`` takes ``residual`` as ``None`` or as a tensor of the
    input's shape, dtype and device, in any memory layout (it is not broadcast), and returns a
    tensor of the input's shape and dtype. The input may be float16, bfloat16, float32 or
    float64; parameters and buffers keep their own dtype. Gradients flow to the input, the
    weight, the bias and the residual. Every check runs before anything is computed: a bad
    input (wrong number of dims or channels, a non-floating dtype, a residual or tensors that
    do not match, a single value per channel where batch statistics are used) raises
    ValueError or TypeError and leaves the buffers as they were. An empty batch gives an empty
    output; while training it counts in ``num_batches_tracked`` and changes nothing else.

    An unknown activation, a keyword argument it does not take or a value of the wrong kind
    raises ValueError when the layer is built. The ``activation`` and ``activation_kwargs``
    attributes may be reassigned later: the next forward checks and uses the new values.

    Args:
        num_features: C, the number of channels of an input of shape {shape}.
        {statistics_args}
        track_running_stats: if ``True``, the layer keeps the buffers ``running_mean``,
            ``running_var`` and ``num_batches_tracked``, updates them while training and
            normalizes with them in eval mode; if ``False``, the buffers are ``None`` and
            the batch's own statistics are used in both modes. Default: ``True``
        activation: the activation applied last, by name: one of
            ``tritonbn.SUPPORTED_ACTIVATIONS`` (``"identity"``, ``"relu"``, ``"relu6"``,
            ``"leaky_relu"``, ``"elu"``, ``"silu"``, ``"hardswish"``, ``"hardsigmoid"``,
            ``"gelu"``, ``"mish"``, ``"sigmoid"``, ``"tanh"``), computed as
            torch.nn.functional computes it. Default: ``"relu"``
        activation_kwargs: the activation's keyword arguments, as torch.nn.functional
            names them: ``negative_slope`` for ``"leaky_relu"`` (default 0.01), ``alpha`` for
            ``"elu"`` (default 1.0), ``approximate`` for ``"gelu"`` (``"none"`` or
            ``"tanh"``, default ``"none"``); the others take none, and ``inplace`` is not
            accepted. ``None`` or a partial dict leaves the rest at their defaults; the
            attribute of the same name holds the full dict, numbers as floats.
            Default: ``None``
        device: where the parameters and buffers are created. Default: ``None``
            (PyTorch's default device)
        dtype: the dtype of the parameters and buffers. Default: ``None`` (PyTorch's default
            dtype)
        **kwargs: further keyword arguments, passed on to nn.{base} as they are, such
            as ``bias=False`` (a learnable weight but no bias) in PyTorch versions that take
            it.

    Shape:
        - Input: {shape}
        - Residual: optional, the input's shape
        - Output: the input's shape

    Examples::

{examples}
    """


class BatchNormAct1d(_BatchNormActMixin, nn.BatchNorm1d):
    __doc__ = _layer_doc("a 2D or 3D", "over the N dimension, or the (N, L) slices",
                         "BatchNorm1d", "(N, C) or (N, C, L)", """

        >>> import torch
        >>> from torch import nn
        >>> from tritonbn import BatchNormAct1d
        >>> _ = torch.manual_seed(0)
        >>> m = BatchNormAct1d(6, activation="silu")
        >>> m(torch.randn(8, 6)).shape
        torch.Size([8, 6])
        >>> x = torch.randn(8, 6, 10)
        >>> y = m(x)
        >>> y.shape
        torch.Size([8, 6, 10])
        >>> # What nn.BatchNorm1d followed by nn.SiLU computes
        >>> bn = nn.BatchNorm1d(6)
        >>> torch.allclose(y, nn.functional.silu(bn(x)), atol=1e-6)
        True
    """)


class BatchNormAct2d(_BatchNormActMixin, nn.BatchNorm2d):
    __doc__ = _layer_doc("a 4D", "over the (N, H, W) slices", "BatchNorm2d", "(N, C, H, W)",
                         """

        >>> import torch
        >>> from torch import nn
        >>> from tritonbn import BatchNormAct2d
        >>> _ = torch.manual_seed(0)
        >>> m = BatchNormAct2d(4)  # batch norm, then ReLU
        >>> x = torch.randn(2, 4, 5, 5)
        >>> y = m(x)
        >>> y.shape
        torch.Size([2, 4, 5, 5])
        >>> # What nn.BatchNorm2d followed by nn.ReLU computes, running statistics included
        >>> bn, relu = nn.BatchNorm2d(4), nn.ReLU()
        >>> torch.allclose(y, relu(bn(x)), atol=1e-6)
        True
        >>> torch.allclose(m.running_mean, bn.running_mean), int(m.num_batches_tracked)
        (True, 1)
        >>> # A residual, added before the activation; a leaky ReLU with its own slope
        >>> m = BatchNormAct2d(4, activation="leaky_relu",
        ...                    activation_kwargs={"negative_slope": 0.2})
        >>> m.activation_kwargs
        {'negative_slope': 0.2}
        >>> m.load_state_dict(bn.state_dict())  # the keys of nn.BatchNorm2d
        <All keys matched successfully>
        >>> _ = m.eval(), bn.eval()
        >>> r = torch.randn(2, 4, 5, 5)
        >>> torch.allclose(m(x, r), nn.functional.leaky_relu(bn(x) + r, 0.2), atol=1e-6)
        True
    """)


class BatchNormAct3d(_BatchNormActMixin, nn.BatchNorm3d):
    __doc__ = _layer_doc("a 5D", "over the (N, D, H, W) slices", "BatchNorm3d",
                         "(N, C, D, H, W)", """

        >>> import torch
        >>> from torch import nn
        >>> from tritonbn import BatchNormAct3d
        >>> _ = torch.manual_seed(0)
        >>> m = BatchNormAct3d(3, activation="gelu", activation_kwargs={"approximate": "tanh"})
        >>> x, r = torch.randn(2, 3, 4, 4, 4), torch.randn(2, 3, 4, 4, 4)
        >>> y = m(x, r)
        >>> y.shape
        torch.Size([2, 3, 4, 4, 4])
        >>> bn = nn.BatchNorm3d(3)
        >>> ref = nn.functional.gelu(bn(x) + r, approximate="tanh")
        >>> torch.allclose(y, ref, atol=1e-6)
        True
    """)
