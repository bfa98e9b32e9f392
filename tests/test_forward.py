"""Forward: batch statistics, running statistics, eval, layouts and odd shapes, against a
float64 reference and against nn.BatchNorm*d followed by the activation."""
import pytest
import torch
import triton
import triton.language as tl
from torch import nn

import tritonbn
from tritonbn import dispatch
from conftest import (ACTIVATION_CASES, DEVICE, LAYOUTS, case_id, eager_act, float64_bn_act,
                      make_input, make_params, max_err)

# Primes, C=1, 1x1 spatial, N=2, and every rank from 2-D to 5-D.
SHAPES = [(5, 3), (7, 4, 5), (3, 5, 7, 3), (2, 6, 5, 7), (2, 1, 3, 3), (3, 4, 1, 1),
          (2, 3, 3, 4, 5)]
BN_MODULES = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
ACT_MODULES = {2: tritonbn.BatchNormAct1d, 3: tritonbn.BatchNormAct1d, 4: tritonbn.BatchNormAct2d,
               5: tritonbn.BatchNormAct3d}
ATOL = {torch.float32: 2e-5, torch.float64: 1e-12}


class EagerBatchNormAct(nn.Sequential):
    """nn.BatchNorm*d, the residual add, then the activation, as eager PyTorch runs them."""

    def __init__(self, bn, activation, activation_kwargs=None):
        super().__init__(bn)
        self.act = eager_act(activation, activation_kwargs)

    def forward(self, x, residual=None):
        y = self[0](x)
        return self.act(y if residual is None else y + residual)


def pair_of_modules(C, ndim, activation="relu", dtype=torch.float32, activation_kwargs=None,
                    **kwargs):
    """(tritonbn module, nn.BatchNorm + activation) with the same random parameters/buffers."""
    ours = ACT_MODULES[ndim](C, activation=activation, activation_kwargs=activation_kwargs,
                             device=DEVICE, dtype=dtype, **kwargs)
    theirs = BN_MODULES[ndim](C, device=DEVICE, dtype=dtype, **kwargs)
    if ours.affine:
        weight, bias, _, _ = make_params(C, dtype)
        with torch.no_grad():
            for m in (ours, theirs):
                m.weight.copy_(weight)
                m.bias.copy_(bias)
    if ours.track_running_stats:
        _, _, running_mean, running_var = make_params(C, dtype)
        for m in (ours, theirs):
            m.running_mean.copy_(running_mean)
            m.running_var.copy_(running_var)
    return ours, EagerBatchNormAct(theirs, activation, activation_kwargs)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_matches_float64_and_pytorch(shape, layout, training, backend):
    x = make_input(shape, layout=layout)
    C = shape[1]
    weight, bias, running_mean, running_var = make_params(C)
    expected, rm64, rv64 = float64_bn_act(x, running_mean, running_var, weight, bias, training,
                                          0.1, 1e-5, "relu")
    y = tritonbn.bn_act(x, running_mean, running_var, weight, bias, training, 0.1, 1e-5)
    assert y.dtype == x.dtype and y.shape == x.shape and y.stride() == x.stride()
    assert max_err(y, expected) < ATOL[torch.float32]
    assert max_err(running_mean, rm64) < 1e-6 and max_err(running_var, rv64) < 1e-6

    ours, theirs = pair_of_modules(C, len(shape))
    ours.train(training)
    theirs.train(training)
    assert max_err(ours(x), theirs(x)) < ATOL[torch.float32]
    for name, buffer in theirs[0].named_buffers():
        assert max_err(ours.get_buffer(name), buffer) < 1e-6, name


@pytest.mark.parametrize("residual", [False, True], ids=["", "residual"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", ACTIVATION_CASES, ids=case_id)
def test_every_activation(case, training, residual, backend):
    """Against float64, and against eager nn.BatchNorm2d + add + activation in float32."""
    activation, kwargs = case
    x = make_input((4, 6, 3, 5), layout="channels_last", scale=2.0)
    r = make_input((4, 6, 3, 5)) if residual else None  # contiguous: another layout than x's
    ours, theirs = pair_of_modules(6, 4, activation, activation_kwargs=kwargs)
    ours.train(training)
    theirs.train(training)
    expected, _, _ = float64_bn_act(x, ours.running_mean, ours.running_var, ours.weight,
                                    ours.bias, training, 0.1, 1e-5, activation, kwargs, r)
    y = ours(x, r)
    assert y.stride() == x.stride()
    assert max_err(y, expected) < ATOL[torch.float32]
    assert max_err(y, theirs(x, r)) < ATOL[torch.float32]
    for name, buffer in theirs[0].named_buffers():
        assert max_err(ours.get_buffer(name), buffer) < 1e-6, name


@triton.jit
def _cast_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    mask = offsets < n
    tl.store(y_ptr + offsets, tl.load(x_ptr + offsets, mask=mask).to(tl.bfloat16), mask=mask)


@pytest.mark.skipif(not dispatch.INTERPRETING, reason="the interpreter's cast")
def test_the_interpreter_rounds_float32_to_bfloat16_as_a_gpu_does():
    """conftest's fix of the interpreter's truncating cast: bit for bit PyTorch's rounding,
    NaN, infinities, overflow and signed zeros included."""
    x = torch.randn(1000, dtype=torch.float64).mul(10).float()
    # NaN, infinities, overflow, a signed zero, and ties to even both ways
    x[:7] = torch.tensor([float("nan"), float("inf"), -float("inf"), 3.4e38, -0.0, 1 + 2**-8,
                          1 + 3 * 2**-8])
    y = torch.empty(1000, dtype=torch.bfloat16)
    _cast_kernel[(1,)](x, y, x.numel(), BLOCK=1024)
    assert torch.equal(y.view(torch.int16), x.bfloat16().view(torch.int16))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", ACTIVATION_CASES, ids=case_id)
def test_half_precision_rounds_as_eager(case, dtype):
    """z is rounded to the input dtype before the activation, as eager stores it: the error
    against float64 stays within twice eager's own plus one ulp of the output's scale."""
    activation, kwargs = case
    x = make_input((3, 4, 5, 3), dtype, "channels_last", offset=0.5, scale=2.0)
    r = make_input((3, 4, 5, 3), dtype)
    ours, theirs = pair_of_modules(4, 4, activation, activation_kwargs=kwargs)
    x64 = x.double()
    expected = EagerBatchNormAct(theirs[0].double(), activation, kwargs)(x64, r.double())
    ulp = torch.finfo(dtype).eps * (expected.abs().max().item() + 1)
    eager = theirs.to(dtype)(x, r)
    assert max_err(ours(x, r), expected) <= 2 * max_err(eager, expected) + ulp


@pytest.mark.parametrize("case", ACTIVATION_CASES, ids=case_id)
def test_nan_passes_through_as_in_eager(case):
    """Eval (per-element): a NaN input gives NaN exactly where eager gives NaN."""
    activation, kwargs = case
    ours, theirs = pair_of_modules(3, 2, activation, activation_kwargs=kwargs)
    ours.eval()
    theirs.eval()
    x = make_input((6, 3))
    x[1, 0] = x[4, 2] = float("nan")
    assert torch.equal(ours(x).isnan(), theirs(x).isnan())


@pytest.mark.parametrize("case", ACTIVATION_CASES, ids=case_id)
def test_activation_over_its_whole_range(case):
    """Eval with z = x exactly (mean 0, var 1, eps 0) on a dense grid out to where exp under-
    and overflows: output and input gradient each within twice eager float32's own error
    against float64, plus a few ulps. The float64 reference itself cancels to about
    eps64 * |z| (gelu's 1 + tanh), hence the last term of the tolerance."""
    activation, kwargs = case
    grid = torch.cat([torch.linspace(-100, 100, 20001), torch.linspace(-4, 4, 8001),
                      torch.logspace(-30, 0, 61), -torch.logspace(-30, 0, 61)])
    x = grid.reshape(1, 1, -1).to(DEVICE).requires_grad_()
    dy = torch.randn_like(x)
    y = tritonbn.bn_act(x, torch.zeros(1, device=DEVICE), torch.ones(1, device=DEVICE),
                        eps=0.0, activation=activation, activation_kwargs=kwargs)
    (dx,) = torch.autograd.grad(y, x, dy)

    def eager(dtype):
        x_ = x.detach().to(dtype).requires_grad_()
        y_ = eager_act(activation, kwargs)(x_)
        return y_.double(), torch.autograd.grad(y_, x_, dy.to(dtype))[0].double()

    (y32, dx32), (y64, dx64) = eager(torch.float32), eager(torch.float64)
    eps32, eps64 = torch.finfo(torch.float32).eps, torch.finfo(torch.float64).eps
    for ours, eager32, exact, scale in ((y, y32, y64, 0.0), (dx, dx32, dx64, dy.abs())):
        tolerance = (2 * (eager32 - exact).abs() + 8 * eps32 * (exact.abs() + scale)
                     + 4 * eps64 * (grid.to(DEVICE).abs() + 1))
        error = (ours.double() - exact).abs()
        outside = (error > tolerance) & ~(ours.isnan() & exact.isnan())
        assert not outside.any(), f"z = {grid[outside.flatten().cpu()][:5].tolist()}"


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", [("sigmoid", {}), ("leaky_relu", {"negative_slope": 0.3}),
                                  ("elu", {"alpha": 0.7})], ids=case_id)
def test_float64_is_exact_to_rounding(case, training, backend):
    """momentum, eps and the activation's parameter reach a kernel as two float32 halves each,
    summed back in float64: none of them rounds to float32 (0.3 would be 1.2e-8 off, and an
    eps of 1e-5 2.5e-13 off, which a variance of 1e-5 makes 6e-9 of the output). Only a GPU
    tells: Triton's interpreter keeps a Python float argument exact."""
    activation, kwargs = case
    x = make_input((4, 5, 6, 3), dtype=torch.float64, offset=3.0)
    x[:, 0] = x[:, 0] * 3e-3 + 1.0  # a channel whose variance is about eps
    weight, bias, running_mean, running_var = make_params(5, torch.float64)
    running_var[1] = 1e-5
    expected, rm64, rv64 = float64_bn_act(x, running_mean, running_var, weight, bias, training,
                                          0.1, 1e-5, activation, kwargs)
    y = tritonbn.bn_act(x, running_mean, running_var, weight, bias, training,
                        activation=activation, activation_kwargs=kwargs)
    assert max_err(y, expected) < ATOL[torch.float64]
    assert max_err(running_mean, rm64) < 1e-12 and max_err(running_var, rv64) < 1e-12


@pytest.mark.parametrize("momentum", [0.1, None])
def test_running_stats_over_steps(momentum, backend):
    ours, theirs = pair_of_modules(5, 4, momentum=momentum)
    for _ in range(3):
        x = make_input((3, 5, 4, 3), offset=2.0, scale=3.0)
        assert max_err(ours(x), theirs(x)) < ATOL[torch.float32]
    assert ours.num_batches_tracked.item() == theirs[0].num_batches_tracked.item() == 3
    assert max_err(ours.running_mean, theirs[0].running_mean) < 1e-5
    assert max_err(ours.running_var, theirs[0].running_var) < 1e-5
    ours.eval()
    theirs.eval()
    x = make_input((3, 5, 4, 3))
    assert max_err(ours(x), theirs(x)) < ATOL[torch.float32]


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("track_running_stats", [True, False])
def test_module_options(affine, track_running_stats, backend):
    ours, theirs = pair_of_modules(3, 3, affine=affine, track_running_stats=track_running_stats)
    assert ours.state_dict().keys() == theirs[0].state_dict().keys()
    for training in (True, False):
        ours.train(training)
        theirs.train(training)
        x = make_input((4, 3, 5))
        assert max_err(ours(x), theirs(x)) < ATOL[torch.float32]


def test_state_dict_round_trip_and_repr():
    ours, theirs = pair_of_modules(4, 4, activation="sigmoid")
    fresh = tritonbn.BatchNormAct2d(4, activation="sigmoid", device=DEVICE)
    fresh.load_state_dict(theirs[0].state_dict())
    x = make_input((2, 4, 3, 3))
    assert max_err(fresh(x), theirs(x)) < ATOL[torch.float32]
    assert "activation=sigmoid" in repr(ours)
    leaky = tritonbn.BatchNormAct2d(4, activation="leaky_relu",
                                    activation_kwargs={"negative_slope": 0.2})
    assert "activation=leaky_relu, negative_slope=0.2" in repr(leaky)
    assert leaky.activation_kwargs == {"negative_slope": 0.2}


@pytest.mark.parametrize("activation", ["relu", "identity"])
def test_mean_far_from_zero_keeps_float32_precision(activation, backend):
    """Training on (1, 1, 3, 1) with mean -50 and std 0.01: normalising around the stored
    mean (x - mean, the mean rounded to float32) was off by 2e-4; centring on the exactly
    stored shift first keeps the error at float32 rounding (eager PyTorch on the CPU is off by
    1e-5 to 1e-3 here). 32 channels of that shape make the old error show whatever the draw."""
    x64 = torch.randn(1, 32, 3, 1, dtype=torch.float64) * 0.01 - 50
    x = x64.to(DEVICE, torch.float32)
    expected, _, _ = float64_bn_act(x, None, None, None, None, True, 0.1, 1e-5, activation)
    y = tritonbn.bn_act(x, None, None, training=True, activation=activation)
    # Rounding the mean to float32 costs up to ulp(50) / 2 / std = 2e-4 here.
    assert max_err(y, expected) < 1e-5


def test_large_mean_is_stable():
    """|mean| / std = 1e4: E[x^2] - E[x]^2 in float32 is useless here; ours must not be."""
    x = make_input((4, 3, 16, 16), offset=1e4)
    running_mean, running_var = torch.zeros(3, device=DEVICE), torch.ones(3, device=DEVICE)
    expected, _, rv64 = float64_bn_act(x, running_mean, running_var, None, None, True, 1.0,
                                       1e-5, "identity")
    naive_var = (x * x).mean((0, 2, 3)) - x.mean((0, 2, 3)) ** 2
    true_var = x.double().var((0, 2, 3), unbiased=False)
    assert (naive_var - true_var).abs().max() > 0.1  # the naive formula does fail here
    y = tritonbn.bn_act(x, running_mean, running_var, None, None, True, 1.0, 1e-5, "identity")
    assert max_err(running_var, rv64) < 1e-4
    # y is ((x - shift) - (mean - shift)) * rstd: no ulp of 1e4 (~1e-3) in it.
    assert max_err(y, expected) < 1e-5


def test_strides_that_do_not_collapse_fall_back_to_a_copy():
    base = make_input((3, 4, 5, 6))
    x = base.transpose(2, 3)  # (N, C, W, H) view: spatial dims do not collapse
    running_mean, running_var = torch.zeros(4, device=DEVICE), torch.ones(4, device=DEVICE)
    expected, _, _ = float64_bn_act(x, running_mean, running_var, None, None, True, 0.1, 1e-5,
                                    "relu")
    y = tritonbn.bn_act(x, running_mean, running_var, None, None, True)
    assert max_err(y, expected) < ATOL[torch.float32]


def test_sliced_input_runs_without_a_copy():
    x = make_input((4, 6, 5, 8))[:, 1:5, :, ::2]  # non-dense, but collapsible strides
    expected, _, _ = float64_bn_act(x, None, None, None, None, True, 0.1, 1e-5, "relu")
    y = tritonbn.bn_act(x, None, None, training=True)
    assert max_err(y, expected) < ATOL[torch.float32]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_mean_of_centred_data_is_accurate(layout):
    """A shift far from the mean makes the partial sums drift by (mean - shift) per element;
    then the mean loses ~1e-7 std, which flips ReLU masks near z = 0 on large tensors."""
    x = make_input((64, 4, 48, 48), layout=layout)
    (shift, mean_d), var = tritonbn.dispatch.run_batch_stats(x, None, None, 0.1)
    mean = shift.double() + mean_d.double()
    var64, mean64 = torch.var_mean(x.double(), dim=(0, 2, 3), correction=0)
    assert max_err(mean, mean64) < 5e-8
    assert max_err(var, var64) < 5e-7
