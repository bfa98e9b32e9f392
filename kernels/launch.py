"""Kernel launches that skip Triton's per-call argument binding once a kernel is compiled.

``jit_fn[grid](*args)`` binds, specialises and hashes every argument on every call: about
50 us of host time per launch on an H100 machine, more than the kernels themselves take on
small tensors, and six launches make a training step. ``@CachedLaunch`` wraps a
``@triton.jit`` function so that the first call for a given specialisation goes through
Triton (compiling if needed) and later calls hand the compiled kernel straight to its
launcher, as torch.compile's own Triton launchers do.

The cache key covers everything Triton specialises on (each tensor's dtype and 16-byte
alignment, each int's width, divisibility by 16 and equality to 1), the constexpr and
compile-option keywords, and the current device. Ints enter by value, which is finer than
needed and cheaper to compute; floats (eps, momentum) are not specialised, so they never
miss the cache. Under the interpreter, and on backends other than NVIDIA's, every call goes
through Triton unchanged. The direct path skips what Triton checks per call beyond
specialisation (pre-run hooks, changed globals, the debug knob), and takes keyword arguments
to be constexprs or launch options and the grid to be a tuple.
"""
import os

import torch
from triton import knobs
from triton.runtime import driver

# Triton decides at import time whether its kernels are interpreted; so do we.
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
# The key below follows the NVIDIA backend's specialisation; others specialise on more (AMD:
# whether a tensor's storage is under 2 GB), so they keep Triton's own launch path.
LAUNCH_DIRECTLY = not INTERPRETING and torch.version.hip is None
# Ints enter the key by value, so each input shape adds entries: start over past this many.
MAX_CACHED = 4096


def specialisation_key(args) -> tuple:
    """A key that changes whenever Triton's specialisation of args would: tensors by dtype and
    16-byte alignment, ints by value (finer than Triton's width, divisibility by 16 and
    equality to 1), anything else (floats) by type alone."""
    return tuple((arg.dtype, arg.data_ptr() % 16 == 0) if isinstance(arg, torch.Tensor)
                 else arg if type(arg) is int else type(arg) for arg in args)


def _active(hook):
    """The launch hook to hand to the launcher, or None. Triton keeps an empty HookChain rather
    than None when no profiler is attached; passing None spares two calls per launch."""
    return None if hook is None or getattr(hook, "calls", None) == [] else hook


class CachedLaunch:
    """``kernel[grid](*args, **constexprs_and_options)``, as for the wrapped JIT function."""

    def __init__(self, jit_fn):
        self.jit_fn = jit_fn
        self._compiled = {}  # specialisation key -> (compiled kernel, constexpr values)

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launch(grid, args, kwargs)

    def launch(self, grid, args, kwargs):
        if not LAUNCH_DIRECTLY:
            self.jit_fn[grid](*args, **kwargs)
            return
        device = driver.active.get_current_device()
        key = (device, specialisation_key(args), tuple(kwargs.items()))
        entry = self._compiled.get(key)
        if entry is None:
            kernel = self.jit_fn[grid](*args, **kwargs)
            if kernel is None:  # nothing compiled to remember
                return
            if hasattr(kernel, "result"):  # compiled asynchronously
                kernel = kernel.result()
            # The compiled kernel takes every parameter in order, constexprs included.
            tail_params = self.jit_fn.params[len(args):]
            assert all(param.is_constexpr for param in tail_params), \
                "pass tensors and runtime scalars positionally: keywords are cached as constexprs"
            if len(self._compiled) >= MAX_CACHED:
                self._compiled.clear()
            self._compiled[key] = (kernel, tuple(kwargs[param.name] for param in tail_params))
            return
        kernel, tail = entry
        stream = driver.active.get_current_stream(device)
        all_args = args + tail
        grid_1 = grid[1] if len(grid) > 1 else 1
        grid_2 = grid[2] if len(grid) > 2 else 1
        enter_hook = _active(knobs.runtime.launch_enter_hook)
        exit_hook = _active(knobs.runtime.launch_exit_hook)
        metadata = (None if enter_hook is None and exit_hook is None
                    else kernel.launch_metadata(grid, stream, *all_args))
        kernel.run(grid[0], grid_1, grid_2, stream, kernel.function, kernel.packed_metadata,
                   metadata, enter_hook, exit_hook, *all_args)
