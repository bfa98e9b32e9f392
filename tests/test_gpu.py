"""GPU-only: half precision against eager PyTorch's own error, large shapes, and a tensor past
2^31 elements. Skipped without a CUDA device."""
import pytest
import torch

import tritonbn
from conftest import (ACTIVATION_CASES, case_id, eager_act, float64_bn_act, gpu_only, make_input,
                      make_params, max_err)

pytestmark = gpu_only


def eager_bn_act(x, running_mean, running_var, weight, bias, training, activation):
    y = torch.nn.functional.batch_norm(x, running_mean, running_var, weight, bias, training)
    return eager_act(*activation)(y)


def ours_bn_act(x, running_mean, running_var, weight, bias, training, activation):
    name, kwargs = activation
    return tritonbn.bn_act(x, running_mean, running_var, weight, bias, training,
                           activation=name, activation_kwargs=kwargs)


def rms_err(a, b) -> float:
    return (a.double() - b.double()).square().mean().sqrt().item()


def errors_against_float64(fn, x, dy, weight, bias, running_mean, running_var, training,
                           activation, metric=max_err):
    """Errors (max abs by default) of (y, dx, dweight, dbias) of fn against float64 autograd."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, weight, bias)]
    y = fn(leaves[0], running_mean.clone(), running_var.clone(), leaves[1], leaves[2], training,
           activation)
    grads = torch.autograd.grad(y, leaves, dy)
    leaves64 = [t.detach().double().requires_grad_() for t in (x, weight, bias)]
    y64, _, _ = float64_bn_act(leaves64[0], running_mean, running_var, leaves64[1], leaves64[2],
                               training, 0.1, 1e-5, *activation)
    grads64 = torch.autograd.grad(y64, leaves64, dy.double())
    return [metric(a, b) for a, b in zip((y, *grads), (y64, *grads64))]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("activation", ACTIVATION_CASES, ids=case_id)
@pytest.mark.parametrize("layout", ["channels_last", "contiguous"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(32, 64, 28, 28), (7, 13, 9, 11), (1024, 96)], ids=str)
def test_half_precision_no_worse_than_eager(shape, dtype, layout, activation, training):
    x = make_input(shape, dtype, layout, offset=1.0)
    dy = make_input(shape, dtype, layout)
    weight, bias, running_mean, running_var = make_params(shape[1])
    ours = errors_against_float64(
        ours_bn_act,
        x, dy, weight, bias, running_mean, running_var, training, activation)
    eager = errors_against_float64(eager_bn_act, x, dy, weight, bias, running_mean, running_var,
                                   training, activation)
    for name, e_ours, e_eager in zip(("y", "dx", "dweight", "dbias"), ours, eager):
        assert e_ours <= 2 * e_eager + 1e-2, (name, e_ours, e_eager)


LARGE = [(128, 256, 56, 56), (16, 64, 16, 56, 56), (65536, 256)]
LARGE_LAYOUTS = [("channels_last", torch.bfloat16), ("contiguous", torch.float32)]


@pytest.mark.slow
@pytest.mark.parametrize("layout, dtype", LARGE_LAYOUTS)
@pytest.mark.parametrize("shape", LARGE, ids=str)
def test_large_shapes_no_worse_than_eager(shape, layout, dtype):
    """Root-mean-square error against float64, identity activation: pure numerics."""
    x = make_input(shape, dtype, layout)
    dy = make_input(shape, dtype, layout)
    weight, bias, running_mean, running_var = make_params(shape[1])
    args = (x, dy, weight, bias, running_mean, running_var, True, ("identity", {}))
    ours = errors_against_float64(
        ours_bn_act, *args,
        metric=rms_err)
    eager = errors_against_float64(eager_bn_act, *args, metric=rms_err)
    for name, e_ours, e_eager in zip(("y", "dx", "dweight", "dbias"), ours, eager):
        assert e_ours <= 2 * e_eager + 1e-6, (name, e_ours, e_eager)


@pytest.mark.slow
@pytest.mark.parametrize("layout, dtype", LARGE_LAYOUTS)
def test_large_relu_masks(layout, dtype):
    """With 1e8 elements a few z sit within rounding of 0, where ReLU's mask may flip between
    any two float32 computations: allow one flipped element per million, no more."""
    shape = LARGE[0]
    x = make_input(shape, dtype, layout)
    dy = make_input(shape, dtype, layout)
    weight, bias, running_mean, running_var = make_params(shape[1])
    leaves = [t.detach().clone().requires_grad_() for t in (x, weight, bias)]
    y = tritonbn.bn_act(leaves[0], running_mean, running_var, leaves[1], leaves[2], True)
    dx, = torch.autograd.grad(y, leaves[0], dy)
    x64 = x.double().requires_grad_()
    y64, _, _ = float64_bn_act(x64, running_mean, running_var, weight, bias, True, 0.1, 1e-5,
                               "relu")
    dx64, = torch.autograd.grad(y64, x64, dy.double())
    tol = 0.05 if dtype == torch.bfloat16 else 1e-4
    for got, expected in ((y, y64), (dx, dx64)):
        wrong = ((got.double() - expected).abs() > tol * (1 + expected.abs())).sum().item()
        assert wrong <= x.numel() // 10**6, wrong


@pytest.mark.slow
def test_past_two_to_the_31_elements():
    """Offsets past 2^31 must not wrap: check the statistics and the last elements."""
    shape = (2**31 // (4 * 4096) + 3, 4, 64, 64)  # just over 2^31 elements, bfloat16
    need = 4 * 2 ** 31 * 2 * 1.2  # x, y, dy, dx in bfloat16 with headroom
    if torch.cuda.mem_get_info()[0] < need:
        pytest.skip("not enough GPU memory for a tensor past 2^31 elements")
    x = make_input(shape, torch.bfloat16, offset=2.0, requires_grad=True)
    running_mean, running_var = torch.zeros(4, device="cuda"), torch.ones(4, device="cuda")
    y = tritonbn.bn_act(x, running_mean, running_var, training=True, momentum=1.0,
                        activation="identity")
    var, mean = torch.var_mean(x.detach().float(), dim=(0, 2, 3))
    assert max_err(running_mean, mean) < 1e-3
    assert max_err(running_var, var) < 1e-3
    tail = slice(-3, None)  # the last samples sit past element 2^31
    expected_tail = (x[tail].float() - mean[:, None, None]) * torch.rsqrt(
        var[:, None, None] * (x.numel() // 4 - 1) / (x.numel() // 4) + 1e-5)
    assert max_err(y[tail], expected_tail) < 5e-2
    dx, = torch.autograd.grad(y, x, torch.ones_like(y))
    assert dx[tail].float().abs().max().item() < 1e-2  # d/dx of sum(xhat) is zero
