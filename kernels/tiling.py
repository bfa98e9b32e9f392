"""How every kernel in this package walks an (N, C, *spatial) tensor: views, tiles and splits.

A tensor is seen as (N, C, S) with one stride per axis, S being the spatial dims collapsed into
one. Contiguous, channels_last and channels_last_3d tensors all collapse, so no layout needs a
copy. When the (n, s) rows are evenly strided (channels_last, 2-D input, N == 1) they are
flattened into one axis of N * S rows.

Each program owns BLOCK_C channels and a chunk of rows, walked in [BLOCK_N, BLOCK_S, BLOCK_C]
tiles: channels-contiguous layouts take wide BLOCK_C tiles, so each row of the tile is one
coalesced segment; channel-major layouts take BLOCK_C = 1 and long runs along S. The rows of
each channel block are split over enough programs to fill the GPU, whatever the shape.

Each loop iteration loads two tiles before using either (PAIR_N or PAIR_S apart): the
reductions keep per-lane accumulators, whose registers cap how many programs an SM holds,
so a second tile in flight per iteration is the cheap way to keep more bytes in flight.
"""
import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import merge

# Programs per SM to aim for: enough in flight to hide memory latency.
PROGRAMS_PER_SM = 8
# Bytes per tile, per program iteration: 64 bytes per thread at 4 warps.
TILE_BYTES = 8192
NUM_WARPS = 4
# Offsets at or past this switch the kernels to int64 indexing.
INT32_LIMIT = 2**31
# The interpreter runs programs one after another: fewer, larger programs run faster there.
INTERPRETER_SMS = 1


@dataclass(frozen=True, eq=False)
class Plan:
    """A launch geometry shared by every kernel that walks the same tensors. Plans come from
    a cache keyed on shapes and strides, so a plan's identity stands for them in launch cache
    keys (hashing by identity is also what keeps those keys cheap)."""

    n: int  # rows along the outer axis (1 when rows are flattened)
    s: int  # rows along the inner axis (N * S when flattened)
    block_n: int
    block_s: int
    block_c: int
    chunk_n: int  # rows of the outer axis per program
    chunk_s: int
    split_s: int  # programs along the inner axis for one channel block
    splits: int  # programs for one channel block
    int64: bool
    num_warps: int
    pair_n: int  # offset of each iteration's second tile: one of pair_n, pair_s is 0
    pair_s: int
    grid: tuple  # (channel blocks, splits)
    group: int  # splits per group when the partials merge (merge.merge_partials)
    block_rows: int  # partial rows per merge iteration
    scratch_rows: int  # rows of each half of the merge's [2, scratch_rows, channels] scratch
    counters: int  # counters a merging launch needs

    def strides(self, ncs, tensor: str = "") -> dict:
        """A tensor's (stride_n, stride_c, stride_s) in this plan's view, named as the kernels'
        parameters are: stride_<tensor>n, stride_<tensor>c, stride_<tensor>s."""
        stride_n, stride_c, stride_s = ncs
        if self.n == 1:  # flattened rows: stride_s walks all N * S rows
            stride_n = 0
        return {f"stride_{tensor}n": stride_n, f"stride_{tensor}c": stride_c,
                f"stride_{tensor}s": stride_s}

    @property
    def split_rows(self) -> dict:
        """How the rows are split over programs, as the kernels' parameters."""
        return dict(CHUNK_N=self.chunk_n, CHUNK_S=self.chunk_s, SPLIT_S=self.split_s)

    @property
    def split(self) -> dict:
        """split_rows, and the split count and merge group of the reductions (merge.py)."""
        return dict(self.split_rows, SPLITS=self.splits, GROUP=self.group)

    @property
    def tiles(self) -> dict:
        """The constexpr tile arguments and num_warps of every kernel walking this plan."""
        return dict(BLOCK_N=self.block_n, BLOCK_S=self.block_s, BLOCK_C=self.block_c,
                    PAIR_N=self.pair_n, PAIR_S=self.pair_s, INT64=self.int64,
                    num_warps=self.num_warps)


def make_plan(t: torch.Tensor, ncs, *others_ncs) -> Plan:
    """The plan for non-empty t, whose strides_ncs() is ncs (and for tensors of its shape whose
    strides are others_ncs). Cached: this runs on every launch."""
    device = t.device
    sms = _sm_count(device.index) if device.type == "cuda" else INTERPRETER_SMS
    strides = (ncs,) + others_ncs
    try:
        return _plan(t.shape, strides, t.element_size(), sms)
    except TypeError:  # symbolic sizes (a trace): the tiles need numbers, so specialise
        return _plan(tuple(map(int, t.shape)), tuple(tuple(map(int, s)) for s in strides),
                     t.element_size(), sms)


def _flat_rows(n, s, ncs) -> bool:
    stride_n, _, stride_s = ncs
    return n == 1 or s == 1 or stride_n == s * stride_s


def _reach(n, c, s, all_ncs) -> int:
    """The largest element offset any tensor of this view can address."""
    return max(max(st_n * (n - 1) + st_c * (c - 1) + st_s * (s - 1), n * c * s)
               for st_n, st_c, st_s in all_ncs)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.lru_cache(maxsize=4096)
def _plan(shape, all_ncs, element_size, sms):
    n, channels = shape[0], shape[1]
    s = math.prod(shape[2:])
    channels_contiguous = all_ncs[0][1] == 1 and channels > 1
    int64 = _reach(n, channels, s, all_ncs) >= INT32_LIMIT
    if all(_flat_rows(n, s, ncs) for ncs in all_ncs):  # everything on the inner axis
        n, s = 1, n * s
    tile = TILE_BYTES // element_size
    if channels_contiguous:
        # Up to 512 contiguous bytes per tile row.
        block_c = min(triton.next_power_of_2(channels), 512 // element_size, tile)
    else:
        block_c = 1
    block_s = min(triton.next_power_of_2(s), tile // block_c)
    block_n = min(triton.next_power_of_2(n), tile // (block_c * block_s))
    tiles_n, tiles_s = triton.cdiv(n, block_n), triton.cdiv(s, block_s)
    wanted = max(1, triton.cdiv(sms * PROGRAMS_PER_SM, triton.cdiv(channels, block_c)))
    split_n = min(tiles_n, wanted)
    chunk_n = triton.cdiv(tiles_n, split_n) * block_n
    split_s = min(tiles_s, triton.cdiv(wanted, triton.cdiv(n, chunk_n)))
    chunk_s = triton.cdiv(tiles_s, split_s) * block_s
    # Each loop iteration reads two tiles, along whichever axis a program walks several.
    if chunk_s > block_s:
        pair_n, pair_s = 0, block_s
    else:
        pair_n, pair_s = (block_n if chunk_n > block_n else 0), 0
    chunk_n = triton.cdiv(chunk_n, block_n + pair_n) * (block_n + pair_n)
    chunk_s = triton.cdiv(chunk_s, block_s + pair_s) * (block_s + pair_s)
    split_n, split_s = triton.cdiv(n, chunk_n), triton.cdiv(s, chunk_s)
    splits = split_n * split_s
    channel_blocks = triton.cdiv(channels, block_c)
    group, block_rows = merge.merge_geometry(splits, block_c)
    return Plan(n, s, block_n, block_s, block_c, chunk_n, chunk_s, split_s, splits,
                int64, NUM_WARPS, pair_n, pair_s, (channel_blocks, splits), group, block_rows,
                merge.scratch_rows(splits, group),
                merge.counters_needed(channel_blocks, splits, group))


@triton.jit
def program_index(axis: tl.constexpr, REVERSE: tl.constexpr):
    """tl.program_id(axis), or with REVERSE counted from the last program. GPUs start programs
    roughly in index order, so a second pass over a tensor run in reverse begins with the tiles
    the reduction pass before it read last, which L2 may still hold."""
    if REVERSE:
        return tl.num_programs(axis) - 1 - tl.program_id(axis)
    return tl.program_id(axis)


@triton.jit
def program_rows(N, S, CHUNK_N, CHUNK_S, SPLIT_S, REVERSE: tl.constexpr = False):
    """This program's row ranges [n_lo, n_hi) x [s_lo, s_hi)."""
    split = program_index(1, REVERSE)
    n_lo = (split // SPLIT_S) * CHUNK_N
    s_lo = (split % SPLIT_S) * CHUNK_S
    return n_lo, tl.minimum(n_lo + CHUNK_N, N), s_lo, tl.minimum(s_lo + CHUNK_S, S)


@triton.jit
def program_channels(C, BLOCK_C: tl.constexpr, REVERSE: tl.constexpr = False):
    c = program_index(0, REVERSE) * BLOCK_C + tl.arange(0, BLOCK_C)
    return c, c < C


# The tile helpers below take two tuples a kernel builds once:
# - a view, (ptr, stride_n, stride_c, stride_s): one tensor in the (N, C, S) view;
# - bounds, (c, c_mask, n_hi, s_hi): the program's channels and the ends of its rows;
# and the tile's constexpr shape, BLOCK_N x BLOCK_S (x BLOCK_C, c's length), and index width.

@triton.jit
def tile_offsets(view, n0, s0, c, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
                 INT64: tl.constexpr):
    """Element offsets, from view's pointer, of the [BLOCK_N, BLOCK_S, BLOCK_C] tile whose
    first row is (n0, s0)."""
    n = n0 + tl.arange(0, BLOCK_N)
    s = s0 + tl.arange(0, BLOCK_S)
    if INT64:
        n = n.to(tl.int64)
        s = s.to(tl.int64)
        c = c.to(tl.int64)
    return n[:, None, None] * view[1] + s[None, :, None] * view[3] + c[None, None, :] * view[2]


@triton.jit
def tile_mask(n0, s0, bounds, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr):
    n = n0 + tl.arange(0, BLOCK_N)
    s = s0 + tl.arange(0, BLOCK_S)
    return ((n < bounds[2])[:, None, None] & (s < bounds[3])[None, :, None]
            & bounds[1][None, None, :])


@triton.jit
def load_tile(view, n0, s0, bounds, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
              INT64: tl.constexpr):
    """(values, mask) of the tile at (n0, s0); masked-out lanes read 0."""
    mask = tile_mask(n0, s0, bounds, BLOCK_N, BLOCK_S)
    offsets = tile_offsets(view, n0, s0, bounds[0], BLOCK_N, BLOCK_S, INT64)
    return tl.load(view[0] + offsets, mask=mask, other=0.0), mask


@triton.jit
def store_tile(view, values, mask, n0, s0, bounds, BLOCK_N: tl.constexpr,
               BLOCK_S: tl.constexpr, INT64: tl.constexpr):
    ptr = view[0]
    offsets = tile_offsets(view, n0, s0, bounds[0], BLOCK_N, BLOCK_S, INT64)
    tl.store(ptr + offsets, values.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def channel_sum(tile):
    """Sum of a [BLOCK_N, BLOCK_S, BLOCK_C] tile over its rows: a [BLOCK_C] vector."""
    return tl.sum(tl.sum(tile, axis=0), axis=0)
