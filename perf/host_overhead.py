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
    python perf/host_overhead.py --stack         # also a training step of 33 Conv-BN-ReLU
                                                 # blocks, eager and fuse_bn_act-converted: the
                                                 # cost of a pair inside a model

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


def fwd_bwd_us(module, bn, x, dy, calls: int) -> float:
    """us per call of the training forward+backward, to the input and bn's parameters."""
    module.train()
    return microseconds_per_call(
        lambda: torch.autograd.grad(module(x), (x, bn.weight, bn.bias), dy), calls)


def host_times(module, bn, x, dy, calls: int):
    """us per call of the training forward, training forward+backward and eval forward."""
    module.train()
    fwd = microseconds_per_call(lambda: module(x), calls)
    fwd_bwd = fwd_bwd_us(module, bn, x, dy, calls)
    module.eval()
    with torch.no_grad():
        evaluation = microseconds_per_call(lambda: module(x), calls)
    return fwd, fwd_bwd, evaluation


STACK_PAIRS = 33  # as many as fuse_bn_act finds in ResNet-50


def tiny_input(device, dtype, channels: int = 64) -> torch.Tensor:
    x = torch.randn(2, channels, 4, 4, device=device, dtype=dtype)
    return x.contiguous(memory_format=torch.channels_last)


def stack_step_ms(device, dtype, steps: int) -> tuple[float, float]:
    """ms per SGD training step of STACK_PAIRS x (1x1 Conv, BatchNorm2d, ReLU) on a tiny input,
    as built and after fuse_bn_act: host time, the GPU's share being a few us per kernel."""
    x = tiny_input(device, dtype)
    channels = x.shape[1]
    times = []
    for convert in (False, True):
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
        times.append(microseconds_per_call(step, steps) / 1e3)
    return times[0], times[1]


def isolated_pair_us(device, dtype, calls: int) -> tuple[float, float]:
    """us per forward+backward of one BatchNorm2d + ReLU and of one BatchNormAct2d, alone, on
    the stack's tiny input: the per-pair cost without a model around it."""
    x = tiny_input(device, dtype).requires_grad_()
    dy = torch.randn_like(x)
    channels = x.shape[1]
    eager = torch.nn.Sequential(torch.nn.BatchNorm2d(channels), torch.nn.ReLU()).to(device)
    ours = tritonbn.BatchNormAct2d(channels, device=device)
    return (fwd_bwd_us(eager, eager[0], x, dy, calls), fwd_bwd_us(ours, ours, x, dy, calls))


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
    parser.add_argument("--stack", action="store_true",
                        help="also time a training step of a Conv-BN-ReLU stack")
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
    if args.stack:
        if stubbed:  # the stubs leave garbage in y and dx: keep denormals from slowing convs
            torch.set_flush_denormal(True)
        as_built, converted = stack_step_ms(device, dtype, steps=20)
        eager_pair, our_pair = isolated_pair_us(device, dtype, args.calls)
        print(f"{STACK_PAIRS} x (Conv, BatchNorm2d, ReLU), 2x64x4x4, SGD step: as built "
              f"{as_built:.2f} ms, converted {converted:.2f} ms, "
              f"{(converted - as_built) / STACK_PAIRS * 1e3:+.0f} us per fused pair; alone, "
              f"fwd+bwd of one pair {eager_pair:.0f} us eager, {our_pair:.0f} us tritonbn "
              f"({our_pair - eager_pair:+.0f} us)")
    ours.train()
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(args.calls):
        torch.autograd.grad(ours(x), (x, ours.weight, ours.bias), dy)
    profile.disable()
    pstats.Stats(profile).sort_stats("tottime").print_stats(args.profile_rows)


if __name__ == "__main__":
    main()
