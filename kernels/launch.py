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
``packed_metadata``, ``launch_metadata``, ``JITFunction.params``) that any release may change,
so it runs only on the Triton versions in VALIDATED_TRITON_VERSIONS; every other version takes
Triton's own path. ``TRITONBN_DIRECT_LAUNCH=0`` forces Triton's path; ``=1`` takes the direct
path on an unlisted version too, which is how a GPU run validates one (``tests/test_launch.py``
compares the two paths there). A kernel whose direct launch raises warns once and takes
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
from typing import NamedTuple

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


def direct_launches(setting: str, triton_version: str, interpreting: bool, hip: bool) -> bool:
    """Whether to launch compiled kernels directly. setting: TRITONBN_DIRECT_LAUNCH's value,
    "" when unset. Cache keys follow the NVIDIA backend's specialisation; others specialise on
    more (AMD: whether a tensor's storage is under 2 GB), so they keep Triton's own path."""
    if setting not in ("", "0", "1"):
        raise ValueError(f"TRITONBN_DIRECT_LAUNCH must be 0, 1 or unset, not {setting!r}")
    if interpreting or hip or setting == "0":
        return False
    minor = ".".join(triton_version.split(".")[:2])
    return setting == "1" or minor in VALIDATED_TRITON_VERSIONS


LAUNCH_DIRECTLY = direct_launches(os.environ.get("TRITONBN_DIRECT_LAUNCH", ""),
                                  triton.__version__, INTERPRETING, torch.version.hip is not None)
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
        self._fell_back = False  # a direct launch raised: nothing is cached any more

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
            self._compile((device, cache_key), bind(), tensors, floats)
            return
        for tensor in tensors:
            if tensor.data_ptr() % 16:  # compiled for aligned tensors: not this call
                self._through_triton(bind(), tensors, floats)
                return
        kernel, grid, ints, tail = entry
        try:
            stream = driver.active.get_current_stream(device)
            enter_hook = _active(knobs.runtime.launch_enter_hook)
            exit_hook = _active(knobs.runtime.launch_exit_hook)
            metadata = (None if enter_hook is None and exit_hook is None else
                        kernel.launch_metadata(grid, stream, *tensors, *ints, *floats, *tail))
            kernel.run(*grid, stream, kernel.function, kernel.packed_metadata, metadata,
                       enter_hook, exit_hook, *tensors, *ints, *floats, *tail)
        except Exception as error:
            # Relaunching assumes the failed call launched nothing; only an exit hook that
            # raises could break that, and it raises again on Triton's path.
            self._fall_back(error)
            self._through_triton(bind(), tensors, floats)

    def _through_triton(self, bound: Launch, tensors, floats):
        return self.jit_fn[bound.grid](*tensors, *bound.ints, *floats, **bound.constexprs)

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
        if len(self._compiled) >= MAX_CACHED:
            self._compiled.clear()
        grid = tuple(bound.grid) + (1,) * (3 - len(bound.grid))
        self._compiled[key] = (kernel, grid, bound.ints,
                               tuple(bound.constexprs[param.name] for param in tail_params))

    def _fall_back(self, error: Exception):
        self._fell_back = True
        self._compiled.clear()
        warnings.warn(f"tritonbn: launching {self.jit_fn.__name__} directly failed on Triton "
                      f"{triton.__version__} ({type(error).__name__}: {error}); it takes "
                      f"Triton's own launch path from now on. TRITONBN_DIRECT_LAUNCH=0 sends "
                      f"every kernel there.", DirectLaunchFallbackWarning)


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
