"""Perf sweep: tritonbn's fused BatchNorm + activation against eager PyTorch and torch.compile.

Writes a long-format CSV, one row per (shape, dtype, layout, activation, mode, provider), and
prints a markdown summary.

Providers: tritonbn (BatchNormAct*d), eager (nn.BatchNorm*d then the activation module),
compile (torch.compile of that eager pair), tritonbn_compile (torch.compile of BatchNormAct*d).
Rows with residual=True add a residual (x's shape and layout) between the BatchNorm and the
ReLU, as a ResNet block's last BatchNorm does; train_fwdbwd then also takes its gradient.
Modes: train_fwd (training forward, recording autograd as a training step does), train_fwdbwd
(that forward plus the backward of a fixed random grad, to the input and the parameters; taken
with torch.autograd.grad, so nothing accumulates into .grad), eval_fwd (under no_grad).

Timing is triton.testing.do_bench's p20/p50/p80, with L2 flushed before every run. GB/s counts
passes over the tensor, on the floor (train_fwd 2, train_fwdbwd 5, eval_fwd 2; with a residual
3, 8, 3) and on the 8-pass model (3, 8, 2; with a residual 4, 11, 3: the backward's reduction
also reads the residual and writes its gradient, which the dx pass reads in place of dy),
against the device-to-device copy bandwidth measured at the start.
max_abs_err (and max_abs_err_dx for train_fwdbwd) compare each provider with eager.
host_us, on the small shapes only, is the wall time per call of a burst of calls with no sync:
few enough that the launch queue never fills, so it is the host's time, not the GPU's.
gpu_ms is the GPU's time alone: the same call captured once in a CUDA graph, the graph's
replays timed as above (p50). A replay costs the host a few us, less than do_bench's L2 flush
that precedes it on the GPU, so host time drops out. speedup_vs_<peer> compares ms_p50 (wall
time, what a user sees on small tensors), gpu_speedup_vs_<peer> compares gpu_ms (what the
kernels cost, what a user sees under CUDA graphs or when the GPU queue is full).

Trade-offs, to keep the full sweep to minutes on a GPU:
- torch.compile costs seconds per graph. Each case compiles one training graph, shared by
  train_fwd and train_fwdbwd, and one eval graph. Dynamo is reset between cases, so guard lists
  stay two entries long: the recompile limit is never reached and guard checks (part of
  host_us) do not grow with the cases run before. fullgraph=True turns a graph break or a
  fallback to eager into an error rather than an eager time filed under a compile provider.
- A case that fails records its error in its rows and the sweep goes on.
- The CSV is rewritten after every case, so a sweep cut short keeps the cases it ran; a
  sweep never overwrites a file that holds more rows than it has (perf/results_csv.py).
- Without a GPU the kernels run on the CPU through Triton's interpreter, on tiny shapes, timed
  with perf_counter after warm-up calls, PyTorch on one thread (on tiny tensors more threads
  only wait for each other: eager's first calls took 20-90 ms against 0.2 ms later with two
  threads on a busy 2-core machine), bfloat16 left out (the interpreter has no bfloat16
  arithmetic) and the compile providers too unless named (Inductor builds C++ for seconds per
  graph). Such rows say interpreter=True: they check the script and the kernels' results,
  not their speed, so they carry no copy bandwidth, GB/s or speedups.

Presets: the full sweep (default), --quick (four shapes), --headline (the ResNet-50 BatchNorm
shapes at batch 128, BN + ReLU with residual rows on each bottleneck's last BatchNorm shapes,
bf16 channels_last and fp32 contiguous, train_fwdbwd and eval_fwd, tritonbn against eager and
torch.compile: what perf/gpu_check.sh runs). --environment prints the device, the versions
and the copy bandwidth, and exits.
"""
import argparse
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm import tqdm

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    # Triton picks the interpreter when it is imported, so this must precede tritonbn.
    os.environ["TRITON_INTERPRET"] = "1"

import triton  # noqa: E402
import triton.testing  # noqa: E402
from plot import summary_table  # noqa: E402
from results_csv import ResultsCsv  # noqa: E402

import tritonbn  # noqa: E402

PERF_DIR = Path(__file__).resolve().parent
DEVICE = "cuda" if ON_GPU else "cpu"
PROVIDERS = ("tritonbn", "eager", "compile", "tritonbn_compile")
COMPILED = {"compile", "tritonbn_compile"}
MODES = ("train_fwd", "train_fwdbwd", "eval_fwd")
# Passes by (mode, residual): the docstring counts them.
PASSES_FLOOR = {("train_fwd", False): 2, ("train_fwdbwd", False): 5, ("eval_fwd", False): 2,
                ("train_fwd", True): 3, ("train_fwdbwd", True): 8, ("eval_fwd", True): 3}
PASSES_MODEL = {("train_fwd", False): 3, ("train_fwdbwd", False): 8, ("eval_fwd", False): 2,
                ("train_fwd", True): 4, ("train_fwdbwd", True): 11, ("eval_fwd", True): 3}
QUANTILES = (0.2, 0.5, 0.8)
# Half do_bench's default warm-up and run time: still tens to thousands of runs per row, and
# the full sweep keeps to minutes.
BENCH_WARMUP_MS, BENCH_REP_MS = 10, 50
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
LAYOUTS = ("channels_last", "contiguous")
MEMORY_FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last,
                  "channels_last_3d": torch.channels_last_3d}
ACTIVATIONS = ("relu", "sigmoid", "identity")
ACTIVATION_MODULES = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "identity": nn.Identity}
TORCH_BATCHNORMS = {2: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
TRITONBN_MODULES = {2: tritonbn.BatchNormAct1d, 4: tritonbn.BatchNormAct2d,
                    5: tritonbn.BatchNormAct3d}

# Nine of ResNet-50's twelve BatchNorm input shapes (perf/static_gpu.py lists all twelve): the
# ones the committed H100 run timed, so that later runs compare with it.
RESNET50_CHW = ((64, 112, 112), (64, 56, 56), (256, 56, 56), (128, 28, 28), (512, 28, 28),
                (256, 14, 14), (1024, 14, 14), (512, 7, 7), (2048, 7, 7))
# Each bottleneck's last BatchNorm, followed by the residual add and the ReLU.
RESNET50_RESIDUAL_CHW = ((256, 56, 56), (512, 28, 28), (1024, 14, 14), (2048, 7, 7))
BATCHNORM1D_SHAPES = ((8192, 1024), (65536, 256), (256, 4096))
HOST_SHAPES = {(32, 64, 56, 56), *BATCHNORM1D_SHAPES}
TINY_SHAPES = ((2, 3, 4, 4), (8, 5), (2, 3, 2, 4, 4))
# Wall time per host-overhead burst stays below the launch queue's depth (about a thousand).
HOST_CALLS = 50
CPU_REPEATS = 5
# Warm-up on the CPU: calls until CPU_STABLE_CALLS in a row each take at most CPU_STABLE_RATIO
# times the fastest of them, CPU_WARMUP_MAX calls at most.
CPU_STABLE_CALLS, CPU_STABLE_RATIO, CPU_WARMUP_MAX = 2, 1.5, 50
COPY_BYTES = 1 << 30 if ON_GPU else 1 << 26


@dataclass(frozen=True)
class Preset:
    shapes: tuple
    formats: tuple  # (dtype, layout) pairs
    # shapes also run with every activation and with a residual, in the first format
    activation_shapes: tuple
    residual_shapes: tuple = ()  # shapes also run with a residual, in every format
    modes: tuple = MODES
    activations: tuple = ACTIVATIONS
    providers: tuple = PROVIDERS


FULL = Preset(
    shapes=tuple((n, *chw) for n in (128, 32) for chw in RESNET50_CHW)
    + BATCHNORM1D_SHAPES + ((16, 64, 16, 56, 56),),
    formats=(("bf16", "channels_last"), ("fp16", "channels_last"), ("fp32", "contiguous"),
             ("bf16", "contiguous")),
    activation_shapes=((128, 256, 56, 56), (32, 64, 56, 56), (128, 1024, 14, 14), (8192, 1024)))
QUICK = Preset(
    shapes=((128, 256, 56, 56), (128, 1024, 14, 14), (32, 64, 56, 56), (8192, 1024)),
    formats=(("bf16", "channels_last"), ("fp32", "contiguous")),
    activation_shapes=())
HEADLINE = Preset(
    shapes=tuple((128, *chw) for chw in RESNET50_CHW),
    formats=(("bf16", "channels_last"), ("fp32", "contiguous")),
    activation_shapes=(),
    residual_shapes=tuple((128, *chw) for chw in RESNET50_RESIDUAL_CHW),
    modes=("train_fwdbwd", "eval_fwd"), activations=("relu",),
    providers=("tritonbn", "eager", "compile"))


@dataclass(frozen=True)
class Case:
    shape: tuple
    dtype: str
    layout: str  # contiguous, channels_last or channels_last_3d
    activation: str
    residual: bool = False

    @property
    def label(self) -> str:
        return "x".join(map(str, self.shape))


def shape_layout(layout: str, ndim: int) -> str:
    """The memory format a layout means at this rank: moot in 2-D, channels_last_3d in 5-D."""
    if ndim == 2:
        return "contiguous"
    return "channels_last_3d" if ndim == 5 and layout == "channels_last" else layout


def shape_selected(index: int, shape: tuple, tokens: list[str]) -> bool:
    """tokens: indexes into the preset's shape list, or substrings of labels like 256x56x56."""
    label = "x".join(map(str, shape))
    return any(token == str(index) if token.isdigit() else token in label for token in tokens)


def plan_cases(args, preset: Preset) -> list[Case]:
    shapes = preset.shapes
    activation_shapes, residual_shapes = preset.activation_shapes, preset.residual_shapes
    if args.tiny or not ON_GPU:  # the same structure on tiny shapes
        shapes = TINY_SHAPES
        activation_shapes = TINY_SHAPES[:1] if activation_shapes else ()
        residual_shapes = TINY_SHAPES[:1] if residual_shapes else ()
    if args.shapes:
        shapes = [shape for i, shape in enumerate(shapes) if shape_selected(i, shape, args.shapes)]
    formats = [(dtype, layout) for dtype, layout in preset.formats
               if dtype in args.dtypes and layout in args.layouts
               and (ON_GPU or dtype != "bf16")]
    cases = []
    for shape in shapes:
        for dtype, layout in formats:
            extra = shape in activation_shapes and (dtype, layout) == formats[0]
            layout = shape_layout(layout, len(shape))
            for activation in ACTIVATIONS if extra else ("relu",):
                if activation in args.activations:
                    cases.append(Case(shape, dtype, layout, activation))
            if (extra or shape in residual_shapes) and "relu" in args.activations:
                cases.append(Case(shape, dtype, layout, "relu", residual=True))
    return list(dict.fromkeys(cases))  # 2-D shapes collapse layouts: drop the repeats


def random_state(channels: int) -> dict:
    """Parameters and running statistics far from their identity defaults."""
    return {"weight": torch.rand(channels) + 0.5, "bias": torch.randn(channels) * 0.5,
            "running_mean": torch.randn(channels) * 0.5,
            "running_var": torch.rand(channels) + 0.5,
            "num_batches_tracked": torch.tensor(0)}


class BatchNormAddAct(nn.Module):
    """The eager peer: nn.BatchNorm*d, the residual add when there is one, the activation."""

    def __init__(self, batchnorm: nn.Module, activation: nn.Module):
        super().__init__()
        self.batchnorm, self.activation = batchnorm, activation

    def forward(self, x, residual=None):
        y = self.batchnorm(x)
        return self.activation(y if residual is None else y + residual)


def build(provider: str, case: Case):
    """(module, its BatchNorm, the callable to time): float32 parameters, as under autocast.
    The callable takes (x, residual or None)."""
    ndim, channels = len(case.shape), case.shape[1]
    if provider.startswith("tritonbn"):
        module = TRITONBN_MODULES[ndim](channels, activation=case.activation)
        batchnorm = module
    else:
        batchnorm = TORCH_BATCHNORMS[ndim](channels)
        module = BatchNormAddAct(batchnorm, ACTIVATION_MODULES[case.activation]())
    module.to(DEVICE)
    if provider in COMPILED:
        return module, batchnorm, torch.compile(module, dynamic=False, fullgraph=True)
    return module, batchnorm, module


def step(mode: str, run, batchnorm, x, residual, dy):
    """The call to time; it returns (y,) or, for train_fwdbwd, (y, dx, dweight, dbias
    [, dresidual])."""
    if mode == "train_fwdbwd":
        inputs = (x, batchnorm.weight, batchnorm.bias) + (() if residual is None else (residual,))

        def forward_backward():
            y = run(x, residual)
            return (y, *torch.autograd.grad(y, inputs, dy))
        return forward_backward
    return lambda: (run(x, residual),)


def call_ms(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def warm_up_cpu(fn) -> None:
    """Calls fn until its time settles (see CPU_STABLE_CALLS)."""
    times = []
    while len(times) < CPU_WARMUP_MAX:
        times.append(call_ms(fn))
        last = times[-CPU_STABLE_CALLS:]
        if len(last) == CPU_STABLE_CALLS and max(last) <= CPU_STABLE_RATIO * min(last):
            return


def time_ms(fn) -> tuple[float, float, float]:
    """p20, p50, p80 of fn's time in ms, after warm-up."""
    if ON_GPU:
        return tuple(triton.testing.do_bench(fn, warmup=BENCH_WARMUP_MS, rep=BENCH_REP_MS,
                                             quantiles=list(QUANTILES)))
    warm_up_cpu(fn)
    return tuple(np.quantile([call_ms(fn) for _ in range(CPU_REPEATS)], QUANTILES))


def graph_ms(fn) -> float:
    """p50 time in ms of fn captured in a CUDA graph and replayed. fn runs once on the capture
    stream first, so the capture compiles and allocates nothing (tritonbn's scratch buffers
    are kept per stream)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        fn()
    return time_ms(graph.replay)[1]


def host_us(fn) -> float:
    """Wall time per call, in us, of a burst of calls with no sync between them."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(HOST_CALLS):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / HOST_CALLS * 1e6


def copy_bandwidth_gbps() -> float:
    """Device-to-device copy_ bandwidth: bytes read plus bytes written over the p50 time."""
    src = torch.empty(COPY_BYTES, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    return 2 * COPY_BYTES / (time_ms(lambda: dst.copy_(src))[1] * 1e6)


def max_abs_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return (out.double() - ref.double()).abs().max().item()


def run_case(case: Case, modes, providers, copy_gbps: float, progress) -> list[dict]:
    """The case's rows; without a GPU they carry times and errors only (see the docstring)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    state = random_state(case.shape[1])
    x = torch.randn(case.shape, dtype=DTYPES[case.dtype], device=DEVICE)
    x = x.contiguous(memory_format=MEMORY_FORMATS[case.layout]).requires_grad_()
    residual = torch.randn_like(x).requires_grad_() if case.residual else None
    dy = torch.randn_like(x)
    inputs = {mode: (x.detach(), None if residual is None else residual.detach())
              if mode == "eval_fwd" else (x, residual) for mode in modes}
    tensor_bytes = x.numel() * x.element_size()

    def prepared(built, mode):
        module, batchnorm, run = built
        batchnorm.load_state_dict(state)
        module.train(mode != "eval_fwd")
        return step(mode, run, batchnorm, *inputs[mode], dy)

    reference_module = build("eager", case)
    reference = {}
    rows = []
    for provider in providers:
        built = None
        for mode in modes:
            row = {"shape": case.label, "dtype": case.dtype, "layout": case.layout,
                   "activation": case.activation, "residual": case.residual, "mode": mode,
                   "provider": provider}
            try:
                built = built or build(provider, case)
                with torch.set_grad_enabled(mode != "eval_fwd"):
                    if mode not in reference:
                        reference[mode] = prepared(reference_module, mode)()
                    fn = prepared(built, mode)
                    outputs = fn()  # also compiles and warms up
                    p20, p50, p80 = time_ms(fn)
                    overhead = (host_us(fn) if ON_GPU and case.shape in HOST_SHAPES
                                else float("nan"))
                    gpu_ms = graph_ms(fn) if ON_GPU else float("nan")
                passes = (mode, case.residual)
                if ON_GPU:
                    gbps_model = PASSES_MODEL[passes] * tensor_bytes / (p50 * 1e6)
                    row.update(gbps_floor=PASSES_FLOOR[passes] * tensor_bytes / (p50 * 1e6),
                               gbps_model=gbps_model, pct_copy_bw=gbps_model / copy_gbps * 100)
                row.update(
                    ms_p20=p20, ms_p50=p50, ms_p80=p80,
                    max_abs_err=max_abs_err(outputs[0], reference[mode][0]),
                    max_abs_err_dx=(max_abs_err(outputs[1], reference[mode][1])
                                    if mode == "train_fwdbwd" else float("nan")),
                    host_us=overhead, gpu_ms=gpu_ms)
            except Exception as error:  # noqa: BLE001 - recorded in the row; the sweep goes on
                row["error"] = f"{type(error).__name__}: {error}".splitlines()[0][:300]
                progress.write(f"{case.label} {case.dtype} {case.layout} {case.activation}"
                               f"{' residual' if case.residual else ''} {mode} {provider}: "
                               f"{row['error']}")
            rows.append(row)
            progress.update()
    return rows


def add_speedups(df: pd.DataFrame) -> pd.DataFrame:
    """speedup_vs_<peer> and gpu_speedup_vs_<peer>: the peer's ms_p50 (gpu_ms) over this
    row's, in the same configuration. None without a GPU: the interpreter's times are no
    measure of the kernels' speed."""
    if not ON_GPU:
        return df
    key = ["shape", "dtype", "layout", "activation", "residual", "mode"]
    for peer in ("eager", "compile"):
        for time_column, prefix in (("ms_p50", ""), ("gpu_ms", "gpu_")):
            peer_ms = df.loc[df.provider == peer, key + [time_column]].rename(
                columns={time_column: "peer_ms"})
            merged = df[key].merge(peer_ms, on=key, how="left")
            df[f"{prefix}speedup_vs_{peer}"] = (merged["peer_ms"].to_numpy()
                                                / df[time_column].to_numpy())
    return df


COLUMNS = ["shape", "dtype", "layout", "activation", "residual", "mode", "provider", "ms_p20",
           "ms_p50", "ms_p80", "gbps_floor", "gbps_model", "pct_copy_bw", "speedup_vs_eager",
           "speedup_vs_compile", "gpu_ms", "gpu_speedup_vs_eager", "gpu_speedup_vs_compile",
           "max_abs_err", "max_abs_err_dx", "host_us", "copy_gbps", "gpu",
           "torch", "triton", "date", "interpreter", "error"]


def device_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100', 'NVIDIA H200' -> 'h200', 'AMD Instinct MI300X' ->
    'mi300x': the first word of the device name that is not a brand."""
    brands = {"nvidia", "geforce", "rtx", "tesla", "quadro", "amd", "radeon", "instinct"}
    words = [w for w in re.split(r"[\s_-]+", name.lower()) if w and w not in brands]
    return re.sub(r"[^a-z0-9]", "", words[0]) if words else "gpu"


def csv_list(choices):
    """An argparse type: a comma-separated subset of choices."""
    def parse(text: str) -> list[str]:
        picked = [item.strip() for item in text.split(",") if item.strip()]
        unknown = [item for item in picked if item not in choices]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(unknown)}; "
                                             f"choose from {', '.join(choices)}")
        return picked
    return parse


def nvidia_smi(field: str) -> str:
    try:
        done = subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError) as error:
        return f"unknown (nvidia-smi: {type(error).__name__})"
    return done.stdout.strip().splitlines()[0]


def environment() -> dict:
    """What a run's figures depend on: the device, the versions, which launch path the kernels
    take, and the copy bandwidth."""
    from tritonbn.kernels import launch

    env = {"device": torch.cuda.get_device_name() if ON_GPU else "cpu (no CUDA device)"}
    if ON_GPU:
        env.update(capability="sm_{}{}".format(*torch.cuda.get_device_capability()),
                   driver=nvidia_smi("driver_version"), cuda=torch.version.cuda,
                   memory=f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
    env.update(python=sys.version.split()[0], torch=torch.__version__,
               triton=triton.__version__, numpy=np.__version__, cpus=os.cpu_count(),
               interpreter=tritonbn.dispatch.INTERPRETING, direct_launches=launch.LAUNCH_DIRECTLY)
    if ON_GPU:
        env["copy_bandwidth"] = f"{copy_bandwidth_gbps():.0f} GB/s"
    return env


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    preset = parser.add_mutually_exclusive_group()
    preset.add_argument("--quick", action="store_true",
                        help="four shapes, bf16 channels_last and fp32 contiguous, relu")
    preset.add_argument("--headline", action="store_true",
                        help="the ResNet-50 shapes, BN + ReLU, with and without a residual, "
                             "bf16 channels_last and fp32 contiguous, train_fwdbwd and "
                             "eval_fwd, tritonbn, eager and compile")
    parser.add_argument("--tiny", action="store_true",
                        help="interpreter-sized shapes (always so without a GPU)")
    parser.add_argument("--shapes", type=lambda s: [t.strip() for t in s.split(",")],
                        help="comma-separated substrings of a shape label such as 256x56x56, "
                             "or indexes into the preset's shape list")
    parser.add_argument("--dtypes", type=csv_list(tuple(DTYPES)), default=list(DTYPES))
    parser.add_argument("--layouts", type=csv_list(LAYOUTS), default=list(LAYOUTS),
                        help="channels_last means channels_last_3d for 5-D input")
    parser.add_argument("--activations", type=csv_list(ACTIVATIONS),
                        help="default: the preset's")
    parser.add_argument("--modes", type=csv_list(MODES), help="default: the preset's")
    parser.add_argument("--providers", type=csv_list(PROVIDERS),
                        help="default: the preset's, less the compiled ones without a GPU")
    parser.add_argument("--max-seconds", type=float, default=float("inf"),
                        help="start no new case after this long (the first always runs); "
                             "the CSV holds the cases done")
    parser.add_argument("--out", type=Path,
                        help="CSV path, or a folder for <gpu>.csv; default "
                             "perf/results/<gpu>.csv, perf/results-interpreter.csv without a GPU")
    parser.add_argument("--environment", action="store_true",
                        help="print the device, versions and copy bandwidth, and exit")
    return parser.parse_args(argv)


def results_frame(rows: list[dict], copy_gbps: float, device_name: str) -> pd.DataFrame:
    df = add_speedups(pd.DataFrame(rows).reindex(columns=COLUMNS))
    return df.assign(copy_gbps=copy_gbps, gpu=device_name, torch=torch.__version__,
                     triton=triton.__version__, date=date.today().isoformat(),
                     interpreter=tritonbn.dispatch.INTERPRETING)


def main(argv=None) -> pd.DataFrame | None:
    args = parse_args(argv)
    interpreting = tritonbn.dispatch.INTERPRETING
    if not ON_GPU and not interpreting:
        sys.exit("no GPU, and triton was imported without TRITON_INTERPRET=1: tritonbn would "
                 "run its PyTorch reference, not its kernels")
    if not ON_GPU:
        torch.set_num_threads(1)
    if args.environment:
        for key, value in environment().items():
            print(f"{key}: {value}")
        return None
    preset = HEADLINE if args.headline else QUICK if args.quick else FULL
    args.activations = args.activations or list(preset.activations)
    modes = args.modes or list(preset.modes)
    providers = args.providers or [p for p in preset.providers if ON_GPU or p not in COMPILED]
    cases = plan_cases(args, preset)
    if not cases:
        sys.exit("the filters select no case")
    device_name = torch.cuda.get_device_name() if ON_GPU else "cpu"
    out = args.out or (PERF_DIR / "results" / f"{device_slug(device_name)}.csv" if ON_GPU
                       else PERF_DIR / "results-interpreter.csv")
    if out.is_dir():
        out = out / f"{device_slug(device_name)}.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    results = ResultsCsv(out)
    banner = ("INTERPRETER NUMBERS: no GPU, the Triton kernels ran on the CPU through Triton's "
              "interpreter; these times are not GPU timings" if interpreting else "")
    print(banner or f"{device_name}: {len(cases)} cases x {len(modes)} modes x "
                    f"{len(providers)} providers")

    start = time.perf_counter()
    copy_gbps = float("nan")
    if ON_GPU:
        copy_gbps = copy_bandwidth_gbps()
        print(f"device-to-device copy bandwidth: {copy_gbps:.0f} GB/s")
    rows = []
    with tqdm(total=len(cases) * len(modes) * len(providers), unit="row") as progress:
        for done, case in enumerate(cases):
            if done and time.perf_counter() - start > args.max_seconds:
                progress.write(f"--max-seconds reached: {done} of {len(cases)} cases run")
                break
            rows.extend(run_case(case, modes, providers, copy_gbps, progress))
            df = results_frame(rows, copy_gbps, device_name)
            written = results.write(df)
    print(summary_table(df))
    if written != out:
        print(f"{out} holds {results.rows_before} rows, more than this run's {len(df)}: "
              "left as it was")
    print(f"wrote {len(df)} rows to {written} in {time.perf_counter() - start:.0f} s")
    if banner:
        print(banner)
    return df


if __name__ == "__main__":
    main()
