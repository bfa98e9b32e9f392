"""Bad input gets a clear exception before any kernel runs, and changes no state."""
import pytest
import torch

import tritonbn
from conftest import DEVICE, make_input, make_params


def module_state(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def assert_rejected_without_state_change(module, x, exception, match):
    before = module_state(module)
    with pytest.raises(exception, match=match):
        module(x)
    for name, value in module.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_one_value_per_channel_when_training():
    m = tritonbn.BatchNormAct2d(3, device=DEVICE)
    assert_rejected_without_state_change(m, make_input((1, 3, 1, 1)), ValueError,
                                         "Expected more than 1 value per channel when training")
    m.eval()
    assert m(make_input((1, 3, 1, 1))).shape == (1, 3, 1, 1)  # fine with frozen statistics


def test_wrong_number_of_dims():
    m = tritonbn.BatchNormAct2d(3, device=DEVICE)
    assert_rejected_without_state_change(m, make_input((2, 3, 4)), ValueError,
                                         r"expected 4D input \(got 3D input\)")
    with pytest.raises(ValueError, match=r"expected 2D to 5D input \(got 6D input\)"):
        tritonbn.bn_act(make_input((2, 3, 1, 1, 1, 2)), None, None, training=True)


def test_channel_count_mismatch():
    """A layer names the channel count it expects and the input's."""
    m = tritonbn.BatchNormAct2d(3, device=DEVICE)
    assert_rejected_without_state_change(
        m, make_input((2, 4, 3, 3)), ValueError,
        r"BatchNormAct2d expects input with num_features=3 channels, got 4 channels "
        r"\(input shape \(2, 4, 3, 3\)\)")
    sync = tritonbn.SyncBatchNormAct(5, device=DEVICE)
    assert_rejected_without_state_change(sync, make_input((2, 4)), ValueError,
                                         "num_features=5 channels, got 4")
    with pytest.raises(ValueError, match="should contain 4 elements"):  # no layer to name
        tritonbn.bn_act(make_input((2, 4)), *make_params(3)[2:], training=True)
    # Without per-channel tensors nothing fixes the count, as in nn.BatchNorm.
    free = tritonbn.BatchNormAct2d(3, affine=False, track_running_stats=False, device=DEVICE)
    assert free(make_input((2, 4, 3, 3))).shape == (2, 4, 3, 3)


def test_non_floating_dtype():
    m = tritonbn.BatchNormAct1d(3, device=DEVICE)
    x = torch.randint(0, 10, (4, 3), device=DEVICE)
    assert_rejected_without_state_change(m, x, TypeError, "floating-point input")


def test_tensors_on_different_devices():
    x = make_input((4, 3))
    weight, bias, running_mean, running_var = make_params(3)
    before = running_mean.clone()
    with pytest.raises(ValueError, match="one device"):
        tritonbn.bn_act(x, running_mean, running_var, weight.to("meta"), bias, training=True)
    assert torch.equal(running_mean, before)


def test_running_stats_of_the_wrong_size():
    x = make_input((4, 3, 2))
    weight, bias, running_mean, running_var = make_params(3)
    for bad in (("running_mean", torch.zeros(4, device=DEVICE)),
                ("running_var", torch.ones(2, device=DEVICE)),
                ("weight", torch.ones(3, 1, device=DEVICE))):
        args = dict(running_mean=running_mean, running_var=running_var, weight=weight, bias=bias)
        args[bad[0]] = bad[1]
        kept = {k: v.clone() for k, v in args.items()}
        with pytest.raises(ValueError, match=bad[0]):
            tritonbn.bn_act(x, training=True, **args)
        for k, v in args.items():
            assert torch.equal(v, kept[k]), k


def test_eval_needs_running_stats():
    with pytest.raises(ValueError, match="required when training=False"):
        tritonbn.bn_act(make_input((4, 3)), None, None, training=False)


def test_unknown_activation_lists_the_supported_ones():
    listed = ", ".join(tritonbn.SUPPORTED_ACTIVATIONS)
    with pytest.raises(ValueError, match=listed):
        tritonbn.BatchNormAct2d(3, activation="swish")
    with pytest.raises(ValueError, match=listed):
        tritonbn.bn_act(make_input((4, 3)), None, None, training=True, activation="softplus")


@pytest.mark.parametrize("activation, kwargs, message", [
    ("relu", {"inplace": True}, "takes no keyword arguments; got inplace"),
    ("leaky_relu", {"alpha": 0.1}, "takes negative_slope; got alpha"),
    ("gelu", {"approximate": "erf"}, "approximate must be one of 'none', 'tanh'"),
    ("elu", {"alpha": "big"}, "alpha must be a number"),
])
def test_bad_activation_kwargs(activation, kwargs, message):
    with pytest.raises(ValueError, match=message):
        tritonbn.BatchNormAct1d(3, activation=activation, activation_kwargs=kwargs)
    with pytest.raises(ValueError, match=message):
        tritonbn.bn_act(make_input((4, 3)), None, None, training=True, activation=activation,
                        activation_kwargs=kwargs)


@pytest.mark.parametrize("bad, error, message", [
    (lambda x: x[:, :2], ValueError, "residual must have the input's shape"),
    (lambda x: x.double(), TypeError, "residual must have the input's dtype"),
    (lambda x: x.to("meta"), ValueError, "on one device"),
    (lambda x: x.tolist(), TypeError, "residual must be a Tensor"),
])
def test_bad_residual_changes_nothing(bad, error, message):
    m = tritonbn.BatchNormAct2d(3, device=DEVICE).train()
    before = module_state(m)
    x = make_input((2, 3, 4, 5))
    with pytest.raises(error, match=message):
        m(x, bad(make_input((2, 3, 4, 5))))
    for name, value in m.state_dict().items():
        assert torch.equal(value, before[name]), name


@pytest.mark.parametrize("training", [True, False])
def test_empty_batch(training):
    """As nn.BatchNorm2d: an empty output, statistics untouched, and a batch counted."""
    m = tritonbn.BatchNormAct2d(3, device=DEVICE).train(training)
    before = module_state(m)
    x = make_input((0, 3, 4, 4), requires_grad=True)
    y = m(x)
    assert y.shape == x.shape
    y.sum().backward()
    for name, value in m.state_dict().items():
        expected = before[name] + 1 if name == "num_batches_tracked" and training else before[name]
        assert torch.equal(value, expected), name
