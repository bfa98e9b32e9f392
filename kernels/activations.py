"""Activations fused after the affine transform, chosen at compile time by a constexpr code.

The forward rounds z to the input dtype before the activation, so that the result equals eager
BatchNorm (which writes z in the input dtype) followed by a separate activation module.
"""
import triton
import triton.language as tl

ACTIVATIONS = {"identity": 0, "relu": 1, "sigmoid": 2}


@triton.jit
def activation(z, OUT_DTYPE: tl.constexpr, ACTIVATION: tl.constexpr):
    """act(z) with z rounded to OUT_DTYPE first where that changes the result."""
    if ACTIVATION == 1:
        # where(z < 0) rather than maximum: NaN must pass through, as torch.relu lets it.
        return tl.where(z < 0, 0.0, z)
    elif ACTIVATION == 2:
        z = z.to(OUT_DTYPE).to(z.dtype)
        return 1.0 / (1.0 + tl.exp(-z))
    else:
        return z


@triton.jit
def activation_grad(z, dy, OUT_DTYPE: tl.constexpr, ACTIVATION: tl.constexpr):
    """dy * act'(z); for sigmoid the product is rounded to OUT_DTYPE as eager's backward does."""
    if ACTIVATION == 1:
        return tl.where(z > 0, dy, 0.0)
    elif ACTIVATION == 2:
        z = z.to(OUT_DTYPE).to(z.dtype)
        s = (1.0 / (1.0 + tl.exp(-z))).to(OUT_DTYPE).to(z.dtype)
        return (dy * s * (1.0 - s)).to(OUT_DTYPE).to(z.dtype)
    else:
        return dy
