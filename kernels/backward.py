"""Backward kernels, derived by hand (see DESIGN.md): g = dy * act'(z), z recomputed from x.

Training takes two launches and five passes over memory: a split reduction reads x and dy for
sum(g) and sum(g * (x - mean)) per channel, its last programs merge the partials into dweight
and dbias (merge.py), and a dx pass reads x and dy again and writes dx. The pre-activation z
is never stored: recomputing it costs a few FMAs per element, storing it a whole extra write
and read.
With frozen statistics (eval) dx = g * weight * rstd needs no reduction, so the reduction pass
writes dx itself: one launch, three passes.
"""
import torch
import triton
import triton.language as tl

from .activations import activation_grad
from .launch import CachedLaunch, Launch
from .forward import accumulate_dtype, channel_affine, dtype_of, triton_dtype
from .merge import merge_partials, workspace
from .tiling import (channel_sum, load_tile, make_plan, program_channels, program_rows,
                     store_tile, strides_ncs)


@triton.jit
def _load_x_dy(x_ptr, dy_ptr, n0, s0, c, n_hi, s_hi, c_mask, stride_xn, stride_xs, stride_xc,
               stride_dyn, stride_dys, stride_dyc, BLOCK_N: tl.constexpr,
               BLOCK_S: tl.constexpr, INT64: tl.constexpr):
    """(x, dy, mask) of the tile at (n0, s0)."""
    x, mask = load_tile(x_ptr, n0, s0, c, n_hi, s_hi, c_mask, stride_xn, stride_xs, stride_xc,
                        BLOCK_N, BLOCK_S, INT64)
    dy, _ = load_tile(dy_ptr, n0, s0, c, n_hi, s_hi, c_mask, stride_dyn, stride_dys, stride_dyc,
                      BLOCK_N, BLOCK_S, INT64)
    return x, dy, mask


@triton.jit
def _grad_tile(x, dy, mean, scale, shift, ACC: tl.constexpr, ACTIVATION: tl.constexpr):
    """(g, x - mean) of one tile, g = dy * act'(z) with z recomputed as the forward did."""
    x_mu = x.to(ACC) - mean
    return activation_grad(x_mu * scale + shift, dy.to(ACC), x.dtype, ACTIVATION), x_mu


@CachedLaunch
@triton.jit
def _grad_reduce_kernel(
    x_ptr, dy_ptr, dx_ptr,  # [N, C, S] each with its own strides; dx written if WRITE_DX
    mean_ptr, var_ptr, weight_ptr, bias_ptr,  # [C]
    partial_ptr,  # [2, plan.scratch_rows, C] scratch of merge_partials; row SPLITS of each
                  # half ends up holding the totals sum(g), sum(g * xhat)
    counter_ptr,  # [plan.counters] int32, zero (merge.workspace)
    dweight_ptr, dbias_ptr,  # [C] out in the parameters' dtype
    N, C, S, stride_xn, stride_xc, stride_xs, stride_dyn, stride_dyc, stride_dys,
    stride_dxn, stride_dxc, stride_dxs, CHUNK_N, CHUNK_S, SPLIT_S, SPLITS, GROUP, eps,
    ACC: tl.constexpr, ACTIVATION: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr, WRITE_DX: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, PAIR_N: tl.constexpr, PAIR_S: tl.constexpr,
    INT64: tl.constexpr, BLOCK_ROWS: tl.constexpr,
):
    c, c_mask = program_channels(C, BLOCK_C)
    n_lo, n_hi, s_lo, s_hi = program_rows(N, S, CHUNK_N, CHUNK_S, SPLIT_S)
    mean, rstd, scale, shift = channel_affine(mean_ptr, var_ptr, weight_ptr, bias_ptr, c, c_mask,
                                              eps, ACC, HAS_WEIGHT, HAS_BIAS)
    acc_g = tl.zeros((BLOCK_N, BLOCK_S, BLOCK_C), ACC)
    acc_gx = tl.zeros((BLOCK_N, BLOCK_S, BLOCK_C), ACC)
    # Masked lanes load dy = 0, so g = 0 there for every activation: no tl.where needed.
    for n0 in range(n_lo, n_hi, BLOCK_N + PAIR_N):
        for s0 in range(s_lo, s_hi, BLOCK_S + PAIR_S):
            x, dy, mask = _load_x_dy(x_ptr, dy_ptr, n0, s0, c, n_hi, s_hi, c_mask, stride_xn,
                                     stride_xs, stride_xc, stride_dyn, stride_dys, stride_dyc,
                                     BLOCK_N, BLOCK_S, INT64)
            if PAIR_N + PAIR_S > 0:
                n1, s1 = n0 + PAIR_N, s0 + PAIR_S
                x2, dy2, mask2 = _load_x_dy(x_ptr, dy_ptr, n1, s1, c, n_hi, s_hi, c_mask,
                                            stride_xn, stride_xs, stride_xc, stride_dyn,
                                            stride_dys, stride_dyc, BLOCK_N, BLOCK_S, INT64)
                g2, x_mu2 = _grad_tile(x2, dy2, mean, scale, shift, ACC, ACTIVATION)
                acc_g += g2
                acc_gx += g2 * x_mu2
                if WRITE_DX:
                    store_tile(dx_ptr, g2 * scale, mask2, n1, s1, c, stride_dxn, stride_dxs,
                               stride_dxc, BLOCK_N, BLOCK_S, INT64)
            g, x_mu = _grad_tile(x, dy, mean, scale, shift, ACC, ACTIVATION)
            acc_g += g
            acc_gx += g * x_mu
            if WRITE_DX:
                store_tile(dx_ptr, g * scale, mask, n0, s0, c, stride_dxn, stride_dxs,
                           stride_dxc, BLOCK_N, BLOCK_S, INT64)
    done, dbias, sum_gx = merge_partials(partial_ptr, counter_ptr, channel_sum(acc_g),
                                         channel_sum(acc_gx), c, c_mask, C, SPLITS, GROUP, ACC,
                                         BLOCK_ROWS, BLOCK_C)
    if done:
        dweight = sum_gx * tl.reshape(rstd, (BLOCK_C,))
        tl.store(dweight_ptr + c, dweight.to(dweight_ptr.dtype.element_ty), mask=c_mask)
        tl.store(dbias_ptr + c, dbias.to(dbias_ptr.dtype.element_ty), mask=c_mask)
        if not WRITE_DX:  # for _dx_kernel, over the group rows that were just read
            totals = partial_ptr + SPLITS * C + c
            tl.store(totals, dbias, mask=c_mask)
            tl.store(totals + (SPLITS + tl.cdiv(SPLITS, GROUP)) * C, dweight, mask=c_mask)


@triton.jit
def _dx_tile(x, dy, mean, scale, shift, mean_g, k, ACC: tl.constexpr, ACTIVATION: tl.constexpr):
    g, x_mu = _grad_tile(x, dy, mean, scale, shift, ACC, ACTIVATION)
    return scale * (g - mean_g - x_mu * k)


@CachedLaunch
@triton.jit
def _dx_kernel(
    x_ptr, dy_ptr, dx_ptr,  # [N, C, S] each with its own strides
    mean_ptr, var_ptr, weight_ptr, bias_ptr,  # [C]
    partial_ptr,  # [2, SCRATCH_ROWS, C]: sum(g), sum(g * xhat) in row SPLITS of each half
    N, C, S, stride_xn, stride_xc, stride_xs, stride_dyn, stride_dyc, stride_dys,
    stride_dxn, stride_dxc, stride_dxs, CHUNK_N, CHUNK_S, SPLIT_S, count, SPLITS,
    SCRATCH_ROWS, eps,
    ACC: tl.constexpr, ACTIVATION: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_C: tl.constexpr, PAIR_N: tl.constexpr, PAIR_S: tl.constexpr, INT64: tl.constexpr,
):
    c, c_mask = program_channels(C, BLOCK_C)
    n_lo, n_hi, s_lo, s_hi = program_rows(N, S, CHUNK_N, CHUNK_S, SPLIT_S)
    mean, rstd, scale, shift = channel_affine(mean_ptr, var_ptr, weight_ptr, bias_ptr, c, c_mask,
                                              eps, ACC, HAS_WEIGHT, HAS_BIAS)
    n = count.to(ACC)
    # dx = scale * (g - sum(g) / n - xhat * sum(g * xhat) / n), with xhat = (x - mean) * rstd
    totals = partial_ptr + SPLITS * C + c
    mean_g = (tl.load(totals, mask=c_mask, other=0.0) / n)[None, None, :]
    k = rstd * (tl.load(totals + SCRATCH_ROWS * C, mask=c_mask, other=0.0) / n)[None, None, :]
    for n0 in range(n_lo, n_hi, BLOCK_N + PAIR_N):
        for s0 in range(s_lo, s_hi, BLOCK_S + PAIR_S):
            x, dy, mask = _load_x_dy(x_ptr, dy_ptr, n0, s0, c, n_hi, s_hi, c_mask, stride_xn,
                                     stride_xs, stride_xc, stride_dyn, stride_dys, stride_dyc,
                                     BLOCK_N, BLOCK_S, INT64)
            if PAIR_N + PAIR_S > 0:
                n1, s1 = n0 + PAIR_N, s0 + PAIR_S
                x2, dy2, mask2 = _load_x_dy(x_ptr, dy_ptr, n1, s1, c, n_hi, s_hi, c_mask,
                                            stride_xn, stride_xs, stride_xc, stride_dyn,
                                            stride_dys, stride_dyc, BLOCK_N, BLOCK_S, INT64)
                store_tile(dx_ptr, _dx_tile(x2, dy2, mean, scale, shift, mean_g, k, ACC,
                                            ACTIVATION),
                           mask2, n1, s1, c, stride_dxn, stride_dxs, stride_dxc, BLOCK_N,
                           BLOCK_S, INT64)
            store_tile(dx_ptr, _dx_tile(x, dy, mean, scale, shift, mean_g, k, ACC, ACTIVATION),
                       mask, n0, s0, c, stride_dxn, stride_dxs, stride_dxc, BLOCK_N, BLOCK_S,
                       INT64)


def normalize_act_backward(dy, x, mean, var, weight, bias, eps: float, training: bool,
                           activation_code: int):
    """(dx, dweight, dbias) of y = normalize_act(x, mean, var, weight, bias, eps, activation).

    training: mean/var are x's batch statistics, so dx includes their dependence on x (two
    launches); else they are frozen (running) statistics (one launch). x and dy are non-empty
    with collapsing spatial dims. dweight/dbias come in the parameters' dtype, or the
    accumulate dtype for a None parameter.
    """
    dx = torch.empty_like(x)
    x_ncs, dy_ncs, dx_ncs = strides_ncs(x), strides_ncs(dy), strides_ncs(dx)
    plan = make_plan(x, x_ncs, dy_ncs, dx_ncs)
    C = x.shape[1]
    acc = accumulate_dtype(x.dtype)
    dweight = x.new_empty(C, dtype=acc if weight is None else weight.dtype)
    dbias = x.new_empty(C, dtype=acc if bias is None else bias.dtype)
    counters, partial = workspace(x.device, plan.counters, 2 * plan.scratch_rows * C, acc)
    tensors = (x, dy, dx, mean, var, weight if weight is not None else mean,
               bias if bias is not None else mean, partial)
    key = (plan, x.dtype, dy.dtype, mean.dtype, var.dtype, dtype_of(weight), dtype_of(bias),
           activation_code)
    floats = (float(eps),)

    def bind(*ints, **constexprs):
        return Launch(plan.grid, (plan.n, C, plan.s, *plan.strides(x_ncs), *plan.strides(dy_ncs),
                                  *plan.strides(dx_ncs), plan.chunk_n, plan.chunk_s,
                                  plan.split_s, *ints),
                      dict(ACC=triton_dtype(x.dtype), ACTIVATION=activation_code,
                           HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
                           **plan.tiles, **constexprs))
    _grad_reduce_kernel.launch(
        (key, training), tensors + (counters, dweight, dbias), floats,
        lambda: bind(plan.splits, plan.group, WRITE_DX=not training,
                     BLOCK_ROWS=plan.block_rows))
    if training:
        _dx_kernel.launch(key, tensors, floats,
                          lambda: bind(x.numel() // C, plan.splits, plan.scratch_rows))
    return dx, dweight, dbias
