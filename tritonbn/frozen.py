"""FrozenBatchNormAct2d and freeze_batch_norm: BatchNorm with frozen statistics and affine,
followed by the activation, for fine-tuning (detection backbones) as torchvision's and timm's
FrozenBatchNorm2d, keeping a fused layer's activation and residual."""
from typing import Optional

import torch
from torch import Tensor, nn

from ._docs import ACTIVATION_ARGS
from .activations import activation_kwargs as full_activation_kwargs
from .functional import bn_act
from .modules import BatchNormAct1d, BatchNormAct2d, BatchNormAct3d
from .sync import SyncBatchNormAct

_FUSED = (BatchNormAct1d, BatchNormAct2d, BatchNormAct3d, SyncBatchNormAct)


class FrozenBatchNormAct2d(nn.Module):
    __doc__ = f"""BatchNorm whose statistics and affine transform are frozen buffers, followed by
    an activation: ``activation((input - running_mean) / sqrt(running_var + eps) * weight +
    bias + residual)``, in every mode, with no gradient for the four buffers.

    Its state_dict keys are those of torchvision's and timm's ``FrozenBatchNorm2d``
    (``weight``, ``bias``, ``running_mean``, ``running_var``), and loading a BatchNorm's state
    drops its ``num_batches_tracked``. Any input of 2 to 5 dims runs, channels in dim 1.

    Args:
        num_features: the number of channels C.
        eps: added to the variance before its square root. Default: 1e-5
        {ACTIVATION_ARGS}

    Examples::

        >>> import torch
        >>> import tritonbn
        >>> layer = tritonbn.FrozenBatchNormAct2d(4, activation="silu")
        >>> sorted(layer.state_dict())
        ['bias', 'running_mean', 'running_var', 'weight']
        >>> layer(torch.randn(2, 4, 3, 3)).shape
        torch.Size([2, 4, 3, 3])
    """

    def __init__(self, num_features: int, eps: float = 1e-5, activation: str = "relu",
                 activation_kwargs: Optional[dict] = None, device=None, dtype=None) -> None:
        super().__init__()
        self.activation_kwargs = full_activation_kwargs(activation, activation_kwargs)
        self.activation, self.num_features, self.eps = activation, num_features, eps
        factory = {"device": device, "dtype": dtype}
        self.register_buffer("weight", torch.ones(num_features, **factory))
        self.register_buffer("bias", torch.zeros(num_features, **factory))
        self.register_buffer("running_mean", torch.zeros(num_features, **factory))
        self.register_buffer("running_var", torch.ones(num_features, **factory))

    def forward(self, input: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        return bn_act(input, self.running_mean, self.running_var, self.weight, self.bias,
                      training=False, eps=self.eps, activation=self.activation,
                      activation_kwargs=self.activation_kwargs, residual=residual)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        kwargs = "".join(f", {key}={value!r}" for key, value in self.activation_kwargs.items())
        return f"{self.num_features}, eps={self.eps}, activation={self.activation}{kwargs}"


def freeze_batch_norm(module: nn.Module) -> nn.Module:
    """Freeze every BatchNorm of a model: the counterpart of timm's ``freeze_batch_norm_2d``
    for models with tritonbn layers, fused by ``fuse_bn_act`` or built with them.

    Every ``BatchNormAct1d/2d/3d`` and ``SyncBatchNormAct`` becomes a ``FrozenBatchNormAct2d``
    with the same activation, and every plain ``nn.BatchNorm2d`` and ``nn.SyncBatchNorm`` one
    with ``activation="identity"``, holding copies of the layer's weight, bias (ones and zeros
    without affine) and running statistics, and its eps. timm's and torchvision's frozen
    layers would drop a fused layer's activation; in a converted model, the fused call keeps
    it around whatever layer it finds, but only this keeps it fused. Exact instances of those
    classes only: other BatchNorm subclasses are left alone.

    Like timm's, it replaces submodules in place and returns ``module`` (or the new layer when
    ``module`` itself is one).

    Examples::

        >>> import torch
        >>> from torch import nn
        >>> import tritonbn
        >>> model = tritonbn.fuse_bn_act(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4),
        ...                                            nn.ReLU()))
        >>> model = tritonbn.freeze_batch_norm(model)
        >>> model[1]
        FrozenBatchNormAct2d(4, eps=1e-05, activation=relu)
        >>> [name for name, p in model.named_parameters()]
        ['0.weight', '0.bias']
    """
    if type(module) in _FUSED or type(module) in (nn.BatchNorm2d, nn.SyncBatchNorm):
        return _frozen(module)
    for name, child in module.named_children():
        frozen = freeze_batch_norm(child)
        if frozen is not child:
            module.add_module(name, frozen)
    return module


def _frozen(bn: nn.modules.batchnorm._BatchNorm) -> FrozenBatchNormAct2d:
    like = next((t for t in (bn.running_mean, bn.weight) if t is not None), None)
    factory = {} if like is None else {"device": like.device, "dtype": like.dtype}
    frozen = FrozenBatchNormAct2d(bn.num_features, bn.eps, getattr(bn, "activation", "identity"),
                                  getattr(bn, "activation_kwargs", None), **factory)
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            source = getattr(bn, name)
            if source is not None:
                getattr(frozen, name).copy_(source.detach())
    return frozen
