"""fuse_bn_act: what it fuses and leaves alone, and that the converted model is the same model:
outputs, gradients, running statistics and state_dict, in training and eval mode."""
import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import DEVICE
from tritonbn import BatchNormAct1d, BatchNormAct2d, BatchNormAct3d
from tritonbn.convert import FusedPair, fuse_bn_act

# BatchNorm's backward subtracts two per-channel means from the incoming gradient: the last
# bits of float32 sums that differ in order come out as relative errors of about 1e-5.
GRAD_TOLERANCE = dict(rtol=1e-4, atol=1e-5)


@pytest.fixture(autouse=True)
def exact_float32_matmul():
    """TF32 convolutions would turn BatchNorm's last-bit differences into 1e-3 errors."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


class BasicBlock(nn.Module):
    """ResNet's basic block with its one shared ReLU: bn1 -> relu fuses, bn2 -> add -> relu
    does not."""

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
        return self.relu(out + x)


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
    """The BatchNorm's output also feeds the residual sum: fusing would feed it relu(y)."""

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


def sequential():
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(inplace=True),
        nn.Sequential(nn.Conv2d(4, 3, 1, bias=False), nn.BatchNorm2d(3), nn.Sigmoid()),
        nn.Conv2d(3, 3, 1, bias=False), nn.BatchNorm2d(3))  # a trailing BatchNorm alone


def sequential_3d():
    return nn.Sequential(nn.Conv3d(2, 3, 3, padding=1, bias=False), nn.BatchNorm3d(3), nn.ReLU())


def assert_same_model(original: nn.Module, converted: nn.Module, make_input, train_steps=2):
    """Train steps then one eval step on both: outputs, input and parameter gradients, and
    every state_dict entry (running statistics, num_batches_tracked) must match.

    Outputs and statistics to float32's default tolerance; gradients to GRAD_TOLERANCE. (Layers
    feeding a BatchNorm have no bias: in training its gradient is zero up to rounding noise.)"""
    for training, steps in ((True, train_steps), (False, 1)):
        original.train(training)
        converted.train(training)
        for _ in range(steps):
            x = make_input()
            x_original = x.clone().requires_grad_()
            x_converted = x.clone().requires_grad_()
            y_original, y_converted = original(x_original), converted(x_converted)
            torch.testing.assert_close(y_converted, y_original)
            grad = torch.randn_like(y_original)
            y_original.backward(grad)
            y_converted.backward(grad)
            torch.testing.assert_close(x_converted.grad, x_original.grad, **GRAD_TOLERANCE)
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


def randn(*shape, memory_format=torch.contiguous_format):
    return lambda: torch.randn(*shape, device=DEVICE).contiguous(memory_format=memory_format)


def test_basic_block_fuses_bn1_with_the_shared_relu_only():
    model = BasicBlock().to(DEVICE)
    converted = fuse_bn_act(model)
    assert converted.fused_pairs == (FusedPair("bn1", "relu"),)
    assert type(converted.bn1) is BatchNormAct2d and converted.bn1.activation == "relu"
    assert type(converted.bn2) is nn.BatchNorm2d
    assert isinstance(converted.relu, nn.ReLU)  # still called after the residual sum
    assert_checkpoints_interchange(model, converted)
    assert_same_model(model, converted, randn(2, 4, 5, 5))
    assert_same_model(model, converted, randn(3, 4, 3, 3, memory_format=torch.channels_last),
                      train_steps=1)


def test_mlp_batchnorm1d_sigmoid():
    model = SigmoidMLP().to(DEVICE)
    converted = fuse_bn_act(model)
    assert converted.fused_pairs == (FusedPair("bn1", "torch.sigmoid"),
                                     FusedPair("bn2", "Tensor.sigmoid"))
    assert type(converted.bn1) is BatchNormAct1d and converted.bn1.activation == "sigmoid"
    assert converted.bn2.momentum is None
    assert_checkpoints_interchange(model, converted)
    assert_same_model(model, converted, randn(4, 6))


def test_sequential_modules():
    model = sequential().to(DEVICE)
    converted = fuse_bn_act(model)
    assert converted.fused_pairs == (FusedPair("1", "2"), FusedPair("3.1", "3.2"))
    # A GraphModule now, not an nn.Sequential: submodules by path, not by index.
    assert converted.get_submodule("1").activation == "relu"
    assert converted.get_submodule("3.1").activation == "sigmoid"
    assert type(converted.get_submodule("5")) is nn.BatchNorm2d
    assert_checkpoints_interchange(model, converted)
    assert_same_model(model, converted, randn(2, 2, 4, 3))


def test_sequential_3d():
    model = sequential_3d().to(DEVICE)
    converted = fuse_bn_act(model)
    assert converted.fused_pairs == (FusedPair("1", "2"),)
    assert type(converted.get_submodule("1")) is BatchNormAct3d
    assert_same_model(model, converted, randn(2, 2, 3, 2, 3), train_steps=1)


def test_functional_relu():
    model = Functional().to(DEVICE)
    converted = fuse_bn_act(model)
    assert converted.fused_pairs == (FusedPair("bn1", "torch.nn.functional.relu"),
                                     FusedPair("bn2", "torch.nn.functional.relu"),
                                     FusedPair("bn3", "torch.relu_"))
    assert converted.bn2.weight is None and converted.bn3.running_mean is None
    assert_checkpoints_interchange(model, converted)
    assert_same_model(model, converted, randn(2, 3, 4, 4), train_steps=1)


def test_shared_output_is_left_alone():
    model = SharedOutput().to(DEVICE)
    converted = fuse_bn_act(model)
    assert converted.fused_pairs == ()
    assert type(converted.bn) is nn.BatchNorm1d
    assert_same_model(model, converted, randn(4, 5), train_steps=1)


def test_batchnorm_called_twice_fuses_only_if_both_calls_do():
    class TwoCalls(nn.Module):
        def __init__(self, second_activation):
            super().__init__()
            self.bn, self.second_activation = nn.BatchNorm1d(3), second_activation

        def forward(self, x):
            return F.relu(self.bn(x)) + self.second_activation(self.bn(2 * x))

    both = fuse_bn_act(TwoCalls(torch.relu))
    assert both.fused_pairs == (FusedPair("bn", "torch.nn.functional.relu"),
                                FusedPair("bn", "torch.relu"))
    assert fuse_bn_act(TwoCalls(torch.sigmoid)).fused_pairs == ()
    assert fuse_bn_act(TwoCalls(torch.tanh)).fused_pairs == ()


def test_hooks_and_subclasses_are_left_alone():
    hooked_bn, hooked_act, custom_act = sequential_3d(), sequential_3d(), sequential_3d()
    hooked_bn[1].register_forward_hook(lambda module, args, output: None)
    hooked_act[2].register_forward_pre_hook(lambda module, args: None)

    class LeakyReLU(nn.ReLU):
        def forward(self, x):
            return F.leaky_relu(x)

    custom_act[2] = LeakyReLU()
    for model in (hooked_bn, hooked_act, custom_act):
        assert fuse_bn_act(model).fused_pairs == ()


def test_untraceable_model_warns_and_comes_back_unchanged():
    model = DataDependent().to(DEVICE)
    with pytest.warns(UserWarning, match=r"cannot trace DataDependent \(TraceError.*y\.sum\(\)"):
        result = fuse_bn_act(model)
    assert result is not model and type(result) is DataDependent
    assert result.fused_pairs == ()
    assert type(result.bn) is nn.BatchNorm1d
    assert_same_model(model, result, randn(4, 3))


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
    once = fuse_bn_act(BasicBlock())
    twice = fuse_bn_act(once)
    assert twice.fused_pairs == ()
    assert type(twice.bn1) is BatchNormAct2d
    assert list(twice.state_dict()) == list(once.state_dict())


def test_reports_through_logging(caplog):
    with caplog.at_level(logging.DEBUG, logger="tritonbn.convert"):
        fuse_bn_act(BasicBlock())
    assert "fused bn1 + relu into BatchNormAct2d(activation=relu)" in caplog.text
    assert "bn2 left alone" in caplog.text


def test_torchvision_resnet50_fuses_bn1_and_bn2_of_every_bottleneck():
    models = pytest.importorskip("torchvision.models")
    model = models.resnet50(weights=None)
    converted = fuse_bn_act(model)
    bottlenecks = [name for name, module in model.named_modules()
                   if type(module).__name__ == "Bottleneck"]
    expected = [FusedPair("bn1", "relu")] + [
        FusedPair(f"{block}.{bn}", f"{block}.relu") for block in bottlenecks
        for bn in ("bn1", "bn2")]
    assert list(converted.fused_pairs) == expected
    assert_checkpoints_interchange(model, converted)
