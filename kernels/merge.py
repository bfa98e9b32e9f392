"""Split reductions that merge themselves: the last program to finish adds up the partials.

A reduction over (N, S) runs as SPLITS programs per channel block, each storing one row of
per-channel partial sums. Rather than a second launch to add the rows up, the programs count
themselves in on a counter: whoever arrives last reads every row, in index order, so the
result is the same bits whichever program that is. One program reading ~1000 rows serially
would stall the launch, so the rows are merged in two levels: the last program of each group
of GROUP consecutive splits adds up its group into a group row, and the last of the group
mergers adds up the group rows. Each level reads at most GROUP rows (GROUP ~ sqrt(SPLITS)).

Counters and partials live in buffers kept per (device, stream, dtype) (workspace()), so a call
allocates neither. The counters are all zero between launches: each last arriver stores 0
back, so no memset is launched per call and CUDA-graph replays find them zeroed. Launches on
one stream run one after another and may share the buffers; another stream gets its own.
Under Triton's interpreter programs run one after another and atomics work, so the same code
runs in CPU tests.
"""
import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .launch import launches_traced

# Elements per [rows, channels] tile the mergers load per iteration.
MERGE_TILE = 4096


@triton.jit
def arrive(counter_ptr, expected, active):
    """Count this program in at counter_ptr where `active`; True in the program that arrives
    there last of `expected`, which also resets the counter. Every thread's earlier stores
    are visible to that program once it returns True."""
    tl.debug_barrier()  # all threads' stores issue before the release below
    arrived = tl.atomic_add(counter_ptr, 1, mask=active, sem="acq_rel")
    last = active & (arrived == expected - 1)
    tl.store(counter_ptr, 0, mask=last)
    return last


@triton.jit
def sum_rows(ptr, first_row, rows, half, c, c_mask, C, ACC: tl.constexpr,
             BLOCK_ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per-channel totals of rows [first_row, first_row + rows) of the two [*, C] halves at
    ptr and ptr + half, added up in row order."""
    first = tl.zeros((BLOCK_ROWS, BLOCK_C), ACC)
    second = tl.zeros((BLOCK_ROWS, BLOCK_C), ACC)
    for r0 in range(0, rows, BLOCK_ROWS):
        r = r0 + tl.arange(0, BLOCK_ROWS)
        offs = (first_row + r)[:, None] * C + c[None, :]
        mask = (r < rows)[:, None] & c_mask[None, :]
        # .cg: past the L1 of this SM, which may hold lines read before other SMs wrote them.
        first += tl.load(ptr + offs, mask=mask, other=0.0, cache_modifier=".cg")
        second += tl.load(ptr + half + offs, mask=mask, other=0.0, cache_modifier=".cg")
    return tl.sum(first, axis=0), tl.sum(second, axis=0)


@triton.jit
def merge_partials(scratch, first, second, c, c_mask, C, ACC: tl.constexpr,
                   BLOCK_ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    """Store this program's [BLOCK_C] partials `first` and `second` and merge every program's.

    scratch: (partial_ptr, counter_ptr, SPLITS, GROUP), with partial_ptr a
    [2, SPLITS + cdiv(SPLITS, GROUP), C] scratch and counter_ptr the launch's counters,
    cdiv(SPLITS, GROUP) + 1 per channel block and one more (arrive_last_block).
    Returns (done, first_total, second_total): done is True in exactly one program of the
    channel block, the one whose totals are valid.
    """
    partial_ptr, counter_ptr, SPLITS, GROUP = scratch
    split = tl.program_id(1)
    groups = tl.cdiv(SPLITS, GROUP)
    counter_ptr += tl.program_id(0) * (groups + 1)
    rows = SPLITS + groups
    half = rows * C
    tl.store(partial_ptr + split * C + c, first, mask=c_mask)
    tl.store(partial_ptr + half + split * C + c, second, mask=c_mask)
    group = split // GROUP
    in_group = tl.minimum(GROUP, SPLITS - group * GROUP)
    group_last = arrive(counter_ptr + group, in_group, split >= 0)
    if group_last:
        group_first, group_second = sum_rows(partial_ptr, group * GROUP, in_group, half, c,
                                             c_mask, C, ACC, BLOCK_ROWS, BLOCK_C)
        tl.store(partial_ptr + (SPLITS + group) * C + c, group_first, mask=c_mask)
        tl.store(partial_ptr + half + (SPLITS + group) * C + c, group_second, mask=c_mask)
    done = arrive(counter_ptr + groups, groups, group_last)
    first_total = tl.zeros((BLOCK_C,), ACC)
    second_total = tl.zeros((BLOCK_C,), ACC)
    if done:
        first_total, second_total = sum_rows(partial_ptr, SPLITS, groups, half, c, c_mask, C,
                                             ACC, BLOCK_ROWS, BLOCK_C)
    return done, first_total, second_total


@triton.jit
def arrive_last_block(scratch, done):
    """Called with merge_partials' scratch and `done` after using the totals: True in the one
    program of the launch whose channel block is the last to finish its merge."""
    _, counter_ptr, SPLITS, GROUP = scratch
    blocks = tl.num_programs(0)
    return arrive(counter_ptr + blocks * (tl.cdiv(SPLITS, GROUP) + 1), blocks, done)


def merge_geometry(splits: int, block_c: int) -> tuple[int, int]:
    """(GROUP, BLOCK_ROWS): splits per group, and rows per merge iteration."""
    group = triton.next_power_of_2(math.isqrt(splits - 1) + 1) if splits > 1 else 1
    return group, max(1, min(group, MERGE_TILE // block_c))


def scratch_rows(splits: int, group: int) -> int:
    """Rows of each half of merge_partials' scratch: one per split, one per group."""
    return splits + triton.cdiv(splits, group)


def counters_needed(channel_blocks: int, splits: int, group: int) -> int:
    """Counters for a launch: each channel block's group and final counters, and one more
    that the channel blocks' final mergers arrive at."""
    return channel_blocks * (triton.cdiv(splits, group) + 1) + 1


class Workspace(NamedTuple):
    counters: torch.Tensor  # int32, zero between launches
    partials: torch.Tensor


_workspaces = {}  # (device, stream, dtype of the partials) -> the stream's Workspace
# Buffers a larger one replaced. A CUDA graph captured with a buffer keeps writing to it at
# every replay, so it is never freed: growth doubles, so these add up to less than the last.
_replaced = []


def workspace(device: torch.device, counters: int, partials: int, dtype: torch.dtype):
    """(counters, partials): at least that many zeroed int32 counters and `dtype` scratch
    elements, private to the current stream of `device`. Launches queued on one stream run
    one after another, so they share them; each stream has its own, as must each thread that
    runs kernels on the CPU through the interpreter. Fresh ones for a traced launch."""
    if launches_traced():
        return Workspace(torch.zeros(counters, dtype=torch.int32, device=device),
                         torch.empty(partials, dtype=dtype, device=device))
    stream = torch._C._cuda_getCurrentRawStream(device.index) if device.type == "cuda" else 0
    key = (device, stream, dtype)
    found = _workspaces.get(key)
    if found is None or found.counters.numel() < counters or found.partials.numel() < partials:
        old = Workspace(None, None) if found is None else found
        found = _workspaces[key] = Workspace(_grown(old.counters, counters, torch.int32, device),
                                             _grown(old.partials, partials, dtype, device))
    return found


def _grown(buffer, size: int, dtype, device) -> torch.Tensor:
    """buffer if it holds size elements, else a zeroed one at least twice its size."""
    if buffer is not None and buffer.numel() >= size:
        return buffer
    if buffer is not None:
        _replaced.append(buffer)
    return torch.zeros(max(size, 1024, 2 * (0 if buffer is None else buffer.numel())),
                       dtype=dtype, device=device)
