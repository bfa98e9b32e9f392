"""fuse_bn_act: what it fuses and leaves alone (and why), and that the converted model is the
same model: outputs, gradients, running statistics and state_dict, in training and eval mode.
torchvision and timm models: test_zoo.py."""
import copy
import logging
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import DEVICE
from tritonbn import BatchNormAct1d, BatchNormAct2d, BatchNormAct3d, dispatch
from tritonbn.convert import FusedPair, call_fused, fuse_bn_act

# BatchNorm's backward subtracts two per-channel means from the incoming gradient: the last
# bits of float32 sums that differ in order come out as relative errors of about 1e-5.
GRAD_TOLERANCE = dict(rtol=1e-4, atol=1e-5)


@pytest.fixture(autouse=True)
def exact_float32_matmul():
    """TF32 convolutions would turn BatchNorm's last-bit differences into 1e-3 errors. The
    context manager, since torch.testing (test_module_db) freezes cudnn's global flags."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    with torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, allow_tf32=False):
        yield
    torch.backends.cuda.matmul.allow_tf32 = saved


class BasicBlock(nn.Module):
    """ResNet's basic block with its one shared ReLU: bn1 -> relu, and bn2 -> += x -> relu."""

    def __init__(self, channels: int = 4):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x
        return self.relu(out)


class SigmoidMLP(nn.Module):
    """BatchNorm1d -> sigmoid as torch.sigmoid and as Tensor.sigmoid (F.sigmoid traces so);
    a head that forward never calls still has to keep its state_dict keys."""

    def __init__(self):
        super().__init__()
        self.fc1, self.bn1 = nn.Linear(6, 8, bias=False), nn.BatchNorm1d(8)
        self.fc2, self.bn2 = nn.Linear(8, 8, bias=False), nn.BatchNorm1d(8, momentum=None)
        self.out = nn.Linear(8, 3)
        self.unused_head = nn.Linear(8, 2)

    def forward(self, x):
        h = torch.sigmoid(self.bn1(self.fc1(x)))
        h = self.bn2(self.fc2(h)).sigmoid()
        return self.out(h)


class Functional(nn.Module):
    """F.relu, F.relu(inplace=True) and torch.relu_, on BatchNorms with and without affine
    parameters or running statistics."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.bn2 = nn.BatchNorm2d(4, affine=False)
        self.bn3 = nn.BatchNorm2d(4, track_running_stats=False)

    def forward(self, x):
        h = F.relu(self.bn1(self.conv(x)))
        h = F.relu(self.bn2(h), inplace=True)
        return torch.relu_(self.bn3(h))


class SharedOutput(nn.Module):
    """The BatchNorm's output also feeds the sum: fusing would feed it relu(y)."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(5)
        self.act = nn.ReLU()

    def forward(self, x):
        y = self.bn(x)
        return self.act(y) + y


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(3)

    def forward(self, x):
        y = self.bn(x)
        if y.sum() > 0:  # control flow on a traced value
            return F.relu(y)
        return y


class Head(nn.Module):
    """Linear -> BatchNorm1d(3) -> then -> Linear: the smallest model around one pair. then is
    a module, registered as `act` and applied to the BatchNorm's output y, or a function of y
    and the model's second input r."""

    def __init__(self, then):
        super().__init__()
        self.fc = nn.Linear(5, 3, bias=False)
        self.bn = nn.BatchNorm1d(3)
        self.out = nn.Linear(3, 2)
        if isinstance(then, nn.Module):
            self.act, self.then = then, None
        else:
            self.then = then

    def forward(self, x, r):
        y = self.bn(self.fc(x))
        return self.out(self.act(y) if self.then is None else self.then(y, r))


def sequential():
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(inplace=True),
        nn.Sequential(nn.Conv2d(4, 3, 1, bias=False), nn.BatchNorm2d(3), nn.Sigmoid()),
        nn.Conv2d(3, 3, 1, bias=False), nn.BatchNorm2d(3))  # a trailing BatchNorm alone


def sequential_3d():
    return nn.Sequential(nn.Conv3d(2, 3, 3, padding=1, bias=False), nn.BatchNorm3d(3), nn.ReLU())


def assert_same_model(original: nn.Module, converted: nn.Module, make_inputs, train_steps=2,
                      run_converted=None):
    """Train steps then one eval step on both: outputs, input and parameter gradients, and
    every state_dict entry (running statistics, num_batches_tracked) must match.

    make_inputs returns a tensor or a tuple of them; run_converted (converted itself if not
    given) runs the converted model. Outputs and statistics to float32's default tolerance;
    gradients to GRAD_TOLERANCE. (Layers feeding a BatchNorm have no bias: in training its
    gradient is zero up to rounding noise.)"""
    run_converted = converted if run_converted is None else run_converted
    for training, steps in ((True, train_steps), (False, 1)):
        original.train(training)
        converted.train(training)
        for _ in range(steps):
            inputs = make_inputs()
            inputs = inputs if isinstance(inputs, tuple) else (inputs,)
            inputs_original = [t.clone().requires_grad_() for t in inputs]
            inputs_converted = [t.clone().requires_grad_() for t in inputs]
            y_original = original(*inputs_original)
            y_converted = run_converted(*inputs_converted)
            torch.testing.assert_close(y_converted, y_original)
            grad = torch.randn_like(y_original)
            y_original.backward(grad)
            y_converted.backward(grad)
            for t_original, t_converted in zip(inputs_original, inputs_converted, strict=True):
                torch.testing.assert_close(t_converted.grad, t_original.grad, **GRAD_TOLERANCE)
            named = zip(original.named_parameters(), converted.named_parameters(), strict=True)
            for (name, p_original), (name_converted, p_converted) in named:
                assert name_converted == name
                torch.testing.assert_close(p_converted.grad, p_original.grad, **GRAD_TOLERANCE,
                                           msg=lambda text, name=name: f"{name}: {text}")
            original.zero_grad(set_to_none=True)
            converted.zero_grad(set_to_none=True)
        state_original, state_converted = original.state_dict(), converted.state_dict()
        assert list(state_converted) == list(state_original)
        for key, value in state_original.items():
            torch.testing.assert_close(state_converted[key], value,
                                       msg=lambda text, key=key: f"{key}: {text}")


def assert_checkpoints_interchange(original: nn.Module, converted: nn.Module):
    assert list(converted.state_dict()) == list(original.state_dict())
    converted.load_state_dict(original.state_dict(), strict=True)
    fresh = copy.deepcopy(original)
    fresh.load_state_dict(converted.state_dict(), strict=True)


def randn(*shapes, memory_format=torch.contiguous_format):
    """A maker of fresh inputs of these shapes (one shape: a tensor, several: a tuple)."""
    def make():
        inputs = tuple(torch.randn(*shape, device=DEVICE).contiguous(memory_format=memory_format)
                       for shape in shapes)
        return inputs if len(inputs) > 1 else inputs[0]
    return make


def head_inputs():
    return randn((4, 5), (4, 3))


def test_basic_block_fuses_bn1_with_relu_and_bn2_with_the_residual_and_relu():
    model = BasicBlock().to(DEVICE)
    converted = fuse_bn_act(model)
    assert converted.fused_pairs == (FusedPair("bn1", "relu"), FusedPair("bn2", "relu", "x"))
    assert converted.left_alone == {}
    assert type(converted.bn1) is BatchNormAct2d and converted.bn1.activation == "relu"
    assert type(converted.bn2) is BatchNormAct2d and converted.bn2.activation == "relu"
    assert not hasattr(converted, "relu")  # both calls of the shared ReLU are fused away
    assert "ReLU" not in repr(converted)
    assert_checkpoints_interchange(model, converted)
    assert_same_model(model, converted, randn((2, 4, 5, 5)))
    assert_same_model(model, converted, randn((3, 4, 3, 3), memory_format=torch.channels_last),
                      train_steps=1)


def test_mlp_batchnorm1d_sigmoid():
    model = SigmoidMLP().to(DEVICE)
    converted = fuse_bn_act(model)
    assert converted.fused_pairs == (FusedPair("bn1", "torch.sigmoid"),
                                     FusedPair("bn2", "Tensor.sigmoid"))
    assert type(converted.bn1) is BatchNormAct1d and converted.bn1.activation == "sigmoid"
    assert converted.bn2.momentum is None
    assert_checkpoints_interchange(model, converted)
    assert_same_model(model, converted, randn((4, 6)))


def test_sequential_modules():
    model = sequential().to(DEVICE)
    converted = fuse_bn_act(model)
    assert converted.fused_pairs == (FusedPair("1", "2"), FusedPair("3.1", "3.2"))
    assert converted.left_alone == {"5": "it is an output of the model"}
    # Still an nn.Sequential, indexed as the original.
    assert isinstance(converted, nn.Sequential) and len(converted) == len(model)
    assert converted[1].activation == "relu" and converted[3][1].activation == "sigmoid"
    assert type(converted[5]) is nn.BatchNorm2d
    # The absorbed activations leave an nn.Identity: the model prints as what it computes.
    assert [type(m).__name__ for m in converted] == [
        "Conv2d", "BatchNormAct2d", "Identity", "Sequential", "Conv2d", "BatchNorm2d"]
    assert [type(m).__name__ for m in converted[3]] == ["Conv2d", "BatchNormAct2d", "Identity"]
    assert_checkpoints_interchange(model, converted)
    assert_same_model(model, converted, randn((2, 2, 4, 3)))


class SharedActivation(nn.Module):
    """One ReLU after a BatchNorm and after a Linear: the second call keeps it."""

    def __init__(self):
        super().__init__()
        self.bn, self.fc, self.act = nn.BatchNorm1d(4), nn.Linear(4, 4), nn.ReLU()

    def forward(self, x):
        return self.act(self.fc(self.act(self.bn(x))))


def test_an_absorbed_module_that_is_still_called_stays():
    model = SharedActivation().to(DEVICE)
    converted = fuse_bn_act(model)
    assert converted.fused_pairs == (FusedPair("bn", "act"),)
    assert isinstance(converted.act, nn.ReLU)
    assert_same_model(model, converted, randn((5, 4)))


def test_sequential_3d():
    model = sequential_3d().to(DEVICE)
    converted = fuse_bn_act(model)
    assert converted.fused_pairs == (FusedPair("1", "2"),)
    assert type(converted.get_submodule("1")) is BatchNormAct3d
    assert_same_model(model, converted, randn((2, 2, 3, 2, 3)), train_steps=1)


def test_functional_relu():
    model = Functional().to(DEVICE)
    converted = fuse_bn_act(model)
    assert converted.fused_pairs == (FusedPair("bn1", "torch.nn.functional.relu"),
                                     FusedPair("bn2", "torch.nn.functional.relu"),
                                     FusedPair("bn3", "torch.relu_"))
    assert converted.bn2.weight is None and converted.bn3.running_mean is None
    assert_checkpoints_interchange(model, converted)
    assert_same_model(model, converted, randn((2, 3, 4, 4)), train_steps=1)


# (id, what follows the BatchNorm, activation, its kwargs, the consumer's name); modules are
# registered as `act`.
ACTIVATIONS = [
    ("ReLU", nn.ReLU(), "relu", {}, "act"),
    ("ReLU-inplace", nn.ReLU(inplace=True), "relu", {}, "act"),
    ("ReLU6", nn.ReLU6(inplace=True), "relu6", {}, "act"),
    ("LeakyReLU", nn.LeakyReLU(0.2), "leaky_relu", {"negative_slope": 0.2}, "act"),
    ("ELU", nn.ELU(alpha=0.7, inplace=True), "elu", {"alpha": 0.7}, "act"),
    ("SiLU", nn.SiLU(), "silu", {}, "act"),
    ("Hardswish", nn.Hardswish(), "hardswish", {}, "act"),
    ("Hardsigmoid", nn.Hardsigmoid(), "hardsigmoid", {}, "act"),
    ("GELU", nn.GELU(), "gelu", {"approximate": "none"}, "act"),
    ("GELU-tanh", nn.GELU(approximate="tanh"), "gelu", {"approximate": "tanh"}, "act"),
    ("Mish", nn.Mish(), "mish", {}, "act"),
    ("Sigmoid", nn.Sigmoid(), "sigmoid", {}, "act"),
    ("Tanh", nn.Tanh(), "tanh", {}, "act"),
    ("F.relu6", lambda y: F.relu6(y, inplace=True), "relu6", {}, "torch.nn.functional.relu6"),
    ("F.leaky_relu", lambda y: F.leaky_relu(y, 0.3), "leaky_relu", {"negative_slope": 0.3},
     "torch.nn.functional.leaky_relu"),
    ("F.leaky_relu_", lambda y: F.leaky_relu_(y), "leaky_relu", {"negative_slope": 0.01},
     "torch.nn.functional.leaky_relu_"),
    ("F.elu", lambda y: F.elu(y, alpha=1.5), "elu", {"alpha": 1.5}, "torch.nn.functional.elu"),
    ("F.elu_", lambda y: F.elu_(y, 0.5), "elu", {"alpha": 0.5}, "torch.nn.functional.elu_"),
    ("F.silu", lambda y: F.silu(y, inplace=True), "silu", {}, "torch.nn.functional.silu"),
    ("F.hardswish", F.hardswish, "hardswish", {}, "torch.nn.functional.hardswish"),
    ("F.hardsigmoid", F.hardsigmoid, "hardsigmoid", {}, "torch.nn.functional.hardsigmoid"),
    ("F.gelu-tanh", lambda y: F.gelu(y, approximate="tanh"), "gelu", {"approximate": "tanh"},
     "torch.nn.functional.gelu"),
    ("F.mish", F.mish, "mish", {}, "torch.nn.functional.mish"),
    ("F.tanh", F.tanh, "tanh", {}, "Tensor.tanh"),
    ("torch.tanh_", torch.tanh_, "tanh", {}, "torch.tanh_"),
    ("Tensor.relu_", lambda y: y.relu_(), "relu", {}, "Tensor.relu_"),
    ("Tensor.sigmoid_", lambda y: y.sigmoid_(), "sigmoid", {}, "Tensor.sigmoid_"),
]


@pytest.mark.parametrize("then, activation, kwargs, consumer",
                         [case[1:] for case in ACTIVATIONS], ids=[case[0] for case in ACTIVATIONS])
def test_every_activation_fuses_with_its_kwargs(then, activation, kwargs, consumer):
    follow = copy.deepcopy(then) if isinstance(then, nn.Module) else (lambda y, r: then(y))
    model = Head(follow).to(DEVICE)
    converted = fuse_bn_act(model)
    assert converted.fused_pairs == (FusedPair("bn", consumer),)
    assert converted.bn.activation == activation and converted.bn.activation_kwargs == kwargs
    assert_same_model(model, converted, head_inputs(), train_steps=1)


def add_in_place_then_leaky_relu(y, r):
    y += r
    return F.leaky_relu(y, 0.2)


# (id, BatchNorm output y and other tensor r -> what the model computes, fused activation)
RESIDUAL_ADDS = [
    ("y+r", lambda y, r: F.silu(y + r), "silu"),
    ("r+y", lambda y, r: torch.relu_(r + y), "relu"),
    ("y+=r", add_in_place_then_leaky_relu, "leaky_relu"),
    ("torch.add", lambda y, r: torch.add(r, y, alpha=1).tanh(), "tanh"),
    ("Tensor.add", lambda y, r: F.hardswish(y.add(r)), "hardswish"),
    ("Tensor.add_", lambda y, r: F.elu(y.add_(r), 0.5, inplace=True), "elu"),
    ("no-activation", lambda y, r: y + r, "identity"),
]


@pytest.mark.parametrize("then, activation", [case[1:] for case in RESIDUAL_ADDS],
                         ids=[case[0] for case in RESIDUAL_ADDS])
def test_residual_add_in_every_form_and_order(then, activation):
    model = Head(then).to(DEVICE)
    converted = fuse_bn_act(model)
    (pair,) = converted.fused_pairs
    assert pair.bn == "bn" and pair.residual == "r"
    assert (pair.activation is None) == (activation == "identity")
    assert converted.bn.activation == activation
    assert_same_model(model, converted, head_inputs(), train_steps=1)


def test_add_result_with_two_consumers_fuses_the_add_alone():
    model = Head(lambda y, r: (lambda s: F.relu(s) * s)(y + r)).to(DEVICE)
    converted = fuse_bn_act(model)
    assert converted.fused_pairs == (FusedPair("bn", None, "r"),)
    assert converted.bn.activation == "identity"
    assert_same_model(model, converted, head_inputs(), train_steps=1)


@pytest.mark.parametrize("then, reason", [
    (lambda y, r: F.relu(torch.add(y, r, alpha=2)), "feeds torch.add with alpha or out"),
    (lambda y, r: F.relu(y + 1.5), "feeds operator.add of a constant"),
    (lambda y, r: F.relu(y + y), "feeds an add of its own output"),
    (lambda y, r: F.relu(r.add_(y)), "feeds an add_ that writes into the other operand"),
    (lambda y, r: F.relu(y * r), "feeds operator.mul"),
    (lambda y, r: F.celu(y), "feeds torch.nn.functional.celu"),
    (lambda y, r: F.leaky_relu(y, r.sum()), "feeds torch.nn.functional.leaky_relu"),
    (lambda y, r: r, "its output is unused"),
], ids=["alpha", "constant", "itself", "add_-into-r", "mul", "celu", "traced-slope", "unused"])
def test_left_alone_with_its_reason(then, reason):
    model = Head(then)
    converted = fuse_bn_act(model)
    assert converted.fused_pairs == ()
    assert converted.left_alone == {"bn": reason}
    assert type(converted.bn) is nn.BatchNorm1d


class TwoBranches(nn.Module):
    """relu(bn_a(fc_a(x)) + bn_b(h)), with, between the two BatchNorms, nothing, an in-place op
    on h (a new tensor: bn_a can still move past it), one on v, made before bn_a's call (fc_a
    allocated bn_a's input, which v cannot share), or one on bn_a's input itself."""

    def __init__(self, in_place_between: str = ""):
        super().__init__()
        self.in_place_between = in_place_between
        self.fc_a, self.fc_b = nn.Linear(4, 3, bias=False), nn.Linear(4, 3, bias=False)
        self.bn_a, self.bn_b = nn.BatchNorm1d(3), nn.BatchNorm1d(3)

    def forward(self, x):
        v = x * 2
        a_input = self.fc_a(x)
        a = self.bn_a(a_input)
        h = self.fc_b(x)
        if self.in_place_between == "fresh":
            h = F.silu(h, inplace=True)
        elif self.in_place_between == "earlier":
            h = self.fc_b(v.relu_())
        elif self.in_place_between == "its input":
            h = h + a_input.relu_()
        return F.relu(a + self.bn_b(h))


@pytest.mark.parametrize("in_place_between", ["", "fresh", "earlier", "its input"])
def test_an_add_of_two_batchnorms_goes_to_the_first_that_can_move(in_place_between):
    model = TwoBranches(in_place_between).to(DEVICE)
    converted = fuse_bn_act(model)
    blocked = in_place_between == "its input"
    winner, loser = ("bn_b", "bn_a") if blocked else ("bn_a", "bn_b")
    assert converted.fused_pairs == (FusedPair(winner, "torch.nn.functional.relu", loser),)
    assert converted.left_alone == {loser: (
        "what runs between it and its add writes in place or uses it"
        if blocked else "feeds an add fused with another BatchNorm")}
    if blocked:  # the write into bn_a's saved input leaves no backward, on the original either
        assert_same_outputs(model, converted, torch.randn(5, 4, device=DEVICE))
    else:
        assert_same_model(model, converted, randn((5, 4)), train_steps=1)


def assert_same_outputs(model: nn.Module, converted: nn.Module, x: torch.Tensor) -> None:
    """Forward only, in training then eval mode, on copies."""
    model, converted = copy.deepcopy(model), copy.deepcopy(converted)
    with torch.no_grad():
        for training in (True, False):
            torch.testing.assert_close(converted.train(training)(x), model.train(training)(x))


def test_residual_produced_by_another_fused_pair():
    """The residual is the output of a pair fused before it: the call uses the new node."""
    class Chain(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn1, self.bn2, self.act = nn.BatchNorm1d(3), nn.BatchNorm1d(3), nn.ReLU6()

        def forward(self, x):
            h = self.act(self.bn1(x))
            return self.act(self.bn2(h * 2) + h)

    model = Chain().to(DEVICE)
    converted = fuse_bn_act(model)
    assert converted.fused_pairs == (FusedPair("bn1", "act"), FusedPair("bn2", "act", "act"))
    assert_same_model(model, converted, randn((4, 3)), train_steps=1)


def test_no_op_modules_are_passed_through():
    class NoOps(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn1, self.bn2 = nn.BatchNorm1d(3), nn.BatchNorm1d(3)
            self.skip, self.drop = nn.Identity(), nn.Dropout(p=0.0)

        def forward(self, x, r):
            h = F.gelu(self.skip(self.bn1(x)))
            return self.drop(self.drop(self.bn2(h)) + r).relu()

    model = NoOps().to(DEVICE)
    converted = fuse_bn_act(model)
    assert converted.fused_pairs == (FusedPair("bn1", "torch.nn.functional.gelu"),
                                     FusedPair("bn2", "Tensor.relu", "r"))
    assert_same_model(model, converted, randn((4, 3), (4, 3)), train_steps=1)


@pytest.mark.parametrize("module, reason", [
    (nn.Dropout(p=0.1), "feeds a Dropout whose p > 0"),
    (nn.Dropout(p=0.1).eval(), "feeds a Dropout whose p > 0"),  # mode can change later
    (nn.Identity(), "feeds a Identity that has hooks"),
])
def test_what_is_not_a_no_op(module, reason):
    if isinstance(module, nn.Identity):
        module.register_forward_hook(lambda *args: None)
    model = Head(module)
    assert fuse_bn_act(model).left_alone == {"bn": reason}


def test_residual_of_another_shape_or_dtype_falls_back_to_unfused_math():
    """A broadcast or promoting add is fused too (a graph does not show shapes), and computed
    unfused at run time."""
    model = Head(lambda y, r: F.silu(y + r)).to(DEVICE)
    converted = fuse_bn_act(model)
    assert converted.fused_pairs == (FusedPair("bn", "torch.nn.functional.silu", "r"),)
    assert_same_model(model, converted, randn((4, 5), (1, 3)), train_steps=1)  # broadcast
    assert_same_model(model, converted, randn((4, 5), (4, 1)), train_steps=1)
    assert_same_model(model.double(), converted.double(),
                      lambda: (torch.randn(4, 5, device=DEVICE, dtype=torch.float64),
                               torch.randn(4, 3, device=DEVICE)), train_steps=1)


def test_call_fused_runs_the_fused_module_only_for_a_matching_residual(monkeypatch):
    bn = BatchNormAct1d(3, activation="leaky_relu", activation_kwargs={"negative_slope": 0.2},
                        device=DEVICE)
    calls = []
    monkeypatch.setattr(BatchNormAct1d, "forward",
                        lambda self, x, r=None: calls.append(r) or torch.zeros_like(x))
    x = torch.randn(4, 3, device=DEVICE)
    r = torch.randn(4, 3, device=DEVICE)
    fused_as = {"activation": "relu", "activation_kwargs": {}, "path": "bn"}  # bn's own rules
    assert torch.equal(call_fused(bn, x, r, **fused_as), torch.zeros_like(x))
    assert calls == [r]
    wide = torch.randn(3, device=DEVICE)
    expected = F.leaky_relu(F.batch_norm(x, None, None, bn.weight, bn.bias, training=True)
                            + wide, 0.2)
    torch.testing.assert_close(call_fused(bn, x, wide, **fused_as), expected)
    assert len(calls) == 1 and bn.num_batches_tracked.item() == 1


def test_batchnorm_called_twice_fuses_only_if_both_calls_do():
    class TwoCalls(nn.Module):
        def __init__(self, second_activation):
            super().__init__()
            self.bn, self.second_activation = nn.BatchNorm1d(3), second_activation

        def forward(self, x):
            return F.relu(self.bn(x) + x) + self.second_activation(self.bn(2 * x))

    both = fuse_bn_act(TwoCalls(torch.relu))
    assert both.fused_pairs == (FusedPair("bn", "torch.nn.functional.relu", "x"),
                                FusedPair("bn", "torch.relu"))
    assert_same_model(TwoCalls(torch.relu).to(DEVICE), fuse_bn_act(TwoCalls(torch.relu)),
                      randn((4, 3)), train_steps=1)
    assert fuse_bn_act(TwoCalls(torch.sigmoid)).left_alone == {
        "bn": "its calls are followed by different activations"}
    assert fuse_bn_act(TwoCalls(F.celu)).left_alone == {"bn": "feeds torch.nn.functional.celu"}


def test_a_call_does_not_move_past_another_call_of_its_module():
    class Reused(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm1d(3)

        def forward(self, x):
            y = self.bn(x)
            return F.relu(y + F.relu(self.bn(x * 2)))

    converted = fuse_bn_act(Reused())
    assert converted.left_alone == {
        "bn": "what runs between it and its add writes in place or uses it"}


def test_hooks_and_subclasses_are_left_alone():
    hooked_bn, hooked_act, custom_act = sequential_3d(), sequential_3d(), sequential_3d()
    hooked_bn[1].register_forward_hook(lambda module, args, output: None)
    hooked_act[2].register_forward_pre_hook(lambda module, args: None)

    class LeakyReLU(nn.ReLU):
        def forward(self, x):
            return F.leaky_relu(x)

    class MyBatchNorm(nn.BatchNorm3d):
        pass

    custom_act[2] = LeakyReLU()
    custom_bn = sequential_3d()
    custom_bn[1] = MyBatchNorm(3)
    assert fuse_bn_act(hooked_bn).left_alone == {"1": "it has hooks"}
    assert fuse_bn_act(hooked_act).left_alone == {"1": "feeds a ReLU that has hooks"}
    assert fuse_bn_act(custom_act).fused_pairs == (FusedPair("1", "2"),)  # F.leaky_relu
    assert fuse_bn_act(custom_bn).left_alone == {"1": "it is a MyBatchNorm, not a plain BatchNorm"}


def test_untraceable_model_warns_and_comes_back_unchanged():
    model = DataDependent().to(DEVICE)
    with pytest.warns(UserWarning, match=r"the forward of 1 module\(s\) of DataDependent kept "
                                         r"as it is.*the model: torch.fx cannot trace it "
                                         r"\(TraceError.*y\.sum\(\)"):
        result = fuse_bn_act(model)
    assert result is not model and type(result) is DataDependent
    assert result.fused_pairs == ()
    assert result.left_alone == {"bn": "it is inside a leaf: the model"}
    assert list(result.leaves) == [""]
    assert type(result.bn) is nn.BatchNorm1d
    assert_same_model(model, result, randn((4, 3)))


def test_unused_batchnorm_is_reported():
    model = SigmoidMLP()
    model.spare = nn.BatchNorm1d(8)
    assert fuse_bn_act(model).left_alone == {"spare": "it is not called by forward"}


def test_input_model_is_untouched_and_state_carries_over():
    model = BasicBlock().to(DEVICE, torch.float64)
    model.train()(torch.randn(2, 4, 3, 3, device=DEVICE, dtype=torch.float64))  # move stats
    model.bn1.eval()
    before = copy.deepcopy(model.state_dict())
    converted = fuse_bn_act(model)
    assert type(model.bn1) is nn.BatchNorm2d and not hasattr(model, "fused_pairs")
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])
        assert torch.equal(converted.state_dict()[key], value)
        assert converted.state_dict()[key].data_ptr() != value.data_ptr()  # a copy
    assert converted.training and not converted.bn1.training and converted.bn2.training
    assert converted.bn1.weight.dtype == torch.float64
    assert converted.bn1.num_batches_tracked.item() == 1
    assert converted.bn1.weight.device == model.bn1.weight.device


def test_converting_twice_changes_nothing():
    once = fuse_bn_act(BasicBlock().to(DEVICE))
    twice = fuse_bn_act(once)
    assert twice.fused_pairs == () and twice.left_alone == {}
    assert type(twice.bn1) is BatchNormAct2d
    assert list(twice.state_dict()) == list(once.state_dict())
    assert_same_model(once, twice, randn((2, 4, 3, 3)), train_steps=1)


def test_compiles_without_graph_breaks():
    model = BasicBlock().to(DEVICE)
    converted = fuse_bn_act(model)
    compiled = torch.compile(converted, fullgraph=True, backend="aot_eager")
    assert_same_model(model, converted, randn((2, 4, 3, 3)), train_steps=1,
                      run_converted=compiled)


def test_reports_through_logging(caplog):
    model = BasicBlock()
    model.conv3 = nn.Conv2d(4, 4, 1)
    model.bn3 = nn.BatchNorm2d(4)
    with caplog.at_level(logging.DEBUG, logger="tritonbn.convert"):
        fuse_bn_act(model)
    assert "fused bn1 + relu into BatchNormAct2d(activation=relu)" in caplog.text
    assert "fused bn2 + relu + x into BatchNormAct2d(activation=relu)" in caplog.text
    assert "bn3 left alone: it is not called by forward" in caplog.text


@pytest.fixture
def reference_backend(monkeypatch):
    """CPU tensors take PyTorch's reference path instead of the interpreter: the tests that
    use it check the graph rewrite, which the kernels do not change."""
    if DEVICE.type == "cpu":
        monkeypatch.setattr(dispatch, "INTERPRETING", False)


def assert_same_in_both_modes(model: nn.Module, make_inputs, converted_in=(True, False)):
    """Converted in training and in eval mode, the model computes the original's function in
    both modes, random ops seeded alike: outputs (any structure), input and parameter
    gradients and buffers, in float64."""
    model = model.to(DEVICE, torch.float64)
    inputs = make_inputs()
    inputs = tuple(t.double() for t in (inputs if isinstance(inputs, tuple) else (inputs,)))
    expected = {training: _seeded_step(copy.deepcopy(model), inputs, training)
                for training in (True, False)}
    for mode in converted_in:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the leaves' warning: the tests check it once
            converted = fuse_bn_act(copy.deepcopy(model).train(mode))
        for training in (True, False):
            result = _seeded_step(copy.deepcopy(converted), inputs, training)
            torch.testing.assert_close(result, expected[training], rtol=1e-9, atol=1e-12,
                                       msg=lambda text, m=mode, t=training:
                                       f"converted in training={m}, run in training={t}: {text}")


def _seeded_step(model: nn.Module, inputs: tuple, training: bool) -> dict:
    inputs = [t.clone().requires_grad_() for t in inputs]
    torch.manual_seed(0)
    output = model.train(training)(*inputs)
    tensors = output if isinstance(output, tuple) else (output,)
    sum((t * torch.linspace(-1, 1, t.numel(), dtype=t.dtype, device=t.device).view(t.shape))
        .sum() for t in tensors).backward()
    return {"output": output, "input_grads": [t.grad for t in inputs],
            "grads": {name: p.grad for name, p in model.named_parameters()},
            "buffers": dict(model.named_buffers())}


def conv_bn_relu(channels: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, bias=False),
                         nn.BatchNorm2d(channels), nn.ReLU())


class DropoutHead(nn.Module):
    """timm's head: F.dropout(training=self.training) after the features."""

    def __init__(self):
        super().__init__()
        self.features = conv_bn_relu()
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        x = self.features(x).mean((2, 3))
        return self.fc(F.dropout(x, p=0.5, training=self.training))


class AuxiliaryHead(nn.Module):
    """GoogLeNet's pattern: in training, the output and an auxiliary head's; in eval, one."""

    def __init__(self):
        super().__init__()
        self.stem, self.body, self.aux = conv_bn_relu(), conv_bn_relu(), conv_bn_relu()

    def forward(self, x):
        x = self.stem(x)
        if self.training:
            return self.body(x), self.aux(x)
        return self.body(x)


class Reparameterisable(nn.Module):
    """A branch that only trains (RepVGG's before reparameterisation): bn1's output and the
    add it feeds exist in training mode only."""

    def __init__(self):
        super().__init__()
        self.conv3, self.bn3 = nn.Conv2d(3, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3)
        self.conv1, self.bn1 = nn.Conv2d(3, 3, 1, bias=False), nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.bn3(self.conv3(x))
        if self.training:
            y = y + self.bn1(self.conv1(x))
        return F.relu(y)


USE_GELU = True


class GlobalFlag(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = conv_bn_relu()
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.bn(self.features(x))
        return F.gelu(y) if USE_GELU else F.relu(y)


@pytest.mark.parametrize("make, fused, leaf_line", [
    (DropoutHead, [FusedPair("features.1", "features.2")], None),
    (AuxiliaryHead, [FusedPair(f"{path}.1", f"{path}.2") for path in ("stem", "body", "aux")],
     None),
    (lambda: nn.Sequential(conv_bn_relu(), Reparameterisable(), Reparameterisable()),
     [FusedPair("0.1", "0.2")], "if self.training:"),
], ids=["dropout-head", "auxiliary-head", "reparameterisable"])
@pytest.mark.usefixtures("reference_backend")
def test_what_reads_the_mode_stays_a_call_and_both_modes_stay_exact(make, fused, leaf_line):
    """torch.fx would freeze the mode the model was converted in: a forward that reads it is
    kept as it is. The heads' forwards own no BatchNorm, so nothing is lost and nothing is
    said; a forward whose own BatchNorms it keeps is named, with the line. Either conversion
    computes the original's function in either mode."""
    model = make()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        converted = fuse_bn_act(model)
    assert list(converted.fused_pairs) == fused
    if leaf_line is None:
        assert converted.leaves == {} and not caught
    else:
        assert "kept as it is" in str(caught[0].message)
        assert converted.leaves and all(
            f"it reads the module mode (training) at {__file__}" in why and leaf_line in why
            for why in converted.leaves.values())
    assert_same_in_both_modes(model, randn((2, 3, 4, 5)))


def test_a_global_flag_read_in_forward_stays_live():
    global USE_GELU
    model = GlobalFlag()
    with pytest.warns(UserWarning, match="USE_GELU"):
        converted = fuse_bn_act(model)
    assert converted.leaves == {"": converted.leaves[""]}
    assert "it reads USE_GELU, which a trace would freeze" in converted.leaves[""]
    assert converted.fused_pairs == (FusedPair("features.1", "features.2"),)
    assert converted.left_alone == {"bn": "it is inside a leaf: the model"}
    x = torch.randn(2, 3, 4, 4, device=DEVICE)
    try:
        for USE_GELU in (True, False):
            torch.testing.assert_close(converted.eval()(x), model.eval()(x))
    finally:
        USE_GELU = True


class Untraceable(nn.Module):
    """Control flow on a traced value in its own forward; its children trace."""

    def __init__(self):
        super().__init__()
        self.inner = conv_bn_relu()
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        if x.sum() > 0:
            x = x.flip(-1)
        return self.bn(self.inner(x))


@pytest.mark.usefixtures("reference_backend")
def test_fusion_goes_on_around_an_untraceable_submodule():
    model = nn.Sequential(conv_bn_relu(), Untraceable(), nn.BatchNorm2d(3), nn.ReLU())
    with pytest.warns(UserWarning, match=r"kept as it is.*1: torch.fx cannot trace it "
                                         r"\(TraceError.*if x\.sum\(\) > 0"):
        converted = fuse_bn_act(model)
    assert list(converted.leaves) == ["1"]
    assert converted.fused_pairs == (FusedPair("0.1", "0.2"), FusedPair("1.inner.1", "1.inner.2"),
                                     FusedPair("2", "3"))
    assert converted.left_alone == {"1.bn": "it is inside a leaf: 1"}
    assert type(converted.get_submodule("1.inner.1")) is BatchNormAct2d
    assert isinstance(converted.get_submodule("1"), Untraceable)
    assert_same_in_both_modes(model, randn((2, 3, 4, 5)))


def test_a_deep_copy_keeps_the_state_dict_and_the_report():
    """fx.GraphModule's own deepcopy registers tensor constants as buffers and drops what the
    graph does not read: state_dict would gain and lose keys."""
    class WithConstant(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn, self.unused_head = nn.BatchNorm2d(3), nn.Linear(3, 2)
            self.scale = torch.tensor([2.0, 3.0, 4.0], device=DEVICE)  # a constant to fx

        def forward(self, x):
            return torch.relu(self.bn(x)) * self.scale.view(1, 3, 1, 1)

    model = WithConstant().to(DEVICE)
    converted = fuse_bn_act(model)
    copied = copy.deepcopy(copy.deepcopy(converted))
    assert list(copied.state_dict()) == list(model.state_dict())
    assert copied.fused_pairs == converted.fused_pairs == (FusedPair("bn", "torch.relu"),)
    assert copied.left_alone == {} and copied.leaves == {}
    x = torch.randn(2, 3, 4, 5, device=DEVICE)
    torch.testing.assert_close(copied(x), model(x))


@pytest.mark.usefixtures("reference_backend")
def test_a_batchnorm_ending_a_leafs_child_is_reported_as_such():
    class EndsInBatchNorm(Untraceable):
        def __init__(self):
            super().__init__()
            self.tail = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))

        def forward(self, x):
            return F.relu(self.tail(super().forward(x)))

    model = EndsInBatchNorm()
    with pytest.warns(UserWarning, match="kept as it is"):
        converted = fuse_bn_act(model)
    assert converted.left_alone == {
        "bn": "it is inside a leaf: the model",
        "tail.1": "its output is its module's output: tail"}
    assert_same_in_both_modes(model, randn((2, 3, 4, 5)))


def test_a_converted_submodule_runs_alone_and_everything_pickles():
    """Each module keeps its own fused forward: called alone it computes what the original's
    does, and a whole converted model or any of its modules pickles and deep-copies to one that
    computes the same, report and all."""
    model = nn.Sequential(conv_bn_relu(), Untraceable(), BasicBlock(3)).to(DEVICE).eval()
    with pytest.warns(UserWarning):
        converted = fuse_bn_act(model)
    x = torch.randn(2, 3, 4, 4, device=DEVICE)
    for path in ("0", "1.inner", "2"):
        torch.testing.assert_close(converted.get_submodule(path)(x),
                                   model.get_submodule(path)(x))
    for copied in (pickle.loads(pickle.dumps(converted)), copy.deepcopy(converted),
                   pickle.loads(pickle.dumps(converted.get_submodule("2")))):
        source = converted if isinstance(copied, nn.Sequential) else converted.get_submodule("2")
        assert [(name, type(m).__qualname__) for name, m in copied.named_modules()] == [
            (name, type(m).__qualname__) for name, m in source.named_modules()]
        torch.testing.assert_close(copied(x), source(x))
        assert copied.state_dict().keys() == source.state_dict().keys()
    loaded = pickle.loads(pickle.dumps(converted))
    assert (loaded.fused_pairs, loaded.left_alone, loaded.leaves) == (
        converted.fused_pairs, converted.left_alone, converted.leaves)


@pytest.mark.usefixtures("reference_backend")
def test_an_add_of_zero_and_a_shape_read_do_not_block_the_fusion():
    class ZeroAndShape(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x):
            y = self.bn(x)
            return F.relu(y + 0).reshape(y.shape[0], -1) * y.size(1)

    model = ZeroAndShape()
    converted = fuse_bn_act(model)
    assert converted.fused_pairs == (FusedPair("bn", "torch.nn.functional.relu"),)
    assert_same_in_both_modes(model, randn((2, 3, 4, 5)), converted_in=(True,))


class WritesInsideASequential(nn.Module):
    """The add's other operand comes from a Sequential that writes into x in place: moving the
    BatchNorm's read of x past it would normalize the written x."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.pre = nn.Sequential(nn.ReLU(inplace=True))

    def forward(self, x):
        x = x * 1.0  # a tensor of the model's own, which pre may write
        y = self.bn(x)
        return y + self.pre(x)


class PassesItsBatchNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return torch.relu(self.bn(x)) + _apply(self.bn, x)


@torch.fx.wrap
def _apply(module, x):
    return module(x)


class OptionalShortcut(nn.Module):
    """timm's DlaBottleneck: forward(x, shortcut=None). A trace sees a traced shortcut, never
    None, and would bake in that case."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

    def forward(self, x, shortcut=None):
        if shortcut is None:
            shortcut = x
        return F.relu(self.bn(self.conv(x)) + shortcut)


@pytest.mark.usefixtures("reference_backend")
def test_what_a_forward_hides_from_its_trace_is_not_fused_over():
    """A Sequential that writes in place, a BatchNorm passed on as a value, a forward with
    optional arguments: each is left alone, with its reason, and the model stays the same."""
    converted = fuse_bn_act(WritesInsideASequential().to(DEVICE))
    assert converted.left_alone == {
        "bn": "what runs between it and its add writes in place or uses it"}
    assert_same_outputs(WritesInsideASequential().to(DEVICE), converted,
                        torch.randn(2, 3, 4, 5, device=DEVICE))
    converted = fuse_bn_act(PassesItsBatchNorm())
    assert converted.left_alone == {"bn": "its forward passes the module on as a value"}
    assert_same_in_both_modes(PassesItsBatchNorm(), randn((2, 3, 4, 5)))
    with pytest.warns(UserWarning, match=r"its forward takes shortcut=None, whose use a trace "
                                         r"would fix to one case"):
        converted = fuse_bn_act(OptionalShortcut())
    assert converted.left_alone == {"bn": "it is inside a leaf: the model"}
    model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.ReLU(), OptionalShortcut())
    with pytest.warns(UserWarning):
        converted = fuse_bn_act(model)
    assert converted.fused_pairs == (FusedPair("1", "2"),)
    assert_same_in_both_modes(model, randn((2, 3, 4, 5)))


def test_a_subclass_of_a_fused_layer_takes_the_unfused_path_for_a_broadcast_residual():
    class MyBatchNormAct(BatchNormAct1d):
        pass

    bn = MyBatchNormAct(3, activation="tanh", device=DEVICE).eval()
    x, wide = torch.randn(4, 3, device=DEVICE), torch.randn(3, device=DEVICE)
    expected = torch.tanh(F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias)
                          + wide)
    torch.testing.assert_close(call_fused(bn, x, wide, activation="relu", activation_kwargs={},
                                          path="bn"), expected)
