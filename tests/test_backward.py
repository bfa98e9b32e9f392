"""Backward: gradients of input, weight and bias against float64 autograd through PyTorch's
batch_norm, in training (batch statistics) and eval (frozen statistics), plus gradcheck."""
import pytest
import torch
import torch.nn.functional as F

import tritonbn
from conftest import (ACTIVATION_CASES, DEVICE, LAYOUTS, case_id, eager_act, float64_bn_act,
                      make_input, make_params)
from test_forward import SHAPES


def gradients(fn, inputs, dy):
    """Gradients of fn(*inputs) for the inputs that are not None."""
    leaves = [t for t in inputs if t is not None]
    return torch.autograd.grad(fn(*inputs), leaves, dy)


def check_gradients(shape, layout, training, activation, affine=True, dtype=torch.float32,
                    dy_layout=None, activation_kwargs=None, residual_layout=None):
    """Gradients of x, weight, bias (and a residual in residual_layout) against float64."""
    C = shape[1]
    x = make_input(shape, dtype, layout, offset=0.5, requires_grad=True)
    residual = None
    if residual_layout:
        residual = make_input(shape, dtype, residual_layout, requires_grad=True)
    weight, bias, running_mean, running_var = make_params(C, dtype)
    if affine:
        weight.requires_grad_()
        bias.requires_grad_()
    else:
        weight = bias = None
    dy = make_input(shape, dtype, dy_layout or layout)

    def ours(x, weight, bias, residual):
        return tritonbn.bn_act(x, running_mean.clone(), running_var.clone(), weight, bias,
                               training, activation=activation,
                               activation_kwargs=activation_kwargs, residual=residual)

    def float64(x, weight, bias, residual):
        return float64_bn_act(x, running_mean, running_var, weight, bias, training, 0.1, 1e-5,
                              activation, activation_kwargs, residual)[0]

    leaves64 = [None if t is None else t.detach().double().requires_grad_() for t in
                (x, weight, bias, residual)]
    expected = gradients(float64, leaves64, dy.double())
    got = gradients(ours, (x, weight, bias, residual), dy)
    for g, e in zip(got, expected):
        assert g.dtype == dtype
        scale = e.abs().max().item() + 1.0
        assert (g.double() - e).abs().max().item() < 2e-5 * scale
    assert got[0].stride() == x.stride()
    if residual is not None:
        assert got[-1].stride() == residual.stride()


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_gradients_match_float64(shape, layout, training, backend):
    check_gradients(shape, layout, training, "relu")


@pytest.mark.parametrize("residual", [False, True], ids=["", "residual"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", ACTIVATION_CASES, ids=case_id)
def test_gradients_every_activation(case, training, residual, backend):
    """The residual comes in another layout than x, and gets its own gradient, in its own."""
    activation, kwargs = case
    check_gradients((3, 4, 5, 3), "channels_last", training, activation,
                    activation_kwargs=kwargs, residual_layout="contiguous" if residual else None)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradients_without_affine(training, backend):
    check_gradients((4, 3, 6), "contiguous", training, "sigmoid", affine=False)


def test_gradient_in_another_layout_than_input():
    check_gradients((2, 5, 4, 3), "channels_last", True, "relu", dy_layout="contiguous")


def test_gradients_match_pytorch_module():
    x = make_input((4, 3, 5, 5), requires_grad=True)
    ours = tritonbn.BatchNormAct2d(3, device=DEVICE)
    theirs = torch.nn.Sequential(torch.nn.BatchNorm2d(3, device=DEVICE), torch.nn.ReLU())
    dy = torch.randn_like(x)
    for training in (True, False):
        ours.train(training)
        theirs.train(training)
        got = gradients(lambda x, w, b: ours(x), (x, ours.weight, ours.bias), dy)
        expected = gradients(lambda x, w, b: theirs(x), (x, theirs[0].weight, theirs[0].bias),
                             dy)
        for g, e in zip(got, expected):
            assert (g - e).abs().max().item() < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("training, residual", [(True, False), (True, True), (False, True)],
                         ids=["train", "train-residual", "eval-residual"])
@pytest.mark.parametrize("case", ACTIVATION_CASES, ids=case_id)
def test_gradcheck_float64(case, training, residual):
    """Fast mode (one random direction): the full Jacobian costs minutes in the interpreter,
    and the float32 tests above already compare every gradient element by element."""
    activation, kwargs = case
    x = make_input((3, 2, 2), torch.float64, scale=2.0, requires_grad=True)
    weight, bias, running_mean, running_var = make_params(2, torch.float64)
    r = make_input((3, 2, 2), torch.float64, requires_grad=True) if residual else None
    inputs = [t for t in (x, weight.requires_grad_(), bias.requires_grad_(), r) if t is not None]

    def fn(x, weight, bias, r=None):
        return tritonbn.bn_act(x, running_mean.clone(), running_var.clone(), weight, bias,
                               training, activation=activation, activation_kwargs=kwargs,
                               residual=r)

    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_double_backward_matches_pytorch(training):
    """create_graph=True (gradient penalties) gives gradients that differentiate again as
    PyTorch's own, through the input, the parameters and the residual."""
    x = make_input((4, 3, 5), requires_grad=True)
    r = make_input((4, 3, 5), requires_grad=True)
    ours = tritonbn.BatchNormAct1d(3, activation="silu", device=DEVICE).train(training)
    bn = torch.nn.BatchNorm1d(3, device=DEVICE).train(training)
    weight, bias, running_mean, running_var = make_params(3)
    for m in (ours, bn):
        m.load_state_dict({"weight": weight, "bias": bias, "running_mean": running_mean,
                           "running_var": running_var, "num_batches_tracked": torch.tensor(0)})
    results = []
    for forward, params in ((lambda: ours(x, r), (ours.weight, ours.bias)),
                            (lambda: F.silu(bn(x) + r), (bn.weight, bn.bias))):
        grads = torch.autograd.grad(forward().square().sum(), (x, r) + params,
                                    create_graph=True)
        penalty = sum(g.square().sum() for g in grads)
        results.append(torch.autograd.grad(penalty, (x, r) + params))
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def _chain(first, second, wiring):
    """The graph of a residual block: the second layer's residual is the block's input
    ("input"), the first layer's output (as in a ResNet block: "fused"), or the second layer's
    own input ("own")."""
    mix = torch.linspace(-1.0, 1.0, 9, dtype=torch.float64, device=DEVICE).view(3, 3)

    def block(x, r):
        if wiring == "input":
            return second(first(x), r)
        h = first(x)
        if wiring == "fused":
            return second(torch.einsum("dc,nchw->ndhw", mix, h), h)
        return second(h, h)
    return block


@pytest.mark.parametrize("wiring", ["input", "fused", "own"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", ACTIVATION_CASES, ids=case_id)
@pytest.mark.slow
def test_double_backward_through_chained_layers_matches_pytorch(case, training, wiring):
    """A gradient penalty through two layers in float64, in every wiring of a residual: the
    gradients taken with create_graph=True, and the gradients of their squared norm, as nn's
    BatchNorm2d followed by the add and the activation (hardsigmoid has no second derivative
    in PyTorch: both raise)."""
    activation, kwargs = case
    act = eager_act(activation, kwargs)
    ours = [tritonbn.BatchNormAct2d(3, activation=activation, activation_kwargs=kwargs,
                                    device=DEVICE, dtype=torch.float64) for _ in range(2)]
    nns = [torch.nn.BatchNorm2d(3, device=DEVICE, dtype=torch.float64) for _ in range(2)]
    for layer, reference_layer in zip(ours, nns):
        weight, bias, running_mean, running_var = make_params(3, torch.float64)
        state = {"weight": weight, "bias": bias, "running_mean": running_mean,
                 "running_var": running_var, "num_batches_tracked": torch.tensor(0)}
        layer.load_state_dict(state)
        reference_layer.load_state_dict(state)
        layer.train(training)
        reference_layer.train(training)
    x = make_input((4, 3, 3, 5), torch.float64, requires_grad=True)
    r = make_input((4, 3, 3, 5), torch.float64, requires_grad=True)

    def nn_layer(bn):
        return lambda t, residual=None: act(bn(t) if residual is None else bn(t) + residual)

    def penalty_gradients(block, layers):
        wrt = (x, r, *(p for layer in layers for p in (layer.weight, layer.bias)))
        grads = torch.autograd.grad(block(x, r).square().sum(), wrt, create_graph=True,
                                    allow_unused=True)
        penalty = sum(g.square().sum() for g in grads if g is not None)
        try:
            return (*grads, *torch.autograd.grad(penalty, wrt, allow_unused=True))
        except RuntimeError as error:
            return str(error)

    got = penalty_gradients(_chain(*ours, wiring), ours)
    expected = penalty_gradients(_chain(*map(nn_layer, nns), wiring), nns)
    if isinstance(expected, str):
        assert got == expected and "not implemented" in expected
        return
    for ours_, nns_ in zip(got, expected):
        if nns_ is None:  # r, where the block does not read it
            assert ours_ is None
        else:
            torch.testing.assert_close(ours_, nns_, rtol=1e-9, atol=1e-9)
