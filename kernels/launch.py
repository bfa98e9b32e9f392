"""Kernel launches that skip Triton's per-call argument binding once a kernel is compiled.

``jit_fn[grid](*args)`` binds, specialises and hashes every argument on every call: about
50 us of host time per launch on an H100 machine, more than the kernels themselves take on
small tensors. ``@CachedLaunch`` wraps a ``@triton.jit`` function so that the first call for a
given ``cache_key`` goes through Triton (compiling if needed) and later calls hand the compiled
kernel straight to its launcher, as torch.compile's own Triton launchers do.

A launcher calls ``kernel.launch(cache_key, bind, **arguments)``. ``arguments`` are what may
change from call to call under one cache key, by parameter name: the launchers in this package
pass the kernel's tensors there, ``None`` for an absent one (Triton compiles it as a constant).
``bind()`` gives the grid and every other argument, also by name: ints, floats, constexprs and
compile options. Once per cache key the launch layer works out where each name goes in the
kernel's parameter list; a call then gathers its values with one C-level lookup and appends
the variant's bound ones. A kernel that lists the parameters its callers name first needs
nothing more; any other order costs one more lookup per call.

The caller's ``cache_key`` stands for everything ``bind`` gives, and for everything Triton
specialises on but tensor alignment: each tensor's dtype or absence, each int's value (width,
divisibility by 16, equality to 1), the constexpr and compile-option keywords. The launchers
in this package key on their launch plan (shapes and strides), the dtypes and flags they pass,
the ints the plan does not fix and their float arguments (eps, momentum, an activation's
parameter: one value per model, as a rule), and call ``bind`` only when the key is new.
Alignment is checked per call: a launch whose tensors are not all 16-byte aligned goes through
Triton's own path. The tensors that every launcher of a kernel allocates itself
(``CachedLaunch.allocating``) are not checked: PyTorch's allocators align them (a pluggable
CUDA allocator must too, as cudaMalloc does).
Under the interpreter, and on backends other than NVIDIA's, every call goes through Triton
unchanged. The direct path skips what Triton checks per call beyond specialisation (pre-run
hooks, changed globals, the debug knob), and takes the grid to be a tuple.

The direct path leans on Triton internals (``CompiledKernel.run``'s argument order,
``packed_metadata``, ``launch_metadata``, ``JITFunction.params``) that any release may change.
On the Triton versions in VALIDATED_TRITON_VERSIONS, where GPU runs compared the two paths on
every kernel variant (``tests/test_launch.py``), it is trusted. On any other version each
kernel variant (each cache key) proves itself once, on its second call: the call's tensors are
copied twice, Triton's path launches on one set of copies and the direct path on the other,
and the copies must come out bit for bit the same (the kernels are deterministic); the call
itself then takes Triton's path, and every later one the direct path. A proof needs a sync,
so it waits for a call outside CUDA-graph capture whose tensors fit PROOF_MAX_BYTES and
whose copies fit in memory; until then the variant takes Triton's path.
``TRITONBN_DIRECT_LAUNCH=0`` forces Triton's path; ``=1`` trusts the direct path without
proofs. A kernel whose direct launch raises, or fails its proof, warns once and takes
Triton's path from then on, that call included.

Inside ``traced_launches()`` (the bodies of the ops registered with ``torch.library.triton_op``)
every launch goes through ``torch.library.wrap_triton`` instead: torch.compile records it, and
Inductor then launches the kernel from its own generated code.
"""
import contextlib
import operator
import os
import threading
import warnings
from typing import NamedTuple, Optional

import torch
import triton
from triton import knobs
from triton.runtime import driver

from . import INTERPRETING

# major.minor versions on which GPU runs have checked the direct path against Triton's own.
# Triton 3.9 has only compiled these kernels offline, never launched them on a GPU: not listed.
# A patch release is taken to keep its minor's internals, so it shares the minor's entry.
VALIDATED_TRITON_VERSIONS = ("3.6",)


def direct_launches(setting: str, triton_version: str, interpreting: bool,
                    hip: bool) -> tuple[str, str]:
    """(mode, why): mode "on" (direct launches trusted), "prove" (each kernel variant proves
    itself first) or "off" (Triton's own path). setting: TRITONBN_DIRECT_LAUNCH's value, ""
    when unset. Cache keys follow the NVIDIA backend's specialisation; others specialise on
    more (AMD: whether a tensor's storage is under 2 GB), so they keep Triton's own path."""
    if setting not in ("", "0", "1"):
        raise ValueError(f"TRITONBN_DIRECT_LAUNCH must be 0, 1 or unset, not {setting!r}")
    if interpreting:
        return "off", "Triton's interpreter has no compiled kernels to launch"
    if hip:
        return "off", "the AMD backend specialises on more than the launch cache keys hold"
    if setting == "0":
        return "off", "TRITONBN_DIRECT_LAUNCH=0"
    if setting == "1":
        return "on", "TRITONBN_DIRECT_LAUNCH=1, without proofs"
    minor = ".".join(triton_version.split(".")[:2])
    if minor in VALIDATED_TRITON_VERSIONS:
        return "on", f"Triton {minor} is validated"
    return "prove", (f"Triton {triton_version} is not in VALIDATED_TRITON_VERSIONS "
                     f"({', '.join(VALIDATED_TRITON_VERSIONS)}): each kernel variant is "
                     f"checked against Triton's own launch once, bit for bit")


LAUNCH_MODE, LAUNCH_MODE_WHY = direct_launches(
    os.environ.get("TRITONBN_DIRECT_LAUNCH", ""), triton.__version__, INTERPRETING,
    torch.version.hip is not None)
LAUNCH_DIRECTLY = LAUNCH_MODE != "off"
PROVE_LAUNCHES = LAUNCH_MODE == "prove"
# A proof copies the call's tensors twice: calls with more bytes than this wait for a smaller one.
PROOF_MAX_BYTES = 256 << 20
# Each input shape adds entries: start over past this many.
MAX_CACHED = 4096


class _Tracing(threading.local):
    on = False  # a class default: reading it costs no getattr fallback per launch


_tracing = _Tracing()


@contextlib.contextmanager
def traced_launches():
    """Launches made inside go through torch.library.wrap_triton, and their scratch buffers
    are allocated per call (merge.workspace): a trace must hold no tensor from outside it."""
    previous = launches_traced()
    _tracing.on = True
    try:
        yield
    finally:
        _tracing.on = previous


def launches_traced() -> bool:
    return _tracing.on


def _active(hook):
    """The launch hook to hand to the launcher, or None. Triton keeps an empty HookChain rather
    than None when no profiler is attached; passing None spares two calls per launch."""
    return hook if hook is not None and getattr(hook, "calls", True) else None


class Launch(NamedTuple):
    """What a launcher works out once per cache key: the grid, and the arguments a call does
    not name (ints, floats, constexprs and compile options) by name."""

    grid: tuple
    constants: dict


class _Direct(NamedTuple):
    """A compiled variant, ready to launch: its grid as a 3-tuple, and how a call's arguments
    become every parameter's value in the kernel's order (_run)."""

    kernel: object
    grid: tuple
    named: object  # call's arguments -> the values of the parameters it names, in order
    constants: tuple  # the values of the others (bind's), in order
    in_order: object  # (named + constants) -> parameter order; None where that is the order
    checked: object  # named's values -> the tensors whose alignment each call checks


LAUNCHERS = []  # every CachedLaunch, in the order the kernel modules define them


class DirectLaunchFallbackWarning(RuntimeWarning):
    """A kernel's direct launch raised; the kernel takes Triton's own launch path from now on."""


class CachedLaunch:
    """``kernel.launch(cache_key, bind, **arguments)`` runs the wrapped JIT function on
    ``bind().grid`` with ``**arguments, **bind().constants``; bind is called only when
    cache_key is new (or on Triton's own path)."""

    def __init__(self, jit_fn, allocated: tuple = ()):
        self.jit_fn = jit_fn
        self.allocated = frozenset(allocated)
        LAUNCHERS.append(self)
        self._compiled = {}  # (device, cache_key) -> _Direct
        self._unproven = {}  # the same, for variants yet to prove themselves (PROVE_LAUNCHES)
        self.proven = 0  # variants that passed their proof
        self._fell_back = False  # a direct launch raised or failed its proof: nothing is cached

    @classmethod
    def allocating(cls, *names):
        """A decorator like CachedLaunch itself, for a kernel whose launchers allocate the
        tensors passed as `names` on every call: PyTorch's allocators align them, so calls
        skip their alignment check."""
        return lambda jit_fn: cls(jit_fn, names)

    def launch(self, cache_key, bind, **arguments):
        if _tracing.on:
            bound = bind()
            torch.library.wrap_triton(self.jit_fn)[bound.grid](**arguments, **bound.constants)
            return
        if not LAUNCH_DIRECTLY:
            self._through_triton(bind(), arguments)
            return
        device = driver.active.get_current_device()
        entry = self._compiled.get((device, cache_key))
        if entry is None:
            self._launch_uncached((device, cache_key), bind, arguments)
            return
        values = entry.named(arguments)
        for tensor in entry.checked(values):
            if tensor.data_ptr() % 16:  # compiled for aligned tensors: not this call
                self._through_triton(bind(), arguments)
                return
        try:
            _run(entry, device, values)
        except Exception as error:
            # Relaunching assumes the failed call launched nothing; only an exit hook that
            # raises could break that, and it raises again on Triton's path.
            self._fall_back(error)
            self._through_triton(bind(), arguments)

    def _through_triton(self, bound: Launch, arguments: dict):
        return self.jit_fn[bound.grid](**arguments, **bound.constants)

    def _launch_uncached(self, key, bind, arguments):
        """A call whose variant has no trusted entry: it compiles, or proves itself."""
        entry = self._unproven.pop(key, None)
        if entry is None:
            self._compile(key, bind(), arguments)
        else:
            bound = bind()
            proved = (self._prove(entry, key[0], bound, arguments)
                      if self._provable(arguments) else None)
            if proved:
                self._compiled[key] = entry  # direct from the next call on
            elif proved is None:
                self._unproven[key] = entry  # a later call proves it
            self._through_triton(bound, arguments)

    @staticmethod
    def _provable(arguments: dict) -> bool:
        """Whether this call can carry a proof: aligned tensors, small enough to copy, and no
        CUDA graph being captured (the comparison waits for the GPU)."""
        unique = {id(tensor): tensor for tensor in _tensors(arguments)}.values()
        return (all(tensor.data_ptr() % 16 == 0 for tensor in unique)
                and sum(tensor.nbytes for tensor in unique) <= PROOF_MAX_BYTES
                and not (any(tensor.is_cuda for tensor in unique)
                         and torch.cuda.is_current_stream_capturing()))

    def _prove(self, entry: _Direct, device, bound: Launch, arguments: dict) -> Optional[bool]:
        """Launch Triton's path and the direct path on two copies of the call's tensors, and
        compare the copies bit for bit: True if they agree; False if not, after falling back
        with a warning; None if the copies did not fit in memory this time."""
        try:
            through_triton, direct = _copies(arguments), _copies(arguments)
        except torch.OutOfMemoryError:
            return None
        self._through_triton(bound, through_triton)
        try:
            _run(entry, device, entry.named(direct))
            if not all(map(_same_bits, _tensors(through_triton), _tensors(direct))):
                raise RuntimeError("its results differ from Triton's launch of the same "
                                   "arguments")
        except Exception as error:
            self._fall_back(error)
            return False
        self.proven += 1
        return True

    def _compile(self, key, bound: Launch, arguments: dict):
        """Launch through Triton, and remember the compiled kernel if every tensor is aligned."""
        kernel = self._through_triton(bound, arguments)
        if (self._fell_back or kernel is None
                or any(tensor.data_ptr() % 16 for tensor in _tensors(arguments))):
            return
        try:
            self._remember(key, kernel, bound, arguments)
        except Exception as error:
            self._fall_back(error)

    def _remember(self, key, kernel, bound: Launch, arguments: dict):
        if hasattr(kernel, "result"):  # compiled asynchronously
            kernel = kernel.result()
        # The compiled kernel takes every parameter in order, constants included: the
        # parameters a call names, then bind's, or a permutation of the two where the kernel
        # interleaves them.
        names = [param.name for param in self.jit_fn.params]
        named = [name for name in names if name in arguments]
        fixed = [name for name in names if name not in arguments]
        in_order = None
        if named + fixed != names:
            in_order = operator.itemgetter(*((named + fixed).index(name) for name in names))
        checked = [index for index, name in enumerate(named)
                   if isinstance(arguments[name], torch.Tensor) and name not in self.allocated]
        entries = self._unproven if PROVE_LAUNCHES else self._compiled
        if len(entries) >= MAX_CACHED:
            entries.clear()
        entries[key] = _Direct(
            kernel, tuple(bound.grid) + (1,) * (3 - len(bound.grid)), _picker(named),
            tuple(bound.constants[name] for name in fixed), in_order, _picker(checked))

    def _fall_back(self, error: Exception):
        self._fell_back = True
        self._compiled.clear()
        self._unproven.clear()
        warnings.warn(f"tritonbn: launching {self.jit_fn.__name__} directly failed on Triton "
                      f"{triton.__version__} ({type(error).__name__}: {error}); it takes "
                      f"Triton's own launch path from now on. TRITONBN_DIRECT_LAUNCH=0 sends "
                      f"every kernel there.", DirectLaunchFallbackWarning)


def _picker(keys):
    """container -> the values at keys, always a tuple (itemgetter of one key is not)."""
    if len(keys) == 1:
        (key,) = keys
        return lambda container: (container[key],)
    return operator.itemgetter(*keys) if keys else lambda container: ()


def _tensors(arguments: dict) -> list:
    return [value for value in arguments.values() if isinstance(value, torch.Tensor)]


def _run(entry: _Direct, device, values: tuple):
    """Hand a compiled kernel straight to its launcher, as Triton's own path would; values are
    entry.named's."""
    kernel, grid = entry.kernel, entry.grid
    args = values + entry.constants
    if entry.in_order is not None:
        args = entry.in_order(args)
    stream = driver.active.get_current_stream(device)
    hooks = knobs.runtime
    enter_hook = _active(hooks.launch_enter_hook)
    exit_hook = _active(hooks.launch_exit_hook)
    metadata = (None if enter_hook is None and exit_hook is None else
                kernel.launch_metadata(grid, stream, *args))
    kernel.run(*grid, stream, kernel.function, kernel.packed_metadata, metadata,
               enter_hook, exit_hook, *args)


def _copies(arguments: dict) -> dict:
    """arguments with a copy of each tensor, sizes and strides kept; a tensor passed twice is
    copied once, so the copies alias as the originals do."""
    made = {}
    for tensor in _tensors(arguments):
        if id(tensor) not in made:
            made[id(tensor)] = torch.empty_strided(
                tensor.size(), tensor.stride(), dtype=tensor.dtype,
                device=tensor.device).copy_(tensor)
    return {name: made[id(value)] if isinstance(value, torch.Tensor) else value
            for name, value in arguments.items()}


_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality: NaNs in the same places compare equal, -0.0 and 0.0 do not."""
    as_int = _SAME_SIZE_INT[a.element_size()]
    return torch.equal(a.view(as_int), b.view(as_int))


def direct_launch_state() -> str:
    """One line: whether compiled kernels launch directly, why, and how the proofs went."""
    if not LAUNCH_DIRECTLY:
        return f"off: {LAUNCH_MODE_WHY}"
    fell_back = [launcher.jit_fn.__name__ for launcher in LAUNCHERS if launcher._fell_back]
    state = f"{'proving' if PROVE_LAUNCHES else 'on'}: {LAUNCH_MODE_WHY}"
    if PROVE_LAUNCHES:
        state += (f"; {sum(launcher.proven for launcher in LAUNCHERS)} variants proven so far, "
                  f"{sum(len(launcher._unproven) for launcher in LAUNCHERS)} waiting")
    if fell_back:
        state += f"; on Triton's own path after a failure: {', '.join(fell_back)}"
    return state


def launches_in(fn) -> int:
    """The number of CachedLaunch launches one call of fn makes (for tests and perf scripts)."""
    count = 0
    original = CachedLaunch.launch

    def counted(self, *args, **kwargs):
        nonlocal count
        count += 1
        return original(self, *args, **kwargs)

    CachedLaunch.launch = counted
    try:
        fn()
    finally:
        CachedLaunch.launch = original
    return count
