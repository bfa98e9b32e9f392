"""fuse_bn_act(): rewrite a model so that each BatchNorm followed only by a ReLU or a sigmoid
runs as one BatchNormAct module.

The model is traced with torch.fx. A BatchNorm call qualifies when its output has exactly one
consumer and that consumer is an activation taking nothing else as a tensor input: the module
``nn.ReLU`` / ``nn.Sigmoid`` (inplace or not, shared between several calls or not), the
functions ``F.relu``, ``F.relu_``, ``torch.relu``, ``torch.relu_``, ``torch.sigmoid``,
``torch.sigmoid_``, or the Tensor methods ``relu``, ``relu_``, ``sigmoid``, ``sigmoid_``
(``F.sigmoid`` traces as the method). The BatchNorm module is replaced, at its own attribute
path and sharing its parameters and buffers, by the matching BatchNormAct with that activation,
and the activation's call is dropped from the graph. A BatchNorm module called more than once
is fused only if every one of its calls qualifies with the same activation.

Left alone: modules of other types (subclasses of the BatchNorm and activation classes
included, since they may change forward), BatchNorms or activation modules carrying hooks
(fusing would change what the hooks see), and BatchNorms whose output feeds anything else.

The result is a new ``torch.fx.GraphModule``; the input model is never modified. Its parameters,
buffers and submodules are a deep copy of the model's own, at the same paths and in the same
order, so ``state_dict()`` keys are exactly the original's and checkpoints load either way.
Activation modules stay in place even where no call uses them any more. Being a GraphModule
(named after the model's class, as fx.symbolic_trace names it), the result keeps the traced
``forward`` only: other methods of the model's class are not on it, and a converted
nn.Sequential is reached by ``get_submodule("3")``, not by index.

A model torch.fx cannot trace (data-dependent control flow, for one) is returned unchanged, as
a deep copy, with a warning that names the error and the line of the model's code that raised.
"""
import copy
import logging
import os
import traceback
import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import fx, nn

from .modules import BatchNormAct1d, BatchNormAct2d, BatchNormAct3d
from .sync import SyncBatchNormAct

logger = logging.getLogger(__name__)

_FUSED_CLASSES = {nn.BatchNorm1d: BatchNormAct1d, nn.BatchNorm2d: BatchNormAct2d,
                  nn.BatchNorm3d: BatchNormAct3d, nn.SyncBatchNorm: SyncBatchNormAct}
_ACTIVATION_MODULES = {nn.ReLU: "relu", nn.Sigmoid: "sigmoid"}
_ACTIVATION_FUNCTIONS = {F.relu: "relu", torch.relu: "relu", torch.relu_: "relu",
                         torch.sigmoid: "sigmoid", torch.sigmoid_: "sigmoid"}
_ACTIVATION_METHODS = {"relu": "relu", "relu_": "relu", "sigmoid": "sigmoid",
                       "sigmoid_": "sigmoid"}
_TORCH_DIR = os.path.dirname(torch.__file__)  # frames under it are not the model's code


class FusedPair(NamedTuple):
    """One fused call: the BatchNorm's module path and its consumer, named as a module path
    (``layer1.0.relu``), a function (``torch.nn.functional.relu``) or a method (``Tensor.relu``)."""

    bn: str
    activation: str


class _Tracer(fx.Tracer):
    """fx's default tracer that also keeps tritonbn's own modules as leaves, so that an
    already converted model traces (and converts again to itself)."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return (isinstance(module, tuple(_FUSED_CLASSES.values()))
                or super().is_leaf_module(module, qualified_name))


def fuse_bn_act(model: nn.Module) -> nn.Module:
    """A copy of model with every BatchNorm1d/2d/3d -> ReLU/sigmoid pair run as one
    BatchNormAct1d/2d/3d (see the module docstring for what qualifies).

    Returns a ``torch.fx.GraphModule`` with the model's state_dict keys, train/eval modes,
    devices and dtypes. Its attribute ``fused_pairs`` lists what was fused, as ``FusedPair``
    tuples in the order of the BatchNorms' first calls; each pair is also logged at INFO level,
    each BatchNorm left alone at DEBUG level with the reason. An untraceable model comes back as
    a deep copy with a warning and ``fused_pairs == ()``.
    """
    root = copy.deepcopy(model)
    try:
        graph = _Tracer().trace(root)
    except Exception as error:  # tracing runs arbitrary user code: any failure means "cannot"
        warnings.warn(f"fuse_bn_act: torch.fx cannot trace {type(model).__name__} "
                      f"({_describe(error)}); returning the model unchanged", stacklevel=2)
        unchanged = copy.deepcopy(model)  # tracing may have run side effects on root
        unchanged.fused_pairs = ()
        return unchanged

    fused_pairs = []
    for target, calls in _batchnorm_calls(root, graph).items():
        bn = root.get_submodule(target)
        consumers = [_fusable_consumer(root, node) for node in calls]
        reason = _refusal(bn, consumers)
        if reason:
            logger.debug("fuse_bn_act: %s left alone: %s", target, reason)
            continue
        activation = consumers[0][1]
        _replace_submodule(root, target, _fused_module(bn, activation))
        for node, (consumer, _) in zip(calls, consumers, strict=True):
            pair = FusedPair(target, _consumer_name(consumer))
            consumer.replace_all_uses_with(node)
            graph.erase_node(consumer)
            fused_pairs.append(pair)
            logger.info("fuse_bn_act: fused %s + %s into %s(activation=%s)", *pair,
                        _FUSED_CLASSES[type(bn)].__name__, activation)
    graph.lint()
    fused = _graph_module(root, graph)
    fused.fused_pairs = tuple(fused_pairs)
    logger.info("fuse_bn_act: %d pair(s) fused in %s", len(fused_pairs), type(model).__name__)
    return fused


def _batchnorm_calls(root: nn.Module, graph: fx.Graph) -> dict[str, list[fx.Node]]:
    """Calls of plain BatchNorm1d/2d/3d modules, grouped by module path, in graph order."""
    calls: dict[str, list[fx.Node]] = {}
    for node in graph.nodes:
        if node.op == "call_module" and type(root.get_submodule(node.target)) in _FUSED_CLASSES:
            calls.setdefault(node.target, []).append(node)
    return calls


def _fusable_consumer(root: nn.Module, node: fx.Node) -> tuple[fx.Node, str] | None:
    """(consumer, activation) if node's only consumer is a ReLU or sigmoid of node alone."""
    if len(node.users) != 1:
        return None
    (consumer,) = node.users
    if consumer.all_input_nodes != [node]:
        return None
    if consumer.op == "call_module":
        module = root.get_submodule(consumer.target)
        activation = None if _has_hooks(module) else _ACTIVATION_MODULES.get(type(module))
    elif consumer.op == "call_function":
        activation = _ACTIVATION_FUNCTIONS.get(consumer.target)
    elif consumer.op == "call_method":
        activation = _ACTIVATION_METHODS.get(consumer.target)
    else:
        activation = None
    return (consumer, activation) if activation else None


def _refusal(bn: nn.Module, consumers: list) -> str | None:
    """Why a BatchNorm with these per-call consumers cannot be fused, or None if it can."""
    if _has_hooks(bn):
        return "it has hooks"
    if any(consumer is None for consumer in consumers):
        return "an output feeds something other than one ReLU or sigmoid"
    if len({activation for _, activation in consumers}) > 1:
        return "its calls are followed by different activations"
    return None


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


def _consumer_name(consumer: fx.Node) -> str:
    if consumer.op == "call_module":
        return consumer.target
    if consumer.op == "call_method":
        return f"Tensor.{consumer.target}"
    return f"{consumer.target.__module__ or 'torch'}.{consumer.target.__name__}"


def _fused_module(bn: nn.Module, activation: str) -> nn.Module:
    """The BatchNormAct twin of bn, holding bn's own parameter and buffer tensors."""
    fused = _FUSED_CLASSES[type(bn)](bn.num_features, bn.eps, bn.momentum, bn.affine,
                                     bn.track_running_stats, activation=activation,
                                     device="meta")
    # Overwrites every placeholder the constructor made (same class family, same flags).
    for name, param in bn._parameters.items():
        fused.register_parameter(name, param)
    for name, buffer in bn._buffers.items():
        fused.register_buffer(name, buffer, persistent=name not in bn._non_persistent_buffers_set)
    return fused.train(bn.training)


def _replace_submodule(root: nn.Module, target: str, module: nn.Module) -> None:
    parent, _, name = target.rpartition(".")
    setattr(root.get_submodule(parent), name, module)


def _graph_module(root: nn.Module, graph: fx.Graph) -> fx.GraphModule:
    """A GraphModule running graph that holds root's own parameters, buffers and submodules,
    in root's order.

    fx.GraphModule alone copies only what the graph uses (a head that forward skips would drop
    out of state_dict), in graph order, and registers plain tensor attributes as buffers.
    """
    module = fx.GraphModule(root, graph, class_name=type(root).__name__)
    for name in [*module._parameters, *module._buffers, *module._modules]:
        delattr(module, name)
    for name, child in root._modules.items():
        module.add_module(name, child)
    for name, param in root._parameters.items():
        module.register_parameter(name, param)
    for name, buffer in root._buffers.items():
        module.register_buffer(name, buffer,
                               persistent=name not in root._non_persistent_buffers_set)
    # Plain attributes the graph reads, such as tensor constants the tracer stored on root.
    for node in graph.find_nodes(op="get_attr"):
        head = node.target.split(".")[0]
        if not hasattr(module, head):
            setattr(module, head, getattr(root, head))
    return module


def _describe(error: Exception) -> str:
    """The error and the innermost line of non-torch code on its traceback."""
    message = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    frames = [frame for frame in traceback.extract_tb(error.__traceback__)
              if not frame.filename.startswith(_TORCH_DIR) and frame.filename != __file__]
    if frames:
        where = frames[-1]
        message += f", at {where.filename}:{where.lineno} in {where.name}: {where.line}"
    return message
