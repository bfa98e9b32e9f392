"""What the forward and backward kernels share: the per-channel affine, the pre-activation z,
and the float arguments, which reach a kernel as float32 pairs so that float64 keeps them whole.

z = (x - mean) * rstd * weight + bias [+ residual] is recomputed by every pass that needs it,
so each must round it exactly as the forward did; having one definition here is what makes
the backward's z the forward's z.
"""
import math
import struct

import torch
import triton
import triton.language as tl

from .activations import div_rn
from .tiling import load_tile


def float32_pair(value: float) -> tuple:
    """(hi, lo): hi the float32 nearest to value, lo the float32 nearest to value - hi.
    Triton passes Python floats to a kernel as float32; a kernel computing in float64 adds
    the two back (to within 2^-48 of value) with joined."""
    hi = struct.unpack("f", struct.pack("f", value))[0]
    return hi, (value - hi if math.isfinite(hi) else 0.0)  # inf - inf would be NaN


def float_pairs(**values: float) -> dict:
    """Float arguments by kernel parameter name: each value as <name>_hi, <name>_lo, its
    float32_pair."""
    pairs = {}
    for name, value in values.items():
        pairs[f"{name}_hi"], pairs[f"{name}_lo"] = float32_pair(value)
    return pairs


@triton.jit
def joined(hi, lo, ACC: tl.constexpr):
    """A float argument split by float32_pair, back in ACC: float64 keeps its digits."""
    return tl.cast(hi, ACC) + tl.cast(lo, ACC)


def triton_dtype(dtype: torch.dtype):
    """The kernels' ACC constexpr for x's dtype: float64 for float64, float32 otherwise."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def dtype_of(t):
    """t's dtype, None for no tensor: what a cache key holds for an optional argument."""
    return None if t is None else t.dtype


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
    float32_pair.

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
def pre_activation(x, r, affine, ACC: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
    """(z, x - mean) of one tile, affine being channel_affine's (center, center_d, rstd, scale,
    bias); z is rounded to x's dtype where eager stores it: after the BatchNorm, and after the
    residual add."""
    center, center_d, _rstd, scale, bias = affine
    x_mu = (x.to(ACC) - center) - center_d
    z = (x_mu * scale + bias).to(x.dtype).to(ACC)
    if HAS_RESIDUAL:
        z = (z + r.to(ACC)).to(x.dtype).to(ACC)
    return z, x_mu


@triton.jit
def load_x_r(x, r, n0, s0, bounds, HAS_RESIDUAL: tl.constexpr, BLOCK_N: tl.constexpr,
             BLOCK_S: tl.constexpr, INT64: tl.constexpr):
    """(x, residual, mask) of the tile at (n0, s0); x and r are views, bounds the program's
    (tiling.load_tile). Without a residual the x tile stands in for it, unread: a value the
    compiler can type (None it cannot)."""
    x_tile, mask = load_tile(x, n0, s0, bounds, BLOCK_N, BLOCK_S, INT64)
    r_tile = x_tile
    if HAS_RESIDUAL:
        r_tile, _ = load_tile(r, n0, s0, bounds, BLOCK_N, BLOCK_S, INT64)
    return x_tile, r_tile, mask
