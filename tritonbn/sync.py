"""SyncBatchNormAct: BatchNorm (+ residual) + activation whose training statistics span a
process group.

Training in a group of two or more processes takes one collective each way:

- forward: each rank reduces its own batch (one launch) to per-channel (count, shift k,
  mean - k, biased var); one all_gather of that [4, C] float64 block; every rank then
  combines the blocks by Chan's parallel formula around a common shift, in float64 on the
  device, and normalizes (one launch) with the group's statistics in the same shifted form.
- backward: one launch reduces the local (sum g, sum g * xhat) per channel, one all_reduce
  sums that [2, C] buffer over the group, one launch writes dx. The parameter gradients are
  the local sums, as in nn.SyncBatchNorm: DistributedDataParallel averages them.

The group's count stays on the device, so a step never waits for the host; the price is that
a group-wide batch of a single value per channel goes undetected (nn.BatchNorm raises for one
on one process) and makes the running variance non-finite. The float64 combination costs a
few tiny kernels on [world, C] tensors; it keeps the statistics exact to float32 when |mean|
is many times the standard deviation, which shifted sums alone would not across ranks whose
shifts differ.
"""
import copy
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .kernels.dtypes import accumulate_dtype
from .modules import (BatchNormAct1d, BatchNormAct2d, BatchNormAct3d, _BatchNormActMixin,
                      check_layer_inputs)
from . import dispatch
from ._docs import ACTIVATION_ARGS, STATISTICS_ARGS
from .dispatch import walkable


def rank_stats(mean: Tensor, var: Tensor, count: int) -> Tensor:
    """One rank's [4, C] float64 block, rows (count, shift, mean - shift, biased var), from
    its batch_stats output (mean [2, C], var [C])."""
    block = mean.new_empty((4, var.numel()), dtype=torch.float64)
    block[0] = count
    block[1:3] = mean
    block[3] = var
    return block


def combine_rank_stats(blocks: Tensor, acc_dtype: torch.dtype):
    """The group's (shift, mean - shift, biased var, count), each [C] in float64, from the
    ranks' [world, 4, C] blocks (rank_stats), by Chan's formula:
    M2 = sum n_r var_r + sum n_r (mean_r - mean)^2.

    The common shift is the count-weighted mean of the ranks' shifts, rounded to acc_dtype so
    that the kernels subtract it from x exactly; each rank's mean is taken relative to it as
    (k_r - K) + (mean_r - k_r), so nothing large is ever subtracted from anything small.
    A rank with count 0 contributes nothing. A group with count 0 gives NaN statistics.
    """
    count, shift, mean_d, var = blocks.unbind(1)
    total = count.sum(0)
    common = ((count * shift).sum(0) / total).to(acc_dtype).double()
    rank_mean = (shift - common) + mean_d
    group_mean = (count * rank_mean).sum(0) / total
    m2 = (count * (var + (rank_mean - group_mean).square())).sum(0)
    return common, group_mean, m2 / total, total


def update_running_stats(running_mean: Optional[Tensor], running_var: Optional[Tensor],
                         num_batches_tracked: Optional[Tensor], momentum: Optional[float],
                         mean: Tensor, var: Tensor, total: Tensor) -> None:
    """nn.SyncBatchNorm's update from the group's statistics (float64 mean, biased var and
    count, each [C]), in float64 on the device, so every rank computes the same bits. A group
    whose whole batch is empty counts in num_batches_tracked alone, as in nn.BatchNorm."""
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    if running_mean is None:
        return
    # momentum=None: the cumulative average, 1 / num_batches_tracked (0 without a count).
    m = momentum if momentum is not None else (
        0.0 if num_batches_tracked is None else 1.0 / num_batches_tracked.double())
    counted = total > 0
    for buffer, batch in ((running_mean, mean), (running_var, var * total / (total - 1))):
        buffer.copy_(torch.where(counted, torch.lerp(buffer.double(), batch, m), buffer))


def _all_gather(output: Tensor, input: Tensor, group) -> None:
    # torch 2.13 renamed all_gather_into_tensor to all_gather_single.
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(output, input, group=group)


class _SyncBatchNormActFunction(torch.autograd.Function):
    """apply(x, weight, bias, residual, state) with state = (running_mean, running_var,
    num_batches_tracked, momentum, eps, activation, activation_param, group, world): the
    group-wide training forward and its backward. x may be empty (count 0): that rank runs
    no kernel but joins both collectives."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, state):
        (running_mean, running_var, num_batches_tracked, momentum, eps, activation,
         activation_param, group, world) = state
        launchers = dispatch.backend(x)
        C, count = x.shape[1], x.numel() // x.shape[1]
        if count:
            x, residual = walkable(x), walkable(residual)
            block = rank_stats(*launchers.batch_stats(x, None, None, momentum), count)
        else:
            block = x.new_zeros((4, C), dtype=torch.float64)
        blocks = block.new_empty((world * 4, C))
        _all_gather(blocks, block, group)
        acc = accumulate_dtype(x.dtype)
        shift, mean_d, var, total = combine_rank_stats(blocks.view(world, 4, C), acc)
        update_running_stats(running_mean, running_var, num_batches_tracked, momentum,
                             shift + mean_d, var, total)
        mean, var = torch.stack([shift, mean_d]).to(acc), var.to(acc)
        ctx.save_for_backward(x, weight, bias, residual, mean, var, total)
        ctx.state = eps, activation, activation_param, group
        if not count:
            return torch.empty_like(x)
        return launchers.normalize_act(x, mean, var, weight, bias, residual, eps, activation,
                                       activation_param)

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, residual, mean, var, total = ctx.saved_tensors
        eps, activation, activation_param, group = ctx.state
        launchers = dispatch.backend(x)
        if x.numel():
            dy = walkable(dy)
            sums, dresidual = launchers.grad_reduce(dy, x, mean, var, weight, bias, residual,
                                                    eps, activation, activation_param)
        else:
            sums = mean.new_zeros((2, x.shape[1]))
            dresidual = None if residual is None else torch.empty_like(residual)
        # Copies: the all_reduce below sums sums in place.
        dweight = None if weight is None else sums[1].to(weight.dtype, copy=True)
        dbias = None if bias is None else sums[0].to(bias.dtype, copy=True)
        dx = None
        if ctx.needs_input_grad[0]:  # the same on every rank, so all of them reduce or none
            dist.all_reduce(sums, group=group)
            # sums pre-divided by the group's count, which lives on the device.
            dx = launchers.grad_input(dy, x, mean, var, weight, bias, residual, dresidual,
                                      (sums / total).to(sums.dtype), 1, eps, activation,
                                      activation_param) if x.numel() else torch.empty_like(x)
        return dx, dweight, dbias, dresidual, None


class SyncBatchNormAct(_BatchNormActMixin, _BatchNorm):
    """Batch normalization whose training statistics span a process group, then an optional
    residual add and an activation, as one fused operation: the ``BatchNormAct*d`` layers for
    distributed training, as nn.SyncBatchNorm is to nn.BatchNorm*d.

    The computation, with the residual only when one is given::

        y = act((x - E[x]) / sqrt(Var[x] + eps) * weight + bias [+ residual])

    E[x] and Var[x] are per-channel statistics over every dimension but the channel one. While
    training in an initialised process group of two or more ranks (``process_group``, or the
    default group when that is ``None``), they are those of the whole group's batch: ranks may
    hold batches of different sizes, an empty one included (that rank still joins every
    collective, and its parameter gradients are zero). Running statistics and
    ``num_batches_tracked`` come out identical on every rank. Every rank of the group must
    call forward and backward of its SyncBatchNormAct layers in the same order, as with any
    collective. Eval mode, and training without a process group or in a group of one, compute
    what ``BatchNormAct1d/2d/3d`` compute, with no collective. CPU tensors go through gloo,
    CUDA tensors through the group's backend (NCCL); unlike nn.SyncBatchNorm, CPU input is
    accepted. The state_dict and the ``process_group`` attribute are nn.SyncBatchNorm's, so
    checkpoints load either way; the activation defaults to ReLU, where nn.SyncBatchNorm has
    none.

    Checked on each rank before any collective: the input's channel count against
    num_features, dims, dtype and devices. Not detectable without a further collective per
    step: ranks whose layers disagree on num_features. Their blocks differ in size, and gloo
    then aborts the process ("Received data size doesn't match expected size") while NCCL
    may hang or read garbage; with ``TORCH_DISTRIBUTED_DEBUG=DETAIL`` (or
    ``torch.distributed.set_debug_level`` before the group is made) torch.distributed checks
    every collective's shapes and raises a RuntimeError on every rank instead.

    Under torch.compile the group-wide forward runs eagerly (a graph break). A scripted
    (TorchScript) layer does not synchronise.

    Like nn.SyncBatchNorm it derives from nn.modules.batchnorm._BatchNorm, but not from
    nn.SyncBatchNorm: DistributedDataParallel refuses that class in CPU models.
    ``tritonbn.convert_sync_batchnorm`` turns a model's BatchNorm layers into this one.

    Args:
        num_features: C, the number of channels of an input of shape (N, C, *).
        {statistics_args}
        track_running_stats: if ``True``, the layer keeps the buffers ``running_mean``,
            ``running_var`` and ``num_batches_tracked``, updates them while training and
            normalizes with them in eval mode; if ``False``, the buffers are ``None`` and
            the batch's own statistics (the group's, while training) are used in both modes.
            Default: ``True``
        {activation_args}
        process_group: the group whose batches the training statistics span; ``None`` means
            the default group, looked up at each forward. Kept as the ``process_group``
            attribute; copies of the layer share it. Default: ``None``
        device: where the parameters and buffers are created. Default: ``None``
            (PyTorch's default device)
        dtype: the dtype of the parameters and buffers. Default: ``None`` (PyTorch's default
            dtype)
        **kwargs: further keyword arguments, passed on to nn.modules.batchnorm._BatchNorm as
            they are, such as ``bias=False`` in PyTorch versions that take it.

    ``forward(input, residual=None)`` takes ``residual`` as ``None`` or as a tensor of the
    input's shape, dtype and device, in any memory layout (it is not broadcast), and returns a
    tensor of the input's shape and dtype.

    Shape:
        - Input: (N, C, *), 2 dims or more
        - Residual: optional, the input's shape
        - Output: the input's shape

    Examples::

        >>> import torch
        >>> from tritonbn import BatchNormAct2d, SyncBatchNormAct
        >>> _ = torch.manual_seed(0)
        >>> m = SyncBatchNormAct(4, activation="silu")
        >>> x = torch.randn(2, 4, 3, 3)
        >>> # Outside a process group it computes what BatchNormAct2d computes
        >>> torch.allclose(m(x), BatchNormAct2d(4, activation="silu")(x), atol=1e-6)
        True
        >>> m(torch.randn(2, 4, 3)).shape  # any number of dims from 2 up
        torch.Size([2, 4, 3])
        >>> # In a script that torchrun starts on every process of the group:
        >>> import torch.distributed as dist
        >>> dist.init_process_group("nccl")  # doctest: +SKIP
        >>> m = SyncBatchNormAct(64).cuda()  # doctest: +SKIP
        >>> x = torch.randn(8, 64, 32, 32, device="cuda")  # doctest: +SKIP
        >>> # normalized with the statistics of every rank's batch together
        >>> y = m(x)  # doctest: +SKIP
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True,
                 activation: str = "relu", activation_kwargs: Optional[dict] = None,
                 process_group=None, device=None, dtype=None, **kwargs) -> None:
        """activation: a name from tritonbn.SUPPORTED_ACTIVATIONS; activation_kwargs: its
        keyword arguments as torch.nn.functional takes them. kwargs: further keyword
        arguments of nn.SyncBatchNorm (bias= where PyTorch has it)."""
        super().__init__(num_features, eps, momentum, affine, track_running_stats, activation,
                         activation_kwargs, device, dtype, **kwargs)
        self.process_group = process_group

    def __deepcopy__(self, memo):
        # A process group is a handle on the processes, not state to copy (nor can it be
        # copied): copies share it.
        memo[id(self.process_group)] = self.process_group
        twin = memo[id(self)] = type(self).__new__(type(self))
        twin.__setstate__(copy.deepcopy(self.__dict__, memo))
        return twin

    # nn.SyncBatchNorm's checks, which its forward also calls on this module when fuse_bn_act
    # falls back to the unfused computation.
    _check_input_dim = nn.SyncBatchNorm._check_input_dim
    _check_non_zero_input_channels = nn.SyncBatchNorm._check_non_zero_input_channels

    def _bn_act(self, input: Tensor, residual: Optional[Tensor]) -> Tensor:
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        if input.dim() > 5:  # the layer sees (N, C, S) anyway; the checks stop at 5 dims
            flat = None if residual is None else residual.flatten(2)
            return self._bn_act(input.flatten(2), flat).view(input.shape)
        group = self._sync_group()
        if group is None:
            return super()._bn_act(input, residual)
        if torch.compiler.is_compiling():
            # A graph break; disabled here, not at import: the decorator imports torch._dynamo.
            return torch.compiler.disable(_sync_forward)(self, input, residual, group)
        return _sync_forward(self, input, residual, group)

    def _sync_group(self):
        """The process group to reduce over in this call, or None for none."""
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return None
        group = self.process_group or dist.group.WORLD
        return group if dist.get_world_size(group) > 1 else None


SyncBatchNormAct.__doc__ = SyncBatchNormAct.__doc__.format(
    statistics_args=STATISTICS_ARGS, activation_args=ACTIVATION_ARGS)


def _sync_forward(layer: SyncBatchNormAct, input: Tensor, residual: Optional[Tensor],
                  group) -> Tensor:
    tracked = layer.track_running_stats
    running_mean = layer.running_mean if tracked else None
    running_var = layer.running_var if tracked else None
    # Checked on empty slices: a rank may hold one value per channel, or none; only the
    # group's count matters.
    check_layer_inputs(layer, input[:0], running_mean, running_var, layer.weight, layer.bias,
                       True, None if residual is None else residual[:0])
    state = (running_mean, running_var, layer.num_batches_tracked if tracked else None,
             layer.momentum, layer.eps, *layer._activation_spec(), group,
             dist.get_world_size(group))
    return _SyncBatchNormActFunction.apply(input, layer.weight, layer.bias, residual, state)


def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """Replace every BatchNorm layer of a model by a SyncBatchNormAct, keeping activations.

    The counterpart of nn.SyncBatchNorm.convert_sync_batchnorm for models with tritonbn
    layers: every BatchNormAct1d/2d/3d becomes a SyncBatchNormAct with the same activation,
    and every plain nn.BatchNorm1d/2d/3d one with ``activation="identity"`` (which, unlike
    nn.SyncBatchNorm, runs on the CPU too). Each new layer holds the original's own parameter
    and buffer tensors (not copies) and its eps, momentum, flags and train/eval mode, so
    ``state_dict`` keys and tensors are unchanged. Exact instances of those six classes only:
    other BatchNorm subclasses are left alone.

    Like PyTorch's, it replaces submodules in place and returns ``module`` (or the new layer
    when ``module`` itself is one). Use it instead of PyTorch's, which would turn BatchNormAct
    layers into plain nn.SyncBatchNorm and drop their activations. It needs no process group
    to run: the layers synchronise only when they train inside one. A plain BatchNorm keeps
    the separate activation after it; run ``tritonbn.fuse_bn_act`` first to fuse the two.

    Args:
        module: the model (or a single layer) to convert.
        process_group: the group the new layers synchronise over, stored as their
            ``process_group``; ``None`` means the default group. Default: ``None``

    Returns:
        ``module``, converted in place, or the new SyncBatchNormAct when ``module`` itself is a
        layer it converts.

    Examples::

        >>> import torch
        >>> from torch import nn
        >>> import tritonbn
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), tritonbn.BatchNormAct2d(8, activation="silu"),
        ...                       nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8))
        >>> weight = model[3].weight
        >>> tritonbn.convert_sync_batchnorm(model) is model
        True
        >>> [type(layer).__name__ for layer in model]
        ['Conv2d', 'SyncBatchNormAct', 'Conv2d', 'SyncBatchNormAct']
        >>> model[1].activation, model[3].activation, model[3].weight is weight
        ('silu', 'identity', True)
        >>> model(torch.randn(2, 3, 6, 6)).shape  # no process group: no synchronisation
        torch.Size([2, 8, 4, 4])
        >>> # Fuse first, so that a BatchNorm takes the activation that follows it
        >>> plain = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
        >>> model = tritonbn.convert_sync_batchnorm(tritonbn.fuse_bn_act(plain))
        >>> layer = model.get_submodule("1")
        >>> type(layer).__name__, layer.activation
        ('SyncBatchNormAct', 'relu')
    """
    converted = _converted(module, process_group)
    if converted is not None:
        return converted
    for name, child in module.named_children():
        module.add_module(name, convert_sync_batchnorm(child, process_group))
    return module


def _converted(module: nn.Module, process_group) -> Optional[nn.Module]:
    """module's synchronised twin, holding module's own tensors, or None if it has none."""
    if type(module) in (BatchNormAct1d, BatchNormAct2d, BatchNormAct3d):
        activation, kwargs = module.activation, module.activation_kwargs
    elif type(module) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
        activation, kwargs = "identity", None
    else:
        return None
    twin = SyncBatchNormAct(module.num_features, module.eps, module.momentum, module.affine,
                            module.track_running_stats, activation, kwargs, process_group,
                            device="meta")
    # Overwrites every placeholder the constructor made (the same flags, so the same names).
    for name, param in module._parameters.items():
        twin.register_parameter(name, param)
    for name, buffer in module._buffers.items():
        twin.register_buffer(name, buffer,
                             persistent=name not in module._non_persistent_buffers_set)
    if hasattr(module, "qconfig"):
        twin.qconfig = module.qconfig
    return twin.train(module.training)
