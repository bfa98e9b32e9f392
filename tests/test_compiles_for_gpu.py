"""Every kernel variant the launchers ask for compiles for an H100 (sm_90), offline.

Triton's interpreter runs the kernels' Python, not Triton's compiler, so code it accepts can
still fail to compile (a None where the compiler wants a typed value, a loop-carried variable
that changes shape). This test drives the real launchers on CPU tensors in a subprocess
without the interpreter, replaces each launch with triton.compile(...) for sm_90 on the
signature and constexprs that launch would have used, and compiles each variant once, down
to PTX and cubin with the ptxas bundled in Triton's wheel. No GPU is needed. The PTX must hold
none of the approximate float32 instructions `/` and tl.exp would give (div.full, ex2.approx
without libdevice's ftz form): the kernels divide and exponentiate as eager does.
"""
import os
import subprocess
import sys

import pytest
import torch

SCRIPT = r'''
import itertools
import re

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from tritonbn import kernels
from tritonbn.activations import SUPPORTED_ACTIVATIONS, activation_spec
from tritonbn.kernels import launch

POINTER_TYPES = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16",
                 torch.float64: "*fp64", torch.int32: "*i32", torch.int64: "*i64"}
APPROXIMATE = re.compile(r"\bdiv\.full\.f32|\bex2\.approx\.f32")
compiled = set()


def argument_type(value):
    if isinstance(value, torch.Tensor):
        return POINTER_TYPES[value.dtype]
    if isinstance(value, float):
        return "fp32"
    return "i32" if -2**31 <= value < 2**31 else "i64"


def compile_for_sm90(self, bound, tensors, floats):
    """In place of a launch: compile what it would have launched, once per variant."""
    constexprs = dict(bound.constexprs)
    options = {"num_warps": constexprs.pop("num_warps")}
    values = (*tensors, *bound.ints, *floats)
    signature = {param.name: argument_type(value)
                 for param, value in zip(self.jit_fn.params, values)}
    signature.update((name, "constexpr") for name in constexprs)
    key = (self.jit_fn.__name__, tuple(signature.items()),
           tuple((name, str(value)) for name, value in constexprs.items()))
    if key not in compiled:
        kernel = triton.compile(ASTSource(self.jit_fn, signature, constexprs),
                                target=GPUTarget("cuda", 90, 32), options=options)
        approximate = set(APPROXIMATE.findall(kernel.asm["ptx"]))
        assert not approximate, (self.jit_fn.__name__, constexprs, approximate)
        compiled.add(key)


launch.LAUNCH_DIRECTLY = False
launch.CachedLaunch._through_triton = compile_for_sm90


def every_launcher(dtype, layout, activation, kwargs, residual, affine, momentum):
    """One call of each launcher, training and eval, as the modules and SyncBatchNormAct
    make them."""
    x = torch.randn(4, 6, 5, 3, dtype=dtype).contiguous(memory_format=layout)
    r = torch.randn_like(x) if residual else None
    params = dtype if dtype == torch.float64 else torch.float32
    weight, bias = ((torch.rand(6, dtype=params), torch.randn(6, dtype=params)) if affine
                    else (None, None))
    running_mean, running_var = torch.zeros(6, dtype=params), torch.ones(6, dtype=params)
    tracked = torch.zeros((), dtype=torch.int64)
    code, param = activation_spec(activation, kwargs)
    dy = torch.randn_like(x)
    mean, var = kernels.batch_stats(x, running_mean, running_var, momentum, tracked)
    kernels.batch_stats(x, None, None, momentum)
    for training, (m, v) in ((True, (mean, var)), (False, (running_mean, running_var))):
        kernels.normalize_act(x, m, v, weight, bias, r, 1e-5, code, param)
        kernels.normalize_act_backward(dy, x, m, v, weight, bias, r, 1e-5, training, code,
                                       param)
    sums, dresidual = kernels.grad_reduce(dy, x, mean, var, weight, bias, r, 1e-5, code, param)
    kernels.grad_input(dy, x, mean, var, weight, bias, r, dresidual, sums, x.numel() // 6,
                       1e-5, code, param)


cases = [(torch.float32, torch.channels_last, name, {}, False, True, 0.1)
         for name in SUPPORTED_ACTIVATIONS]
cases += [(torch.float32, torch.channels_last, "leaky_relu", {"negative_slope": 0.2}, False,
           True, 0.1), (torch.float32, torch.channels_last, "gelu", {"approximate": "tanh"},
                        True, True, 0.1)]
cases += [(dtype, layout, "relu", {}, residual, affine, momentum)
          for dtype, layout, residual, affine, momentum in itertools.product(
              (torch.float32, torch.float16, torch.bfloat16, torch.float64),
              (torch.channels_last, torch.contiguous_format), (False, True), (True, False),
              (0.1, None))
          if (dtype == torch.float32) or (layout == torch.channels_last and affine)]
for case in cases:
    every_launcher(*case)
print(f"compiled {len(compiled)} kernel variants for sm_90")
'''


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU compiles the kernels in its tests")
def test_every_kernel_variant_compiles_for_sm90():
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr[-5000:]
    assert "kernel variants for sm_90" in done.stdout
