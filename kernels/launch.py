"""Kernel launches that skip Triton's per-call argument binding once a kernel is compiled.

``jit_fn[grid](*args)`` binds, specialises and hashes every argument on every call: about
50 us of host time per launch on an H100 machine, more than the kernels themselves take on
small tensors. ``@CachedLaunch`` wraps a ``@triton.jit`` function so that the first call for a
given ``cache_key`` goes through Triton (compiling if needed) and later calls hand the compiled
kernel straight to its launcher, as torch.compile's own Triton launchers do.

The caller's ``cache_key`` stands for everything Triton specialises on but tensor alignment:
each tensor's dtype, each int's value (width, divisibility by 16, equality to 1), the
constexpr and compile-option keywords; and for the grid. The launchers in this package key on
their launch plan (shapes and strides) and the dtypes and flags they pass, from which all of
these follow, and work out the grid, ints and constexprs only when the key is new. Floats
must be Python floats (they are never specialised). Alignment is checked per call: a launch
whose tensors are not all 16-byte aligned goes through Triton's own path.
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
import functools
import math
import os
import struct
import threading
import warnings
from typing import NamedTuple, Optional

import torch
import triton
from triton import knobs
from triton.runtime import driver

# Triton decides at import time whether its kernels are interpreted; so do we.
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
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
    return None if hook is None or getattr(hook, "calls", None) == [] else hook


@functools.lru_cache(maxsize=256)  # eps, momentum and slopes repeat from call to call
def float32_pair(value: float) -> tuple:
    """(hi, lo): hi the float32 nearest to value, lo the float32 nearest to value - hi.
    Triton passes Python floats to a kernel as float32; a kernel computing in float64 adds
    the two back (to within 2^-48 of value) with forward.joined."""
    hi = struct.unpack("f", struct.pack("f", value))[0]
    return hi, (value - hi if math.isfinite(hi) else 0.0)  # inf - inf would be NaN


class Launch(NamedTuple):
    """What a launcher works out once per cache key: the grid, the int arguments (which follow
    the tensors), and the constexpr and compile-option keywords."""

    grid: tuple
    ints: tuple
    constexprs: dict


LAUNCHERS = []  # every CachedLaunch, in the order the kernel modules define them


class DirectLaunchFallbackWarning(RuntimeWarning):
    """A kernel's direct launch raised; the kernel takes Triton's own launch path from now on."""


class CachedLaunch:
    """``kernel.launch(cache_key, tensors, floats, bind)`` runs the wrapped JIT function with
    the arguments ``*tensors, *ints, *floats, **constexprs`` on ``grid``, where
    ``(grid, ints, constexprs) = bind()``; bind is called only when cache_key is new (or on
    Triton's own path). The kernel's parameters must come in that order."""

    def __init__(self, jit_fn):
        self.jit_fn = jit_fn
        LAUNCHERS.append(self)
        self._compiled = {}  # (device, cache_key) -> (kernel, grid, ints, constexpr values)
        self._unproven = {}  # the same, for variants yet to prove themselves (PROVE_LAUNCHES)
        self.proven = 0  # variants that passed their proof
        self._fell_back = False  # a direct launch raised or failed its proof: nothing is cached

    def launch(self, cache_key, tensors, floats, bind):
        if launches_traced():
            bound = bind()
            torch.library.wrap_triton(self.jit_fn)[bound.grid](
                *tensors, *bound.ints, *floats, **bound.constexprs)
            return
        if not LAUNCH_DIRECTLY:
            self._through_triton(bind(), tensors, floats)
            return
        device = driver.active.get_current_device()
        entry = self._compiled.get((device, cache_key))
        if entry is None:
            self._launch_uncached((device, cache_key), bind, tensors, floats)
            return
        for tensor in tensors:
            if tensor.data_ptr() % 16:  # compiled for aligned tensors: not this call
                self._through_triton(bind(), tensors, floats)
                return
        try:
            _run(entry, device, tensors, floats)
        except Exception as error:
            # Relaunching assumes the failed call launched nothing; only an exit hook that
            # raises could break that, and it raises again on Triton's path.
            self._fall_back(error)
            self._through_triton(bind(), tensors, floats)

    def _through_triton(self, bound: Launch, tensors, floats):
        return self.jit_fn[bound.grid](*tensors, *bound.ints, *floats, **bound.constexprs)

    def _launch_uncached(self, key, bind, tensors, floats):
        """A call whose variant has no trusted entry: it compiles, or proves itself."""
        entry = self._unproven.pop(key, None)
        if entry is None:
            self._compile(key, bind(), tensors, floats)
        else:
            bound = bind()
            proved = (self._prove(entry, key[0], bound, tensors, floats)
                      if self._provable(tensors) else None)
            if proved:
                self._compiled[key] = entry  # direct from the next call on
            elif proved is None:
                self._unproven[key] = entry  # a later call proves it
            self._through_triton(bound, tensors, floats)

    @staticmethod
    def _provable(tensors) -> bool:
        """Whether this call can carry a proof: aligned tensors, small enough to copy, and no
        CUDA graph being captured (the comparison waits for the GPU)."""
        unique = {id(tensor): tensor for tensor in tensors}.values()
        return (all(tensor.data_ptr() % 16 == 0 for tensor in unique)
                and sum(tensor.nbytes for tensor in unique) <= PROOF_MAX_BYTES
                and not (tensors[0].is_cuda and torch.cuda.is_current_stream_capturing()))

    def _prove(self, entry, device, bound: Launch, tensors, floats) -> Optional[bool]:
        """Launch Triton's path and the direct path on two copies of the call's tensors, and
        compare the copies bit for bit: True if they agree; False if not, after falling back
        with a warning; None if the copies did not fit in memory this time."""
        try:
            through_triton, direct = _copies(tensors), _copies(tensors)
        except torch.OutOfMemoryError:
            return None
        self._through_triton(bound, through_triton, floats)
        try:
            _run(entry, device, direct, floats)
            if not all(map(_same_bits, through_triton, direct)):
                raise RuntimeError("its results differ from Triton's launch of the same "
                                   "arguments")
        except Exception as error:
            self._fall_back(error)
            return False
        self.proven += 1
        return True

    def _compile(self, key, bound: Launch, tensors, floats):
        """Launch through Triton, and remember the compiled kernel if every tensor is aligned."""
        kernel = self._through_triton(bound, tensors, floats)
        if self._fell_back or kernel is None or any(tensor.data_ptr() % 16 for tensor in tensors):
            return
        try:
            self._remember(key, kernel, bound, len(tensors) + len(floats))
        except Exception as error:
            self._fall_back(error)

    def _remember(self, key, kernel, bound: Launch, tensors_and_floats: int):
        if hasattr(kernel, "result"):  # compiled asynchronously
            kernel = kernel.result()
        # The compiled kernel takes every parameter in order, constexprs included.
        tail_params = self.jit_fn.params[tensors_and_floats + len(bound.ints):]
        assert all(param.is_constexpr for param in tail_params), \
            "tensors, ints, floats, then constexprs: the kernel's parameters in another order"
        entries = self._unproven if PROVE_LAUNCHES else self._compiled
        if len(entries) >= MAX_CACHED:
            entries.clear()
        grid = tuple(bound.grid) + (1,) * (3 - len(bound.grid))
        entries[key] = (kernel, grid, bound.ints,
                        tuple(bound.constexprs[param.name] for param in tail_params))

    def _fall_back(self, error: Exception):
        self._fell_back = True
        self._compiled.clear()
        self._unproven.clear()
        warnings.warn(f"tritonbn: launching {self.jit_fn.__name__} directly failed on Triton "
                      f"{triton.__version__} ({type(error).__name__}: {error}); it takes "
                      f"Triton's own launch path from now on. TRITONBN_DIRECT_LAUNCH=0 sends "
                      f"every kernel there.", DirectLaunchFallbackWarning)


def _run(entry, device, tensors, floats):
    """Hand a compiled kernel straight to its launcher, as Triton's own path would."""
    kernel, grid, ints, tail = entry
    stream = driver.active.get_current_stream(device)
    enter_hook = _active(knobs.runtime.launch_enter_hook)
    exit_hook = _active(knobs.runtime.launch_exit_hook)
    metadata = (None if enter_hook is None and exit_hook is None else
                kernel.launch_metadata(grid, stream, *tensors, *ints, *floats, *tail))
    kernel.run(*grid, stream, kernel.function, kernel.packed_metadata, metadata,
               enter_hook, exit_hook, *tensors, *ints, *floats, *tail)


def _copies(tensors) -> tuple:
    """A copy of each tensor with its sizes and strides; a tensor passed twice is copied once,
    so the copies alias as the originals do."""
    made = {}
    for tensor in tensors:
        if id(tensor) not in made:
            made[id(tensor)] = torch.empty_strided(
                tensor.size(), tensor.stride(), dtype=tensor.dtype,
                device=tensor.device).copy_(tensor)
    return tuple(made[id(tensor)] for tensor in tensors)


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

    def counted(self, *args):
        nonlocal count
        count += 1
        return original(self, *args)

    CachedLaunch.launch = counted
    try:
        fn()
    finally:
        CachedLaunch.launch = original
    return count
