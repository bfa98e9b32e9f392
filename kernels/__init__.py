"""Triton kernels for fused BatchNorm + activation, installed as ``tritonbn.kernels``.

Importing the package imports no Triton: ``activation_codes``, ``dtypes`` and ``layout`` are
plain PyTorch, for callers that run without Triton. The launchers load Triton on first use.
"""
import importlib
import os

# Triton decides when it is imported whether its kernels are interpreted, from this variable.
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"

_LAUNCHERS = {"batch_stats": "forward", "normalize_act": "forward",
              "grad_input": "backward", "grad_reduce": "backward",
              "normalize_act_backward": "backward"}

__all__ = sorted(_LAUNCHERS)


def __getattr__(name: str):
    if name not in _LAUNCHERS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    launcher = getattr(importlib.import_module(f".{_LAUNCHERS[name]}", __name__), name)
    globals()[name] = launcher  # found directly from now on
    return launcher
