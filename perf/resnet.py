"""Training-step throughput of torchvision's ResNet-50, with and without fuse_bn_act.

Four variants at batch 128 and 32, each a fresh randomly initialised ResNet-50 (weights=None,
the same seed for all) in channels_last, training under bfloat16 autocast with SGD + momentum
on random 224x224 images:

- eager: torchvision's model as is (nn.BatchNorm2d, then nn.ReLU);
- converted: ``tritonbn.fuse_bn_act(model)``, which fuses 49 of the 53 BatchNorms: bn1 and bn2
  of every bottleneck and the stem's with the ReLU after them, and each bottleneck's bn3 with
  the residual add and the ReLU after it (16); the 4 downsample BatchNorms end their
  Sequential, whose output the bn3 of the block adds, and stay nn.BatchNorm2d;
- compile, compile_converted: torch.compile of either model (default mode);
- on request only, cudagraphs and cudagraphs_converted: torch.compile(mode="reduce-overhead"),
  which replays each step's kernels from CUDA graphs, so the per-layer host time of the
  Python layers around the kernels is paid at capture only.

A step is forward, cross-entropy, backward and optimizer step; its time is the wall time from
one CUDA synchronisation to the next. After --warmup steps (the compiled variants compile in
the first one), --steps timed steps give the median ms per step and images/s; peak memory is
torch.cuda.max_memory_allocated over the timed steps. One profiled step also gives the share of
GPU kernel time spent in BatchNorm and ReLU kernels (BN_ACT_KERNELS; the ReLUs after the
residual sums count too). In compiled code that means Inductor's generated kernels whose names
(which list the aten ops each fuses) include a BatchNorm or a ReLU, and tritonbn's kernels,
which Inductor launches under their own names.

Writes <out-dir>/resnet50_<gpu>.csv after every variant (never over a file that holds more
rows: perf/results_csv.py) and prints a markdown table. --max-seconds starts no new variant
after that long. Needs torchvision: without it, it says so and exits with status 1.

Without a GPU it rehearses on a tiny model through Triton's interpreter: a stem and one
downsampling bottleneck of torchvision's Bottleneck block (4 fused pairs), batch 2 of
8x8 images, float32, eager and converted only (the compiled variants need a GPU), written to
results-interpreter-resnet.csv. Its times measure the interpreter, not the kernels.

    python perf/resnet.py                      # most of the time goes to four compiles
    python perf/resnet.py --batch-sizes 128 --variants eager,converted
"""
import argparse
import gc
import os
import re
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import pandas as pd
import torch
from torch import nn

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"  # before tritonbn imports triton

import tritonbn  # noqa: E402
from results_csv import ResultsCsv  # noqa: E402

VARIANTS = ("eager", "converted", "compile", "compile_converted")
CUDA_GRAPH_VARIANTS = ("cudagraphs", "cudagraphs_converted")  # by --variants only
BATCH_SIZES = (128, 32)
IMAGE_SIZE = 224
NUM_CLASSES = 1000
DEVICE = "cuda" if ON_GPU else "cpu"
TINY_BATCH_SIZE, TINY_IMAGE_SIZE = 2, 8  # without a GPU
# Kernels of BatchNorm (cuDNN, PyTorch's native CUDA kernels, tritonbn's Triton kernels) and of
# ReLU (a clamp forward, threshold backward), matched on the profiler's kernel names.
BN_ACT_KERNELS = re.compile(r"batch_norm|batchnorm|bn_fw|bn_bw|cudnn::bn|clamp|threshold|relu"
                            r"|_batch_stats_kernel|_normalize_kernel|_grad_reduce_kernel"
                            r"|_dx_kernel")
PERF_DIR = Path(__file__).resolve().parent


def tiny_resnet() -> nn.Module:
    """A stem and a downsampling bottleneck: every kind of pair ResNet-50 has."""
    from torchvision.models.resnet import Bottleneck

    def downsample(inplanes, planes, stride):
        return nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False),
                             nn.BatchNorm2d(planes))
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
        Bottleneck(8, 4, stride=2, downsample=downsample(8, 16, 2)),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, NUM_CLASSES))


def build(variant: str, seed: int):
    """(model, number of fused pairs) for variant, on DEVICE in channels_last."""
    from torchvision.models import resnet50

    torch.manual_seed(seed)
    model = resnet50(weights=None) if ON_GPU else tiny_resnet()
    model = model.to(DEVICE, memory_format=torch.channels_last)
    fused = 0
    if variant.endswith("converted"):
        model = tritonbn.fuse_bn_act(model)
        fused = len(model.fused_pairs)
    if variant.startswith("compile"):
        model = torch.compile(model)
    elif variant.startswith("cudagraphs"):
        model = torch.compile(model, mode="reduce-overhead")
    return model, fused


def make_step(model: nn.Module, batch_size: int, graph_trees: bool):
    """One training step on a fixed random batch, as a closure."""
    size = IMAGE_SIZE if ON_GPU else TINY_IMAGE_SIZE
    images = torch.randn(batch_size, 3, size, size, device=DEVICE)
    images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, NUM_CLASSES, (batch_size,), device=DEVICE)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)

    def step():
        if graph_trees:  # a new step for CUDA-graph trees
            torch.compiler.cudagraph_mark_step_begin()
        # The interpreter has no bfloat16 arithmetic: float32 without a GPU.
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=ON_GPU):
            loss = nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def synchronize():
    if ON_GPU:
        torch.cuda.synchronize()


def timed_ms(step, steps: int) -> list[float]:
    times = []
    for _ in range(steps):
        synchronize()
        start = time.perf_counter()
        step()
        synchronize()
        times.append(1e3 * (time.perf_counter() - start))
    return times


def bn_act_share(step) -> float:
    """Fraction of one step's GPU kernel time spent in BN_ACT_KERNELS."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        step()
        torch.cuda.synchronize()
    kernels = [event for event in profile.key_averages() if event.device_time_total > 0]
    total = sum(event.device_time_total for event in kernels)
    matched = sum(event.device_time_total for event in kernels if BN_ACT_KERNELS.search(event.key))
    return matched / total


def run(variant: str, batch_size: int, args) -> dict:
    model, fused = build(variant, args.seed)
    step = make_step(model, batch_size, variant.startswith("cudagraphs"))
    start = time.perf_counter()
    for _ in range(args.warmup):
        step()
    synchronize()
    warmup_s = time.perf_counter() - start
    peak_gib = share = float("nan")  # CUDA's allocator and kernels only
    if ON_GPU:
        torch.cuda.reset_peak_memory_stats()
    times = timed_ms(step, args.steps)
    if ON_GPU:
        peak_gib = torch.cuda.max_memory_allocated() / 2**30
        share = bn_act_share(step)
    ms = statistics.median(times)
    del model, step
    gc.collect()
    if ON_GPU:
        torch.cuda.empty_cache()
    torch._dynamo.reset()
    return dict(batch_size=batch_size, variant=variant, images_per_s=batch_size / ms * 1e3,
                ms_per_step=ms, ms_min=min(times), ms_max=max(times), peak_mem_gib=peak_gib,
                bn_act_share=share, fused_pairs=fused, warmup_s=warmup_s, steps=args.steps)


def results_table(rows: list, gpu: str, torchvision_version: str) -> pd.DataFrame:
    df = pd.DataFrame(rows)
    eager_ms = df[df.variant == "eager"].set_index("batch_size").ms_per_step
    # The interpreter's times measure the interpreter: no speedups from them.
    df["speedup_vs_eager"] = df.batch_size.map(eager_ms) / df.ms_per_step if ON_GPU else None
    return df.assign(gpu=gpu, model="resnet50" if ON_GPU else "tiny bottleneck net",
                     torch=torch.__version__, torchvision=torchvision_version,
                     date=date.today().isoformat(), interpreter=not ON_GPU)


def markdown(df: pd.DataFrame) -> str:
    lines = ["| batch | variant | images/s | ms/step | vs eager | peak GiB | BN+ReLU kernels |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for row in df.itertuples():
        speedup = "" if pd.isna(row.speedup_vs_eager) else f"{row.speedup_vs_eager:.2f}x"
        share = "" if pd.isna(row.bn_act_share) else f"{100 * row.bn_act_share:.1f}%"
        peak = "" if pd.isna(row.peak_mem_gib) else f"{row.peak_mem_gib:.1f}"
        lines.append(f"| {row.batch_size} | {row.variant} | {row.images_per_s:.0f} | "
                     f"{row.ms_per_step:.1f} | {speedup} | {peak} | {share} |")
    return "\n".join(lines)


def csv_list(kind):
    return lambda text: [kind(item) for item in text.split(",") if item]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", type=csv_list(int), default=list(BATCH_SIZES))
    parser.add_argument("--variants", type=csv_list(str), default=list(VARIANTS))
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps, compile included")
    parser.add_argument("--steps", type=int, default=15, help="timed steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-seconds", type=float, default=float("inf"),
                        help="start no new variant after this long (the first always runs)")
    parser.add_argument("--out-dir", type=Path,
                        help="default perf/results, perf without a GPU")
    args = parser.parse_args(argv)
    unknown = set(args.variants) - set(VARIANTS + CUDA_GRAPH_VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; choose from "
                     f"{', '.join(VARIANTS + CUDA_GRAPH_VARIANTS)}")
    if not args.variants or not args.batch_sizes:
        parser.error("name at least one variant and one batch size")
    try:
        import torchvision
    except ImportError:
        print("resnet.py needs torchvision (pip install torchvision); it is not installed",
              file=sys.stderr)
        return 1
    from sweep import device_slug  # one naming rule for every results file

    if ON_GPU:
        torch.backends.cudnn.benchmark = True
        gpu = torch.cuda.get_device_name()
        out_dir = args.out_dir or PERF_DIR / "results"
        out = out_dir / f"resnet50_{device_slug(gpu)}.csv"
        print(f"{gpu}: ResNet-50 training step, bf16 autocast, channels_last; torch "
              f"{torch.__version__}, torchvision {torchvision.__version__}")
    else:
        torch.set_num_threads(1)  # tiny tensors: more threads only wait for each other
        gpu = "cpu"
        out_dir = args.out_dir or PERF_DIR
        out = out_dir / "results-interpreter-resnet.csv"
        left_out = [v for v in args.variants if v not in ("eager", "converted")]
        args.variants = [v for v in args.variants if v in ("eager", "converted")]
        args.batch_sizes = [TINY_BATCH_SIZE]
        print(f"INTERPRETER NUMBERS: no GPU, a tiny bottleneck net at batch {TINY_BATCH_SIZE} "
              f"through Triton's interpreter; not GPU timings. Left out (they need a GPU): "
              f"{', '.join(left_out) or 'none'}")
    out_dir.mkdir(parents=True, exist_ok=True)
    results = ResultsCsv(out)
    rows = []
    start = time.perf_counter()
    for batch_size in args.batch_sizes:
        for variant in args.variants:
            if rows and time.perf_counter() - start > args.max_seconds:
                print(f"--max-seconds reached: batch {batch_size} {variant} and later not run")
                break
            row = run(variant, batch_size, args)
            print(f"batch {batch_size:>4} {variant:>17}: {row['ms_per_step']:7.1f} ms/step, "
                  f"{row['images_per_s']:6.0f} images/s (warm-up {row['warmup_s']:.0f} s)",
                  flush=True)
            rows.append(row)
            df = results_table(rows, gpu, torchvision.__version__)
            written = results.write(df)  # after every row: a cut-short run keeps what it had
    print(markdown(df))
    print(f"wrote {len(df)} rows to {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
