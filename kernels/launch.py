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
"""
import os
from typing import NamedTuple

import torch
from triton import knobs
from triton.runtime import driver

# Triton decides at import time whether its kernels are interpreted; so do we.
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Cache keys follow the NVIDIA backend's specialisation; others specialise on more (AMD:
# whether a tensor's storage is under 2 GB), so they keep Triton's own launch path.
LAUNCH_DIRECTLY = not INTERPRETING and torch.version.hip is None
# Each input shape adds entries: start over past this many.
MAX_CACHED = 4096


def _active(hook):
    """The launch hook to hand to the launcher, or None. Triton keeps an empty HookChain rather
    than None when no profiler is attached; passing None spares two calls per launch."""
    return None if hook is None or getattr(hook, "calls", None) == [] else hook


class Launch(NamedTuple):
    """What a launcher works out once per cache key: the grid, the int arguments (which follow
    the tensors), and the constexpr and compile-option keywords."""

    grid: tuple
    ints: tuple
    constexprs: dict


class CachedLaunch:
    """``kernel.launch(cache_key, tensors, floats, bind)`` runs the wrapped JIT function with
    the arguments ``*tensors, *ints, *floats, **constexprs`` on ``grid``, where
    ``(grid, ints, constexprs) = bind()``; bind is called only when cache_key is new (or on
    Triton's own path). The kernel's parameters must come in that order."""

    def __init__(self, jit_fn):
        self.jit_fn = jit_fn
        self._compiled = {}  # (device, cache_key) -> (kernel, grid, ints, constexpr values)

    def launch(self, cache_key, tensors, floats, bind):
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
        stream = driver.active.get_current_stream(device)
        enter_hook = _active(knobs.runtime.launch_enter_hook)
        exit_hook = _active(knobs.runtime.launch_exit_hook)
        metadata = (None if enter_hook is None and exit_hook is None else
                    kernel.launch_metadata(grid, stream, *tensors, *ints, *floats, *tail))
        kernel.run(*grid, stream, kernel.function, kernel.packed_metadata, metadata, enter_hook,
                   exit_hook, *tensors, *ints, *floats, *tail)

    def _through_triton(self, bound: Launch, tensors, floats):
        return self.jit_fn[bound.grid](*tensors, *bound.ints, *floats, **bound.constexprs)

    def _compile(self, key, bound: Launch, tensors, floats):
        """Launch through Triton, and remember the compiled kernel if every tensor is aligned."""
        kernel = self._through_triton(bound, tensors, floats)
        if kernel is None or any(tensor.data_ptr() % 16 for tensor in tensors):
            return
        if hasattr(kernel, "result"):  # compiled asynchronously
            kernel = kernel.result()
        # The compiled kernel takes every parameter in order, constexprs included.
        tail_params = self.jit_fn.params[len(tensors) + len(bound.ints) + len(floats):]
        assert all(param.is_constexpr for param in tail_params), \
            "tensors, ints, floats, then constexprs: the kernel's parameters in another order"
        if len(self._compiled) >= MAX_CACHED:
            self._compiled.clear()
        grid = tuple(bound.grid) + (1,) * (3 - len(bound.grid))
        self._compiled[key] = (kernel, grid, bound.ints,
                               tuple(bound.constexprs[param.name] for param in tail_params))


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
