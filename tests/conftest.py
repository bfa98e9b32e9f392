"""Shared test setup. Without a GPU the Triton kernels run on CPU tensors through Triton's
interpreter, which must be switched on before anything imports triton."""
import os
import random

import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from tritonbn import dispatch, reference  # noqa: E402
from tritonbn.activations import (SUPPORTED_ACTIVATIONS, activation_spec,  # noqa: E402
                                  eager_activation)

DEVICE = torch.device("cuda" if ON_GPU else "cpu")


def _round_bfloat16_as_a_gpu_does():
    """Triton's interpreter (3.7) casts float32 to bfloat16 by truncation, where the GPU code
    rounds to nearest even (cvt.rn.bf16.f32), as PyTorch does: results then differ by up to
    an ulp per cast from what the kernels give on a GPU. The tests judge the kernels' rounding
    against eager's, so under the interpreter that cast rounds as on a GPU."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    truncating = getattr(interpreter.InterpreterBuilder, "cast_impl", None)
    if truncating is None:  # another Triton: its casts are as they are, and a test says how
        return

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            rounded = torch.from_numpy(np.asarray(src.data)).to(torch.bfloat16)
            return interpreter.TensorHandle(rounded.view(torch.int16).numpy().view(np.uint16),
                                            dst_type.scalar)
        return truncating(self, src, dst_type)

    interpreter.InterpreterBuilder.cast_impl = cast_impl


if dispatch.INTERPRETING:
    _round_bfloat16_as_a_gpu_does()
# Every activation, and the keyword arguments that change what it computes.
ACTIVATION_CASES = [(name, {}) for name in SUPPORTED_ACTIVATIONS] + [
    ("leaky_relu", {"negative_slope": 0.2}), ("elu", {"alpha": 0.6}),
    ("gelu", {"approximate": "tanh"})]
LAYOUTS = ("contiguous", "channels_last")

gpu_only = pytest.mark.gpu  # skipped without a GPU: pytest_collection_modifyitems


@pytest.fixture(autouse=True)
def fresh_seed():
    """Fresh random inputs every run; the seed is printed so a failure can be replayed."""
    seed = int(os.environ.get("TRITONBN_SEED", random.randrange(2**31)))
    print(f"TRITONBN_SEED={seed}")
    torch.manual_seed(seed)


def memory_format(layout: str, ndim: int):
    if layout == "channels_last" and ndim == 4:
        return torch.channels_last
    if layout == "channels_last" and ndim == 5:
        return torch.channels_last_3d
    return torch.contiguous_format


def make_input(shape, dtype=torch.float32, layout="contiguous", offset=0.0, scale=1.0,
               requires_grad=False):
    """Random normal input on DEVICE in the given layout (channels_last is moot below 4-D)."""
    x = torch.randn(shape, dtype=torch.float64) * scale + offset
    x = x.to(DEVICE, dtype).contiguous(memory_format=memory_format(layout, len(shape)))
    return x.requires_grad_(requires_grad)


def make_params(C, dtype=torch.float32):
    """weight, bias, running_mean, running_var: random, non-trivial."""
    weight = (torch.rand(C, dtype=torch.float64) + 0.5).to(DEVICE, dtype)
    bias = torch.randn(C, dtype=torch.float64).to(DEVICE, dtype)
    running_mean = torch.randn(C, dtype=torch.float64).to(DEVICE, dtype)
    running_var = (torch.rand(C, dtype=torch.float64) + 0.5).to(DEVICE, dtype)
    return weight, bias, running_mean, running_var


def case_id(case) -> str:
    name, kwargs = case
    return name + "".join(f"-{key}={value}" for key, value in kwargs.items())


def eager_act(activation, activation_kwargs=None):
    """The eager PyTorch function of an activation name and its kwargs."""
    return eager_activation(activation_spec(activation, activation_kwargs))


@pytest.fixture(params=["triton", "reference"])
def backend(request, monkeypatch):
    """Runs a test against the Triton kernels (interpreter or GPU) and against reference.py."""
    if request.param == "reference":
        monkeypatch.setattr(dispatch, "backend", lambda x: reference)
    return request.param


def float64_bn_act(x, running_mean, running_var, weight, bias, training, momentum, eps,
                   activation, activation_kwargs=None, residual=None):
    """Ground truth: PyTorch's batch_norm in float64 on copies, plus the residual, then the
    activation. Returns (y, running_mean, running_var) in float64; gradients flow to the
    float64 leaves the caller passes in."""
    def as64(t):
        return None if t is None else t.detach().double().clone()
    rm, rv = as64(running_mean), as64(running_var)
    y = F.batch_norm(x.double() if x.dtype != torch.float64 else x, rm, rv,
                     None if weight is None else weight.double(),
                     None if bias is None else bias.double(), training, momentum, eps)
    if residual is not None:
        y = y + residual.double()
    return eager_act(activation, activation_kwargs)(y), rm, rv


def max_err(a, b) -> float:
    return (a.double() - b.double()).abs().max().item()


def pytest_collection_modifyitems(config, items):
    """Skip the tests marked gpu where there is none; `pytest -m gpu` selects them."""
    if ON_GPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


import tritonbn  # noqa: E402  (after TRITON_INTERPRET is set)

# name -> torch.nn.functional's function of that name (identity has none), for every name
# tritonbn supports: tests widen with the list, and a name PyTorch lacks fails at collection.
EAGER_ACTIVATIONS = {name: (lambda t: t) if name == "identity" else getattr(F, name)
                     for name in tritonbn.SUPPORTED_ACTIVATIONS}
