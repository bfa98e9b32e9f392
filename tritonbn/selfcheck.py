"""``tritonbn.check()`` and ``python -m tritonbn``: does tritonbn work on this machine, and is
it faster here? It prints the environment (versions, GPU, which path runs, the direct launch
path), then a few cases forward and backward against PyTorch in float64, each passing when its
error is within twice eager PyTorch's own in the same dtype plus 16 ulps of the result's scale,
and on a GPU the speed of BatchNorm + ReLU, forward and backward, against eager PyTorch."""
import argparse
import sys
import time
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from . import environment
from .activations import activation_spec, eager_activation
from .functional import bn_act


class Case(NamedTuple):
    shape: tuple
    dtype: torch.dtype
    memory_format: torch.memory_format
    activation: str
    activation_kwargs: dict
    training: bool
    residual: bool

    def __str__(self):
        kwargs = ", ".join(f"{k}={v!r}" for k, v in self.activation_kwargs.items())
        layout = {torch.channels_last: "channels_last",
                  torch.channels_last_3d: "channels_last_3d"}.get(self.memory_format,
                                                                   "contiguous")
        return (f"{'x'.join(map(str, self.shape)):<11} {str(self.dtype)[6:]:<8} {layout:<16} "
                f"{self.activation}({kwargs}) {'train' if self.training else 'eval'}"
                f"{' +residual' if self.residual else ''}")


CONTIGUOUS, NHWC, NDHWC = torch.contiguous_format, torch.channels_last, torch.channels_last_3d
CASES = (
    Case((7, 3), torch.float32, CONTIGUOUS, "relu", {}, True, False),
    Case((3, 4, 5), torch.float64, CONTIGUOUS, "silu", {}, True, False),
    Case((2, 5, 3, 4), torch.float32, NHWC, "gelu", {"approximate": "tanh"}, True, True),
    Case((2, 5, 3, 4), torch.float16, NHWC, "leaky_relu", {"negative_slope": 0.2}, True, False),
    Case((2, 3, 2, 3, 2), torch.float32, NDHWC, "sigmoid", {}, False, False),
    Case((3, 4, 3, 3), torch.float32, CONTIGUOUS, "hardswish", {}, False, True),
)
# The interpreter has no bfloat16 arithmetic: on a GPU only, with a larger shape.
GPU_CASES = (
    Case((2, 5, 3, 4), torch.bfloat16, NHWC, "silu", {}, True, True),
    Case((16, 64, 28, 28), torch.bfloat16, NHWC, "relu", {}, True, False),
)
# BatchNorm + ReLU training steps to time on a GPU: a layer small enough to be host-bound on
# most machines, and one large enough to be bound by memory bandwidth.
SPEED_SHAPES = ((32, 64, 56, 56), (128, 256, 56, 56))


def run_case(case: Case, device: torch.device) -> tuple[bool, str]:
    """(passed, what the worst output was) for one case, forward and backward."""
    C = case.shape[1]
    generator = torch.Generator().manual_seed(0)

    def draw(*shape, low=None):
        t = torch.randn(*shape, dtype=torch.float64, generator=generator)
        return t if low is None else t.abs() + low
    x64 = draw(*case.shape) * 2 + 0.5
    residual64 = draw(*case.shape) if case.residual else None
    params64 = {"weight": draw(C, low=0.5), "bias": draw(C),
                "running_mean": draw(C), "running_var": draw(C, low=0.5)}
    dy64 = draw(*case.shape)

    def run(fn, dtype, target):
        x = x64.to(target, dtype).contiguous(memory_format=case.memory_format)
        leaves = {"x": x, "weight": params64["weight"].to(target, dtype),
                  "bias": params64["bias"].to(target, dtype)}
        if residual64 is not None:
            leaves["residual"] = residual64.to(target, dtype)
        leaves = {name: t.requires_grad_() for name, t in leaves.items()}
        stats = {name: params64[name].to(target, dtype) for name in ("running_mean",
                                                                     "running_var")}
        y = fn(leaves["x"], stats["running_mean"], stats["running_var"], leaves["weight"],
               leaves["bias"], case.training, 0.1, 1e-5, case.activation,
               case.activation_kwargs, leaves.get("residual"))
        grads = torch.autograd.grad(y, list(leaves.values()), dy64.to(target, dtype))
        outputs = {"y": y, **{"d" + name: g for name, g in zip(leaves, grads)}}
        if case.training:
            outputs.update(stats)
        return {name: t.detach().double().cpu() for name, t in outputs.items()}

    expected = run(_eager, torch.float64, "cpu")
    eager = run(_eager, case.dtype, device)
    # On a GPU three calls: the first compiles, the second may prove the direct launch path
    # (kernels/launch.py), the third may take it.
    runs = [run(bn_act, case.dtype, device) for _ in range(3 if device.type == "cuda" else 1)]
    eps = torch.finfo(case.dtype).eps
    worst, worst_name = -1.0, ""
    for name, exact in expected.items():
        floor = 16 * eps * (exact.abs().max().item() + 1)
        tolerance = 2 * (eager[name] - exact).abs().max().item() + floor
        for ours in runs:
            ratio = (ours[name] - exact).abs().max().item() / tolerance
            if not ratio <= worst:  # NaN counts as the worst
                worst, worst_name = ratio, name
    return worst <= 1, f"worst {worst_name}: {worst:.2f} of its tolerance"


def _eager(x, running_mean, running_var, weight, bias, training, momentum, eps, activation,
           activation_kwargs, residual):
    """PyTorch's own: F.batch_norm, the residual added, the activation."""
    y = F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
    if residual is not None:
        y = y + residual
    return eager_activation(activation_spec(activation, activation_kwargs))(y)


def _gpu_ms(fn, replays: int = 50) -> float:
    """GPU time per call of fn, captured in a CUDA graph (no host time) and replayed."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # compiles and allocates before the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / replays


def _host_ms(fn, calls: int = 20) -> tuple[float, float]:
    """(host ms, wall ms) per call: the time to issue a burst of calls, then to finish them."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    issued = time.perf_counter()
    torch.cuda.synchronize()
    done = time.perf_counter()
    return (issued - start) / calls * 1e3, (done - start) / calls * 1e3


def speed(out) -> None:
    """BatchNorm + ReLU training forward + backward, tritonbn against eager, and advice."""
    from .modules import BatchNormAct2d
    print("speed (BatchNorm2d + ReLU, training forward + backward, bfloat16 channels_last; ms "
          "per step):", file=out)
    print(f"  {'shape':<16} {'':<9} {'GPU':>7} {'host':>7} {'wall':>7}", file=out)
    host_bound = []
    for shape in SPEED_SHAPES:
        x = torch.randn(shape, device="cuda", dtype=torch.bfloat16).to(
            memory_format=torch.channels_last).requires_grad_()
        dy = torch.randn_like(x)
        eager = torch.nn.Sequential(torch.nn.BatchNorm2d(shape[1]), torch.nn.ReLU()).cuda()
        models = {"eager": eager.to(torch.bfloat16),
                  "tritonbn": BatchNormAct2d(shape[1], device="cuda", dtype=torch.bfloat16)}
        for name, model in models.items():
            def step():
                return torch.autograd.grad(model(x), (x, *model.parameters()), dy)
            gpu = _gpu_ms(step)
            host, wall = _host_ms(step)
            print(f"  {'x'.join(map(str, shape)):<16} {name:<9} {gpu:7.3f} {host:7.3f} "
                  f"{wall:7.3f}", file=out)
            if name == "tritonbn" and host > gpu:
                host_bound.append(f"{'x'.join(map(str, shape))} (host {host:.3f} ms > GPU "
                                  f"{gpu:.3f} ms)")
    if host_bound:
        print(f"advice: host-bound here at {', '.join(host_bound)}: run the model under "
              f"torch.compile or CUDA graphs, which take the host's time out of each step",
              file=out)
    else:
        print("advice: GPU-bound at both shapes: the GPU column is what a step costs here",
              file=out)


def check(speed_test: bool = True, device: Optional[str] = None, out=None) -> bool:
    """Print the environment, run the correctness cases (and, on a GPU, the speed test);
    return whether every case passed."""
    out = out or sys.stdout
    started = time.perf_counter()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    print(f"tritonbn {environment.__version__} self-check", file=out)
    versions = environment.versions()
    for name in ("python", "torch", "triton"):
        minimum = environment.MINIMUM_VERSIONS[name]
        print(f"  {name:<14} {versions[name] or 'not installed'} (supported: >= {minimum})",
              file=out)
    for problem in environment.unsupported_versions():
        print(f"  WARNING: {problem}", file=out)
    print(f"  {'GPU':<14} {environment.gpu()}", file=out)
    probe = torch.empty(0, device=device)
    print(f"  {'path':<14} {device.type} tensors run on: {environment.backend_for(probe)}",
          file=out)
    print(f"  {'direct launch':<14} (CUDA tensors) {environment.direct_launch_state()}",
          file=out)

    cases = CASES + (GPU_CASES if device.type == "cuda" else ())
    print(f"correctness on {device.type} (forward and backward against PyTorch in float64; "
          f"tolerance: twice eager's own error + 16 ulps):", file=out)
    failed = 0
    for case in cases:
        try:
            passed, detail = run_case(case, device)
        except Exception as error:
            passed, detail = False, f"{type(error).__name__}: {error}"
        failed += not passed
        print(f"  {'ok  ' if passed else 'FAIL'} {case}  {detail}", file=out)
    if device.type == "cuda":
        print(f"  direct launch after the cases: {environment.direct_launch_state()}", file=out)
        if speed_test:
            speed(out)
    else:
        print("speed: not measured (no GPU)", file=out)
    verdict = "all passed" if not failed else f"{failed} FAILED"
    print(f"{len(cases) - failed}/{len(cases)} cases passed ({verdict}) in "
          f"{time.perf_counter() - started:.2f} s", file=out)
    return not failed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tritonbn", description=__doc__)
    parser.add_argument("--no-speed", action="store_true", help="skip the GPU speed test")
    parser.add_argument("--device", help="cuda or cpu (default: cuda where there is one)")
    args = parser.parse_args(argv)
    return 0 if check(speed_test=not args.no_speed, device=args.device) else 1
