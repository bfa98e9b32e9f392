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

from tritonbn.activations import IDENTITY
from tritonbn.dtypes import accumulate_dtype
from tritonbn.layout import strides_ncs

from .activations import activation_grad, div_rn
from .forward import channel_affine, dtype_of, joined, load_x_r, pre_activation, triton_dtype
from .launch import CachedLaunch, Launch, float32_pair
from .merge import merge_partials, workspace
from .tiling import (channel_sum, load_tile, make_plan, program_channels, program_rows,
                     store_tile)


@triton.jit
def _load_x_dy_r(x_ptr, dy_ptr, r_ptr, n0, s0, c, n_hi, s_hi, c_mask, stride_xn, stride_xc,
                 stride_xs, stride_dyn, stride_dyc, stride_dys, stride_rn, stride_rc, stride_rs,
                 HAS_RESIDUAL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
                 INT64: tl.constexpr):
    """(x, dy, residual, mask) of the tile at (n0, s0); without a residual x stands in."""
    x, r, mask = load_x_r(x_ptr, r_ptr, n0, s0, c, n_hi, s_hi, c_mask, stride_xn, stride_xc,
                          stride_xs, stride_rn, stride_rc, stride_rs, HAS_RESIDUAL, BLOCK_N,
                          BLOCK_S, INT64)
    dy, _ = load_tile(dy_ptr, n0, s0, c, n_hi, s_hi, c_mask, stride_dyn, stride_dyc, stride_dys,
                      BLOCK_N, BLOCK_S, INT64)
    return x, dy, r, mask


@triton.jit
def _grad_tile(x, dy, r, center, center_d, scale, bias, act_param, ACC: tl.constexpr,
               ACTIVATION: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
    """(g, x - mean) of one tile: g = dy * act'(z), z recomputed as the forward did, and g
    rounded to x's dtype, where eager's activation backward hands it on."""
    z, x_mu = pre_activation(x, r, center, center_d, scale, bias, ACC, HAS_RESIDUAL)
    g = activation_grad(z, dy.to(ACC), act_param, x.dtype, ACTIVATION)
    return g.to(x.dtype).to(ACC), x_mu


@CachedLaunch
@triton.jit
def _grad_reduce_kernel(
    x_ptr, dy_ptr, r_ptr,  # [N, C, S] each with its own strides; r read if HAS_RESIDUAL
    dx_ptr, dr_ptr,  # [N, C, S]: dx written if WRITE_DX, d residual (= g) if HAS_RESIDUAL
    mean_ptr, var_ptr, weight_ptr, bias_ptr,  # as _normalize_kernel's
    partial_ptr,  # [2, plan.scratch_rows, C] scratch of merge_partials
    counter_ptr,  # [plan.counters] int32, zero (merge.workspace)
    dweight_ptr, dbias_ptr,  # [C] out in the parameters' dtype
    totals_ptr,  # sum(g), sum(g * xhat) out at totals_ptr + TOTALS_OFFSET + (0 or TOTALS_STRIDE)
    N, C, S, stride_xn, stride_xc, stride_xs, stride_dyn, stride_dyc, stride_dys,
    stride_rn, stride_rc, stride_rs, stride_dxn, stride_dxc, stride_dxs, stride_drn,
    stride_drc, stride_drs, CHUNK_N, CHUNK_S, SPLIT_S, SPLITS, GROUP, TOTALS_OFFSET,
    TOTALS_STRIDE, eps_hi, eps_lo, act_param_hi, act_param_lo,
    ACC: tl.constexpr, ACTIVATION: tl.constexpr, SHIFTED: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    WRITE_DX: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_C: tl.constexpr, PAIR_N: tl.constexpr, PAIR_S: tl.constexpr, INT64: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
):
    c, c_mask = program_channels(C, BLOCK_C)
    n_lo, n_hi, s_lo, s_hi = program_rows(N, S, CHUNK_N, CHUNK_S, SPLIT_S)
    act_param = joined(act_param_hi, act_param_lo, ACC)
    center, center_d, rstd, scale, bias = channel_affine(mean_ptr, var_ptr, weight_ptr,
                                                         bias_ptr, c, c_mask, C, eps_hi, eps_lo,
                                                         ACC, SHIFTED, HAS_WEIGHT, HAS_BIAS)
    acc_g = tl.zeros((BLOCK_N, BLOCK_S, BLOCK_C), ACC)
    acc_gx = tl.zeros((BLOCK_N, BLOCK_S, BLOCK_C), ACC)
    # Masked lanes load dy = 0, so g = 0 there for every activation: no tl.where needed.
    for n0 in range(n_lo, n_hi, BLOCK_N + PAIR_N):
        for s0 in range(s_lo, s_hi, BLOCK_S + PAIR_S):
            x, dy, r, mask = _load_x_dy_r(x_ptr, dy_ptr, r_ptr, n0, s0, c, n_hi, s_hi, c_mask,
                                          stride_xn, stride_xc, stride_xs, stride_dyn,
                                          stride_dyc, stride_dys, stride_rn, stride_rc,
                                          stride_rs, HAS_RESIDUAL, BLOCK_N, BLOCK_S, INT64)
            if PAIR_N + PAIR_S > 0:
                n1, s1 = n0 + PAIR_N, s0 + PAIR_S
                x2, dy2, r2, mask2 = _load_x_dy_r(x_ptr, dy_ptr, r_ptr, n1, s1, c, n_hi, s_hi,
                                                  c_mask, stride_xn, stride_xc, stride_xs,
                                                  stride_dyn, stride_dyc, stride_dys, stride_rn,
                                                  stride_rc, stride_rs, HAS_RESIDUAL, BLOCK_N,
                                                  BLOCK_S, INT64)
                g2, x_mu2 = _grad_tile(x2, dy2, r2, center, center_d, scale, bias, act_param,
                                       ACC, ACTIVATION, HAS_RESIDUAL)
                acc_g += tl.where(mask2, g2, 0.0)
                acc_gx += tl.where(mask2, g2 * x_mu2, 0.0)
                if HAS_RESIDUAL:
                    store_tile(dr_ptr, g2, mask2, n1, s1, c, stride_drn, stride_drc, stride_drs,
                               BLOCK_N, BLOCK_S, INT64)
                if WRITE_DX:
                    store_tile(dx_ptr, g2 * scale, mask2, n1, s1, c, stride_dxn, stride_dxc,
                               stride_dxs, BLOCK_N, BLOCK_S, INT64)
            g, x_mu = _grad_tile(x, dy, r, center, center_d, scale, bias, act_param, ACC,
                                 ACTIVATION, HAS_RESIDUAL)
            acc_g += tl.where(mask, g, 0.0)
            acc_gx += tl.where(mask, g * x_mu, 0.0)
            if HAS_RESIDUAL:
                store_tile(dr_ptr, g, mask, n0, s0, c, stride_drn, stride_drc, stride_drs,
                           BLOCK_N, BLOCK_S, INT64)
            if WRITE_DX:
                store_tile(dx_ptr, g * scale, mask, n0, s0, c, stride_dxn, stride_dxc,
                           stride_dxs, BLOCK_N, BLOCK_S, INT64)
    done, dbias, sum_gx = merge_partials(partial_ptr, counter_ptr, channel_sum(acc_g),
                                         channel_sum(acc_gx), c, c_mask, C, SPLITS, GROUP, ACC,
                                         BLOCK_ROWS, BLOCK_C)
    if done:
        dweight = sum_gx * tl.reshape(rstd, (BLOCK_C,))
        tl.store(dweight_ptr + c, dweight.to(dweight_ptr.dtype.element_ty), mask=c_mask)
        tl.store(dbias_ptr + c, dbias.to(dbias_ptr.dtype.element_ty), mask=c_mask)
        if not WRITE_DX:
            totals = totals_ptr + TOTALS_OFFSET + c
            tl.store(totals, dbias, mask=c_mask)
            tl.store(totals + TOTALS_STRIDE, dweight, mask=c_mask)


@triton.jit
def _dx_tile(x, dy, r, center, center_d, scale, bias, mean_g, k, act_param, ACC: tl.constexpr,
             ACTIVATION: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
    g, x_mu = _grad_tile(x, dy, r, center, center_d, scale, bias, act_param, ACC, ACTIVATION,
                         HAS_RESIDUAL)
    return scale * (g - mean_g - x_mu * k)


@CachedLaunch
@triton.jit
def _dx_kernel(
    x_ptr, dy_ptr, r_ptr, dx_ptr,  # [N, C, S] each with its own strides
    mean_ptr, var_ptr, weight_ptr, bias_ptr,  # as _normalize_kernel's
    totals_ptr,  # sum(g), sum(g * xhat) at totals_ptr + TOTALS_OFFSET + (0 or TOTALS_STRIDE)
    N, C, S, stride_xn, stride_xc, stride_xs, stride_dyn, stride_dyc, stride_dys,
    stride_rn, stride_rc, stride_rs, stride_dxn, stride_dxc, stride_dxs, CHUNK_N, CHUNK_S,
    SPLIT_S, count, TOTALS_OFFSET, TOTALS_STRIDE, eps_hi, eps_lo, act_param_hi, act_param_lo,
    ACC: tl.constexpr, ACTIVATION: tl.constexpr, SHIFTED: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, PAIR_N: tl.constexpr,
    PAIR_S: tl.constexpr, INT64: tl.constexpr,
):
    # In reverse: see program_index.
    c, c_mask = program_channels(C, BLOCK_C, REVERSE=True)
    n_lo, n_hi, s_lo, s_hi = program_rows(N, S, CHUNK_N, CHUNK_S, SPLIT_S, REVERSE=True)
    act_param = joined(act_param_hi, act_param_lo, ACC)
    center, center_d, rstd, scale, bias = channel_affine(mean_ptr, var_ptr, weight_ptr,
                                                         bias_ptr, c, c_mask, C, eps_hi, eps_lo,
                                                         ACC, SHIFTED, HAS_WEIGHT, HAS_BIAS)
    n = count.to(ACC)
    # dx = scale * (g - sum(g) / n - xhat * sum(g * xhat) / n), with xhat = (x - mean) * rstd
    totals = totals_ptr + TOTALS_OFFSET + c
    mean_g = div_rn(tl.load(totals, mask=c_mask, other=0.0), n)[None, None, :]
    k = rstd * div_rn(tl.load(totals + TOTALS_STRIDE, mask=c_mask, other=0.0),
                              n)[None, None, :]
    for n0 in range(n_lo, n_hi, BLOCK_N + PAIR_N):
        for s0 in range(s_lo, s_hi, BLOCK_S + PAIR_S):
            x, dy, r, mask = _load_x_dy_r(x_ptr, dy_ptr, r_ptr, n0, s0, c, n_hi, s_hi, c_mask,
                                          stride_xn, stride_xc, stride_xs, stride_dyn,
                                          stride_dyc, stride_dys, stride_rn, stride_rc,
                                          stride_rs, HAS_RESIDUAL, BLOCK_N, BLOCK_S, INT64)
            if PAIR_N + PAIR_S > 0:
                n1, s1 = n0 + PAIR_N, s0 + PAIR_S
                x2, dy2, r2, mask2 = _load_x_dy_r(x_ptr, dy_ptr, r_ptr, n1, s1, c, n_hi, s_hi,
                                                  c_mask, stride_xn, stride_xc, stride_xs,
                                                  stride_dyn, stride_dyc, stride_dys, stride_rn,
                                                  stride_rc, stride_rs, HAS_RESIDUAL, BLOCK_N,
                                                  BLOCK_S, INT64)
                store_tile(dx_ptr, _dx_tile(x2, dy2, r2, center, center_d, scale, bias, mean_g,
                                            k, act_param, ACC, ACTIVATION, HAS_RESIDUAL),
                           mask2, n1, s1, c, stride_dxn, stride_dxc, stride_dxs, BLOCK_N,
                           BLOCK_S, INT64)
            store_tile(dx_ptr, _dx_tile(x, dy, r, center, center_d, scale, bias, mean_g, k,
                                        act_param, ACC, ACTIVATION, HAS_RESIDUAL),
                       mask, n0, s0, c, stride_dxn, stride_dxc, stride_dxs, BLOCK_N, BLOCK_S,
                       INT64)


class _Walk(NamedTuple):
    """The plan shared by the backward launches, and each tensor's strides in it: a missing
    residual takes x's strides, never read."""

    plan: object
    x: tuple
    dy: tuple
    residual: tuple
    dx: tuple
    dresidual: tuple


def _walk(x, dy, dx, residual, dresidual) -> _Walk:
    x_ncs, dy_ncs, dx_ncs = strides_ncs(x), strides_ncs(dy), strides_ncs(dx)
    r_ncs = dr_ncs = x_ncs
    if residual is not None:
        r_ncs, dr_ncs = strides_ncs(residual), strides_ncs(dresidual)
    plan = make_plan(x, x_ncs, dy_ncs, dx_ncs, r_ncs, dr_ncs)
    return _Walk(plan, *(plan.strides(ncs) for ncs in (x_ncs, dy_ncs, r_ncs, dx_ncs, dr_ncs)))


def _constexprs(walk, x, mean, weight, bias, residual, activation):
    return dict(ACC=triton_dtype(x.dtype), ACTIVATION=activation, SHIFTED=mean.dim() == 2,
                HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
                HAS_RESIDUAL=residual is not None, **walk.plan.tiles)


def _reduce(walk, dy, x, mean, var, weight, bias, residual, dx, dresidual, totals,
            totals_offset, totals_stride, eps, activation, activation_param, write_dx):
    """The reduction launch: dweight and dbias, d residual, and dx (write_dx) or the totals."""
    plan, C = walk.plan, x.shape[1]
    acc = accumulate_dtype(x.dtype)
    dweight = x.new_empty(C, dtype=acc if weight is None else weight.dtype)
    dbias = x.new_empty(C, dtype=acc if bias is None else bias.dtype)
    counters, partial = workspace(x.device, plan.counters, 2 * plan.scratch_rows * C, acc)
    _grad_reduce_kernel.launch(
        (plan, x.dtype, dy.dtype, mean.dtype, mean.dim(), var.dtype, dtype_of(weight),
         dtype_of(bias), dtype_of(residual), activation, write_dx),
        (x, dy, x if residual is None else residual, dx, dx if dresidual is None else dresidual,
         mean, var, mean if weight is None else weight, mean if bias is None else bias, partial,
         counters, dweight, dbias, partial if totals is None else totals),
        (*float32_pair(eps), *float32_pair(activation_param)),
        lambda: Launch(plan.grid, (plan.n, C, plan.s, *walk.x, *walk.dy, *walk.residual,
                                   *walk.dx, *walk.dresidual, plan.chunk_n, plan.chunk_s,
                                   plan.split_s, plan.splits, plan.group, totals_offset,
                                   totals_stride),
                       dict(_constexprs(walk, x, mean, weight, bias, residual, activation),
                            WRITE_DX=write_dx, BLOCK_ROWS=plan.block_rows)))
    return dweight, dbias, partial


def _dx(walk, dy, x, mean, var, weight, bias, residual, dresidual, dx, totals, totals_offset,
        totals_stride, count, eps, activation, activation_param):
    """The dx launch of training. Given d residual (= g), it reads that instead of dy and the
    residual, with no activation left to apply."""
    plan, C = walk.plan, x.shape[1]
    g_given = dresidual is not None
    g_strides = walk.dresidual if g_given else walk.dy
    if g_given:
        dy, residual, activation = dresidual, None, IDENTITY
    _dx_kernel.launch(
        (plan, x.dtype, dy.dtype, mean.dtype, mean.dim(), var.dtype, dtype_of(weight),
         dtype_of(bias), dtype_of(residual), activation, g_given),
        (x, dy, x if residual is None else residual, dx, mean, var,
         mean if weight is None else weight, mean if bias is None else bias, totals),
        (*float32_pair(eps), *float32_pair(activation_param)),
        lambda: Launch(plan.grid, (plan.n, C, plan.s, *walk.x, *g_strides, *walk.residual,
                                   *walk.dx, plan.chunk_n, plan.chunk_s, plan.split_s, count,
                                   totals_offset, totals_stride),
                       _constexprs(walk, x, mean, weight, bias, residual, activation)))
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
    dweight, dbias, partial = _reduce(walk, dy, x, mean, var, weight, bias, residual, dx,
                                      dresidual, None, totals_offset, totals_stride, eps,
                                      activation, activation_param, not training)
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
    _reduce(walk, dy, x, mean, var, weight, bias, residual, x, dresidual, sums, 0, C, eps,
            activation, activation_param, False)
    return sums, dresidual


def grad_input(dy, x, mean, var, weight, bias, residual, dresidual, sums, count: int,
               eps: float, activation: int, activation_param: float):
    """dx for batch statistics over count elements per channel, whose sum(g) and
    sum(g * xhat) are sums ([2, C], e.g. grad_reduce's summed over processes)."""
    dx = torch.empty_like(x)
    walk = _walk(x, dy, dx, residual, dresidual)
    return _dx(walk, dy, x, mean, var, weight, bias, residual, dresidual, dx, sums, 0,
               x.shape[1], count, eps, activation, activation_param)
