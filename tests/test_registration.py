"""The torch.library registration: opcheck on every op, torch.compile(fullgraph=True) through
a small model, and proof that the Triton kernels (not the reference) run on the CPU."""
import copy
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import tritonbn
from tritonbn import dispatch, kernels, ops, reference
from tritonbn.activations import activation_spec
from conftest import DEVICE, ON_GPU, make_input, make_params


SHAPES = {"4d-channels_last": ((3, 4, 5, 2), "channels_last"), "2d": ((5, 3), "contiguous")}


@pytest.mark.parametrize("running", [True, False], ids=["running", "no-running"])
@pytest.mark.parametrize("shape", SHAPES)
def test_opcheck_batch_stats(shape, running):
    shape, layout = SHAPES[shape]
    x = make_input(shape, layout=layout)
    _, _, running_mean, running_var = make_params(shape[1])
    stats = (running_mean, running_var) if running else (None, None)
    torch.library.opcheck(ops.batch_stats, (x, *stats, None, 0.1))


@pytest.mark.parametrize("affine, residual", [(True, False), (False, False), (True, True)],
                         ids=["affine", "no-affine", "residual"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", SHAPES)
def test_opcheck_normalize_act(shape, training, affine, residual):
    """Both differentiable ops, with a parametrised activation (leaky_relu's slope)."""
    shape, layout = SHAPES[shape]
    x = make_input(shape, layout=layout)
    weight, bias, running_mean, running_var = make_params(shape[1])
    stats = (ops.batch_stats(x, None, None, None, 0.1) if training
             else (running_mean, running_var))
    params = (weight, bias) if affine else (None, None)
    r = make_input(shape) if residual else None
    code, param = activation_spec("leaky_relu", {"negative_slope": 0.2})
    leaves = [None if t is None else t.clone().requires_grad_() for t in (x, *params, r)]
    torch.library.opcheck(ops.normalize_act, (leaves[0], *stats, *leaves[1:3], leaves[3], 1e-5,
                                              training, code, param))
    torch.library.opcheck(ops.normalize_act_backward, (torch.randn_like(x), x, *stats, *params,
                                                       r, 1e-5, training, code, param))


class ConvNet(nn.Module):
    """Convolutions around three fused layers: SiLU, a residual block with a parametrised
    activation, and a sigmoid."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = tritonbn.BatchNormAct2d(8, activation="silu")
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = tritonbn.BatchNormAct2d(8, activation="leaky_relu",
                                           activation_kwargs={"negative_slope": 0.2})
        self.conv3 = nn.Conv2d(8, 4, 3, padding=1)
        self.bn3 = tritonbn.BatchNormAct2d(4, activation="sigmoid")

    def forward(self, x):
        h = self.bn1(self.conv1(x))
        h = self.bn2(self.conv2(h), residual=h)
        return self.bn3(self.conv3(h))


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["inductor", "aot_eager"])
def test_compile_fullgraph_matches_eager(backend):
    """aot_eager checks the capture (fullgraph, fake tensors, autograd); Inductor also lays out
    and reinplaces the graph around our ops (C++ code for the rest of it on the CPU)."""
    eager = ConvNet().to(DEVICE).to(memory_format=torch.channels_last)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True, backend=backend)
    for _ in range(2):
        x = make_input((2, 3, 6, 6), layout="channels_last", requires_grad=True)
        y_eager, y_compiled = eager(x), compiled(x)
        torch.testing.assert_close(y_compiled, y_eager, atol=1e-5, rtol=1e-5)
        dy = torch.randn_like(y_eager)
        grads_eager = torch.autograd.grad(y_eager, [x, *eager.parameters()], dy)
        grads_compiled = torch.autograd.grad(y_compiled, [x, *compiled_model.parameters()], dy)
        for g_e, g_c in zip(grads_eager, grads_compiled):
            torch.testing.assert_close(g_c, g_e, atol=1e-4, rtol=1e-4)
    for (name, b_e), (_, b_c) in zip(eager.named_buffers(), compiled_model.named_buffers()):
        torch.testing.assert_close(b_c, b_e, atol=1e-6, rtol=1e-5, msg=name)
    assert compiled_model.bn1.num_batches_tracked.item() == 2
    eager.eval()
    compiled_model.eval()
    x = make_input((2, 3, 6, 6), layout="channels_last")
    torch.testing.assert_close(compiled(x), eager(x), atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(ON_GPU, reason="the interpreter path is for machines without a GPU")
def test_triton_kernels_run_under_the_interpreter(monkeypatch):
    """With TRITON_INTERPRET=1 the CPU path is the Triton kernels: the reference must not run,
    the launchers must, and the kernels must be the interpreter's."""
    import triton.runtime.interpreter as interpreter

    def forbidden(*args, **kwargs):
        raise AssertionError("the PyTorch reference ran instead of the Triton kernels")

    calls = []

    def counted(fn):
        def wrapper(*args, **kwargs):
            calls.append(fn.__name__)
            return fn(*args, **kwargs)
        return wrapper

    for name in ("batch_stats", "normalize_act", "normalize_act_backward"):
        monkeypatch.setattr(reference, name, forbidden)
        monkeypatch.setattr(kernels, name, counted(getattr(kernels, name)))
    assert dispatch.INTERPRETING and dispatch.runs_triton(torch.empty(1))
    assert isinstance(kernels.forward._normalize_kernel.jit_fn, interpreter.InterpretedFunction)
    m = tritonbn.BatchNormAct2d(3)
    x = make_input((2, 3, 4, 4), requires_grad=True)
    m(x).sum().backward()
    assert calls == ["batch_stats", "normalize_act", "normalize_act_backward"]


@pytest.mark.slow
@pytest.mark.skipif(ON_GPU, reason="checks the CPU path without the interpreter")
def test_cpu_without_interpreter_runs_the_reference():
    """Eager calls run PyTorch's native ops (the same bits as nn.BatchNorm1d + ReLU, no
    reference launcher called); torch.compile runs the registered ops, on the reference."""
    script = ("import torch, tritonbn\n"
              "from tritonbn import dispatch, reference\n"
              "assert not dispatch.INTERPRETING and not dispatch.runs_triton(torch.empty(1))\n"
              "m, ref = tritonbn.BatchNormAct1d(3), torch.nn.BatchNorm1d(3)\n"
              "x = torch.randn(8, 3, 5, requires_grad=True)\n"
              "launchers = reference.batch_stats, reference.normalize_act\n"
              "reference.batch_stats = reference.normalize_act = None\n"
              "y, y_ref = m(x), torch.relu(ref(x))\n"
              "assert torch.equal(y, y_ref) and torch.equal(m.running_var, ref.running_var)\n"
              "assert torch.equal(torch.autograd.grad(y, x, y)[0],\n"
              "                   torch.autograd.grad(y_ref, x, y)[0])\n"
              "reference.batch_stats, reference.normalize_act = launchers\n"
              # The registered ops' bodies run without autograd, the reference's backward too.
              "y = torch.compile(m, fullgraph=True, backend='aot_eager')(x)\n"
              "dx, = torch.autograd.grad(y, x, y)\n"
              "x64 = x.detach().double().requires_grad_()\n"
              "y64 = torch.relu(ref.double()(x64))\n"
              "torch.testing.assert_close(dx, torch.autograd.grad(y64, x64, y64)[0].float())\n")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=300)
