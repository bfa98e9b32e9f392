"""SyncBatchNormAct against nn.SyncBatchNorm + nn.ReLU: agreement, collectives, step time.

Starts --world processes in one process group and, for each per-rank shape and dtype:

1. checks one training step of SyncBatchNormAct(relu) against float64 PyTorch over the whole
   group's batch (output, input gradient, parameter gradients summed over the ranks, running
   statistics), within twice the error of eager nn.BatchNorm2d + ReLU (float32 parameters,
   input in the dtype) over that batch in one process; nn.SyncBatchNorm's own errors are
   listed beside them (GPU only: it refuses CPU tensors). Also counts the step's
   collectives and its host reads of tensor values.
2. times a training step (forward + backward, synchronised), the median over --iters steps
   on the slowest rank, for SyncBatchNormAct and for nn.SyncBatchNorm + nn.ReLU (GPU only).

On one GPU, gloo puts every rank on it (NCCL needs a GPU per rank: --backend nccl). Without a
GPU the ranks run CPU tensors through Triton's interpreter (--tiny: a smoke run, no timings
worth reading).

    python perf/sync_bench.py --out perf/results/sync_h100.csv   # 2 ranks, gloo, one GPU
    python perf/sync_bench.py --backend nccl --world 4           # 4 GPUs
    python perf/sync_bench.py --tiny                             # any machine
"""
import argparse
import csv
import datetime
import os
import socket
import statistics
import sys
import time

import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: CPU tensors run kernels

import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import tritonbn  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
HOST_READS = ("_local_scalar_dense", "nonzero", "masked_select")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--backend", default="gloo", choices=["gloo", "nccl"])
    parser.add_argument("--shapes", default="4x1024x14x14,8x256x28x28,32x64x56x56",
                        help="per-rank N x C x H x W, comma separated")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--out", help="CSV file for the rows")
    parser.add_argument("--tiny", action="store_true",
                        help="3x5x4x3, fp32, 2 iterations: a smoke run")
    args = parser.parse_args(argv)
    if args.tiny:
        args.shapes, args.dtypes, args.iters, args.warmup = "3x5x4x3", "fp32", 2, 1
    args.shapes = [tuple(int(n) for n in s.split("x")) for s in args.shapes.split(",")]
    args.dtypes = args.dtypes.split(",")
    return args


class CountOps(TorchDispatchMode):
    """Collectives and host reads of tensor values dispatched under it."""

    def __init__(self):
        super().__init__()
        self.collectives, self.host_reads = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.collectives += func.namespace == "c10d"
        self.host_reads += func.overloadpacket.__name__ in HOST_READS
        return func(*args, **(kwargs or {}))


def make_layer(provider, C, device):
    if provider == "tritonbn":
        return tritonbn.SyncBatchNormAct(C, device=device)
    return nn.Sequential(nn.SyncBatchNorm(C, device=device), nn.ReLU())


def bn_of(layer):
    return layer if isinstance(layer, tritonbn.SyncBatchNormAct) else layer[0]


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


def check(rank, world, shape, dtype, device, providers):
    """({provider: (errors, collectives, host reads)}, yardstick errors) of one training step
    over the group's batch; errors in the order of TENSORS."""
    N, C = shape[0], shape[1]
    generator = torch.Generator().manual_seed(1234)  # the same batch on every rank
    full = torch.randn((N * world, *shape[1:]), generator=generator, dtype=torch.float64)
    full = (full * 2 + 0.5).to(dtype).double().to(device)
    dy = torch.randn(full.shape, generator=generator, dtype=torch.float64).to(device)
    weight = torch.rand(C, generator=generator, dtype=torch.float64).to(device) + 0.5
    bias = torch.randn(C, generator=generator, dtype=torch.float64).to(device)
    lo, hi = rank * N, (rank + 1) * N

    expected = {}
    for d in (torch.float64, dtype):
        bn = nn.BatchNorm2d(C, device=device, dtype=torch.float64 if d == torch.float64
                            else torch.float32)
        with torch.no_grad():
            bn.weight.copy_(weight)
            bn.bias.copy_(bias)
        x = full.to(d, copy=True).requires_grad_()
        y = F.relu(bn(x))
        y.backward(dy.to(d))
        expected[d] = [y.detach(), x.grad, bn.weight.grad, bn.bias.grad, bn.running_mean,
                       bn.running_var]
    yardstick = [max_err(e, e64) for e, e64 in zip(expected[dtype], expected[torch.float64])]
    results = {}
    for provider in providers:
        layer = make_layer(provider, C, device)
        bn = bn_of(layer)
        with torch.no_grad():
            bn.weight.copy_(weight)
            bn.bias.copy_(bias)
        x = full[lo:hi].to(dtype).contiguous(memory_format=torch.channels_last)
        x.requires_grad_()
        with CountOps() as ops:
            y = layer(x)
            y.backward(dy[lo:hi].to(dtype))
        grads = [bn.weight.grad.clone(), bn.bias.grad.clone()]
        for g in grads:
            dist.all_reduce(g)
        got = [y, x.grad, *grads, bn.running_mean, bn.running_var]
        errors = [max_err(ours, e64[lo:hi] if i < 2 else e64)
                  for i, (ours, e64) in enumerate(zip(got, expected[torch.float64]))]
        results[provider] = errors, ops.collectives, ops.host_reads
    return results, yardstick


TENSORS = ("y", "dx", "dweight", "dbias", "running_mean", "running_var")


def step_ms(layer, x, dy, iters, warmup):
    """Median ms of a synchronised training step on this rank."""
    def step():
        layer(x).backward(dy)
        if x.is_cuda:
            torch.cuda.synchronize()
    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        dist.barrier()  # the ranks start each step together
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def slowest(value, device):
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def worker(rank, args, port):
    if ON_GPU:
        device = torch.device("cuda", rank if args.backend == "nccl" else 0)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(1)
    dist.init_process_group(args.backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=args.world, timeout=datetime.timedelta(seconds=300))
    # nn.SyncBatchNorm refuses CPU tensors.
    providers = ("tritonbn", "torch") if ON_GPU else ("tritonbn",)
    rows, failures = [], 0
    for shape in args.shapes:
        for dtype_name in args.dtypes:
            dtype = DTYPES[dtype_name]
            results, yardstick = check(rank, args.world, shape, dtype, device, providers)
            x = torch.randn(shape, device=device, dtype=dtype).contiguous(
                memory_format=torch.channels_last)
            dy = torch.randn_like(x)
            for provider in providers:
                errors, collectives, host_reads = results[provider]
                errors = [slowest(e, device) for e in errors]
                bound = [2 * e + 4 * torch.finfo(dtype).eps for e in yardstick]
                ok = all(e <= b for e, b in zip(errors, bound))
                failures += provider == "tritonbn" and not ok
                layer = make_layer(provider, shape[1], device)
                ms = slowest(step_ms(layer, x, dy, args.iters, args.warmup), device)
                rows.append(dict(
                    shape="x".join(map(str, shape)), dtype=dtype_name, provider=provider,
                    step_ms=round(ms, 4), within_2x_eager=ok, collectives=collectives,
                    host_reads=host_reads,
                    **{f"err_{name}": f"{e:.2e}" for name, e in zip(TENSORS, errors)},
                    **{f"eager_err_{name}": f"{e:.2e}" for name, e in zip(TENSORS, yardstick)},
                    world=args.world, backend=args.backend,
                    device=torch.cuda.get_device_name(device) if ON_GPU else "cpu (interpreter)",
                    torch=torch.__version__, triton=_triton_version(),
                    date=datetime.date.today().isoformat()))
    if rank == 0:
        _report(rows, args.out)
    dist.destroy_process_group()
    if failures:
        raise SystemExit(f"rank {rank}: {failures} case(s) outside twice eager's error")


def _triton_version():
    import triton
    return triton.__version__


def _report(rows, out):
    by_case = {}
    for row in rows:
        by_case.setdefault((row["shape"], row["dtype"]), {})[row["provider"]] = row
    print("| shape per rank | dtype | provider | step ms | vs nn.SyncBatchNorm + ReLU | "
          "collectives | host reads | err y | err dx | within 2x eager |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for (shape, dtype), providers in by_case.items():
        for provider, row in providers.items():
            ratio = ""
            if "torch" in providers:
                ratio = f"{providers['torch']['step_ms'] / row['step_ms']:.2f}x"
            print(f"| {shape} | {dtype} | {provider} | {row['step_ms']:.3f} | {ratio} | "
                  f"{row['collectives']} | {row['host_reads']} | {row['err_y']} | "
                  f"{row['err_dx']} | {row['within_2x_eager']} |")
    if out:
        with open(out, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        print(f"wrote {out}")


def main(argv=None):
    args = parse_args(argv)
    if args.backend == "nccl" and args.world > torch.cuda.device_count():
        sys.exit(f"--backend nccl needs a GPU per rank: {torch.cuda.device_count()} visible")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # CUDA cannot start in a forked child; without it, forking skips re-importing torch.
    mp.start_processes(worker, args=(args, port), nprocs=args.world,
                       start_method="spawn" if ON_GPU else "fork")


if __name__ == "__main__":
    main()
