"""fuse_bn_act(): convert a model so that each BatchNorm runs, as one BatchNormAct call, together
with the activation and the residual add that follow it; docs/DESIGN.md §13 gives the design.

A conversion keeps the model's module tree: every module whose forward calls a BatchNorm of its
own is traced on its own, its submodules kept as calls (leaves), and its forward is replaced by
the fused trace. So each submodule is still called by its parent, exactly when it was before,
and hooks, feature extraction by module name and per-block wrappers see the original's
modules. The stages, in the order of this file: the tree (which forwards to trace), the trace
(what a trace would freeze keeps a forward as it is), the plan (which calls fuse with what:
the rules are fuse_bn_act's docstring), and the rewrite (the fused call, the new forward, and
how a converted module pickles and copies).
"""
import contextlib
import copy
import dis
import inspect
import linecache
import logging
import operator
import os
import sys
import traceback
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from .activations import activation_kwargs, activation_spec, eager_activation
from .frozen import FrozenBatchNormAct2d
from .modules import BatchNormAct1d, BatchNormAct2d, BatchNormAct3d
from .sync import SyncBatchNormAct

logger = logging.getLogger(__name__)

_FUSED_CLASSES = {nn.BatchNorm1d: BatchNormAct1d, nn.BatchNorm2d: BatchNormAct2d,
                  nn.BatchNorm3d: BatchNormAct3d, nn.SyncBatchNorm: SyncBatchNormAct}
_PLAIN_CLASSES = {fused: plain for plain, fused in _FUSED_CLASSES.items()}
_FUSED_LAYERS = tuple(_PLAIN_CLASSES)
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


class FusedPair(NamedTuple):
    """One fused call: the BatchNorm's module path, the activation it now applies and the
    residual it now adds. The activation is named as a module path (``layer1.0.relu``; for
    timm's BatchNormAct2d its ``act``), a function (``torch.nn.functional.relu``) or a method
    (``Tensor.relu``), None when none was fused; the residual is named the same way after the
    call that produced it (a forward argument by its name), None without a residual."""

    bn: str
    activation: Optional[str]
    residual: Optional[str] = None


def call_fused(bn: nn.Module, input: Tensor, residual: Optional[Tensor] = None, *,
               activation: str, activation_kwargs: dict, path: str) -> Tensor:
    """What a converted model's forward calls where it fused the BatchNorm at ``path``:
    ``bn(input, residual)``, or ``bn(input)`` without a residual.

    The fused computation is ``activation(batchnorm(input) + residual)``, and it stays that
    whatever happened to the layer since: a residual of another shape, dtype or device than
    input (a broadcast add, which a graph does not show) runs the layer's BatchNorm, the add and
    its activation unfused; a layer that another library put in its place (an
    ``nn.SyncBatchNorm`` from ``nn.SyncBatchNorm.convert_sync_batchnorm``, a
    ``FrozenBatchNorm2d``, a plain BatchNorm) runs with the add and ``activation`` around it. A
    layer that applies an activation of its own, other than tritonbn's, raises ValueError.
    A later trace of a converted model (torchvision's feature extractor, say) goes through it
    and records the layer's own call, under the layer's name."""
    if isinstance(bn, (*_FUSED_LAYERS, FrozenBatchNormAct2d)):
        return bn(input) if residual is None else _with_residual(bn, input, residual)
    own = getattr(bn, "act", None)
    if isinstance(own, nn.Module) and type(own) is not nn.Identity:
        raise ValueError(
            f"fuse_bn_act fused {path} with {activation}, and {path} is now a "
            f"{type(bn).__name__} that applies an activation of its own "
            f"({type(own).__name__}): applying both would change the model. Convert the fused "
            "model with tritonbn.convert_sync_batchnorm or tritonbn.freeze_batch_norm, which "
            "keep the fused activation in the layer")
    output = bn(input)
    if residual is not None:
        output = output + residual
    return eager_activation(activation_spec(activation, activation_kwargs))(output)


@torch.fx.wrap
def _with_residual(bn: nn.Module, input: Tensor, residual: Tensor) -> Tensor:
    """bn(input, residual) for a tritonbn layer, or its BatchNorm, the add (broadcasting,
    promoting) and its activation unfused where residual's shape, dtype or device differ
    from input's. A later trace records it as one call: its check would branch on traced
    values."""
    if (residual.shape == input.shape and residual.dtype == input.dtype
            and residual.device == input.device):
        return bn(input, residual)
    if isinstance(bn, FrozenBatchNormAct2d):
        plain = F.batch_norm(input, bn.running_mean, bn.running_var, bn.weight, bn.bias,
                             False, 0.0, bn.eps)
    else:
        plain = next(plain for fused, plain in _PLAIN_CLASSES.items()
                     if isinstance(bn, fused)).forward(bn, input)
    return eager_activation(activation_spec(bn.activation, bn.activation_kwargs))(
        plain + residual)


def fuse_bn_act(model: nn.Module) -> nn.Module:
    """Fuse each BatchNorm of a model with the activation and residual add that follow it.

    Returns a copy of ``model`` in which every qualifying nn.BatchNorm1d/2d/3d (and
    nn.SyncBatchNorm, and timm's BatchNormAct2d) runs, together with the activation and the
    residual add after it, as one ``BatchNormAct1d/2d/3d`` (``SyncBatchNormAct``) call::

        act(bn(x) + residual)  ->  fused_bn(x, residual)

    The copy is the same model to the tools around it: the same classes, module tree,
    ``state_dict`` keys and order, train/eval modes, devices and dtypes. Each module whose
    forward calls a BatchNorm of its own gets a fused forward (its class is a subclass of the
    original's, of the same name); it still calls each of its submodules when the original
    did, so hooks fire, and features extracted by module name are the original's. The
    exceptions: an activation (or no-op) module whose work moved into a fused BatchNorm is no
    longer called, and is removed unless it holds state or hooks or is called elsewhere; a
    fused BatchNorm's output is the activated one. The copy pickles (``torch.save`` of the
    whole model), deep-copies and converts again to itself. ``model`` is never modified.

    What fuses. A module's forward is traced with torch.fx, its submodules kept as calls. A
    call of one of its BatchNorms qualifies when the output, passed on through no-op modules
    (``nn.Identity``, an add of 0, and ``nn.Dropout``, torchvision's ``StochasticDepth`` or
    timm's ``DropPath``/``DropBlock2d`` at a drop rate of 0), has exactly one consumer in that
    forward (reads of its shape aside), and that consumer is

    - an activation of it alone, as a module with its settings (``nn.ReLU6``,
      ``nn.LeakyReLU(0.2)``, ...), a function (``F.silu``, ``torch.sigmoid_``, ...) or a
      Tensor method, in place or not: any of ``tritonbn.SUPPORTED_ACTIVATIONS``;
    - an add of one other tensor (``+``, ``+=``, ``torch.add``, ``Tensor.add(_)``, alpha 1,
      either order): that tensor becomes the residual, and the activation the sum alone feeds
      is fused too (``identity`` when there is none). The fused call runs where the add ran,
      unless what runs in between writes in place into memory the BatchNorm's input may
      share, calls the same BatchNorm or reads its state; when both operands come from
      BatchNorms, the first that can move takes the add.

    A BatchNorm whose output is its module's output is left alone: fusing it with what the
    caller does next would change that module's output. timm's ``BatchNormAct2d`` fuses with
    its own activation (or, with ``nn.Identity``, as a plain BatchNorm). Left alone too: other
    BatchNorm subclasses, BatchNorms and consumers with hooks, a BatchNorm called with
    different activations, and the BatchNorms of a module whose forward is kept as it is: one
    that torch.fx cannot trace, that timm registers as not traceable, or that reads what a
    trace would freeze (a module's ``training`` flag, a global bool, the grad mode), since
    the graph would compute another function once those change. A drop rate and other plain
    attributes read in forward are frozen at conversion, as in any torch.fx graph.

    Args:
        model: the ``nn.Module`` to convert.

    Returns:
        The converted copy. Its attribute ``fused_pairs`` lists what was fused, as
        ``FusedPair`` tuples; ``left_alone`` maps the path of every other BatchNorm to the
        reason; ``leaves`` maps the path of every module whose forward holds BatchNorms and is
        kept as it is ("" for the model's own) to the reason, with the line of code. Each pair
        is logged at INFO level, each BatchNorm left alone at DEBUG level, and a warning says
        how many forwards are kept, if any for a reason other than timm's registration.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.

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
        >>> type(fused[1]).__name__, isinstance(fused, nn.Sequential)
        ('BatchNormAct2d', True)
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
    if not isinstance(model, nn.Module):
        raise TypeError(f"fuse_bn_act expects an nn.Module, got {type(model).__name__}")
    converted = _copy(model)
    report = _convert(converted)
    converted.fused_pairs = tuple(report.fused_pairs)
    converted.leaves = dict(report.leaves)
    converted.left_alone = {}
    for name, module in _batchnorm_modules(model):
        if name in report.fused:
            continue
        reason = (report.refused.get(name) or _module_refusal(module)
                  or "it is not called by forward")
        converted.left_alone[name] = reason
        logger.debug("fuse_bn_act: %s left alone: %s", name, reason)
    kept = {path: reason for path, reason in report.leaves.items() if reason != _TIMM_LEAF}
    if kept:
        first = next(iter(kept))
        warnings.warn(f"fuse_bn_act: the forward of {len(kept)} module(s) of "
                      f"{type(model).__name__} kept as it is, its BatchNorms unfused (see "
                      f".leaves); {first or 'the model'}: {kept[first]}", stacklevel=2)
    logger.info("fuse_bn_act: %d call(s) fused in %s", len(report.fused_pairs),
                type(model).__name__)
    return converted


@dataclass
class _Report:
    fused_pairs: list = field(default_factory=list)
    fused: set = field(default_factory=set)
    refused: dict = field(default_factory=dict)
    leaves: dict = field(default_factory=dict)


# The tree: which forwards to trace, and in what order things change.

def _convert(root: nn.Module) -> _Report:
    """Fuse root (the caller's own copy) in place, one module's forward at a time: every module
    that owns a BatchNorm is traced first, on the unchanged tree, then each graph is planned
    and rewritten, and the absorbed modules go once no graph calls them."""
    report = _Report()
    owners = _owners(root)
    graphs = {}
    for path in dict.fromkeys(owners.values()):
        graph, scratch, reason = _trace(root.get_submodule(path))
        if graph is None:
            report.leaves[path] = reason
        else:
            graphs[path] = graph, scratch
    callers: dict[str, list[str]] = {}
    for path, (graph, _) in graphs.items():
        for target in _batchnorm_calls(root.get_submodule(path), graph):
            callers.setdefault(_joined(path, target), []).append(path or "the model")
    refused = {bn: f"it is inside a leaf: {owner or 'the model'}"
               for bn, owner in owners.items() if owner in report.leaves}
    refused.update((bn, f"it is called by the forwards of {' and '.join(paths)}")
                   for bn, paths in callers.items() if len(paths) > 1)
    report.refused.update(refused)
    absorbed = []
    for path, (graph, scratch) in graphs.items():
        absorbed += _fuse(root, path, graph, scratch, refused, report)
    _drop_absorbed(root, graphs, absorbed)
    for path, (graph, _) in graphs.items():
        if graph.find_nodes(op="call_function", target=call_fused):
            _install_forward(root.get_submodule(path), graph)
    return report


def _owners(root: nn.Module) -> dict[str, str]:
    """{path of each BatchNorm other than tritonbn's: path of the module that holds it}, seen
    through containers without a forward of their own (nn.ModuleList, nn.ModuleDict)."""
    owners = {}
    for path, _ in _batchnorm_modules(root):
        owner = path.rpartition(".")[0]
        while owner and type(root.get_submodule(owner)).forward is nn.Module.forward:
            owner = owner.rpartition(".")[0]
        owners[path] = owner
    return owners


def _joined(prefix: str, path: str) -> str:
    return f"{prefix}.{path}" if prefix and path else prefix or path


# The trace: one module's own forward, its submodules kept as calls.

_TIMM_LEAF = "timm registers it as not traceable by torch.fx"


class _Tracer(fx.Tracer):
    """A tracer of one module's own forward: every submodule stays a call (a leaf), and so do
    the functions timm registers as not traceable. While it traces it notes the first thing a
    trace would freeze (``frozen``): a read of a module's ``training`` flag, a global bool,
    ``torch.is_grad_enabled()``."""

    def __init__(self):
        super().__init__(autowrap_functions=(call_fused, *_timm_registry()[1]))
        self.frozen: Optional[str] = None

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return True

    def trace(self, root: nn.Module, concrete_args=None) -> fx.Graph:
        self._note_frozen_code(type(root).forward)
        return super().trace(root, concrete_args)

    def note_training_read(self, frame) -> None:
        self.frozen = self.frozen or f"it reads the module mode (training) at {_where(frame)}"

    def _note_frozen_code(self, function) -> None:
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
                self.frozen = self.frozen or (f"it reads {name}, which a trace would freeze, "
                                              f"at {code.co_filename}:{line}: {text}")
                return


def _trace(module: nn.Module):
    """(graph, the copy of module it was traced from, None), or (None, None, why module's
    forward is kept as it is). The copy shares module's submodules (leaves, not run) and
    copies its own state, which a trace may write (levit caches its attention biases)."""
    if _Watch.unwatched(type(module)) in _timm_registry()[0]:
        return None, None, _TIMM_LEAF
    optional = _optional_parameters(type(module).forward)
    if optional:
        return None, None, (f"its forward takes {', '.join(optional)}, whose use a trace would "
                            "fix to one case (every argument is a traced value)")
    scratch = copy.deepcopy(module, {id(child): child for child in module.modules()
                                     if child is not module})
    tracer = _Tracer()
    try:
        with _watching(scratch, tracer):
            graph = tracer.trace(scratch)
    except Exception as error:  # tracing runs arbitrary user code: any failure means "cannot"
        return None, None, f"torch.fx cannot trace it ({_describe(error)})"
    if tracer.frozen:
        return None, None, tracer.frozen
    for node in graph.nodes:  # it names the classes _watching swapped in, which do not pickle
        node.meta.pop("nn_module_stack", None)
    return graph, scratch, None


def _optional_parameters(function) -> list[str]:
    """The parameters of function a caller may leave out (name=default, *args, **kwargs)."""
    try:
        parameters = list(inspect.signature(function).parameters.values())[1:]
    except (TypeError, ValueError):  # no signature to read: nothing known to be optional
        return []
    return [f"{'*' * (p.kind == p.VAR_POSITIONAL)}{'**' * (p.kind == p.VAR_KEYWORD)}{p.name}"
            + ("" if p.default is p.empty else f"={p.default!r}") for p in parameters
            if p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


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
        except TypeError:  # a layout Python cannot swap (a ScriptModule): its reads unseen
            continue
        swapped.append((module, original))
    _Watch.tracer = tracer
    try:
        yield
    finally:
        _Watch.tracer = None
        for module, original in swapped:
            module.__class__ = original


def _timm_registry() -> tuple[tuple, tuple]:
    """(module classes, functions) timm registers as not traceable; empty unless timm is
    imported (a model built by timm has imported it)."""
    timm_fx = sys.modules.get("timm.layers._fx")
    if timm_fx is None:
        return (), ()
    return tuple(timm_fx.get_notrace_modules()), tuple(timm_fx.get_notrace_functions())


# The plan: which calls fuse with what.

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


def _plan(root: nn.Module, calls: dict[str, list[fx.Node]], refused: dict[str, str]):
    """(route of every call of a fused module, {module path: reason} of the modules refused,
    starting from refused).

    Each add goes to the first of its qualifying BatchNorm operands, among modules not refused;
    a module whose call lost its add is refused in turn, freeing its other adds: repeated until
    nothing changes (at least one more module is refused each round)."""
    refused = {**refused, **{target: reason for target in calls if target not in refused
                             for reason in [_module_refusal(root.get_submodule(target))]
                             if reason}}
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
        return _traced_activation(root.get_submodule(node.target))
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
    graph = _trace(module)[0]
    if graph is None:  # not traceable, or it reads the mode: not an activation we can read
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
    """Whether bn_node's call can run where add runs: nothing in between calls the same module
    or reads its attributes, writes in place into what may share memory with the BatchNorm's
    input, or passes what may share it to a call tritonbn cannot see into (a module other than
    a childless torch.nn one, which may write in place inside)."""
    (source,) = bn_node.all_input_nodes
    # When a conv, say, allocated the input, only what derives from it can share its memory;
    # otherwise anything could, but what is allocated in between.
    sharing = _derived(root, source) if _allocates(root, source) else None
    between = set()

    def may_share(value: fx.Node) -> bool:
        return value in sharing if sharing is not None else not (
            value in between and _allocates(root, value))

    node = bn_node.next
    while node is not add:
        if node.op in ("call_module", "get_attr") and (
                node.target == bn_node.target or node.target.startswith(bn_node.target + ".")):
            return False
        if _writes_in_place(root, node):
            if may_share(_written(root, node)):
                return False
        elif node.op == "call_module" and _is_opaque(root.get_submodule(node.target)):
            if any(may_share(value) for value in node.all_input_nodes):
                return False
        between.add(node)
        node = node.next
    return True


def _derived(root: nn.Module, node: fx.Node) -> set:
    """node and every node computed from it by something that may return a view of it, or
    it itself (anything but an allocating call)."""
    derived, stack = {node}, [node]
    while stack:
        for user in stack.pop().users:
            if user not in derived and not _allocates(root, user):
                derived.add(user)
                stack.append(user)
    return derived


def _is_opaque(module: nn.Module) -> bool:
    """Whether a call of module may write in place where a graph does not show it."""
    return not _is_noop(module) and (not _is_torch_module(module)
                                     or any(True for _ in module.children()))


def _written(root: nn.Module, node: fx.Node) -> fx.Node:
    """The node whose tensor an in-place node writes into, through chains of in-place
    writes."""
    while _writes_in_place(root, node) and node.args and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def _allocates(root: nn.Module, node: fx.Node) -> bool:
    """Whether node's tensor is a new one, never a view or an input of the call."""
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


# The rewrite: the fused calls, the module's new forward, and how it pickles.

def _fuse(root: nn.Module, path: str, graph: fx.Graph, scratch: nn.Module, refused: dict,
          report: _Report) -> list[str]:
    """Plan and rewrite the graph of the module at path (traced from scratch, its copy) and
    swap in its fused BatchNorms; the paths of the modules whose calls the fused calls
    replaced."""
    module = root.get_submodule(path)
    prefix = path + "." if path else ""
    calls = _batchnorm_calls(module, graph)
    passed = {node.target for node in graph.find_nodes(op="get_attr")}
    routes, refusals = _plan(module, calls, {
        **{target: "its forward passes the module on as a value" for target in calls
           if target in passed},
        **{target: refused[prefix + target] for target in calls if prefix + target in refused}})
    ends = f"its output is its module's output: {path}" if path else _ENDS_MODEL
    report.refused.update((prefix + name, ends if reason == _ENDS_MODEL else reason)
                          for name, reason in refusals.items())
    fused_nodes = {}
    absorbed = []
    for target, nodes in calls.items():
        if target in refusals:
            continue
        absorbed += [prefix + node.target for call in nodes for node in routes[call].replaced
                     if node.op == "call_module"]
        bn = module.get_submodule(target)
        first = routes[nodes[0]]
        fused_class = _fused_class(bn)
        _replace_submodule(module, target, _fused_module(bn, fused_class, first))
        report.fused.add(prefix + target)
        for node in nodes:
            pair = FusedPair(*(prefix + name if name is not None and _is_path(module, name)
                               else name
                               for name in _rewrite(graph, routes[node], fused_nodes,
                                                    prefix + target)))
            report.fused_pairs.append(pair)
            logger.info("fuse_bn_act: fused %s into %s(activation=%s)",
                        " + ".join(filter(None, pair)), fused_class.__name__, first.activation)
    graph.lint()
    if report.fused.isdisjoint(prefix + target for target in calls):
        return absorbed
    for node in graph.find_nodes(op="get_attr"):  # constants the tracer stored on scratch
        head = node.target.split(".")[0]
        if not hasattr(module, head):
            setattr(module, head, getattr(scratch, head))
    return absorbed


def _rewrite(graph: fx.Graph, route: _Route, fused_nodes: dict, path: str) -> FusedPair:
    """Replace route's BatchNorm call and the nodes it fuses with one call_fused of the
    (already swapped in) BatchNormAct module, at path in the model. fused_nodes maps each node
    replaced so far to its replacement (a residual may be one), and gains this route's."""
    bn_node = route.bn
    (input,) = [*bn_node.args, *bn_node.kwargs.values()]
    pair = FusedPair(bn_node.target, route.consumer,
                     None if route.residual is None else _node_name(route.residual))
    arguments = (input,)
    if route.residual is not None:
        arguments = (input, fused_nodes.get(route.residual, route.residual))
    with graph.inserting_before(bn_node if route.residual is None else route.add):
        module = graph.get_attr(bn_node.target)
        fused = graph.call_function(call_fused, (module, *arguments), {
            "activation": route.activation, "activation_kwargs": route.kwargs, "path": path})
    last = route.replaced[-1] if route.replaced else bn_node
    for node in [bn_node, *route.replaced[:-1]]:
        for user in [user for user in node.users if _reads_shape(user)]:
            user.replace_input_with(node, input)
    last.replace_all_uses_with(fused)
    fused_nodes[last] = fused
    for node in reversed([bn_node, *route.replaced]):
        graph.erase_node(node)
    return pair


def _drop_absorbed(root: nn.Module, graphs: dict, absorbed: list[str]) -> None:
    """Remove the absorbed modules (activations, no-op drops) that no graph calls any more, so
    that the model prints as what it computes (in an nn.Sequential or nn.ModuleList, an
    nn.Identity takes the place). A module stays if a graph still reaches it, it
    is registered at another path too (a forward kept as it is may call it there), or it holds
    state or hooks."""
    registered = Counter(id(module) for _, module in root.named_modules(remove_duplicate=False))
    reached = {id(root.get_submodule(_joined(path, node.target)))
               for path, (graph, _) in graphs.items()
               for node in graph.nodes if node.op in ("call_module", "get_attr")
               if _is_path(root, _joined(path, node.target))}
    for target in dict.fromkeys(absorbed):
        module = root.get_submodule(target)
        if (id(module) in reached or registered[id(module)] > 1
                or any(True for _ in module.parameters()) or any(True for _ in module.buffers())
                or any(_has_hooks(m) for m in module.modules())):
            continue
        parent, _, name = target.rpartition(".")
        parent = root.get_submodule(parent)
        if isinstance(parent, (nn.Sequential, nn.ModuleList)):  # indices stay the original's
            parent.add_module(name, nn.Identity().train(module.training))
        else:
            delattr(parent, name)


_GRAPH = "_fused_graph"  # the class attribute holding a fused forward's graph


def _install_forward(module: nn.Module, graph: fx.Graph) -> None:
    """Run graph as module's forward: module's class becomes a subclass of its own class (same
    name) holding the fused forward and its graph."""
    original = type(module)
    if _GRAPH in vars(original):  # converted before: a subclass of the original already
        original = original.__bases__[0]
    module.__class__ = _fused_subclass(original, graph)


def _fused_subclass(original: type, graph: fx.Graph) -> type:
    # The forward fx generates for the graph; the module only names the attributes it reads.
    names = {node.target: nn.Module() for node in graph.nodes
             if node.op in ("call_module", "get_attr")}
    forward = type(fx.GraphModule(names, graph)).forward
    graph.owning_module = None  # the graph pickles on its own
    return type(original)(original.__name__, (original,), {
        "__module__": original.__module__, "__qualname__": original.__qualname__,
        "forward": forward, _GRAPH: graph, "__reduce_ex__": _reduce_fused})


def _reduce_fused(self, protocol):
    """Pickles (and deep-copies) as the original class does, plus the graph of the fused
    forward, which unpickling installs again."""
    fused, self.__class__ = type(self), type(self).__bases__[0]
    try:
        rebuild, arguments, *state = self.__reduce_ex__(protocol)
    finally:
        self.__class__ = fused
    return (_unpickle_fused, (rebuild, arguments, vars(fused)[_GRAPH]), *state)


def _unpickle_fused(rebuild, arguments: tuple, graph: fx.Graph) -> nn.Module:
    module = rebuild(*arguments)
    module.__class__ = _fused_subclass(type(module), graph)
    return module


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


def _is_path(root: nn.Module, name: str) -> bool:
    try:
        root.get_submodule(name)
    except AttributeError:
        return False
    return True


def _describe(error: Exception) -> str:
    """The error and the innermost line of non-torch code on its traceback."""
    message = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    frames = [frame for frame in traceback.extract_tb(error.__traceback__)
              if not frame.filename.startswith(_TORCH_DIR) and frame.filename != __file__]
    if frames:
        where = frames[-1]
        message += f", at {where.filename}:{where.lineno} in {where.name}: {where.line}"
    return message
