"""Compiling the kernels for GPUs this machine does not have, from the launches the launchers
make.

Triton's interpreter runs the kernels' Python, not Triton's compiler: code it accepts can still
fail to compile (a None where the compiler wants a typed value, a loop-carried variable that
changes shape). Inside `launches_compiled(targets)` the real launchers run on CPU tensors with
Triton not interpreting (TRITON_INTERPRET unset), and each launch, instead of running, is
specialised as Triton's own launch specialises it (the binder Triton builds for the kernel:
dtypes, 16-byte alignment, ints divisible by 16 or equal to 1) and compiled for each target
with triton.compile, once per variant. NVIDIA targets go down to cubin with the ptxas in
Triton's wheel (ptxas-blackwell for sm_100), AMD ones to hsaco with the LLVM inside Triton: no
GPU, CUDA toolkit or ROCm is needed, and nothing runs, so tensors may be torch.empty. The
binder and `JITFunction._pack_args` are Triton internals, as the direct launch path's are.

Run as a script, it compiles what tests/test_compiles_for_gpu.py checks: every variant the
launchers ask for (each activation, dtype, layout, residual, affine and momentum case) for
sm_90, and a representative subset for the other targets, and fails on an instruction that
approximates a division or an exponential where eager's are exact or correctly rounded (PTX's
div.full and ex2.approx without libdevice's ftz form; fast-math flags on an AMD division or
call).

    python perf/offline_compile.py                             # what the test compiles
    python perf/offline_compile.py --targets sm_100,gfx942 --every-variant
"""
import argparse
import contextlib
import itertools
import re
import sys
from typing import NamedTuple

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature

from tritonbn import kernels
from tritonbn.activations import SUPPORTED_ACTIVATIONS, activation_spec
from tritonbn.kernels import launch, tiling

TARGETS = {"sm_80": GPUTarget("cuda", 80, 32), "sm_89": GPUTarget("cuda", 89, 32),
           "sm_90": GPUTarget("cuda", 90, 32), "sm_100": GPUTarget("cuda", 100, 32),
           "gfx90a": GPUTarget("hip", "gfx90a", 64), "gfx942": GPUTarget("hip", "gfx942", 64)}
# Where each backend's approximate float32 arithmetic would show. On AMD, tl.exp is exp2 of a
# rounded product (off by ~1.2 |z| ulps, as NVIDIA's is), and `/` is IEEE division unless a
# fast-math flag says otherwise.
APPROXIMATE = {
    "cuda": ("ptx", re.compile(r"\bdiv\.full\.f32|\bex2\.approx\.f32")),
    "hip": ("llir", re.compile(r"@llvm\.exp2\.f32|= fdiv (?:\w+ )*(?:afn|arcp|fast)\b")),
}


class CompiledLaunch(NamedTuple):
    """One launch, compiled for one target instead of run."""

    target: str
    kernel: triton.compiler.CompiledKernel  # the same object for every launch of a variant
    name: str  # the kernel function's name
    grid: tuple
    arguments: dict  # parameter name -> value, constexprs included
    signature: dict  # parameter name -> Triton type ("*bf16", "i32", "constexpr", ...)


@contextlib.contextmanager
def launches_compiled(targets, sms: int | None = None):
    """Inside, every launch compiles for each of targets (names in TARGETS) instead of running;
    yields the list that each launch appends its CompiledLaunch to, one per target. sms: the
    SM count the launch plans are made for (the interpreter's otherwise)."""
    backends = {name: make_backend(TARGETS[name]) for name in targets}
    binders, variants, launches = {}, {}, []

    def compile_launch(self, bound, arguments):
        for name, backend in backends.items():
            fn = self.jit_fn
            if (name, fn) not in binders:
                binders[name, fn] = create_function_from_signature(fn.signature, fn.params,
                                                                   backend)
            bound_arguments, specialization, options = binders[name, fn](
                **arguments, **bound.constants)
            key = (name, fn, str(specialization), str(options))
            if key not in variants:
                options, signature, constexprs, attrs = fn._pack_args(
                    backend, options, bound_arguments, specialization, options)
                variants[key] = (triton.compile(ASTSource(fn, signature, constexprs, attrs),
                                                target=TARGETS[name], options=options.__dict__),
                                 signature)
            kernel, signature = variants[key]
            launches.append(CompiledLaunch(name, kernel, fn.__name__, tuple(bound.grid),
                                           bound_arguments, signature))

    saved = launch.LAUNCH_DIRECTLY, launch.CachedLaunch._through_triton, tiling.INTERPRETER_SMS
    launch.LAUNCH_DIRECTLY = False
    launch.CachedLaunch._through_triton = compile_launch
    tiling.INTERPRETER_SMS = sms or tiling.INTERPRETER_SMS
    try:
        yield launches
    finally:
        launch.LAUNCH_DIRECTLY, launch.CachedLaunch._through_triton, tiling.INTERPRETER_SMS = saved


def approximate_instructions(compiled: CompiledLaunch) -> set:
    stage, pattern = APPROXIMATE[TARGETS[compiled.target].backend]
    return set(pattern.findall(compiled.kernel.asm[stage]))


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


# (dtype, layout, activation, its kwargs, residual, affine, momentum) for every_launcher.
EVERY_CASE = [(torch.float32, torch.channels_last, name, {}, False, True, 0.1)
              for name in SUPPORTED_ACTIVATIONS]
EVERY_CASE += [(torch.float32, torch.channels_last, "leaky_relu", {"negative_slope": 0.2},
                False, True, 0.1),
               (torch.float32, torch.channels_last, "gelu", {"approximate": "tanh"}, True,
                True, 0.1)]
EVERY_CASE += [(dtype, layout, "relu", {}, residual, affine, momentum)
               for dtype, layout, residual, affine, momentum in itertools.product(
                   (torch.float32, torch.float16, torch.bfloat16, torch.float64),
                   (torch.channels_last, torch.contiguous_format), (False, True),
                   (True, False), (0.1, None))
               if (dtype == torch.float32) or (layout == torch.channels_last and affine)]
# For the other targets: the low-precision and float32 paths, both layouts, the residual, the
# cumulative momentum, and an activation built on exp, log and division.
SUBSET = [(torch.bfloat16, torch.channels_last, "relu", {}, True, True, 0.1),
          (torch.float32, torch.contiguous_format, "mish", {}, False, True, None)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", default=",".join(TARGETS),
                        help=f"comma-separated, of {', '.join(TARGETS)} (default: all)")
    parser.add_argument("--every-variant", action="store_true",
                        help="every case for every target (default: every case for sm_90, "
                             "a subset for the others)")
    args = parser.parse_args(argv)
    targets = args.targets.split(",")
    unknown = set(targets) - set(TARGETS)
    if unknown:
        parser.error(f"unknown targets {sorted(unknown)}: expected some of {list(TARGETS)}")
    every = [t for t in targets if args.every_variant or t == "sm_90"]
    runs = [(every, EVERY_CASE), ([t for t in targets if t not in every], SUBSET)]
    failures = []
    for run_targets, cases in runs:
        if not run_targets:
            continue
        with launches_compiled(run_targets) as launches:
            for case in cases:
                every_launcher(*case)
        for target in run_targets:
            variants = {id(c.kernel): c for c in launches if c.target == target}.values()
            failures += [(c.target, c.name, approximate_instructions(c)) for c in variants
                         if approximate_instructions(c)]
            print(f"{target}: compiled {len(variants)} kernel variants of {len(cases)} cases")
    for failure in failures:
        print("approximate arithmetic:", *failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
