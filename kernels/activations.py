"""The fused activations and their derivatives, picked at compile time by a constexpr code
(the codes: activation_codes.py; the derivatives: docs/DESIGN.md).

Each follows PyTorch's own CUDA kernel: the same formula, the same side of every kink (relu6's
gradient is 0 at 0 and at 6, hardswish's is 0 at -3), NaN passing through. Eager rounds
BatchNorm's output to the input dtype before a separate activation runs, and rounds the
activation's gradient before BatchNorm's backward reads it: the callers round z and g through
the input dtype at the same places, so float16/bfloat16 results round as eager's do.

Only tl.math runs under the interpreter, so tanh, log1p and expm1 are built from exp and log
here, accurate to a few ulps (libdevice's versions are not available there). On a GPU two
tl.math operations are approximate where eager's are not: float32 tl.exp compiles to
ex2.approx (about 2 + 1.2 |z| ulps off, against expf's 1) and `/` to div.full (2 ulps, against
IEEE division). So exp is libdevice's there (_exp), and divisions go through div_rn.
"""
import triton
import triton.language as tl
from triton.language.extra import libdevice

from . import INTERPRETING
from . import activation_codes as codes

IDENTITY = tl.constexpr(codes.IDENTITY)
RELU = tl.constexpr(codes.RELU)
SIGMOID = tl.constexpr(codes.SIGMOID)
RELU6 = tl.constexpr(codes.RELU6)
LEAKY_RELU = tl.constexpr(codes.LEAKY_RELU)
ELU = tl.constexpr(codes.ELU)
SILU = tl.constexpr(codes.SILU)
HARDSWISH = tl.constexpr(codes.HARDSWISH)
HARDSIGMOID = tl.constexpr(codes.HARDSIGMOID)
GELU = tl.constexpr(codes.GELU)
GELU_TANH = tl.constexpr(codes.GELU_TANH)
MISH = tl.constexpr(codes.MISH)
TANH = tl.constexpr(codes.TANH)

# Constants go on the right of a product: the interpreter cannot multiply constexpr * tensor.
SQRT1_2 = tl.constexpr(0.7071067811865476)  # 1 / sqrt(2)
INV_SQRT_2PI = tl.constexpr(0.3989422804014327)  # 1 / sqrt(2 pi)
SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)  # sqrt(2 / pi)
GELU_KAPPA = tl.constexpr(0.044715)
LIBDEVICE_EXP = tl.constexpr(not INTERPRETING)  # the interpreter has no libdevice
# PyTorch's hardsigmoid backward multiplies by 1/6 rounded to float32, in every dtype (its
# CPU forward divides by 6, its CUDA forward multiplies by this: the forward here divides).
ONE_SIXTH = tl.constexpr(0.1666666716337204)


@triton.jit
def div_rn(a, b):
    """a / b correctly rounded, as IEEE division (and eager) gives it. A GPU compiles float32
    `/` to the approximate div.full; float64 `/` is already div.rn, which tl.math.div_rn does
    not take."""
    q = a / b
    if q.dtype == tl.float32:
        q = tl.math.div_rn(a, b)
    return q


@triton.jit
def _exp(z):
    if LIBDEVICE_EXP:
        return libdevice.exp(z)
    else:
        return tl.exp(z)


@triton.jit
def _sigmoid(z):
    return div_rn(1.0, 1.0 + _exp(-z))


@triton.jit
def _log1p(u):
    """log(1 + u), accurate for tiny u: the rounding of 1 + u cancels in the ratio."""
    w = 1.0 + u
    exact = w == 1.0
    return tl.where(exact, u, tl.log(w) * div_rn(u, tl.where(exact, 1.0, w - 1.0)))


@triton.jit
def _expm1(z):
    """exp(z) - 1, accurate near 0 for the same reason as _log1p. Away from 0 the plain
    difference is exact enough, and the ratio would not be: log of a subnormal exp(z) is off
    by percents."""
    u = _exp(z)
    near_zero = (u > 0.5) & (u < 2.0)
    ratio = (u - 1.0) * div_rn(z, tl.log(tl.where(near_zero & (u != 1.0), u, 2.0)))
    return tl.where(near_zero, tl.where(u == 1.0, z, ratio), u - 1.0)


@triton.jit
def _tanh(z):
    """tanh(|z|) = -expm1(-2|z|) / (2 + expm1(-2|z|)) near 0, 1 - 2 / (1 + exp(2|z|)) past
    0.5 (where the first loses two ulps), with z's sign."""
    a = tl.abs(z)
    m = _expm1(-2.0 * a)
    t = tl.where(a < 0.5, div_rn(-m, 2.0 + m),
                 1.0 - div_rn(2.0, 1.0 + _exp(2.0 * a)))
    return tl.where(z < 0, -t, t)


@triton.jit
def _sech2(z):
    """1 - tanh(z)^2 = 4 e / (1 + e)^2 with e = exp(-2|z|): 1 - t*t would cancel where |t|
    nears 1."""
    e = _exp(-2.0 * tl.abs(z))
    return div_rn(4.0 * e, (1.0 + e) * (1.0 + e))


@triton.jit
def _softplus(z):
    """log(1 + exp(z)) without overflow or cancellation."""
    return tl.maximum(z, 0.0) + _log1p(_exp(-tl.abs(z)))


@triton.jit
def _gelu_tanh_inner(z):
    return (z + z * z * z * GELU_KAPPA) * SQRT_2_OVER_PI


@triton.jit
def _clip6(u):
    """min(max(u, 0), 6), letting NaN through."""
    return tl.where(u < 0.0, 0.0, tl.where(u > 6.0, 6.0, u))


@triton.jit
def activation(z, param, ACTIVATION: tl.constexpr):
    """act(z) for z already rounded as eager would have stored it."""
    if ACTIVATION == RELU:
        # where(z < 0) rather than maximum: NaN must pass through, as torch.relu lets it.
        return tl.where(z < 0, 0.0, z)
    elif ACTIVATION == SIGMOID:
        return _sigmoid(z)
    elif ACTIVATION == RELU6:
        return _clip6(z)
    elif ACTIVATION == LEAKY_RELU:
        return tl.where(z > 0, z, z * param)
    elif ACTIVATION == ELU:
        return tl.where(z > 0, z, param * _expm1(z))
    elif ACTIVATION == SILU:
        return z * _sigmoid(z)
    elif ACTIVATION == HARDSWISH:
        return div_rn(z * _clip6(z + 3.0), 6.0)
    elif ACTIVATION == HARDSIGMOID:
        return div_rn(_clip6(z + 3.0), 6.0)
    elif ACTIVATION == GELU:
        return 0.5 * z * (1.0 + tl.math.erf(z * SQRT1_2))
    elif ACTIVATION == GELU_TANH:
        # 0.5 (1 + tanh(u)) = sigmoid(2u): the sum would cancel for negative u.
        return z * _sigmoid(2.0 * _gelu_tanh_inner(z))
    elif ACTIVATION == MISH:
        return z * _tanh(_softplus(z))
    elif ACTIVATION == TANH:
        return _tanh(z)
    else:
        return z


@triton.jit
def activation_grad(z, dy, param, OUT_DTYPE: tl.constexpr, ACTIVATION: tl.constexpr):
    """dy * act'(z) for z as activation() took it. Where eager's backward works from the
    activation's output (sigmoid, tanh) that output is rounded to OUT_DTYPE first. The
    comparisons are eager's own, so a NaN z picks the same branch as there."""
    if ACTIVATION == RELU:
        return tl.where(z <= 0, 0.0, dy)
    elif ACTIVATION == SIGMOID:
        s = _sigmoid(z).to(OUT_DTYPE).to(z.dtype)
        return dy * s * (1.0 - s)
    elif ACTIVATION == RELU6:
        return tl.where((z <= 0.0) | (z >= 6.0), 0.0, dy)
    elif ACTIVATION == LEAKY_RELU:
        return tl.where(z > 0, dy, dy * param)
    elif ACTIVATION == ELU:
        return tl.where(z <= 0, dy * param * _exp(z), dy)
    elif ACTIVATION == SILU:
        s = _sigmoid(z)
        return dy * s * (1.0 + z * (1.0 - s))
    elif ACTIVATION == HARDSWISH:
        return tl.where(z <= -3.0, 0.0,
                        tl.where(z < 3.0, dy * (div_rn(z, 3.0) + 0.5), dy))
    elif ACTIVATION == HARDSIGMOID:
        return tl.where((z > -3.0) & (z < 3.0), dy * ONE_SIXTH, 0.0)
    elif ACTIVATION == GELU:
        cdf = 0.5 * (1.0 + tl.math.erf(z * SQRT1_2))
        pdf = _exp(-0.5 * z * z) * INV_SQRT_2PI
        return dy * (cdf + z * pdf)
    elif ACTIVATION == GELU_TANH:
        u = _gelu_tanh_inner(z)
        slope = (1.0 + z * z * (3.0 * GELU_KAPPA)) * SQRT_2_OVER_PI
        return dy * (_sigmoid(2.0 * u) + 0.5 * z * _sech2(u) * slope)
    elif ACTIVATION == MISH:
        softplus = _softplus(z)
        return dy * (_tanh(softplus) + z * _sigmoid(z) * _sech2(softplus))
    elif ACTIVATION == TANH:
        t = _tanh(z).to(OUT_DTYPE).to(z.dtype)
        return dy * (1.0 - t * t)
    else:
        return dy
