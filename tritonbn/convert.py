"""fuse_bn_act(): rewrite a model so that each BatchNorm runs as one BatchNormAct module together
with what follows it: an activation, a residual add, or a residual add and then an activation.

The model is traced with torch.fx. A call of an ``nn.BatchNorm1d/2d/3d`` qualifies when its
output, passed on through no-op modules, has exactly one consumer, and that consumer is

- an activation of that output alone: a module (``nn.ReLU``, ``nn.ReLU6``, ``nn.LeakyReLU``,
  ``nn.ELU``, ``nn.SiLU``, ``nn.Hardswish``, ``nn.Hardsigmoid``, ``nn.GELU``, ``nn.Mish``,
  ``nn.Sigmoid``, ``nn.Tanh``, with their settings), a function (``F.relu``,
  ``F.leaky_relu(x, 0.2)``, ``F.gelu(x, approximate="tanh")``, ``torch.sigmoid_``, ...) or a
  Tensor method (``relu``, ``sigmoid``, ``tanh``, in place or not): fused as that activation;
- an add of one other tensor (``+``, ``+=``, ``torch.add``, ``Tensor.add``, ``Tensor.add_`` into
  the BatchNorm's side, alpha 1, either operand order): fused with that tensor as the residual,
  and with the activation the add's result feeds, found the same way, if it feeds only that;
  with ``identity`` otherwise.

timm's ``BatchNormAct2d`` (when timm builds the model) is converted too, with its own
activation, when its drop layer is a no-op; if that activation is ``nn.Identity`` it continues
like a plain BatchNorm into an activation or add after it, and is converted alone otherwise.

No-op modules are ``nn.Identity``, an add of the constant 0, and, with a drop rate of 0 at
conversion time,
``nn.Dropout``, torchvision's ``StochasticDepth`` and timm's ``DropPath`` and ``DropBlock2d``.
A drop rate above 0 is never a no-op, not even in eval mode: the mode can change after the
conversion. The stochastic modules stay leaves of the trace for that reason, so that their mode
is read when the model runs, not baked in when it is traced.

An add's other operand can have a different shape (a broadcast bias), dtype or device, which a
graph does not show: a fused call with a residual goes through ``call_with_residual``, which
checks them at run time and falls back to the unfused computation when they differ. A fused
call with a residual runs where the add ran, so it is moved past what ran between the
BatchNorm and the add; that is refused if something there calls the same BatchNorm or reads
its state, writes in place into a tensor that may share memory with the BatchNorm's input (one
not allocated in between by a conv, linear, BatchNorm, pooling or arithmetic call), or calls a
leaf module (see below) on such a tensor. Reads of the BatchNorm output's shape do not count as
its consumers: they read its input's shape instead. When both operands of an add come from
qualifying BatchNorms, the first one that can move takes the add (in ResNet, ``bn3`` takes
``downsample.1`` as residual).

The BatchNorm module is replaced, at its own attribute path and sharing its parameters and
buffers, by the matching BatchNormAct; the fused activation and add calls leave the graph. A
BatchNorm module called more than once is fused only if every call qualifies with the same
activation. Left alone: other BatchNorm subclasses (their forward may differ), BatchNorms and
consumers carrying hooks (fusing would change what the hooks see), and everything else.

The result is a new ``torch.fx.GraphModule``; the input model is never modified. Its parameters,
buffers and submodules are a deep copy of the model's own, at the same paths and in the same
order, so ``state_dict()`` keys are exactly the original's and checkpoints load either way.
The activation and no-op modules whose calls the fused calls replaced are removed, unless the
graph still calls them elsewhere or they hold parameters, buffers or hooks, so that the model
prints as what it computes. Being a GraphModule (named after the model's class, as
fx.symbolic_trace names it), the result keeps the traced
``forward`` only: other methods of the model's class are not on it, and a converted
nn.Sequential is reached by ``get_submodule("3")``, not by index. A submodule whose forward was
traced into the graph and holds a fused BatchNorm raises if called on its own: its forward
would apply the fused activation or residual a second time.

A trace freezes every Python value its code reads. What would change the computation later is
kept out of the graph: a submodule whose forward reads a module's ``training`` flag (a dropout
head, an auxiliary head, a branch that only trains), a global bool or the grad mode, or whose
forward torch.fx cannot trace (data-dependent control flow, for one), stays a call of its own
forward, a leaf of the trace, and so do the modules timm registers as not traceable. The
children of each leaf are converted in turn, each keeping its class with a fused forward; a
model whose own forward is such a leaf comes back as a copy of itself, fused inside its
children. ``leaves`` names each with the reason and the line of code, and a warning says how
many there are. What a trace freezes otherwise (a plain Python attribute read in forward)
stays frozen, as in any torch.fx graph.
"""
import contextlib
import copy
import dis
import linecache
import logging
import operator
import os
import sys
import traceback
import warnings
from dataclasses import dataclass, field
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from .activations import activation_kwargs, activation_spec, eager_activation
from .modules import BatchNormAct1d, BatchNormAct2d, BatchNormAct3d
from .sync import SyncBatchNormAct

logger = logging.getLogger(__name__)

_FUSED_CLASSES = {nn.BatchNorm1d: BatchNormAct1d, nn.BatchNorm2d: BatchNormAct2d,
                  nn.BatchNorm3d: BatchNormAct3d, nn.SyncBatchNorm: SyncBatchNormAct}
_PLAIN_CLASSES = {fused: plain for plain, fused in _FUSED_CLASSES.items()}
# Classes of packages tritonbn does not depend on, by their qualified names.
_TIMM_BATCHNORM_ACT = "timm.layers.norm_act.BatchNormAct2d"
# Modules that return their input when their drop rate (the named attribute) is 0, in any mode.
_DROP_RATES = {"torch.nn.modules.dropout.Dropout": "p",
               "torchvision.ops.stochastic_depth.StochasticDepth": "p",
               "timm.layers.drop.DropPath": "drop_prob",
               "timm.layers.drop.DropBlock2d": "drop_prob"}

# Activation -> its name and the parameters it takes after the input, in order.
_ACTIVATION_MODULES = {
    nn.ReLU: ("relu", ()), nn.ReLU6: ("relu6", ()),
    nn.LeakyReLU: ("leaky_relu", ("negative_slope",)), nn.ELU: ("elu", ("alpha",)),
    nn.SiLU: ("silu", ()), nn.Hardswish: ("hardswish", ()),
    nn.Hardsigmoid: ("hardsigmoid", ()), nn.GELU: ("gelu", ("approximate",)),
    nn.Mish: ("mish", ()), nn.Sigmoid: ("sigmoid", ()), nn.Tanh: ("tanh", ()),
}
_ACTIVATION_FUNCTIONS = {
    F.relu: ("relu", ("inplace",)), torch.relu: ("relu", ()), torch.relu_: ("relu", ()),
    F.relu6: ("relu6", ("inplace",)),
    F.leaky_relu: ("leaky_relu", ("negative_slope", "inplace")),
    F.leaky_relu_: ("leaky_relu", ("negative_slope",)),
    F.elu: ("elu", ("alpha", "inplace")), F.elu_: ("elu", ("alpha", "scale", "input_scale")),
    F.silu: ("silu", ("inplace",)), F.hardswish: ("hardswish", ("inplace",)),
    F.hardsigmoid: ("hardsigmoid", ("inplace",)), F.gelu: ("gelu", ("approximate",)),
    F.mish: ("mish", ("inplace",)),
    torch.sigmoid: ("sigmoid", ()), torch.sigmoid_: ("sigmoid", ()),
    torch.tanh: ("tanh", ()), torch.tanh_: ("tanh", ()),
}
_ACTIVATION_METHODS = {method: (method.rstrip("_"), ())
                       for method in ("relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_")}
# Parameters that leave the result as it is when they have these values (None: any value).
_NEUTRAL_PARAMETERS = {"inplace": None, "scale": 1, "input_scale": 1}
_ADDS = {(op, target) for op, targets in (("call_function", (operator.add, torch.add)),
                                          ("call_method", ("add", "add_")))
         for target in targets}
# Calls whose result is a new tensor, never a view or their input itself.
_ALLOCATING_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.BatchNorm1d,
                       nn.BatchNorm2d, nn.BatchNorm3d, nn.AdaptiveAvgPool2d, nn.AvgPool2d,
                       nn.MaxPool2d)
_ALLOCATING_FUNCTIONS = (operator.add, operator.mul, operator.sub, operator.truediv, torch.add,
                         torch.mul, torch.cat, F.conv2d, F.linear)
_TORCH_DIR = os.path.dirname(torch.__file__)  # frames under it are not the model's code
# Calls in a forward whose result a trace would freeze.
_FROZEN_CALLS = ("is_grad_enabled", "is_autocast_enabled", "is_inference_mode_enabled")
_MOST_LEAVES = 64  # leaves found one trace at a time; past this the module is a leaf itself


class FusedPair(NamedTuple):
    """One fused call: the BatchNorm's module path, the activation it now applies and the
    residual it now adds. The activation is named as a module path (``layer1.0.relu``; for
    timm's BatchNormAct2d its ``act``), a function (``torch.nn.functional.relu``) or a method
    (``Tensor.relu``), None when none was fused; the residual is named the same way after the
    call that produced it (a forward argument by its name), None without a residual."""

    bn: str
    activation: Optional[str]
    residual: Optional[str] = None


def call_with_residual(bn: nn.Module, input: Tensor, residual: Tensor) -> Tensor:
    """bn(input, residual) when residual has input's shape, dtype and device; otherwise the
    computation the fusion replaced: plain BatchNorm, add (broadcasting, promoting), then
    bn's activation. A fused model's code wraps it (torch.fx.wrap), so that a later trace of the
    model (torchvision's feature extractor, say) records it as one call."""
    if (residual.shape == input.shape and residual.dtype == input.dtype
            and residual.device == input.device):
        return bn(input, residual)
    activation = eager_activation(activation_spec(bn.activation, bn.activation_kwargs))
    return activation(_PLAIN_CLASSES[type(bn)].forward(bn, input) + residual)


class _Tracer(fx.Tracer):
    """fx's default tracer that also keeps as leaves (opaque calls) every BatchNorm (subclasses
    too, whose forward fx cannot trace: it checks the input's dims), tritonbn's own modules (so
    an already converted model converts again to itself), the stochastic drop modules, whose
    forward depends on the mode, timm's registered leaves, and the modules in ``leaves``.

    While it traces it notes, for the module whose forward runs, what a trace would freeze: a
    read of a module's ``training`` flag, a global bool, ``torch.is_grad_enabled()``
    (``frozen``), and the module whose forward raised an error (``raised_in``)."""

    def __init__(self, leaves: Optional[dict[str, str]] = None):
        super().__init__(autowrap_functions=(call_with_residual, *_timm_registry()[1]))
        self.leaves = {} if leaves is None else leaves  # none when a GraphModule unpickles
        self.reached: dict[str, str] = {}  # leaves called, other than tritonbn's own rules
        self.traced_through: set[str] = set()
        self.running = [""]  # paths of the modules whose forward runs, innermost last
        self.frozen: dict[str, str] = {}
        self.raised_in: dict[int, str] = {}  # id(error) -> path

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return (isinstance(module, nn.modules.batchnorm._BatchNorm)
                or _class_name(module) in _DROP_RATES
                or self._leaf_reason(module, qualified_name) is not None
                or super().is_leaf_module(module, qualified_name))

    def _leaf_reason(self, module: nn.Module, path: str) -> Optional[str]:
        if path in self.leaves:
            return self.leaves[path]
        registered = _timm_registry()[0]
        if _Watch.unwatched(type(module)) in registered and _fused_class(module) is None:
            return "timm registers it as not traceable by torch.fx"
        return None

    def trace(self, root: nn.Module, concrete_args=None) -> fx.Graph:
        self._note_frozen_code(type(root).forward, "")
        return super().trace(root, concrete_args)

    def call_module(self, module, forward, args, kwargs):
        path = self.path_of_module(module)
        if self.is_leaf_module(module, path):
            reason = self._leaf_reason(module, path)
            if reason is not None:
                self.reached[path] = reason
            return super().call_module(module, forward, args, kwargs)
        self.traced_through.add(path)
        self._note_frozen_code(type(module).forward, path)
        self.running.append(path)
        try:
            return super().call_module(module, forward, args, kwargs)
        except Exception as error:
            self.raised_in.setdefault(id(error), path)
            raise
        finally:
            self.running.pop()

    def note_training_read(self, frame) -> None:
        self.frozen.setdefault(self.running[-1],
                               f"it reads the module mode (training) at {_where(frame)}")

    def _note_frozen_code(self, function, path: str) -> None:
        """Note a read of a global bool or of the grad mode in function's own code."""
        code = getattr(function, "__code__", None)
        if code is None or code.co_filename.startswith(_TORCH_DIR):
            return
        for instruction in dis.get_instructions(code):
            name = instruction.argval
            if ((instruction.opname == "LOAD_GLOBAL"
                 and type(function.__globals__.get(name)) is bool)
                    or (isinstance(name, str) and name in _FROZEN_CALLS)):
                line = instruction.positions.lineno if instruction.positions else None
                text = linecache.getline(code.co_filename, line or 0).strip()
                self.frozen.setdefault(path, f"it reads {name}, which a trace would freeze, "
                                             f"at {code.co_filename}:{line}: {text}")
                return


def _where(frame) -> str:
    return (f"{frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}: "
            f"{linecache.getline(frame.f_code.co_filename, frame.f_lineno).strip()}")


class _Watch:
    """While a _Tracer traces, module classes are swapped for subclasses whose ``training`` is
    a property that tells the tracer of each read (the flag lives in the instance dict still)."""

    tracer: Optional[_Tracer] = None
    classes: dict = {}

    @staticmethod
    def read(module):
        if _Watch.tracer is not None:
            _Watch.tracer.note_training_read(sys._getframe(1))
        return module.__dict__["training"]

    @staticmethod
    def write(module, mode):
        module.__dict__["training"] = mode

    @classmethod
    def unwatched(cls, watched: type) -> type:
        original = watched.__bases__[0]
        return original if cls.classes.get(original) is watched else watched

    @classmethod
    def watched_class(cls, original: type) -> type:
        if original not in cls.classes:
            cls.classes[original] = type(original)(
                original.__name__, (original,),
                {"training": property(cls.read, cls.write), "__module__": original.__module__,
                 "__qualname__": original.__qualname__})
        return cls.classes[original]


@contextlib.contextmanager
def _watching(root: nn.Module, tracer: _Tracer):
    swapped = []
    for module in root.modules():
        original = type(module)
        try:
            module.__class__ = _Watch.watched_class(original)
        except TypeError:  # a layout Python cannot swap (a ScriptModule): kept as a call
            tracer.leaves.setdefault(_path_in(root, module), "its class cannot be watched")
            continue
        swapped.append((module, original))
    _Watch.tracer = tracer
    try:
        yield
    finally:
        _Watch.tracer = None
        for module, original in swapped:
            module.__class__ = original


def _path_in(root: nn.Module, module: nn.Module) -> str:
    return next(name for name, candidate in root.named_modules() if candidate is module)


def _timm_registry() -> tuple[tuple, tuple]:
    """(module classes, functions) timm registers as not traceable; empty unless timm is
    imported (a model built by timm has imported it)."""
    timm_fx = sys.modules.get("timm.layers._fx")
    if timm_fx is None:
        return (), ()
    return tuple(timm_fx.get_notrace_modules()), tuple(timm_fx.get_notrace_functions())


@dataclass
class _Route:
    """What one BatchNorm call fuses with: the activation (full kwargs) and its consumer's name,
    the residual and the add that adds it, and the nodes the fused call replaces, in order."""

    bn: fx.Node
    activation: str = "identity"
    kwargs: dict = field(default_factory=dict)
    consumer: Optional[str] = None
    add: Optional[fx.Node] = None
    operand: int = 0  # the BatchNorm's side of the add
    residual: Optional[fx.Node] = None
    replaced: list = field(default_factory=list)
    alone: Optional["_Route"] = None  # timm's identity BatchNormAct2d, should its add be taken


def fuse_bn_act(model: nn.Module) -> nn.Module:
    """Fuse each BatchNorm of a model with the activation and residual add that follow it.

    Returns a copy of ``model`` in which every qualifying nn.BatchNorm1d/2d/3d (and
    nn.SyncBatchNorm, and timm's BatchNormAct2d) runs, together with the activation and the
    residual add after it, as one ``BatchNormAct1d/2d/3d`` (``SyncBatchNormAct``) call::

        act(bn(x) + residual)  ->  fused_bn(x, residual)

    The module docstring of ``tritonbn.convert`` says what qualifies. ``model`` itself is never
    modified. The fused layers share nothing with it: the copy's parameters, buffers and
    submodules are a deep copy, at the same paths and in the same order, so ``state_dict()``
    keys are exactly the original's and checkpoints load either way.

    Args:
        model: the model to convert, traced with torch.fx; a submodule whose forward cannot be
            traced, or reads what a trace would freeze (its ``training`` flag, say), stays a
            call of its own forward (a leaf), and its children are converted in turn.

    Returns:
        A ``torch.fx.GraphModule`` with the model's state_dict keys, train/eval modes,
        devices and dtypes, or, when the model's own forward cannot be traced, a copy of the
        model itself fused inside its submodules. Its attribute ``fused_pairs`` lists what was
        fused, as ``FusedPair`` tuples, ``left_alone`` maps the path of every other BatchNorm
        module to the reason it was not converted, and ``leaves`` maps the path of every
        module kept as an opaque call (the model's own is "") to the reason, with the line of
        code that stopped the trace. Each pair is also logged at INFO level, each BatchNorm
        left alone at DEBUG level, and a warning says how many leaves there are, if any.

    Examples::

        >>> import torch
        >>> from torch import nn
        >>> import tritonbn
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
        ...                       nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)).eval()
        >>> fused = tritonbn.fuse_bn_act(model)
        >>> fused.fused_pairs
        (FusedPair(bn='1', activation='2', residual=None),)
        >>> fused.left_alone, fused.leaves
        ({'4': 'it is an output of the model'}, {})
        >>> type(fused.get_submodule("1")).__name__
        'BatchNormAct2d'
        >>> x = torch.randn(2, 3, 8, 8)
        >>> torch.allclose(fused(x), model(x), atol=1e-6)
        True
        >>> list(fused.state_dict()) == list(model.state_dict())
        True
        >>> # A residual block: relu(bn(conv(x)) + x) runs as one call, bn(conv(x), x)
        >>> class Block(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        ...     def forward(self, x):
        ...         return torch.relu(self.bn(self.conv(x)) + x)
        >>> block = Block().eval()
        >>> fused = tritonbn.fuse_bn_act(block)
        >>> fused.fused_pairs
        (FusedPair(bn='bn', activation='torch.relu', residual='x'),)
        >>> x = torch.randn(2, 4, 5, 5)
        >>> torch.allclose(fused(x), block(x), atol=1e-6)
        True
    """
    root = _copy(model)
    report = _Report()
    converted = _convert(root, "", report)
    converted.fused_pairs = tuple(report.fused_pairs)
    converted.leaves = dict(report.leaves)
    converted.left_alone = {}
    for name, module in _batchnorm_modules(model):
        if name in report.fused:
            continue
        enclosing = max((leaf for leaf in report.leaves if _is_inside(name, leaf)), key=len,
                        default=None)
        reason = (report.refused.get(name) or _module_refusal(module)
                  or (enclosing is not None and f"it is inside a leaf: {enclosing or 'the model'}")
                  or "it is not called by forward")
        converted.left_alone[name] = reason
        logger.debug("fuse_bn_act: %s left alone: %s", name, reason)
    kept = {path: reason for path, reason in report.leaves.items()
            if "timm registers" not in reason}
    if kept:
        first = next(iter(kept))
        warnings.warn(f"fuse_bn_act: {len(kept)} submodule(s) of {type(model).__name__} kept as "
                      f"opaque calls, fused inside (see .leaves); {first or 'the model'}: "
                      f"{kept[first]}", stacklevel=2)
    logger.info("fuse_bn_act: %d call(s) fused in %s", len(report.fused_pairs),
                type(model).__name__)
    return converted


@dataclass
class _Report:
    fused_pairs: list = field(default_factory=list)
    fused: set = field(default_factory=set)
    refused: dict = field(default_factory=dict)
    leaves: dict = field(default_factory=dict)


def _is_inside(path: str, ancestor: str) -> bool:
    return ancestor == "" or path.startswith(ancestor + ".")


def _convert(module: nn.Module, prefix: str, report: _Report) -> nn.Module:
    """module (the caller's own copy) fused: a GraphModule at the top (prefix ""), module
    itself with a fused forward below; module as it is if its forward cannot be traced. The
    children of every leaf are converted in turn, and report gains what was done."""
    graph, scratch, leaves, traced_through = _trace(module)
    report.leaves.update((prefix + path if path else prefix.rstrip("."), reason)
                         for path, reason in leaves.items())
    result = module
    if graph is not None:
        result = _fuse(module, graph, scratch, traced_through, prefix, report)
    for leaf in leaves:
        for name, child in module.get_submodule(leaf).named_children():
            if _batchnorm_modules(child) and _fused_class(child) is None:
                _convert(child, f"{prefix}{leaf}.{name}." if leaf else f"{prefix}{name}.", report)
    return result


def _trace(module: nn.Module):
    """(graph or None, the copy of module traced, {path: reason} of the leaves, "" for module
    itself when its own forward cannot be traced or reads what a trace would freeze, the paths
    of the submodules traced through).

    A submodule that raises while traced, or whose forward reads what a trace would freeze,
    becomes a leaf, and the trace starts again on a fresh copy (the failed trace may have run
    side effects on its own)."""
    leaves: dict[str, str] = {}
    while True:
        scratch = _copy(module)
        tracer = _Tracer(leaves)
        try:
            with _watching(scratch, tracer):
                graph = tracer.trace(scratch)
        except Exception as error:  # tracing runs arbitrary user code: any failure means "cannot"
            failed = {tracer.raised_in.get(id(error), ""):
                      f"torch.fx cannot trace it ({_describe(error)})"}
        else:
            failed = {path: reason for path, reason in tracer.frozen.items()
                      if path not in leaves}
            if not failed:
                return graph, scratch, tracer.reached, tracer.traced_through
        if "" in failed or len(leaves) >= _MOST_LEAVES:
            reason = failed.get("", f"over {_MOST_LEAVES} of its submodules are leaves")
            return None, None, {"": reason}, ()
        leaves.update(failed)


def _fuse(root: nn.Module, graph: fx.Graph, scratch: nn.Module, traced_through, prefix: str,
          report: _Report) -> nn.Module:
    """Rewrite graph (traced from scratch, a copy of root) and root's BatchNorms; root as a
    GraphModule if prefix is "" (the top), else root with its forward replaced."""
    calls = _batchnorm_calls(root, graph)
    routes, refused = _plan(root, calls)
    ends_child = f"it ends {prefix.rstrip('.')}, whose output goes to an opaque call"
    report.refused.update((prefix + name, ends_child if prefix and reason == _ENDS_MODEL
                           else reason) for name, reason in refused.items())
    fused_nodes = {}
    absorbed = set()  # the modules whose calls the fused calls replace
    for target, nodes in calls.items():
        if target in refused:
            continue
        absorbed.update(replaced.target for node in nodes for replaced in routes[node].replaced
                        if replaced.op == "call_module")
        bn = root.get_submodule(target)
        first = routes[nodes[0]]
        fused_class = _fused_class(bn)
        _replace_submodule(root, target, _fused_module(bn, fused_class, first))
        report.fused.add(prefix + target)
        for node in nodes:
            pair = FusedPair(*(prefix + name if name is not None and _is_path(root, name)
                               else name for name in _rewrite(graph, routes[node], fused_nodes)))
            report.fused_pairs.append(pair)
            logger.info("fuse_bn_act: fused %s into %s(activation=%s)",
                        " + ".join(filter(None, pair)), fused_class.__name__, first.activation)
    graph.lint()
    _drop_unused(root, graph, absorbed)
    for node in graph.find_nodes(op="get_attr"):  # constants the tracer stored on scratch
        head = node.target.split(".")[0]
        if not hasattr(root, head):
            setattr(root, head, getattr(scratch, head))
    fused_paths = [target for target in calls if target not in refused]
    for path in traced_through:
        if any(_is_inside(target, path) for target in fused_paths):
            _guard(root.get_submodule(path))
    if not prefix:
        return _graph_module(root, graph)
    if fused_paths:
        _swap_class(root, {"forward": type(fx.GraphModule(root, graph)).forward})
    return root


def _drop_unused(root: nn.Module, graph: fx.Graph, absorbed: set) -> None:
    """Remove from root the absorbed modules (activations, no-op drops) that the graph no
    longer calls, so that the model prints as what it computes. A module stays if the graph
    still reaches it, or it holds state (state_dict keys stay the original's) or hooks."""
    reached = {id(module) for node in graph.nodes if node.op in ("call_module", "get_attr")
               if _is_path(root, node.target)
               for module in root.get_submodule(node.target).modules()}
    for target in absorbed:
        module = root.get_submodule(target)
        if (id(module) in reached or any(True for _ in module.parameters())
                or any(True for _ in module.buffers())
                or any(_has_hooks(m) for m in module.modules())):
            continue
        parent, _, name = target.rpartition(".")
        delattr(root.get_submodule(parent), name)
        reached.add(id(module))  # a module registered at two paths goes once


def _guard(module: nn.Module) -> nn.Module:
    """module, made to raise when called: the graph holding it runs its code, fused."""
    _swap_class(module, {"forward": _runs_inside_graph, "__reduce_ex__": _reduce_guarded})
    return module


def _reduce_guarded(self, protocol):
    """Pickles as the original class does, and unpickles guarded again."""
    guarded, self.__class__ = type(self), type(self).__bases__[0]
    try:
        _, (cls, *_), *state = self.__reduce_ex__(protocol)
    finally:
        self.__class__ = guarded
    return (_unpickle_guarded, (cls,), *state)


def _unpickle_guarded(cls: type) -> nn.Module:
    return _guard(cls.__new__(cls))


def _runs_inside_graph(self, *args, **kwargs):
    raise RuntimeError(
        f"fuse_bn_act: this {type(self).__name__} runs inside the graph of the converted model "
        "that holds it, where its BatchNorms are fused with what follows them; its own forward "
        "would apply those twice. Call the converted model, or convert this module on its own")


def _swap_class(module: nn.Module, members: dict) -> None:
    """Give module a subclass of its class with these members. The subclass is named apart
    (``Block.<fused>``), so that pickle refuses it instead of restoring the original class."""
    original = type(module)
    module.__class__ = type(original)(
        original.__name__, (original,),
        {"__module__": original.__module__, "__qualname__": f"{original.__qualname__}.<fused>",
         **members})


def _is_path(root: nn.Module, name: str) -> bool:
    try:
        root.get_submodule(name)
    except AttributeError:
        return False
    return True
def _batchnorm_modules(model: nn.Module):
    """(path, module) of every BatchNorm in model that is not tritonbn's already."""
    return [(name, module) for name, module in model.named_modules()
            if isinstance(module, nn.modules.batchnorm._BatchNorm)
            and not isinstance(module, tuple(_FUSED_CLASSES.values()))]


def _fused_class(module: nn.Module):
    if _class_name(module) == _TIMM_BATCHNORM_ACT:
        return BatchNormAct2d
    return _FUSED_CLASSES.get(type(module))


def _batchnorm_calls(root: nn.Module, graph: fx.Graph) -> dict[str, list[fx.Node]]:
    """Calls of BatchNorm modules other than tritonbn's, grouped by module path, in graph
    order."""
    paths = {name for name, _ in _batchnorm_modules(root)}
    calls: dict[str, list[fx.Node]] = {}
    for node in graph.nodes:
        if node.op == "call_module" and node.target in paths:
            calls.setdefault(node.target, []).append(node)
    return calls


def _plan(root: nn.Module, calls: dict[str, list[fx.Node]]):
    """(route of every call of a fused module, {module path: reason} of the modules refused).

    Each add goes to the first of its qualifying BatchNorm operands, among modules not refused;
    a module whose call lost its add is refused in turn, freeing its other adds: repeated until
    nothing changes (at least one more module is refused each round)."""
    refused = {target: reason for target in calls
               for reason in [_module_refusal(root.get_submodule(target))] if reason}
    candidates = {node: _route(root, node) for target, nodes in calls.items()
                  if target not in refused for node in nodes}
    while True:
        live = {node: route for node, route in candidates.items()
                if node.target not in refused}
        claims: dict[fx.Node, _Route] = {}
        for route in sorted((route for route in live.values()
                             if isinstance(route, _Route) and route.add is not None),
                            key=lambda route: route.operand):
            claims.setdefault(route.add, route)
        routes = {}
        for node, route in live.items():
            if isinstance(route, _Route) and route.add and claims[route.add] is not route:
                route = route.alone or "feeds an add fused with another BatchNorm"
            routes[node] = route
        newly = {target: reason for target, nodes in calls.items() if target not in refused
                 for reason in [_calls_refusal([routes[node] for node in nodes])] if reason}
        if not newly:
            return routes, refused
        refused.update(newly)


def _module_refusal(bn: nn.Module) -> Optional[str]:
    """Why a BatchNorm module cannot be fused whatever follows its calls, or None."""
    if _fused_class(bn) is None:
        return f"it is a {type(bn).__name__}, not a plain BatchNorm"
    if _has_hooks(bn):
        return "it has hooks"
    return None


def _calls_refusal(routes: list) -> Optional[str]:
    """Why a BatchNorm module whose calls take these routes cannot be fused, or None."""
    reasons = [route for route in routes if isinstance(route, str)]
    if reasons:
        return reasons[0]
    if len({(route.activation, tuple(route.kwargs.items())) for route in routes}) > 1:
        return "its calls are followed by different activations"
    return None


def _route(root: nn.Module, bn_node: fx.Node):
    """The _Route of one BatchNorm call, or the reason it has none."""
    bn = root.get_submodule(bn_node.target)
    alone = None
    if _class_name(bn) == _TIMM_BATCHNORM_ACT:
        if not _is_noop(bn.drop):
            return f"its drop layer {type(bn.drop).__name__} is not a no-op"
        own = _traced_activation(bn.act)
        if own is None:
            return f"its activation {type(bn.act).__name__} is not supported"
        if own[0] != "identity":
            return _Route(bn_node, *own, consumer=f"{bn_node.target}.act")
        alone = _Route(bn_node)
    noops, value = _through_noops(root, bn_node, shape_reads=True)
    consumer = _sole_consumer(value, shape_reads=True)
    if isinstance(consumer, str):
        return alone or consumer
    activation = _activation_call(root, consumer, value)
    if activation:
        return _Route(bn_node, *activation, _node_name(consumer), replaced=[*noops, consumer])
    if (consumer.op, consumer.target) not in _ADDS:
        return alone or _feeds(root, consumer)
    operands = _add_operands(consumer)
    if isinstance(operands, str):
        return alone or operands
    operand = operands.index(value)
    residual = operands[1 - operand]
    if residual is value:
        return alone or "feeds an add of its own output"
    if consumer.target == "add_" and operand == 1:
        return alone or "feeds an add_ that writes into the other operand"
    if not _movable(root, bn_node, consumer):
        return alone or "what runs between it and its add writes in place or uses it"
    route = _Route(bn_node, consumer=None, add=consumer, operand=operand, residual=residual,
                   replaced=[*noops, consumer], alone=alone)
    after, value = _through_noops(root, consumer)
    consumer = _sole_consumer(value)
    activation = None if isinstance(consumer, str) else _activation_call(root, consumer, value)
    if activation:
        route.activation, route.kwargs = activation
        route.consumer = _node_name(consumer)
        route.replaced += [*after, consumer]
    return route


def _through_noops(root: nn.Module, node: fx.Node, shape_reads=False):
    """node's value passed on through no-op module calls and adds of 0: (those calls, the last
    node). With shape_reads, reads of the value's shape are not counted as its uses (a
    BatchNorm's output has its input's shape)."""
    noops = []
    while len(users := _value_users(node, shape_reads)) == 1:
        (user,) = users
        if not (_adds_zero(user, node) or (
                user.op == "call_module" and user.args == (node,) and not user.kwargs
                and _is_noop(root.get_submodule(user.target)))):
            break
        noops.append(user)
        node = user
    return noops, node


def _value_users(node: fx.Node, shape_reads: bool) -> list[fx.Node]:
    return [user for user in node.users if not (shape_reads and _reads_shape(user))]


def _reads_shape(node: fx.Node) -> bool:
    return ((node.op, node.target) in (("call_method", "size"), ("call_method", "dim"))
            or (node.op == "call_function" and node.target is getattr
                and node.args[1:] in (("shape",), ("ndim",))))


def _adds_zero(node: fx.Node, value: fx.Node) -> bool:
    """Whether node is value + 0 (fastvit adds a constant 0 where a branch is absent)."""
    return ((node.op, node.target) in _ADDS and node.target != "add_" and not node.kwargs
            and len(node.args) == 2 and value in node.args
            and any(type(arg) in (int, float) and arg == 0 for arg in node.args))


_ENDS_MODEL = "it is an output of the model"


def _sole_consumer(node: fx.Node, shape_reads=False):
    """node's only user (reads of its shape aside, with shape_reads), or why there is none."""
    users = _value_users(node, shape_reads)
    if not users:
        return "its output is unused"
    if len(users) > 1:
        return f"its output has {len(users)} consumers"
    (user,) = users
    return _ENDS_MODEL if user.op == "output" else user


def _is_noop(module: nn.Module) -> bool:
    if _has_hooks(module):
        return False
    if type(module) is nn.Identity:
        return True
    rate = _DROP_RATES.get(_class_name(module))
    return rate is not None and not getattr(module, rate)


def _activation_call(root: nn.Module, node: fx.Node, value: fx.Node) -> Optional[tuple]:
    """(activation name, full kwargs) if node applies a supported activation to value alone."""
    if node.all_input_nodes != [value]:
        return None
    if node.op == "call_module":
        return _module_activation(root.get_submodule(node.target))
    if node.op == "call_function":
        entry = _ACTIVATION_FUNCTIONS.get(node.target)
    elif node.op == "call_method":
        entry = _ACTIVATION_METHODS.get(node.target)
    else:
        entry = None
    if entry is None:
        return None
    name, parameters = entry
    given = dict(node.kwargs)
    inputs = list(node.args) or [given.pop("input", None)]
    if inputs[0] is not value or len(inputs) > 1 + len(parameters) or set(given) - set(parameters):
        return None
    given.update(zip(parameters, inputs[1:]))
    kwargs = {}
    for key, argument in given.items():
        if key not in _NEUTRAL_PARAMETERS:
            kwargs[key] = argument
        elif _NEUTRAL_PARAMETERS[key] not in (None, argument):
            return None
    return _checked(name, kwargs)


def _module_activation(module: nn.Module) -> Optional[tuple]:
    if _has_hooks(module) or type(module) not in _ACTIVATION_MODULES:
        return None
    if type(module) is nn.ReLU6 and (module.min_val, module.max_val) != (0.0, 6.0):
        return None
    name, parameters = _ACTIVATION_MODULES[type(module)]
    return _checked(name, {key: getattr(module, key) for key in parameters})


def _traced_activation(module: nn.Module) -> Optional[tuple]:
    """(name, kwargs) for an nn.Identity, or for a module whose forward is one supported
    activation of its input (torch's, or timm's own classes, which call F.gelu and the like)."""
    if type(module) is nn.Identity and not _has_hooks(module):
        return "identity", {}
    if type(module) in _ACTIVATION_MODULES:
        return _module_activation(module)
    if _has_hooks(module) or any(True for _ in module.parameters()):
        return None
    try:
        graph = _Tracer().trace(module)
    except Exception:  # not traceable: not an activation we can read
        return None
    inputs = graph.find_nodes(op="placeholder")
    calls = [node for node in graph.nodes if node.op not in ("placeholder", "output")]
    (output,) = graph.find_nodes(op="output")
    if len(inputs) != 1 or len(calls) != 1 or output.args != (calls[0],):
        return None
    return _activation_call(module, calls[0], inputs[0])


def _checked(name: str, kwargs: dict) -> Optional[tuple]:
    """(name, full kwargs), or None for values tritonbn does not take (then neither would
    PyTorch, or they are traced tensors)."""
    try:
        return name, activation_kwargs(name, kwargs)
    except ValueError:
        return None


def _add_operands(node: fx.Node):
    """[first operand, second operand] of an add, or why it is not a plain add of two."""
    given = dict(node.kwargs)
    alpha = given.pop("alpha", 1)
    operands = [*node.args, *(given.pop(key) for key in ("input", "other") if key in given)]
    if given or len(operands) != 2 or alpha != 1:
        return f"feeds {_node_name(node)} with alpha or out"
    if not all(isinstance(operand, fx.Node) for operand in operands):
        return f"feeds {_node_name(node)} of a constant"
    return operands


def _movable(root: nn.Module, bn_node: fx.Node, add: fx.Node) -> bool:
    """Whether bn_node's call can run where add runs: nothing in between writes in place into
    what may share memory with the BatchNorm's input, calls the same module or reads its
    attributes, or calls a module tritonbn cannot see into (a leaf of the trace) on what may."""
    between = set()
    node = bn_node.next
    while node is not add:
        if node.op in ("call_module", "get_attr") and (
                node.target == bn_node.target or node.target.startswith(bn_node.target + ".")):
            return False
        if _writes_in_place(root, node):
            if not _fresh(root, _written(root, node), between):
                return False
        elif node.op == "call_module" and not _is_torch_module(
                module := root.get_submodule(node.target)) and not _is_noop(module):
            if not all(_fresh(root, value, between) for value in node.all_input_nodes):
                return False
        between.add(node)
        node = node.next
    return True


def _written(root: nn.Module, node: fx.Node) -> fx.Node:
    """The node whose tensor an in-place node writes into, through chains of in-place
    writes."""
    while _writes_in_place(root, node) and node.args and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def _fresh(root: nn.Module, node: fx.Node, between: set) -> bool:
    """Whether node's tensor is one allocated after the BatchNorm's call (among between), so
    that it cannot share memory with the BatchNorm's input."""
    if node not in between:
        return False
    if node.op == "call_module":
        return type(root.get_submodule(node.target)) in _ALLOCATING_MODULES
    return node.op == "call_function" and node.target in _ALLOCATING_FUNCTIONS


def _is_torch_module(module: nn.Module) -> bool:
    return type(module).__module__.startswith("torch.nn.")


def _writes_in_place(root: nn.Module, node: fx.Node) -> bool:
    if node.op == "call_module":
        module = root.get_submodule(node.target)
        return bool(getattr(module, "inplace", False)) and not _is_noop(module)
    if node.op == "call_method":
        name = node.target
    elif node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        if node.kwargs.get("inplace") or node.target is operator.setitem:
            return True
    else:
        return False
    return name.endswith("_") and not name.endswith("__")


def _rewrite(graph: fx.Graph, route: _Route, fused_nodes: dict) -> FusedPair:
    """Replace route's BatchNorm call and the nodes it fuses with one call of the (already
    swapped in) BatchNormAct module. fused_nodes maps each node replaced so far to its
    replacement (a residual may be one), and gains this route's."""
    bn_node = route.bn
    (input,) = [*bn_node.args, *bn_node.kwargs.values()]
    pair = FusedPair(bn_node.target, route.consumer,
                     None if route.residual is None else _node_name(route.residual))
    if route.residual is None:
        with graph.inserting_before(bn_node):
            fused = graph.call_module(bn_node.target, (input,))
    else:
        with graph.inserting_before(route.add):
            module = graph.get_attr(bn_node.target)
            residual = fused_nodes.get(route.residual, route.residual)
            fused = graph.call_function(call_with_residual, (module, input, residual))
            fused.meta["is_wrapped"] = True  # the generated code fx.wraps it for later traces
    last = route.replaced[-1] if route.replaced else bn_node
    for node in [bn_node, *route.replaced[:-1]]:
        for user in [user for user in node.users if _reads_shape(user)]:
            user.replace_input_with(node, input)
    last.replace_all_uses_with(fused)
    fused_nodes[last] = fused
    for node in reversed([bn_node, *route.replaced]):
        graph.erase_node(node)
    return pair


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


def _class_name(module: nn.Module) -> str:
    return f"{type(module).__module__}.{type(module).__qualname__}"


def _node_name(node: fx.Node) -> str:
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    if node.op == "call_function":
        module = getattr(node.target, "__module__", None)
        module = {None: "torch", "torch._C._nn": "torch.nn.functional",
                  "_operator": "operator"}.get(module, module)
        return f"{module}.{getattr(node.target, '__name__', node.target)}"
    return node.target  # a module path, a forward argument, an attribute


def _feeds(root: nn.Module, node: fx.Node) -> str:
    """Why a BatchNorm feeding node is left alone."""
    if node.op != "call_module":
        return f"feeds {_node_name(node)}"
    module = root.get_submodule(node.target)
    rate = _DROP_RATES.get(_class_name(module))
    if _has_hooks(module):
        return f"feeds a {type(module).__name__} that has hooks"
    if rate:
        return f"feeds a {type(module).__name__} whose {rate} > 0"
    return f"feeds a {type(module).__name__}"


def _copy(model: nn.Module) -> nn.Module:
    """A deep copy of model that shares its process groups (nn.SyncBatchNorm's), which are
    handles on the processes and cannot be copied."""
    groups = {id(m.process_group): m.process_group for m in model.modules()
              if isinstance(m, nn.SyncBatchNorm) and m.process_group is not None}
    return copy.deepcopy(model, groups)


def _fused_module(bn: nn.Module, fused_class, route: _Route) -> nn.Module:
    """The BatchNormAct twin of bn, holding bn's own parameter and buffer tensors."""
    group = {"process_group": bn.process_group} if isinstance(bn, nn.SyncBatchNorm) else {}
    fused = fused_class(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
                        activation=route.activation, activation_kwargs=route.kwargs,
                        device="meta", **group)
    # Overwrites every placeholder the constructor made (same class family, same flags).
    for name, param in bn._parameters.items():
        fused.register_parameter(name, param)
    for name, buffer in bn._buffers.items():
        fused.register_buffer(name, buffer, persistent=name not in bn._non_persistent_buffers_set)
    return fused.train(bn.training)


def _replace_submodule(root: nn.Module, target: str, module: nn.Module) -> None:
    parent, _, name = target.rpartition(".")
    setattr(root.get_submodule(parent), name, module)


class _FusedGraphModule(fx.GraphModule):
    """A GraphModule that keeps its source's parameters, buffers and submodules, in its order,
    through copy.deepcopy too.

    fx.GraphModule copies only what the graph uses (a head that forward skips would drop out
    of state_dict), in graph order, and registers plain tensor attributes, such as the tensor
    constants the tracer stores, as buffers: state_dict would gain keys. Its deepcopy rebuilds
    the module the same way, and drops other attributes, so both are redone here.
    """

    def __deepcopy__(self, memo):
        copied = super().__deepcopy__(memo)
        _hold_as(copied, self, lambda value: copy.deepcopy(value, memo))
        for name in ("fused_pairs", "left_alone", "leaves"):
            if name in self.__dict__:
                setattr(copied, name, copy.deepcopy(self.__dict__[name], memo))
        return copied


def _hold_as(module: fx.GraphModule, source: nn.Module, take=lambda value: value) -> None:
    """Give module source's parameters, buffers and submodules (each through take), in
    source's order, and the plain attributes its graph reads."""
    for name in [*module._parameters, *module._buffers, *module._modules]:
        delattr(module, name)
    for name, child in source._modules.items():
        module.add_module(name, take(child))
    for name, param in source._parameters.items():
        module.register_parameter(name, take(param))
    for name, buffer in source._buffers.items():
        module.register_buffer(name, take(buffer),
                               persistent=name not in source._non_persistent_buffers_set)
    for node in module.graph.find_nodes(op="get_attr"):
        head = node.target.split(".")[0]
        if not hasattr(module, head):
            setattr(module, head, take(getattr(source, head)))


def _graph_module(root: nn.Module, graph: fx.Graph) -> fx.GraphModule:
    """A GraphModule running graph that holds root's own parameters, buffers and submodules,
    in root's order (_FusedGraphModule)."""
    module = _FusedGraphModule(root, graph, class_name=type(root).__name__)
    _hold_as(module, root)
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
