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

from tritonbn.dtypes import accumulate_dtype
from tritonbn.layout import strides_ncs

from .activations import activation, div_rn
from .launch import CachedLaunch, Launch, float32_pair
from .merge import arrive_last_block, merge_partials, workspace
from .tiling import (channel_sum, load_tile, make_plan, program_channels, program_rows,
                     store_tile)


@CachedLaunch
@triton.jit
def _batch_stats_kernel(
    x_ptr,  # [N, C, S] input, any strides
    partial_ptr,  # [2, plan.scratch_rows, C] scratch of merge_partials
    counter_ptr,  # [plan.counters] int32, zero (merge.workspace)
    mean_ptr,  # [2, C] out, ACC dtype: the shift each channel was summed around, and
               # the batch mean minus that shift
    var_ptr,  # [C] out, ACC dtype, biased
    running_mean_ptr, running_var_ptr,  # [C] updated in place when UPDATE_RUNNING
    tracked_ptr,  # [] int64 num_batches_tracked, incremented when COUNT_BATCH
    N, C, S, stride_n, stride_c, stride_s, CHUNK_N, CHUNK_S, SPLIT_S, SPLITS, GROUP, count,
    momentum_hi, momentum_lo, ACC: tl.constexpr, UPDATE_RUNNING: tl.constexpr,
    COUNT_BATCH: tl.constexpr, CUMULATIVE: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_C: tl.constexpr, PAIR_N: tl.constexpr, PAIR_S: tl.constexpr, INT64: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
):
    c, c_mask = program_channels(C, BLOCK_C)
    n_lo, n_hi, s_lo, s_hi = program_rows(N, S, CHUNK_N, CHUNK_S, SPLIT_S)
    first, _ = load_tile(x_ptr, 0, 0, c, N, S, c_mask, stride_n, stride_c, stride_s, BLOCK_N,
                         BLOCK_S, INT64)
    first_count = (tl.minimum(N, BLOCK_N) * tl.minimum(S, BLOCK_S)).to(ACC)
    shift = div_rn(channel_sum(first.to(ACC)), first_count)
    acc_d = tl.zeros((BLOCK_N, BLOCK_S, BLOCK_C), ACC)
    acc_d2 = tl.zeros((BLOCK_N, BLOCK_S, BLOCK_C), ACC)
    for n0 in range(n_lo, n_hi, BLOCK_N + PAIR_N):
        for s0 in range(s_lo, s_hi, BLOCK_S + PAIR_S):
            x, mask = load_tile(x_ptr, n0, s0, c, n_hi, s_hi, c_mask, stride_n, stride_c,
                                stride_s, BLOCK_N, BLOCK_S, INT64)
            if PAIR_N + PAIR_S > 0:
                x2, mask2 = load_tile(x_ptr, n0 + PAIR_N, s0 + PAIR_S, c, n_hi, s_hi, c_mask,
                                      stride_n, stride_c, stride_s, BLOCK_N, BLOCK_S, INT64)
                d2 = tl.where(mask2, x2.to(ACC) - shift[None, None, :], 0.0)
                acc_d += d2
                acc_d2 += d2 * d2
            d = tl.where(mask, x.to(ACC) - shift[None, None, :], 0.0)
            acc_d += d
            acc_d2 += d * d
    done, sum_d, sum_d2 = merge_partials(partial_ptr, counter_ptr, channel_sum(acc_d),
                                         channel_sum(acc_d2), c, c_mask, C, SPLITS, GROUP, ACC,
                                         BLOCK_ROWS, BLOCK_C)
    if done:  # one program per channel block: the statistics of its channels
        n = count.to(ACC)
        mean_d = div_rn(sum_d, n)
        var = tl.maximum(div_rn(sum_d2, n) - mean_d * mean_d, 0.0)
        tl.store(mean_ptr + c, shift, mask=c_mask)
        tl.store(mean_ptr + C + c, mean_d, mask=c_mask)
        tl.store(var_ptr + c, var, mask=c_mask)
        if UPDATE_RUNNING:
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
    if COUNT_BATCH:
        # Every channel block's merger has read the count once the last of them arrives here.
        if arrive_last_block(counter_ptr, SPLITS, GROUP, done):
            tl.store(tracked_ptr, tl.load(tracked_ptr) + 1)


def triton_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def dtype_of(t):
    """t's dtype, None for no tensor: what a cache key holds for an optional argument."""
    return None if t is None else t.dtype


@triton.jit
def joined(hi, lo, ACC: tl.constexpr):
    """A float argument split by launch.float32_pair, back in ACC: float64 keeps its digits."""
    return tl.cast(hi, ACC) + tl.cast(lo, ACC)


@triton.jit
def reciprocal_std(var, eps):
    """1 / sqrt(var + eps), correctly rounded like PyTorch's (rsqrt is off by an ulp or two)."""
    if var.dtype == tl.float64:
        return 1.0 / tl.sqrt(var + eps)  # float64 sqrt and division are correctly rounded
    else:
        return div_rn(1.0, tl.sqrt_rn(var + eps))


@triton.jit
def channel_affine(mean_ptr, var_ptr, weight_ptr, bias_ptr, c, c_mask, C, eps_hi, eps_lo,
                   ACC: tl.constexpr, SHIFTED: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                   HAS_BIAS: tl.constexpr):
    """Per-channel (center, center_d, rstd, scale, bias), each [1, 1, BLOCK_C], such that
    x - mean = (x - center) - center_d and z = (x - mean) * scale + bias; eps comes as its
    launch.float32_pair.

    SHIFTED: mean_ptr holds [2, C], a shift and the mean minus it (batch_stats' output), and
    x is centred on the shift first: x - shift is exact for x near the mean, so |mean| >> std
    costs no precision. Otherwise mean_ptr holds the mean itself (running statistics)."""
    center = tl.load(mean_ptr + c, mask=c_mask, other=0.0).to(ACC)
    center_d = tl.zeros_like(center)
    if SHIFTED:
        center_d = tl.load(mean_ptr + C + c, mask=c_mask, other=0.0).to(ACC)
    var = tl.load(var_ptr + c, mask=c_mask, other=1.0).to(ACC)
    rstd = reciprocal_std(var, joined(eps_hi, eps_lo, ACC))
    scale = rstd
    if HAS_WEIGHT:
        scale = scale * tl.load(weight_ptr + c, mask=c_mask, other=0.0).to(ACC)
    bias = tl.zeros_like(scale)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + c, mask=c_mask, other=0.0).to(ACC)
    return (center[None, None, :], center_d[None, None, :], rstd[None, None, :],
            scale[None, None, :], bias[None, None, :])


@triton.jit
def pre_activation(x, r, center, center_d, scale, bias, ACC: tl.constexpr,
                   HAS_RESIDUAL: tl.constexpr):
    """(z, x - mean) of one tile, z rounded to x's dtype where eager stores it: after the
    BatchNorm, and after the residual add."""
    x_mu = (x.to(ACC) - center) - center_d
    z = (x_mu * scale + bias).to(x.dtype).to(ACC)
    if HAS_RESIDUAL:
        z = (z + r.to(ACC)).to(x.dtype).to(ACC)
    return z, x_mu


@CachedLaunch
@triton.jit
def _normalize_kernel(
    x_ptr, r_ptr, y_ptr,  # [N, C, S] input, residual (if HAS_RESIDUAL) and output, each
                          # with its own strides
    mean_ptr, var_ptr,  # batch statistics ([2, C] mean: SHIFTED) or running statistics
    weight_ptr, bias_ptr,  # [C] or unused (HAS_WEIGHT, HAS_BIAS)
    N, C, S, stride_xn, stride_xc, stride_xs, stride_rn, stride_rc, stride_rs,
    stride_yn, stride_yc, stride_ys, CHUNK_N, CHUNK_S, SPLIT_S, eps_hi, eps_lo, act_param_hi,
    act_param_lo,
    ACC: tl.constexpr, ACTIVATION: tl.constexpr, SHIFTED: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, PAIR_N: tl.constexpr,
    PAIR_S: tl.constexpr, INT64: tl.constexpr,
):
    # In reverse: see program_index.
    c, c_mask = program_channels(C, BLOCK_C, REVERSE=True)
    n_lo, n_hi, s_lo, s_hi = program_rows(N, S, CHUNK_N, CHUNK_S, SPLIT_S, REVERSE=True)
    act_param = joined(act_param_hi, act_param_lo, ACC)
    # A name of its own for the unused rstd: the loop below reassigns `_` with another shape.
    center, center_d, _rstd, scale, bias = channel_affine(mean_ptr, var_ptr, weight_ptr,
                                                          bias_ptr, c, c_mask, C, eps_hi,
                                                          eps_lo, ACC, SHIFTED, HAS_WEIGHT,
                                                          HAS_BIAS)
    # Both tiles are loaded ahead of both stores, which the compiler may not reorder.
    for n0 in range(n_lo, n_hi, BLOCK_N + PAIR_N):
        for s0 in range(s_lo, s_hi, BLOCK_S + PAIR_S):
            x, r, mask = load_x_r(x_ptr, r_ptr, n0, s0, c, n_hi, s_hi, c_mask, stride_xn,
                                   stride_xc, stride_xs, stride_rn, stride_rc, stride_rs,
                                   HAS_RESIDUAL, BLOCK_N, BLOCK_S, INT64)
            if PAIR_N + PAIR_S > 0:
                n1, s1 = n0 + PAIR_N, s0 + PAIR_S
                x2, r2, mask2 = load_x_r(x_ptr, r_ptr, n1, s1, c, n_hi, s_hi, c_mask,
                                          stride_xn, stride_xc, stride_xs, stride_rn, stride_rc,
                                          stride_rs, HAS_RESIDUAL, BLOCK_N, BLOCK_S, INT64)
                z2, _ = pre_activation(x2, r2, center, center_d, scale, bias, ACC, HAS_RESIDUAL)
                store_tile(y_ptr, activation(z2, act_param, ACTIVATION), mask2, n1, s1, c,
                           stride_yn, stride_yc, stride_ys, BLOCK_N, BLOCK_S, INT64)
            z, _ = pre_activation(x, r, center, center_d, scale, bias, ACC, HAS_RESIDUAL)
            store_tile(y_ptr, activation(z, act_param, ACTIVATION), mask, n0, s0, c, stride_yn,
                       stride_yc, stride_ys, BLOCK_N, BLOCK_S, INT64)


@triton.jit
def load_x_r(x_ptr, r_ptr, n0, s0, c, n_hi, s_hi, c_mask, stride_xn, stride_xc, stride_xs,
              stride_rn, stride_rc, stride_rs, HAS_RESIDUAL: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, INT64: tl.constexpr):
    """(x, residual, mask) of the tile at (n0, s0); without a residual x stands in for it."""
    x, mask = load_tile(x_ptr, n0, s0, c, n_hi, s_hi, c_mask, stride_xn, stride_xc, stride_xs,
                        BLOCK_N, BLOCK_S, INT64)
    r = x  # unread without a residual: a placeholder the compiler can type (None it cannot)
    if HAS_RESIDUAL:
        r, _ = load_tile(r_ptr, n0, s0, c, n_hi, s_hi, c_mask, stride_rn, stride_rc, stride_rs,
                         BLOCK_N, BLOCK_S, INT64)
    return x, r, mask


def batch_stats(x, running_mean, running_var, momentum: float, num_batches_tracked=None):
    """(mean, biased var) per channel of non-empty x, in the accumulate dtype: one launch.

    mean is [2, C]: the shift each channel's sums were taken around, and the batch mean minus
    it (normalize_act centres x on the shift first). x's spatial dims must collapse
    (tritonbn.layout). Updates running_mean/running_var in place when they are given
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
    update = running_mean is not None
    count_batch = num_batches_tracked is not None
    cumulative = update and count_batch and momentum is None
    _batch_stats_kernel.launch(
        (plan, x.dtype, dtype_of(running_mean), dtype_of(running_var),
         dtype_of(num_batches_tracked), cumulative),
        (x, partial, counters, mean, var, running_mean if update else mean,
         running_var if update else var, num_batches_tracked if count_batch else mean),
        float32_pair(0.0 if momentum is None else float(momentum)),
        lambda: Launch(plan.grid, (plan.n, C, plan.s, *plan.strides(x_ncs), plan.chunk_n,
                                   plan.chunk_s, plan.split_s, plan.splits, plan.group,
                                   x.numel() // C),
                       dict(ACC=triton_dtype(x.dtype), UPDATE_RUNNING=update,
                            COUNT_BATCH=count_batch, CUMULATIVE=cumulative,
                            BLOCK_ROWS=plan.block_rows, **plan.tiles)))
    return mean, var


def normalize_act(x, mean, var, weight, bias, residual, eps: float, activation: int,
                  activation_param: float):
    """y = act((x - mean) / sqrt(var + eps) * weight + bias [+ residual]), in x's dtype and
    layout. mean is [C], or [2, C] in batch_stats' shifted form."""
    y = torch.empty_like(x)
    x_ncs, y_ncs = strides_ncs(x), strides_ncs(y)
    r_ncs = x_ncs if residual is None else strides_ncs(residual)
    plan = make_plan(x, x_ncs, y_ncs, r_ncs)
    _normalize_kernel.launch(
        (plan, x.dtype, mean.dtype, mean.dim(), var.dtype, dtype_of(weight), dtype_of(bias),
         dtype_of(residual), activation),
        (x, x if residual is None else residual, y, mean, var,
         mean if weight is None else weight, mean if bias is None else bias),
        (*float32_pair(eps), *float32_pair(activation_param)),
        lambda: Launch(plan.grid, (plan.n, x.shape[1], plan.s, *plan.strides(x_ncs),
                                   *plan.strides(r_ncs), *plan.strides(y_ncs), plan.chunk_n,
                                   plan.chunk_s, plan.split_s),
                       dict(ACC=triton_dtype(x.dtype), ACTIVATION=activation,
                            SHIFTED=mean.dim() == 2, HAS_WEIGHT=weight is not None,
                            HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None,
                            **plan.tiles)))
    return y
