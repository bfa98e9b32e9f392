"""Backward kernels, derived by hand (docs/DESIGN.md): g = dy * act'(z), z recomputed from x.

Training takes two launches and five passes over memory: a split reduction reads x and dy for
sum(g) and sum(g * xhat) per channel, its last programs merge the partials into dweight and
dbias (merge.py), and a dx pass reads x and dy again and writes dx. The pre-activation z is
never stored: recomputing it costs a few FMAs per element, storing it a whole extra write and
read.
With a residual, z also needs the residual, and d residual = g is an output anyway: the
reduction reads x, dy and the residual and writes g as d residual, and the dx pass then reads
x and g alone (seven passes in all, against eight for re-reading dy and the residual).
With frozen statistics (eval) dx = g * weight * rstd needs no reduction, so the reduction pass
writes dx itself: one launch, three passes (five with a residual).
"""
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .activation_codes import IDENTITY
from .activations import activation_grad, div_rn
from .affine import (channel_affine, dtype_of, float_pairs, joined, load_x_r,
                     pre_activation, triton_dtype)
from .dtypes import accumulate_dtype
from .launch import CachedLaunch, Launch
from .layout import strides_ncs
from .merge import merge_partials, workspace
from .tiling import channel_sum, load_tile, make_plan, program_channels, program_rows, store_tile


@triton.jit
def _load_x_dy_r(x, dy, r, n0, s0, bounds, HAS_RESIDUAL: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_S: tl.constexpr, INT64: tl.constexpr):
    """(x, dy, residual, mask) of the tile at (n0, s0): load_x_r's, and dy's."""
    x_tile, r_tile, mask = load_x_r(x, r, n0, s0, bounds, HAS_RESIDUAL, BLOCK_N, BLOCK_S, INT64)
    dy_tile, _ = load_tile(dy, n0, s0, bounds, BLOCK_N, BLOCK_S, INT64)
    return x_tile, dy_tile, r_tile, mask


@triton.jit
def _grad_tile(x, dy, r, affine, act_param, ACC: tl.constexpr, ACTIVATION: tl.constexpr,
               HAS_RESIDUAL: tl.constexpr):
    """(g, x - mean) of one tile: g = dy * act'(z), z recomputed as the forward did, and g
    rounded to x's dtype, where eager's activation backward hands it on."""
    z, x_mu = pre_activation(x, r, affine, ACC, HAS_RESIDUAL)
    g = activation_grad(z, dy.to(ACC), act_param, x.dtype, ACTIVATION)
    return g.to(x.dtype).to(ACC), x_mu


@triton.jit
def _reduce_tile(sums, x, dy, r, mask, n0, s0, dx, dr, bounds, affine, act_param,
                 ACC: tl.constexpr, ACTIVATION: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                 WRITE_DX: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
                 INT64: tl.constexpr):
    """sums, (sum of g, sum of g * (x - mean)) per lane, plus one tile's; stores the tile's g
    as d residual (the view dr) with a residual, and g * scale as dx (the view dx) where
    WRITE_DX."""
    g, x_mu = _grad_tile(x, dy, r, affine, act_param, ACC, ACTIVATION, HAS_RESIDUAL)
    sums = (sums[0] + tl.where(mask, g, 0.0), sums[1] + tl.where(mask, g * x_mu, 0.0))
    if HAS_RESIDUAL:
        store_tile(dr, g, mask, n0, s0, bounds, BLOCK_N, BLOCK_S, INT64)
    if WRITE_DX:
        store_tile(dx, g * affine[3], mask, n0, s0, bounds, BLOCK_N, BLOCK_S, INT64)
    return sums


@CachedLaunch.allocating("dx_ptr", "dr_ptr", "dweight_ptr", "dbias_ptr", "totals_ptr",
                         "partial_ptr", "counter_ptr")
@triton.jit
def _grad_reduce_kernel(
    x_ptr, dy_ptr, r_ptr,  # [N, C, S] input, output gradient, residual (or None)
    dx_ptr,  # [N, C, S] out, or None: written here with frozen statistics (eval)
    dr_ptr,  # [N, C, S] out, d residual (= g), with a residual; else None
    mean_ptr, var_ptr, weight_ptr, bias_ptr,  # as _normalize_kernel's
    dweight_ptr, dbias_ptr,  # [C] out in the parameters' dtype
    totals_ptr,  # sum(g), sum(g * xhat) out at totals_ptr + TOTALS_OFFSET + (0 or
                 # TOTALS_STRIDE); None where dx is written here
    partial_ptr,  # [2, plan.scratch_rows, C] scratch of merge_partials
    counter_ptr,  # [plan.counters] int32, zero (merge.workspace)
    N, C, S, stride_xn, stride_xc, stride_xs, stride_dyn, stride_dyc, stride_dys,
    stride_rn, stride_rc, stride_rs, stride_dxn, stride_dxc, stride_dxs, stride_drn,
    stride_drc, stride_drs,  # the (N, C, S) view of each tensor
    CHUNK_N, CHUNK_S, SPLIT_S, SPLITS, GROUP,  # the plan's split (tiling.Plan)
    TOTALS_OFFSET, TOTALS_STRIDE,
    # float32_pair(eps), of the activation's param. After the ints, unlike the other kernels'
    # floats: ahead of them, ptxas allocates registers differently and spills more often
    # (perf/static_h100.csv).
    eps_hi, eps_lo, act_param_hi, act_param_lo,
    ACC: tl.constexpr, ACTIVATION: tl.constexpr, SHIFTED: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, PAIR_N: tl.constexpr,
    PAIR_S: tl.constexpr, INT64: tl.constexpr, BLOCK_ROWS: tl.constexpr,
):
    HAS_RESIDUAL: tl.constexpr = r_ptr is not None
    HAS_WEIGHT: tl.constexpr = weight_ptr is not None
    HAS_BIAS: tl.constexpr = bias_ptr is not None
    WRITE_DX: tl.constexpr = dx_ptr is not None
    x = (x_ptr, stride_xn, stride_xc, stride_xs)
    dy = (dy_ptr, stride_dyn, stride_dyc, stride_dys)
    r = (r_ptr, stride_rn, stride_rc, stride_rs)
    dx = (dx_ptr, stride_dxn, stride_dxc, stride_dxs)
    dr = (dr_ptr, stride_drn, stride_drc, stride_drs)
    c, c_mask = program_channels(C, BLOCK_C)
    n_lo, n_hi, s_lo, s_hi = program_rows(N, S, CHUNK_N, CHUNK_S, SPLIT_S)
    bounds = (c, c_mask, n_hi, s_hi)
    act_param = joined(act_param_hi, act_param_lo, ACC)
    affine = channel_affine(mean_ptr, var_ptr, weight_ptr, bias_ptr, c, c_mask, C, eps_hi,
                            eps_lo, ACC, SHIFTED, HAS_WEIGHT, HAS_BIAS)
    sums = (tl.zeros((BLOCK_N, BLOCK_S, BLOCK_C), ACC), tl.zeros((BLOCK_N, BLOCK_S, BLOCK_C), ACC))
    # Masked lanes load dy = 0, so g = 0 there for every activation: no tl.where needed.
    for n0 in range(n_lo, n_hi, BLOCK_N + PAIR_N):
        for s0 in range(s_lo, s_hi, BLOCK_S + PAIR_S):
            x_tile, dy_tile, r_tile, mask = _load_x_dy_r(x, dy, r, n0, s0, bounds, HAS_RESIDUAL,
                                                         BLOCK_N, BLOCK_S, INT64)
            if PAIR_N + PAIR_S > 0:
                n1, s1 = n0 + PAIR_N, s0 + PAIR_S
                x_pair, dy_pair, r_pair, mask_pair = _load_x_dy_r(
                    x, dy, r, n1, s1, bounds, HAS_RESIDUAL, BLOCK_N, BLOCK_S, INT64)
                sums = _reduce_tile(sums, x_pair, dy_pair, r_pair, mask_pair, n1, s1, dx, dr,
                                    bounds, affine, act_param, ACC, ACTIVATION, HAS_RESIDUAL,
                                    WRITE_DX, BLOCK_N, BLOCK_S, INT64)
            sums = _reduce_tile(sums, x_tile, dy_tile, r_tile, mask, n0, s0, dx, dr, bounds,
                                affine, act_param, ACC, ACTIVATION, HAS_RESIDUAL, WRITE_DX,
                                BLOCK_N, BLOCK_S, INT64)
    done, dbias, sum_gx = merge_partials((partial_ptr, counter_ptr, SPLITS, GROUP),
                                         channel_sum(sums[0]), channel_sum(sums[1]), c, c_mask,
                                         C, ACC, BLOCK_ROWS, BLOCK_C)
    if done:
        dweight = sum_gx * tl.reshape(affine[2], (BLOCK_C,))
        tl.store(dweight_ptr + c, dweight.to(dweight_ptr.dtype.element_ty), mask=c_mask)
        tl.store(dbias_ptr + c, dbias.to(dbias_ptr.dtype.element_ty), mask=c_mask)
        if totals_ptr is not None:
            totals = totals_ptr + TOTALS_OFFSET + c
            tl.store(totals, dbias, mask=c_mask)
            tl.store(totals + TOTALS_STRIDE, dweight, mask=c_mask)


@triton.jit
def _dx_store(dx, x, dy, r, mask, n0, s0, bounds, affine, mean_g, k, act_param,
              ACC: tl.constexpr, ACTIVATION: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, INT64: tl.constexpr):
    """Store dx = scale * (g - mean_g - (x - mean) * k) of one tile (see _dx_kernel)."""
    g, x_mu = _grad_tile(x, dy, r, affine, act_param, ACC, ACTIVATION, HAS_RESIDUAL)
    store_tile(dx, affine[3] * (g - mean_g - x_mu * k), mask, n0, s0, bounds, BLOCK_N, BLOCK_S,
               INT64)


@CachedLaunch.allocating("dx_ptr")
@triton.jit
def _dx_kernel(
    x_ptr, dy_ptr, r_ptr,  # [N, C, S] input, output gradient (or g), residual (or None)
    dx_ptr,  # [N, C, S] out
    mean_ptr, var_ptr, weight_ptr, bias_ptr,  # as _normalize_kernel's
    totals_ptr,  # sum(g), sum(g * xhat) at totals_ptr + TOTALS_OFFSET + (0 or TOTALS_STRIDE)
    eps_hi, eps_lo, act_param_hi, act_param_lo,  # float32_pair(eps), of the activation's param
    N, C, S, stride_xn, stride_xc, stride_xs, stride_dyn, stride_dyc, stride_dys,
    stride_rn, stride_rc, stride_rs, stride_dxn, stride_dxc, stride_dxs,  # the (N, C, S) views
    CHUNK_N, CHUNK_S, SPLIT_S,  # the plan's split (tiling.Plan)
    count,  # elements per channel
    TOTALS_OFFSET, TOTALS_STRIDE,
    ACC: tl.constexpr, ACTIVATION: tl.constexpr, SHIFTED: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, PAIR_N: tl.constexpr,
    PAIR_S: tl.constexpr, INT64: tl.constexpr,
):
    HAS_RESIDUAL: tl.constexpr = r_ptr is not None
    HAS_WEIGHT: tl.constexpr = weight_ptr is not None
    HAS_BIAS: tl.constexpr = bias_ptr is not None
    x = (x_ptr, stride_xn, stride_xc, stride_xs)
    dy = (dy_ptr, stride_dyn, stride_dyc, stride_dys)
    r = (r_ptr, stride_rn, stride_rc, stride_rs)
    dx = (dx_ptr, stride_dxn, stride_dxc, stride_dxs)
    # In reverse: see program_index.
    c, c_mask = program_channels(C, BLOCK_C, REVERSE=True)
    n_lo, n_hi, s_lo, s_hi = program_rows(N, S, CHUNK_N, CHUNK_S, SPLIT_S, REVERSE=True)
    bounds = (c, c_mask, n_hi, s_hi)
    act_param = joined(act_param_hi, act_param_lo, ACC)
    affine = channel_affine(mean_ptr, var_ptr, weight_ptr, bias_ptr, c, c_mask, C, eps_hi,
                            eps_lo, ACC, SHIFTED, HAS_WEIGHT, HAS_BIAS)
    n = count.to(ACC)
    # dx = scale * (g - sum(g) / n - xhat * sum(g * xhat) / n), with xhat = (x - mean) * rstd
    totals = totals_ptr + TOTALS_OFFSET + c
    mean_g = div_rn(tl.load(totals, mask=c_mask, other=0.0), n)[None, None, :]
    k = affine[2] * div_rn(tl.load(totals + TOTALS_STRIDE, mask=c_mask, other=0.0),
                           n)[None, None, :]
    for n0 in range(n_lo, n_hi, BLOCK_N + PAIR_N):
        for s0 in range(s_lo, s_hi, BLOCK_S + PAIR_S):
            x_tile, dy_tile, r_tile, mask = _load_x_dy_r(x, dy, r, n0, s0, bounds, HAS_RESIDUAL,
                                                         BLOCK_N, BLOCK_S, INT64)
            if PAIR_N + PAIR_S > 0:
                n1, s1 = n0 + PAIR_N, s0 + PAIR_S
                x_pair, dy_pair, r_pair, mask_pair = _load_x_dy_r(
                    x, dy, r, n1, s1, bounds, HAS_RESIDUAL, BLOCK_N, BLOCK_S, INT64)
                _dx_store(dx, x_pair, dy_pair, r_pair, mask_pair, n1, s1, bounds, affine,
                          mean_g, k, act_param, ACC, ACTIVATION, HAS_RESIDUAL, BLOCK_N,
                          BLOCK_S, INT64)
            _dx_store(dx, x_tile, dy_tile, r_tile, mask, n0, s0, bounds, affine, mean_g, k,
                      act_param, ACC, ACTIVATION, HAS_RESIDUAL, BLOCK_N, BLOCK_S, INT64)


class _Walk(NamedTuple):
    """The plan shared by the backward launches, and each tensor's (N, C, S) strides: a
    missing residual takes x's, never read."""

    plan: object
    x: tuple
    dy: tuple
    residual: tuple
    dx: tuple
    dresidual: tuple


def _walk(x, dy, dx, residual, dresidual) -> _Walk:
    x_ncs, dy_ncs = strides_ncs(x), strides_ncs(dy)
    dx_ncs = x_ncs if dx.stride() == x.stride() else strides_ncs(dx)  # as it nearly always is
    r_ncs = dr_ncs = x_ncs
    if residual is not None:
        r_ncs, dr_ncs = strides_ncs(residual), strides_ncs(dresidual)
    return _Walk(make_plan(x, x_ncs, dy_ncs, dx_ncs, r_ncs, dr_ncs), x_ncs, dy_ncs, r_ncs,
                 dx_ncs, dr_ncs)


def _reduce(walk, dy, x, mean, var, weight, bias, residual, dx, dresidual, totals,
            totals_offset, totals_stride, eps, activation, activation_param):
    """The reduction launch: dweight and dbias, d residual, and dx (given dx) or the totals
    (given totals, else in the merge scratch)."""
    plan, C = walk.plan, x.shape[1]
    acc = accumulate_dtype(x.dtype)
    dweight = x.new_empty(C, dtype=acc if weight is None else weight.dtype)
    dbias = x.new_empty(C, dtype=acc if bias is None else bias.dtype)
    counters, partial = workspace(x.device, plan.counters, 2 * plan.scratch_rows * C, acc)
    if dx is None and totals is None:
        totals = partial
    _grad_reduce_kernel.launch(
        (plan, x.dtype, dy.dtype, mean.dtype, mean.dim(), var.dtype, dtype_of(weight),
         dtype_of(bias), dtype_of(residual), activation, dx is None, totals_offset,
         totals_stride, eps, activation_param),
        lambda: Launch(plan.grid, dict(
            N=plan.n, C=C, S=plan.s, **plan.strides(walk.x, "x"), **plan.strides(walk.dy, "dy"),
            **plan.strides(walk.residual, "r"), **plan.strides(walk.dx, "dx"),
            **plan.strides(walk.dresidual, "dr"), **plan.split, TOTALS_OFFSET=totals_offset,
            TOTALS_STRIDE=totals_stride, **float_pairs(eps=eps, act_param=activation_param),
            ACC=triton_dtype(x.dtype), ACTIVATION=activation, SHIFTED=mean.dim() == 2,
            BLOCK_ROWS=plan.block_rows, **plan.tiles)),
        x_ptr=x, dy_ptr=dy, r_ptr=residual, dx_ptr=dx, dr_ptr=dresidual, mean_ptr=mean,
        var_ptr=var, weight_ptr=weight, bias_ptr=bias, dweight_ptr=dweight, dbias_ptr=dbias,
        totals_ptr=totals, partial_ptr=partial, counter_ptr=counters)
    return dweight, dbias, partial


def _dx(walk, dy, x, mean, var, weight, bias, residual, dresidual, dx, totals, totals_offset,
        totals_stride, count, eps, activation, activation_param):
    """The dx launch of training. Given d residual (= g), it reads that instead of dy and the
    residual, with no activation left to apply."""
    plan = walk.plan
    g_given = dresidual is not None
    g_strides = walk.dresidual if g_given else walk.dy
    if g_given:
        dy, residual, activation = dresidual, None, IDENTITY
    _dx_kernel.launch(
        (plan, x.dtype, dy.dtype, mean.dtype, mean.dim(), var.dtype, dtype_of(weight),
         dtype_of(bias), dtype_of(residual), activation, g_given, totals.dtype, count,
         totals_offset, totals_stride, eps, activation_param),
        lambda: Launch(plan.grid, dict(
            N=plan.n, C=x.shape[1], S=plan.s, **plan.strides(walk.x, "x"),
            **plan.strides(g_strides, "dy"), **plan.strides(walk.residual, "r"),
            **plan.strides(walk.dx, "dx"), **plan.split_rows, count=count,
            TOTALS_OFFSET=totals_offset, TOTALS_STRIDE=totals_stride,
            **float_pairs(eps=eps, act_param=activation_param), ACC=triton_dtype(x.dtype),
            ACTIVATION=activation, SHIFTED=mean.dim() == 2, **plan.tiles)),
        x_ptr=x, dy_ptr=dy, r_ptr=residual, dx_ptr=dx, mean_ptr=mean, var_ptr=var,
        weight_ptr=weight, bias_ptr=bias, totals_ptr=totals)
    return dx


def normalize_act_backward(dy, x, mean, var, weight, bias, residual, eps: float,
                           training: bool, activation: int, activation_param: float):
    """(dx, dweight, dbias, dresidual) of y = normalize_act(x, mean, var, weight, bias,
    residual, eps, activation, activation_param); dresidual is None without a residual.

    training: mean/var are x's batch statistics, so dx includes their dependence on x (two
    launches); else they are frozen (running) statistics (one launch). x and dy are non-empty
    with collapsing spatial dims. dweight/dbias come in the parameters' dtype, or the
    accumulate dtype for a None parameter.
    """
    dx = torch.empty_like(x)
    dresidual = None if residual is None else torch.empty_like(residual)
    walk = _walk(x, dy, dx, residual, dresidual)
    plan, C = walk.plan, x.shape[1]
    # The totals overwrite the merge's group rows, read by then (merge.py).
    totals_offset, totals_stride = plan.splits * C, plan.scratch_rows * C
    dweight, dbias, partial = _reduce(walk, dy, x, mean, var, weight, bias, residual,
                                      None if training else dx, dresidual, None, totals_offset,
                                      totals_stride, eps, activation, activation_param)
    if training:
        _dx(walk, dy, x, mean, var, weight, bias, residual, dresidual, dx, partial,
            totals_offset, totals_stride, x.numel() // C, eps, activation, activation_param)
    return dx, dweight, dbias, dresidual


def grad_reduce(dy, x, mean, var, weight, bias, residual, eps: float, activation: int,
                activation_param: float):
    """(sums, dresidual) over this batch, for batch statistics computed over more than it
    (across processes): sums is [2, C] in the accumulate dtype, sum(g) and sum(g * xhat),
    which are also dbias and dweight; dresidual = g, or None without a residual."""
    dresidual = None if residual is None else torch.empty_like(residual)
    walk = _walk(x, dy, x, residual, dresidual)
    C = x.shape[1]
    sums = x.new_empty((2, C), dtype=accumulate_dtype(x.dtype))
    _reduce(walk, dy, x, mean, var, weight, bias, residual, None, dresidual, sums, 0, C, eps,
            activation, activation_param)
    return sums, dresidual


def grad_input(dy, x, mean, var, weight, bias, residual, dresidual, sums, count: int,
               eps: float, activation: int, activation_param: float):
    """dx for batch statistics over count elements per channel, whose sum(g) and
    sum(g * xhat) are sums ([2, C], e.g. grad_reduce's summed over processes)."""
    dx = torch.empty_like(x)
    walk = _walk(x, dy, dx, residual, dresidual)
    return _dx(walk, dy, x, mean, var, weight, bias, residual, dresidual, dx, sums, 0,
               x.shape[1], count, eps, activation, activation_param)
