"""Host time per call of BatchNormAct2d against eager, and where it goes.

Small shapes are bound by host time: Python, torch's dispatch and autograd, Triton's launcher.
This prints microseconds per call (a burst of calls, no sync in between) for the training
forward, the training forward+backward and the eval forward; then each launcher called
directly (no autograd, no module) and the backward alone through autograd, which runs on
autograd's device thread for CUDA tensors; then a cProfile of forward+backward (the calling
thread only).

    python perf/host_overhead.py                 # on a GPU: real launches
    python perf/host_overhead.py --stub-launches # any machine: kernels replaced by no-ops, so
                                                 # only the Python above the launches is timed
    python perf/host_overhead.py --compiled      # also under torch.compile (fullgraph, static
                                                 # shapes): the registered ops' dispatch cost

Without a GPU the tensors are CPU tensors routed to the Triton launchers (TRITON_INTERPRET=1),
and the launches are always stubbed: the interpreter's own time would swamp the host's.
"""
import argparse
import cProfile
import os
import pstats
import time

import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"  # route CPU tensors to the launchers

import tritonbn  # noqa: E402
from tritonbn import kernels  # noqa: E402
from tritonbn.kernels import backward, forward  # noqa: E402


class _NoLaunch:
    """Stands in for a Triton kernel: kernel[grid](...) does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def stub_launches():
    for module in (forward, backward):
        for name in dir(module):
            if name.startswith("_") and name.endswith("_kernel"):
                setattr(module, name, _NoLaunch())


def microseconds_per_call(fn, calls: int) -> float:
    fn()
    if ON_GPU:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    if ON_GPU:
        torch.cuda.synchronize()
    return elapsed / calls * 1e6


def host_times(module, bn, x, dy, calls: int):
    """us per call of the training forward, training forward+backward and eval forward."""
    module.train()
    fwd = microseconds_per_call(lambda: module(x), calls)
    fwd_bwd = microseconds_per_call(
        lambda: torch.autograd.grad(module(x), (x, bn.weight, bn.bias), dy), calls)
    module.eval()
    with torch.no_grad():
        evaluation = microseconds_per_call(lambda: module(x), calls)
    return fwd, fwd_bwd, evaluation


def launcher_times(module, x, dy, calls: int):
    """us per call of each launcher on its own, and of the backward alone through autograd."""
    module.train()
    mean, var = kernels.batch_stats(x.detach(), None, None, 0.1)
    weight, bias = module.weight, module.bias
    relu = kernels.ACTIVATIONS["relu"]
    y = module(x)
    return {
        "batch_stats": microseconds_per_call(
            lambda: kernels.batch_stats(x.detach(), module.running_mean, module.running_var,
                                        0.1), calls),
        "normalize_act": microseconds_per_call(
            lambda: kernels.normalize_act(x.detach(), mean, var, weight, bias, 1e-5, relu),
            calls),
        "normalize_act_backward": microseconds_per_call(
            lambda: kernels.normalize_act_backward(dy, x.detach(), mean, var, weight, bias,
                                                   1e-5, True, relu), calls),
        "autograd backward alone": microseconds_per_call(
            lambda: torch.autograd.grad(y, (x, weight, bias), dy, retain_graph=True), calls),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stub-launches", action="store_true")
    parser.add_argument("--calls", type=int, default=200,
                        help="per burst; on a GPU keep it under the launch queue's depth")
    parser.add_argument("--profile-rows", type=int, default=25)
    parser.add_argument("--compiled", action="store_true",
                        help="also time torch.compile of each module")
    args = parser.parse_args()
    stubbed = args.stub_launches or not ON_GPU
    if stubbed:
        stub_launches()
    device = "cuda" if ON_GPU else "cpu"
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    x = torch.randn(32, 64, 56, 56, device=device, dtype=dtype)
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    dy = torch.randn_like(x)
    ours = tritonbn.BatchNormAct2d(64, device=device)
    eager = torch.nn.Sequential(torch.nn.BatchNorm2d(64, device=device), torch.nn.ReLU())
    print(f"32x64x56x56 {str(dtype)[6:]} channels_last on {device}; "
          f"{'launches stubbed out' if stubbed else 'real launches'}; us per call")
    providers = {"tritonbn": (ours, ours)}
    if not stubbed:  # eager's kernels cannot be stubbed: compare only with real launches
        providers["eager"] = (eager, eager[0])
    if args.compiled:
        for name, (module, bn) in list(providers.items()):
            compiled = torch.compile(module, fullgraph=True, dynamic=False)
            providers["compile" if name == "eager" else f"{name}_compile"] = (compiled, bn)
    for name, (module, bn) in providers.items():
        fwd, fwd_bwd, evaluation = host_times(module, bn, x, dy, args.calls)
        print(f"{name:16s} train_fwd {fwd:7.1f}  train_fwdbwd {fwd_bwd:7.1f}  "
              f"eval_fwd {evaluation:7.1f}")
    for name, us in launcher_times(ours, x, dy, args.calls).items():
        print(f"  {name:24s} {us:7.1f}")
    ours.train()
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(args.calls):
        torch.autograd.grad(ours(x), (x, ours.weight, ours.bias), dy)
    profile.disable()
    pstats.Stats(profile).sort_stats("tottime").print_stats(args.profile_rows)


if __name__ == "__main__":
    main()
