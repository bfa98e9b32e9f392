"""Forward: batch statistics, running statistics, eval, layouts and odd shapes, against a
float64 reference and against nn.BatchNorm*d followed by the activation."""
import pytest
import torch
from torch import nn

import tritonbn
from conftest import (ACTIVATION_FNS, DEVICE, LAYOUTS, float64_bn_act, make_input, make_params,
                      max_err)

# Primes, C=1, 1x1 spatial, N=2, and every rank from 2-D to 5-D.
SHAPES = [(5, 3), (7, 4, 5), (3, 5, 7, 3), (2, 6, 5, 7), (2, 1, 3, 3), (3, 4, 1, 1),
          (2, 3, 3, 4, 5)]
BN_MODULES = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
ACT_MODULES = {2: tritonbn.BatchNormAct1d, 3: tritonbn.BatchNormAct1d, 4: tritonbn.BatchNormAct2d,
               5: tritonbn.BatchNormAct3d}
ATOL = {torch.float32: 2e-5, torch.float64: 1e-12}


def pair_of_modules(C, ndim, activation="relu", dtype=torch.float32, **kwargs):
    """(tritonbn module, nn.BatchNorm + activation) with the same random parameters/buffers."""
    ours = ACT_MODULES[ndim](C, activation=activation, device=DEVICE, dtype=dtype, **kwargs)
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
    return ours, nn.Sequential(theirs, _activation_module(activation))


def _activation_module(activation):
    return {"identity": nn.Identity(), "relu": nn.ReLU(), "sigmoid": nn.Sigmoid()}[activation]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_matches_float64_and_pytorch(shape, layout, training):
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


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("activation", list(ACTIVATION_FNS))
def test_every_activation(activation, training):
    x = make_input((4, 6, 3, 5), layout="channels_last")
    weight, bias, running_mean, running_var = make_params(6)
    expected, _, _ = float64_bn_act(x, running_mean, running_var, weight, bias, training, 0.1,
                                    1e-5, activation)
    y = tritonbn.bn_act(x, running_mean, running_var, weight, bias, training,
                        activation=activation)
    assert max_err(y, expected) < ATOL[torch.float32]


def test_float64_is_exact_to_rounding():
    x = make_input((4, 5, 6, 3), dtype=torch.float64, offset=3.0)
    weight, bias, running_mean, running_var = make_params(5, torch.float64)
    expected, rm64, rv64 = float64_bn_act(x, running_mean, running_var, weight, bias, True,
                                          0.1, 1e-5, "sigmoid")
    y = tritonbn.bn_act(x, running_mean, running_var, weight, bias, True, activation="sigmoid")
    assert max_err(y, expected) < ATOL[torch.float64]
    # Triton receives momentum as a float32 scalar: 0.1 is off by 1.5e-9 there.
    assert max_err(running_mean, rm64) < 1e-7 and max_err(running_var, rv64) < 1e-7


@pytest.mark.parametrize("momentum", [0.1, None])
def test_running_stats_over_steps(momentum):
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
def test_module_options(affine, track_running_stats):
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
    # y is (x - mean) * rstd: x - mean is exact in float32, the mean itself is off by an ulp
    # of 1e4 (~1e-3).
    assert max_err(y, expected) < 2e-3


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
    (shift, mean_d), var = tritonbn.ops.run_batch_stats(x, None, None, 0.1)
    mean = shift.double() + mean_d.double()
    var64, mean64 = torch.var_mean(x.double(), dim=(0, 2, 3), correction=0)
    assert max_err(mean, mean64) < 5e-8
    assert max_err(var, var64) < 5e-7
