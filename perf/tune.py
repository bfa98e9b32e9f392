"""Times each Triton launcher alone under several tile geometries, against copy bandwidth.

For choosing tiling.TILE_BYTES / NUM_WARPS / PROGRAMS_PER_SM: prints, per shape and geometry,
the median ms of batch_stats (1 read pass), normalize_act (read + write) and the training
backward (4 read passes + 1 write) and the bandwidth each reaches on its own bytes.

    python perf/tune.py            # on a GPU
"""
import itertools

import torch
from triton.testing import do_bench

from tritonbn import kernels
from tritonbn.activations import RELU
from tritonbn.kernels.layout import strides_ncs
from tritonbn.kernels import tiling

SHAPES = [((128, 256, 56, 56), torch.bfloat16, torch.channels_last),
          ((128, 256, 56, 56), torch.float32, torch.contiguous_format),
          ((128, 2048, 7, 7), torch.bfloat16, torch.channels_last),
          ((32, 64, 56, 56), torch.bfloat16, torch.channels_last)]
GEOMETRIES = [(8192, 8, 8), (16384, 8, 8), (8192, 4, 8), (8192, 8, 16), (16384, 16, 4),
              (32768, 16, 4)]  # (TILE_BYTES, NUM_WARPS, PROGRAMS_PER_SM)


def copy_bandwidth() -> float:
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / do_bench(lambda: dst.copy_(src)) / 1e6


def time_launchers(x):
    """(name, median ms, GB/s on its own passes) for each launcher on input x."""
    C = x.shape[1]
    dy = torch.randn_like(x)
    w, b = torch.ones(C, device="cuda"), torch.zeros(C, device="cuda")
    rm, rv = torch.zeros(C, device="cuda"), torch.ones(C, device="cuda")
    mean, var = kernels.batch_stats(x, rm, rv, 0.1)
    runs = (("stats", lambda: kernels.batch_stats(x, rm, rv, 0.1), 1),
            ("normalize", lambda: kernels.normalize_act(x, mean, var, w, b, None, 1e-5, RELU,
                                                        0.0), 2),
            ("backward", lambda: kernels.normalize_act_backward(dy, x, mean, var, w, b, None,
                                                                1e-5, True, RELU, 0.0), 5))
    for name, fn, passes in runs:
        ms = do_bench(fn)
        yield name, ms, passes * x.numel() * x.element_size() / ms / 1e6


def main():
    copy_gbps = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: copy {copy_gbps:.0f} GB/s")
    for (shape, dtype, fmt), (tile, warps, per_sm) in itertools.product(SHAPES, GEOMETRIES):
        tiling.TILE_BYTES, tiling.NUM_WARPS, tiling.PROGRAMS_PER_SM = tile, warps, per_sm
        tiling._plan.cache_clear()
        x = torch.randn(shape, device="cuda", dtype=dtype).contiguous(memory_format=fmt)
        cells = [f"{name} {ms:.3f} ms {100 * gbps / copy_gbps:3.0f}%"
                 for name, ms, gbps in time_launchers(x)]
        plan = tiling.make_plan(x, strides_ncs(x))
        print(f"{str(shape):20s} {str(dtype)[6:]:9s} tile={tile:5d} warps={warps:2d} "
              f"per_sm={per_sm:2d} blocks=({plan.block_n},{plan.block_s},{plan.block_c}) "
              f"splits={plan.splits:4d} | " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
