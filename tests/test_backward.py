"""Backward: gradients of input, weight and bias against float64 autograd through PyTorch's
batch_norm, in training (batch statistics) and eval (frozen statistics), plus gradcheck."""
import pytest
import torch

import tritonbn
from conftest import ACTIVATION_FNS, DEVICE, LAYOUTS, float64_bn_act, make_input, make_params
from test_forward import SHAPES


def gradients(fn, x, weight, bias, dy):
    leaves = [t for t in (x, weight, bias) if t is not None]
    return torch.autograd.grad(fn(x, weight, bias), leaves, dy)


def check_gradients(shape, layout, training, activation, affine=True, dtype=torch.float32,
                    dy_layout=None):
    C = shape[1]
    x = make_input(shape, dtype, layout, offset=0.5, requires_grad=True)
    weight, bias, running_mean, running_var = make_params(C, dtype)
    if affine:
        weight.requires_grad_()
        bias.requires_grad_()
    else:
        weight = bias = None
    dy = make_input(shape, dtype, dy_layout or layout)

    def ours(x, weight, bias):
        return tritonbn.bn_act(x, running_mean.clone(), running_var.clone(), weight, bias,
                               training, activation=activation)

    def float64(x, weight, bias):
        return float64_bn_act(x, running_mean, running_var, weight, bias, training, 0.1, 1e-5,
                              activation)[0]

    leaves64 = [None if t is None else t.detach().double().requires_grad_() for t in
                (x, weight, bias)]
    expected = gradients(float64, *leaves64, dy.double())
    got = gradients(ours, x, weight, bias, dy)
    for g, e in zip(got, expected):
        assert g.dtype == dtype
        scale = e.abs().max().item() + 1.0
        assert (g.double() - e).abs().max().item() < 2e-5 * scale
    assert got[0].stride() == x.stride()


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_gradients_match_float64(shape, layout, training):
    check_gradients(shape, layout, training, "relu")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("activation", list(ACTIVATION_FNS))
def test_gradients_every_activation(activation, training):
    check_gradients((3, 4, 5, 3), "channels_last", training, activation)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradients_without_affine(training):
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
        got = gradients(lambda x, w, b: ours(x), x, ours.weight, ours.bias, dy)
        expected = gradients(lambda x, w, b: theirs(x), x, theirs[0].weight, theirs[0].bias, dy)
        for g, e in zip(got, expected):
            assert (g - e).abs().max().item() < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("activation", ["identity", "sigmoid", "relu"])
def test_gradcheck_float64(activation, training):
    x = make_input((3, 2, 2, 2), torch.float64, requires_grad=True)
    weight, bias, running_mean, running_var = make_params(2, torch.float64)
    weight.requires_grad_()
    bias.requires_grad_()

    def fn(x, weight, bias):
        return tritonbn.bn_act(x, running_mean.clone(), running_var.clone(), weight, bias,
                               training, activation=activation)

    assert torch.autograd.gradcheck(fn, (x, weight, bias))
