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
    try:
        module = importlib.import_module(f".{_LAUNCHERS[name]}", __name__)
    except ImportError as error:  # no Triton: hasattr() says False, a call says why
        raise AttributeError(f"{__name__}.{name} needs Triton: {error}") from error
    launcher = globals()[name] = getattr(module, name)  # found directly from now on
    return launcher


def __dir__():
    return sorted({*globals(), *_LAUNCHERS})
