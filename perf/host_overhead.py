"""Host time of BatchNormAct2d against nn.BatchNorm2d + nn.ReLU, alone and inside a model.

Small tensors are bound by host time: Python, torch's dispatch and autograd, the launches.
Every figure is the median of --repeats runs, the providers interleaved run by run, each run
a burst of calls with no sync in between:

- pair alone: one training forward+backward of BatchNorm2d + ReLU (eager) and of
  BatchNormAct2d (tritonbn) on a 2x64x4x4 input, where the host is all there is;
- stack (--stack): an SGD training step of 33 x (1x1 Conv, BatchNorm2d, ReLU), as built and
  after fuse_bn_act: what a pair costs inside a model;
- modes: BatchNormAct2d's training forward, training forward+backward and eval forward on
  32x64x56x56 (and eager's, with real launches), then each launcher alone;
- launches per step: Triton launches in one training forward+backward.

It ends with one line for scripts:

    host: pair_alone eager=<us> tritonbn=<us> ratio=<r>; stack eager=<ms> converted=<ms>
    ratio=<r>; launches_per_step=<n>

    python perf/host_overhead.py                 # on a GPU: real launches
    python perf/host_overhead.py --stub-launches # any machine: each compiled kernel's launch
                                                 # is a no-op; everything above it is timed
    python perf/host_overhead.py --stack         # also the Conv-BN-ReLU stack
    python perf/host_overhead.py --compiled      # also under torch.compile (fullgraph, static
                                                 # shapes): the registered ops' dispatch cost
    python perf/host_overhead.py --out host.csv  # also every figure as a CSV row (part,
                                                 # provider, mode, shape, us), after each part

With launches stubbed (always so without a GPU) the modes are timed for tritonbn's module
only, compiled or not: eager's kernels cannot be stubbed.

Without a GPU the tensors are CPU tensors routed to the Triton launchers (TRITON_INTERPRET=1),
the launches are always stubbed (the interpreter's own time would swamp the host's), and
PyTorch's CPU kernels run on one thread: on a GPU they would be launches, and threads on tiny
tensors only add noise.
"""
import argparse
import cProfile
import inspect
import os
import pstats
import statistics
import time
from datetime import date
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"  # route CPU tensors to the launchers

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

import tritonbn  # noqa: E402
from tritonbn import activations, kernels  # noqa: E402
from tritonbn.kernels import backward, forward, launch  # noqa: E402
from results_csv import ResultsCsv  # noqa: E402

STACK_PAIRS = 33  # as many as fuse_bn_act finds in ResNet-50


class _StubKernel:
    """A compiled kernel whose launch does nothing."""

    function = packed_metadata = None

    def run(self, *args):
        pass

    def launch_metadata(self, *args):
        return None


class _StubJit:
    """Stands in for a @triton.jit function: its first call per specialisation 'compiles'
    (returns a _StubKernel) and launches nothing."""

    def __init__(self, jit_fn):
        self.params = [SimpleNamespace(name=name, is_constexpr=param.annotation is tl.constexpr)
                       for name, param in inspect.signature(jit_fn.fn).parameters.items()]

    def __getitem__(self, grid):
        return lambda *args, **kwargs: _StubKernel()


def stub_launches():
    """Route every kernel through launch.CachedLaunch's direct path onto no-op kernels, so that
    all the Python above the launch is timed, the launch cache included."""
    launch.LAUNCH_DIRECTLY = True
    launch.driver = SimpleNamespace(active=SimpleNamespace(
        get_current_device=lambda: 0, get_current_stream=lambda device: 0))
    for module in (forward, backward):
        for value in vars(module).values():
            if isinstance(value, launch.CachedLaunch):
                value.jit_fn = _StubJit(value.jit_fn)


def microseconds_per_call(fn, calls: int) -> float:
    if ON_GPU:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    if ON_GPU:
        torch.cuda.synchronize()
    return elapsed / calls * 1e6


def interleaved_medians(fns: dict, calls: int, repeats: int) -> dict:
    """Median us per call of each fn over `repeats` bursts, taking the fns in turn. A value
    may be a (setup, fn) pair: setup runs untimed before each of fn's bursts."""
    fns = {name: fn if isinstance(fn, tuple) else (None, fn) for name, fn in fns.items()}
    samples = {name: [] for name in fns}
    for repeat in range(repeats + 1):  # the first round compiles, allocates, warms caches
        for name, (setup, fn) in fns.items():
            if setup is not None:
                setup()
            us = microseconds_per_call(fn, calls if repeat else 2)
            if repeat:
                samples[name].append(us)
    return {name: statistics.median(values) for name, values in samples.items()}


def fwd_bwd(module, bn, x, dy):
    """(setup, fn): one training forward+backward, to the input and bn's parameters."""
    return module.train, lambda: torch.autograd.grad(module(x), (x, bn.weight, bn.bias), dy)


def tiny_input(device, dtype, channels: int = 64) -> torch.Tensor:
    x = torch.randn(2, channels, 4, 4, device=device, dtype=dtype)
    return x.contiguous(memory_format=torch.channels_last)


def pair_alone(device, dtype, calls: int, repeats: int) -> dict:
    """us per forward+backward of one BatchNorm2d + ReLU and of one BatchNormAct2d."""
    x = tiny_input(device, dtype).requires_grad_()
    dy = torch.randn_like(x)
    channels = x.shape[1]
    eager = torch.nn.Sequential(torch.nn.BatchNorm2d(channels), torch.nn.ReLU()).to(device)
    ours = tritonbn.BatchNormAct2d(channels, device=device)
    return interleaved_medians({"eager": fwd_bwd(eager, eager[0], x, dy),
                                "tritonbn": fwd_bwd(ours, ours, x, dy)}, calls, repeats)


def stack_step(convert: bool, device, dtype):
    """An SGD training step of STACK_PAIRS x (1x1 Conv, BatchNorm2d, ReLU) on a tiny input,
    as built or after fuse_bn_act: host time, the GPU's share being a few us per kernel."""
    x = tiny_input(device, dtype)
    channels = x.shape[1]
    torch.manual_seed(0)
    blocks = []
    for _ in range(STACK_PAIRS):
        blocks += [torch.nn.Conv2d(channels, channels, 1, bias=False),
                   torch.nn.BatchNorm2d(channels), torch.nn.ReLU(inplace=True)]
    model = torch.nn.Sequential(*blocks).to(device=device, dtype=dtype,
                                             memory_format=torch.channels_last)
    if convert:
        model = tritonbn.fuse_bn_act(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step():
        loss = model(x).float().sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def stack_ms(device, dtype, steps: int, repeats: int) -> dict:
    us = interleaved_medians({"eager": stack_step(False, device, dtype),
                              "converted": stack_step(True, device, dtype)}, steps, repeats)
    return {name: value / 1e3 for name, value in us.items()}


def mode_times(module, bn, x, dy, calls: int, repeats: int) -> dict:
    """us per call of the training forward, training forward+backward and eval forward."""
    def eval_fwd():
        with torch.no_grad():
            module(x)
    return interleaved_medians({"train_fwd": (module.train, lambda: module(x)),
                                "train_fwdbwd": fwd_bwd(module, bn, x, dy),
                                "eval_fwd": (module.eval, eval_fwd)}, calls, repeats)


def launcher_times(module, x, dy, calls: int, repeats: int) -> dict:
    """us per call of each launcher on its own, and of the backward alone through autograd."""
    module.train()
    xd = x.detach()
    mean, var = kernels.batch_stats(xd, None, None, 0.1)
    weight, bias = module.weight, module.bias
    relu = activations.RELU
    y = module(x)
    return interleaved_medians({
        "batch_stats": lambda: kernels.batch_stats(xd, module.running_mean,
                                                   module.running_var, 0.1),
        "normalize_act": lambda: kernels.normalize_act(xd, mean, var, weight, bias, None, 1e-5,
                                                         relu, 0.0),
        "normalize_act_backward": lambda: kernels.normalize_act_backward(
            dy, xd, mean, var, weight, bias, None, 1e-5, True, relu, 0.0),
        "autograd backward alone": lambda: torch.autograd.grad(y, (x, weight, bias), dy,
                                                               retain_graph=True),
    }, calls, repeats)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stub-launches", action="store_true")
    parser.add_argument("--calls", type=int, default=200,
                        help="per burst; on a GPU keep it under the launch queue's depth")
    parser.add_argument("--repeats", type=int, default=7, help="bursts per figure (median)")
    parser.add_argument("--profile-rows", type=int, default=15)
    parser.add_argument("--compiled", action="store_true",
                        help="also time torch.compile of each module")
    parser.add_argument("--stack", action="store_true",
                        help="also time a training step of a Conv-BN-ReLU stack")
    parser.add_argument("--out", type=Path, help="also write every figure to this CSV")
    args = parser.parse_args()
    stubbed = args.stub_launches or not ON_GPU
    if stubbed:
        stub_launches()
    if not ON_GPU:
        torch.set_num_threads(1)
    if stubbed:  # stubbed kernels leave garbage in y and dx: keep denormals from slowing convs
        torch.set_flush_denormal(True)
    device = "cuda" if ON_GPU else "cpu"
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    print(f"{device}, {str(dtype)[6:]}, {'launches stubbed out' if stubbed else 'real launches'}"
          f"; medians of {args.repeats} interleaved bursts")
    rows = []
    results = ResultsCsv(args.out) if args.out else None

    def record(part: str, shape: str, times: dict):
        """Rows of times, {(provider, mode): us}, then the CSV with every row so far."""
        rows.extend(dict(part=part, provider=provider, mode=mode, shape=shape, us=us)
                    for (provider, mode), us in times.items())
        if results is not None:
            results.write(pd.DataFrame(rows).assign(
                device=torch.cuda.get_device_name() if ON_GPU else "cpu", stubbed=stubbed,
                dtype=str(dtype)[6:], torch=torch.__version__, triton=triton.__version__,
                date=date.today().isoformat()))

    alone = pair_alone(device, dtype, args.calls, args.repeats)
    record("pair_alone", "2x64x4x4", {(name, "train_fwdbwd"): us for name, us in alone.items()})
    print(f"pair alone, 2x64x4x4 fwd+bwd: eager {alone['eager']:.1f} us, "
          f"tritonbn {alone['tritonbn']:.1f} us")

    x = torch.randn(32, 64, 56, 56, device=device, dtype=dtype)
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    dy = torch.randn_like(x)
    ours = tritonbn.BatchNormAct2d(64, device=device)
    ours.train()
    launches = launch.launches_in(fwd_bwd(ours, ours, x, dy)[1])
    print(f"32x64x56x56 channels_last, us per call; {launches} launches per training "
          f"forward+backward")
    providers = {"tritonbn": (ours, ours)}
    if not stubbed:  # eager's kernels cannot be stubbed: compare only with real launches
        eager = torch.nn.Sequential(torch.nn.BatchNorm2d(64, device=device), torch.nn.ReLU())
        providers["eager"] = (eager, eager[0])
    if args.compiled:
        for name, (module, bn) in list(providers.items()):
            compiled = torch.compile(module, fullgraph=True, dynamic=False)
            providers["compile" if name == "eager" else f"{name}_compile"] = (compiled, bn)
    shape = "x".join(map(str, x.shape))
    for name, (module, bn) in providers.items():
        times = mode_times(module, bn, x, dy, args.calls, args.repeats)
        print(f"  {name:16s} " + "  ".join(f"{mode} {us:7.1f}" for mode, us in times.items()))
        record("layer", shape, {(name, mode): us for mode, us in times.items()})
    launchers = launcher_times(ours, x, dy, args.calls, args.repeats)
    for name, us in launchers.items():
        print(f"    {name:24s} {us:7.1f}")
    record("launcher", shape, {(name, ""): us for name, us in launchers.items()})

    stack = None
    if args.stack:
        stack = stack_ms(device, dtype, steps=20, repeats=args.repeats)
        print(f"{STACK_PAIRS} x (Conv, BatchNorm2d, ReLU), 2x64x4x4, SGD step: as built "
              f"{stack['eager']:.2f} ms, converted {stack['converted']:.2f} ms, "
              f"{(stack['converted'] - stack['eager']) / STACK_PAIRS * 1e3:+.1f} us per pair")
        record("stack", f"{STACK_PAIRS}x2x64x4x4",
               {(name, "sgd_step"): ms * 1e3 for name, ms in stack.items()})

    if args.profile_rows:
        ours.train()
        profile = cProfile.Profile()
        profile.enable()
        for _ in range(args.calls):
            torch.autograd.grad(ours(x), (x, ours.weight, ours.bias), dy)
        profile.disable()
        pstats.Stats(profile).sort_stats("tottime").print_stats(args.profile_rows)

    summary = (f"host: pair_alone eager={alone['eager']:.1f} tritonbn={alone['tritonbn']:.1f} "
               f"ratio={alone['tritonbn'] / alone['eager']:.3f}; ")
    if stack is not None:
        summary += (f"stack eager={stack['eager']:.3f} converted={stack['converted']:.3f} "
                    f"ratio={stack['converted'] / stack['eager']:.3f}; ")
    print(summary + f"launches_per_step={launches}")


if __name__ == "__main__":
    main()
