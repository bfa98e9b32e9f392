"""Launch geometry: small tiles force many tiles per program, paired loads along either axis,
ragged edges and int64 offsets, all of which real GPU shapes hit but tiny test shapes don't."""
import pytest
import torch

import tritonbn
from tritonbn.kernels.layout import strides_ncs
from tritonbn.kernels import tiling
from conftest import float64_bn_act, make_input, make_params, max_err


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiny tiles, and a one-SM device so that each program walks several of them."""
    monkeypatch.setattr(tiling, "TILE_BYTES", 64)
    monkeypatch.setattr(tiling, "_sm_count", lambda index: 1)
    tiling._plan.cache_clear()
    yield
    tiling._plan.cache_clear()


@pytest.mark.slow
@pytest.mark.parametrize("int64", [False, True], ids=["int32", "int64"])
@pytest.mark.parametrize("shape, layout, pair", [
    ((3, 5, 37, 3), "contiguous", "pair_s"),  # long spatial runs: pairs along S
    ((37, 2, 2, 3), "contiguous", "pair_n"),  # short spatial runs: pairs along N
    ((7, 20, 5, 3), "channels_last", "pair_s"),  # flattened rows
])
def test_paired_tiles_and_offsets(small_tiles, monkeypatch, shape, layout, pair, int64):
    if int64:
        monkeypatch.setattr(tiling, "INT32_LIMIT", 1)
    x = make_input(shape, layout=layout, requires_grad=True)
    plan = tiling.make_plan(x.detach(), strides_ncs(x))
    assert getattr(plan, pair) > 0 and plan.int64 == int64
    assert plan.chunk_n * plan.chunk_s > plan.block_n * plan.block_s  # several tiles each
    weight, bias, running_mean, running_var = make_params(shape[1])
    expected, rm64, rv64 = float64_bn_act(x.detach(), running_mean, running_var, weight, bias,
                                          True, 0.1, 1e-5, "sigmoid")
    y = tritonbn.bn_act(x, running_mean, running_var, weight, bias, True, activation="sigmoid")
    assert max_err(y, expected) < 2e-5
    assert max_err(running_var, rv64) < 1e-6
    x64 = x.detach().double().requires_grad_()
    dy = torch.randn_like(y)
    y64, _, _ = float64_bn_act(x64, running_mean, running_var, weight, bias, True, 0.1, 1e-5,
                               "sigmoid")
    dx, = torch.autograd.grad(y, x, dy)
    dx64, = torch.autograd.grad(y64, x64, dy.double())
    assert max_err(dx, dx64) < 2e-5
