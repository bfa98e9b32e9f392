"""Forward kernels: batch statistics, then normalize + affine + activation.

Training takes two launches and three passes over memory (read x for the statistics, read x
again and write y; a residual adds one read): a split reduction whose last programs merge the
partial sums into mean/var and update the running statistics (merge.py), then an elementwise
pass that writes y.
The split lets every shape fill the GPU (a few channels with a huge N*H*W, or many channels
with a small one) at the price of the second read of x, which comes from L2 when x fits there.
Eval is the elementwise pass alone, on the running statistics: one read, one write. Each
program derives rstd from var itself, so no launch is spent on per-channel vectors.

Statistics are sums of (x - k) and (x - k)^2 around a per-channel shift k, the mean of the
channel's first tile: with k near the mean, E[d^2] - E[d]^2 keeps its precision even when
|mean| >> std, and the running sums stay small instead of drifting by (mean - k) per element,
which cost ~1e-7 std of accuracy in the mean with k a single element. Every program derives
the same k from the same tile, so partials merge by plain addition. The statistics keep k
and mean - k apart, and every later pass computes (x - k) - (mean - k): x - k is exact for x
near the mean, where x - mean with the mean rounded to float32 would carry its rounding
error, |mean| * 2^-24, into every output (6e-5 of std once |mean| / std reaches 1e3).
The derivations: docs/DESIGN.md.
"""

import torch
import triton
import triton.language as tl

from .activations import activation, div_rn
from .affine import (channel_affine, dtype_of, float_pairs, joined, load_x_r, pre_activation,
                     triton_dtype)
from .dtypes import accumulate_dtype
from .launch import CachedLaunch, Launch
from .layout import strides_ncs
from .merge import arrive_last_block, merge_partials, workspace
from .tiling import channel_sum, load_tile, make_plan, program_channels, program_rows, store_tile


@triton.jit
def _add_deviations(sums, x, mask, shift, ACC: tl.constexpr):
    """sums, (sum of d, sum of d^2) per lane, plus one tile's d = x - shift."""
    d = tl.where(mask, x.to(ACC) - shift[None, None, :], 0.0)
    return sums[0] + d, sums[1] + d * d


@CachedLaunch.allocating("mean_ptr", "var_ptr", "partial_ptr", "counter_ptr")
@triton.jit
def _batch_stats_kernel(
    x_ptr,  # [N, C, S] input, any strides
    mean_ptr,  # [2, C] out, ACC dtype: the shift each channel was summed around, and
               # the batch mean minus that shift
    var_ptr,  # [C] out, ACC dtype, biased
    running_mean_ptr, running_var_ptr,  # [C] updated in place, or None
    tracked_ptr,  # [] int64 num_batches_tracked, incremented, or None
    partial_ptr,  # [2, plan.scratch_rows, C] scratch of merge_partials
    counter_ptr,  # [plan.counters] int32, zero (merge.workspace)
    momentum_hi, momentum_lo,  # float32_pair(momentum)
    N, C, S, stride_n, stride_c, stride_s,  # the (N, C, S) view
    CHUNK_N, CHUNK_S, SPLIT_S, SPLITS, GROUP,  # the plan's split (tiling.Plan)
    count,  # elements per channel
    ACC: tl.constexpr, CUMULATIVE: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, PAIR_N: tl.constexpr, PAIR_S: tl.constexpr,
    INT64: tl.constexpr, BLOCK_ROWS: tl.constexpr,
):
    x = (x_ptr, stride_n, stride_c, stride_s)
    c, c_mask = program_channels(C, BLOCK_C)
    n_lo, n_hi, s_lo, s_hi = program_rows(N, S, CHUNK_N, CHUNK_S, SPLIT_S)
    first, _ = load_tile(x, 0, 0, (c, c_mask, N, S), BLOCK_N, BLOCK_S, INT64)
    first_count = (tl.minimum(N, BLOCK_N) * tl.minimum(S, BLOCK_S)).to(ACC)
    shift = div_rn(channel_sum(first.to(ACC)), first_count)
    bounds = (c, c_mask, n_hi, s_hi)
    sums = (tl.zeros((BLOCK_N, BLOCK_S, BLOCK_C), ACC), tl.zeros((BLOCK_N, BLOCK_S, BLOCK_C), ACC))
    for n0 in range(n_lo, n_hi, BLOCK_N + PAIR_N):
        for s0 in range(s_lo, s_hi, BLOCK_S + PAIR_S):
            x_tile, mask = load_tile(x, n0, s0, bounds, BLOCK_N, BLOCK_S, INT64)
            if PAIR_N + PAIR_S > 0:
                x_pair, mask_pair = load_tile(x, n0 + PAIR_N, s0 + PAIR_S, bounds, BLOCK_N,
                                              BLOCK_S, INT64)
                sums = _add_deviations(sums, x_pair, mask_pair, shift, ACC)
            sums = _add_deviations(sums, x_tile, mask, shift, ACC)
    scratch = (partial_ptr, counter_ptr, SPLITS, GROUP)
    done, sum_d, sum_d2 = merge_partials(scratch, channel_sum(sums[0]), channel_sum(sums[1]),
                                         c, c_mask, C, ACC, BLOCK_ROWS, BLOCK_C)
    if done:  # one program per channel block: the statistics of its channels
        n = count.to(ACC)
        mean_d = div_rn(sum_d, n)
        var = tl.maximum(div_rn(sum_d2, n) - mean_d * mean_d, 0.0)
        tl.store(mean_ptr + c, shift, mask=c_mask)
        tl.store(mean_ptr + C + c, mean_d, mask=c_mask)
        tl.store(var_ptr + c, var, mask=c_mask)
        if running_mean_ptr is not None:
            if CUMULATIVE:  # momentum = 1 / batches tracked, this one included, as PyTorch
                tracked = tl.load(tracked_ptr)  # rounds it: in float64, then to ACC
                m = (1.0 / (tracked + 1).to(tl.float64)).to(ACC)
            else:
                m = joined(momentum_hi, momentum_lo, ACC)  # 1 - m is taken in ACC too
            # The same expressions as PyTorch's CUDA kernel, so the buffers round alike.
            running_mean = tl.load(running_mean_ptr + c, mask=c_mask).to(ACC)
            running_var = tl.load(running_var_ptr + c, mask=c_mask).to(ACC)
            new_mean = m * (shift + mean_d) + (1 - m) * running_mean
            new_var = m * div_rn(var * n, n - 1) + (1 - m) * running_var
            tl.store(running_mean_ptr + c, new_mean.to(running_mean_ptr.dtype.element_ty),
                     mask=c_mask)
            tl.store(running_var_ptr + c, new_var.to(running_var_ptr.dtype.element_ty),
                     mask=c_mask)
    if tracked_ptr is not None:
        # Every channel block's merger has read the count once the last of them arrives here.
        if arrive_last_block(scratch, done):
            tl.store(tracked_ptr, tl.load(tracked_ptr) + 1)


@triton.jit
def _normalize_store(y, x, r, mask, n0, s0, bounds, affine, act_param, ACC: tl.constexpr,
                     ACTIVATION: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, INT64: tl.constexpr):
    """Store y = act(z) of one tile."""
    z, _ = pre_activation(x, r, affine, ACC, HAS_RESIDUAL)
    store_tile(y, activation(z, act_param, ACTIVATION), mask, n0, s0, bounds, BLOCK_N, BLOCK_S,
               INT64)


@CachedLaunch.allocating("y_ptr")
@triton.jit
def _normalize_kernel(
    x_ptr, r_ptr, y_ptr,  # [N, C, S] input, residual (or None) and output
    mean_ptr, var_ptr,  # batch statistics ([2, C] mean: SHIFTED) or running statistics
    weight_ptr, bias_ptr,  # [C], or None
    eps_hi, eps_lo, act_param_hi, act_param_lo,  # float32_pair(eps), of the activation's param
    N, C, S, stride_xn, stride_xc, stride_xs, stride_rn, stride_rc, stride_rs,
    stride_yn, stride_yc, stride_ys,  # the (N, C, S) view of each tensor
    CHUNK_N, CHUNK_S, SPLIT_S,  # the plan's split (tiling.Plan)
    ACC: tl.constexpr, ACTIVATION: tl.constexpr, SHIFTED: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, PAIR_N: tl.constexpr,
    PAIR_S: tl.constexpr, INT64: tl.constexpr,
):
    HAS_RESIDUAL: tl.constexpr = r_ptr is not None
    HAS_WEIGHT: tl.constexpr = weight_ptr is not None
    HAS_BIAS: tl.constexpr = bias_ptr is not None
    x = (x_ptr, stride_xn, stride_xc, stride_xs)
    r = (r_ptr, stride_rn, stride_rc, stride_rs)
    y = (y_ptr, stride_yn, stride_yc, stride_ys)
    # In reverse: see program_index.
    c, c_mask = program_channels(C, BLOCK_C, REVERSE=True)
    n_lo, n_hi, s_lo, s_hi = program_rows(N, S, CHUNK_N, CHUNK_S, SPLIT_S, REVERSE=True)
    bounds = (c, c_mask, n_hi, s_hi)
    act_param = joined(act_param_hi, act_param_lo, ACC)
    affine = channel_affine(mean_ptr, var_ptr, weight_ptr, bias_ptr, c, c_mask, C, eps_hi,
                            eps_lo, ACC, SHIFTED, HAS_WEIGHT, HAS_BIAS)
    # Both tiles are loaded ahead of both stores, which the compiler may not reorder.
    for n0 in range(n_lo, n_hi, BLOCK_N + PAIR_N):
        for s0 in range(s_lo, s_hi, BLOCK_S + PAIR_S):
            x_tile, r_tile, mask = load_x_r(x, r, n0, s0, bounds, HAS_RESIDUAL, BLOCK_N, BLOCK_S,
                                            INT64)
            if PAIR_N + PAIR_S > 0:
                n1, s1 = n0 + PAIR_N, s0 + PAIR_S
                x_pair, r_pair, mask_pair = load_x_r(x, r, n1, s1, bounds, HAS_RESIDUAL, BLOCK_N,
                                                     BLOCK_S, INT64)
                _normalize_store(y, x_pair, r_pair, mask_pair, n1, s1, bounds, affine,
                                 act_param, ACC, ACTIVATION, HAS_RESIDUAL, BLOCK_N, BLOCK_S,
                                 INT64)
            _normalize_store(y, x_tile, r_tile, mask, n0, s0, bounds, affine, act_param, ACC,
                             ACTIVATION, HAS_RESIDUAL, BLOCK_N, BLOCK_S, INT64)


def batch_stats(x, running_mean, running_var, momentum: float, num_batches_tracked=None):
    """(mean, biased var) per channel of non-empty x, in the accumulate dtype: one launch.

    mean is [2, C]: the shift each channel's sums were taken around, and the batch mean minus
    it (normalize_act centres x on the shift first). x's spatial dims must collapse
    (kernels.layout). Updates running_mean/running_var in place when they are given
    (unbiased variance, PyTorch's momentum convention). A given num_batches_tracked is
    incremented on the device; momentum=None then means the cumulative average,
    1 / num_batches_tracked, also taken on the device (and 0 without a count, as in
    nn.BatchNorm).
    """
    x_ncs = strides_ncs(x)
    plan = make_plan(x, x_ncs)
    C = x.shape[1]
    acc = accumulate_dtype(x.dtype)
    counters, partial = workspace(x.device, plan.counters, 2 * plan.scratch_rows * C, acc)
    mean = x.new_empty((2, C), dtype=acc)
    var = x.new_empty(C, dtype=acc)
    cumulative = running_mean is not None and num_batches_tracked is not None and momentum is None
    # Bound once per key: a Python float, and 0.0 where the kernel does not read it.
    momentum = float(momentum) if running_mean is not None and momentum is not None else 0.0
    _batch_stats_kernel.launch(
        (plan, x.dtype, dtype_of(running_mean), dtype_of(running_var),
         dtype_of(num_batches_tracked), cumulative, momentum),
        lambda: Launch(plan.grid, dict(
            N=plan.n, C=C, S=plan.s, **plan.strides(x_ncs), **plan.split,
            count=x.numel() // C, **float_pairs(momentum=momentum),
            ACC=triton_dtype(x.dtype), CUMULATIVE=cumulative, BLOCK_ROWS=plan.block_rows,
            **plan.tiles)),
        x_ptr=x, mean_ptr=mean, var_ptr=var, running_mean_ptr=running_mean,
        running_var_ptr=running_var, tracked_ptr=num_batches_tracked, partial_ptr=partial,
        counter_ptr=counters)
    return mean, var


def normalize_act(x, mean, var, weight, bias, residual, eps: float, activation: int,
                  activation_param: float):
    """y = act((x - mean) / sqrt(var + eps) * weight + bias [+ residual]), in x's dtype and
    layout. mean is [C], or [2, C] in batch_stats' shifted form."""
    y = torch.empty_like(x)
    x_ncs = strides_ncs(x)
    y_ncs = x_ncs if y.stride() == x.stride() else strides_ncs(y)  # as it nearly always is
    r_ncs = x_ncs if residual is None else strides_ncs(residual)
    plan = make_plan(x, x_ncs, y_ncs, r_ncs)
    _normalize_kernel.launch(
        (plan, x.dtype, mean.dtype, mean.dim(), var.dtype, dtype_of(weight), dtype_of(bias),
         dtype_of(residual), activation, eps, activation_param),
        lambda: Launch(plan.grid, dict(
            N=plan.n, C=x.shape[1], S=plan.s, **plan.strides(x_ncs, "x"),
            **plan.strides(r_ncs, "r"), **plan.strides(y_ncs, "y"), **plan.split_rows,
            **float_pairs(eps=eps, act_param=activation_param), ACC=triton_dtype(x.dtype),
            ACTIVATION=activation, SHIFTED=mean.dim() == 2, **plan.tiles)),
        x_ptr=x, r_ptr=residual, y_ptr=y, mean_ptr=mean, var_ptr=var, weight_ptr=weight,
        bias_ptr=bias)
    return y
