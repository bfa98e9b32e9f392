"""fuse_bn_act on the model zoos: the counts of perf/zoo.py's table for every torchvision and
timm model in it, the conversion's same-function check on all of them, and timm's and
torchvision's own modules (BatchNormAct2d, DropPath, DropBlock2d, StochasticDepth) one by one.

The same-function check of every model runs the BatchNorms through PyTorch's reference (the
interpreter takes minutes per model): it checks the graph rewrite, not the kernels, which the
rest of the suite checks, the timm blocks below included. Without torchvision and timm these
tests skip, except in CI (CI=true), where they fail.
"""
import importlib.util
import os
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import DEVICE
from test_convert import assert_same_model, randn, reference_backend  # noqa: F401
from tritonbn import BatchNormAct2d
from tritonbn.convert import FusedPair, fuse_bn_act


def _import_zoo_packages():
    try:
        import timm
        import torchvision
    except Exception as error:  # torchvision's C++ ops fail to load on a mismatched torch
        if os.environ.get("CI") == "true":
            raise
        pytest.skip(f"torchvision and timm are needed: {type(error).__name__}: {error}",
                    allow_module_level=True)
    return timm, torchvision


timm, torchvision = _import_zoo_packages()
from timm.layers import BatchNormAct2d as TimmBatchNormAct2d  # noqa: E402
from timm.layers import DropBlock2d, DropPath  # noqa: E402
from torchvision.ops import StochasticDepth  # noqa: E402

_spec = importlib.util.spec_from_file_location(
    "zoo", Path(__file__).resolve().parents[1] / "perf" / "zoo.py")
zoo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(zoo)

# model: (BatchNorms, fused, with an activation, with a residual, {reason: count} of the rest)
ENDS = "its output is its module's output"  # a BatchNorm that ends a Sequential, say
EXPECTED = {
    # downsample.1 ends the downsample Sequential; bn3 (bn2) takes the add.
    "torchvision/resnet18": (20, 17, 17, 8, {ENDS: 3}),
    "torchvision/resnet50": (53, 49, 49, 16, {ENDS: 4}),
    "torchvision/resnext50_32x4d": (53, 49, 49, 16, {ENDS: 4}),
    # The block's BatchNorm before its add ends the block's f (a Sequential), whose add, in
    # the parent, would change f's output: left alone, as the projections' and the
    # squeeze-excitation convs' BatchNorms that end a Conv2dNormActivation.
    "torchvision/regnet_y_400mf": (53, 33, 33, 0, {ENDS: 20}),
    "torchvision/mobilenet_v2": (52, 35, 35, 0, {ENDS: 17}),
    "torchvision/mobilenet_v3_large": (46, 31, 31, 0, {ENDS: 15}),
    "torchvision/efficientnet_b0": (49, 33, 33, 0, {ENDS: 16}),
    # norm5 ends features; DenseNet's forward applies F.relu to it.
    "torchvision/densenet121": (121, 120, 120, 0, {ENDS: 1}),
    "timm/resnet50": (53, 49, 49, 16, {ENDS: 4}),
    # Every timm BatchNormAct2d; those without an activation that feed no add are converted
    # alone (with_activation and with_residual count neither).
    "timm/efficientnet_b0": (49, 49, 33, 9, {}),
    "timm/mobilenetv3_large_100": (46, 46, 31, 10, {}),
    "timm/cspdarknet53": (67, 67, 67, 0, {}),
    "timm/regnety_008": (47, 47, 29, 0, {}),
}


@pytest.mark.parametrize("model_name", EXPECTED)
@pytest.mark.usefixtures("reference_backend")
def test_zoo_counts_and_same_function(model_name):
    batchnorms, fused, with_activation, with_residual, reasons = EXPECTED[model_name]
    (train, evaluation) = zoo.run(model_name, image_size=32, batch=2, counts_only=False,
                                  seed=torch.randint(2**31, ()).item())
    assert (train["batchnorms"], train["fused"], train["with_activation"],
            train["with_residual"]) == (batchnorms, fused, with_activation, with_residual)
    assert train["left_alone"] == "; ".join(f"{n} {reason}" for reason, n in reasons.items())
    assert (train["mode"], evaluation["mode"]) == ("train", "eval")
    for row in (train, evaluation):
        assert row["ratio_fp64"] <= 2, row


# perf/zoo.py --all's check on a sample that is cheap at 64x64 in float64: (BatchNorms, fused,
# leaves, {reason: count} of the BatchNorms left alone). With EXPECTED, 20 models in CI.
SWEEP_SAMPLE = {
    # Their forward reads self.training (an auxiliary head, a dropout head) and calls no
    # BatchNorm of its own: kept as it is, and nothing is lost.
    "torchvision/googlenet": (59, 59, 0, {}),
    "timm/legacy_seresnet18": (20, 17, 0, {ENDS: 3}),
    # timm's registered leaves: its "same" padding convs, which own no BatchNorm.
    "timm/tf_mobilenetv3_small_075": (34, 34, 0, {}),
    "timm/mobilenetv2_035": (52, 52, 0, {}),
    "timm/test_efficientnet": (13, 13, 0, {}),
    "timm/test_byobnet": (14, 14, 0, {}),
    "timm/test_resnet": (15, 12, 0, {ENDS: 3}),
}


@pytest.mark.slow
@pytest.mark.parametrize("model_name", SWEEP_SAMPLE)
@pytest.mark.usefixtures("reference_backend")
def test_zoo_sweep_sample_is_exact_in_both_modes(model_name):
    """Converted in training and in eval mode, the model computes the unconverted one's
    function in both modes, in float64: outputs, gradients and running statistics."""
    batchnorms, fused, leaves, reasons = SWEEP_SAMPLE[model_name]
    row = zoo.sweep(model_name, image_size=64, batch=2, seed=torch.randint(2**31, ()).item())
    print(row)
    assert (row["batchnorms"], row["fused"], row["leaves"]) == (batchnorms, fused, leaves)
    assert row["left_alone"] == "; ".join(f"{n} {reason}" for reason, n in reasons.items())
    assert row["exact"] and row["pickles"] and row["hooks"] == "same", row


def test_torchvision_resnet50_pairs():
    """bn1 and bn2 of every bottleneck with its ReLU; bn3 with the residual and the ReLU after
    the add: the downsample's output, or the block's input x. The downsample's BatchNorm ends
    its Sequential, and is left alone."""
    model = torchvision.models.resnet50(weights=None)
    converted = fuse_bn_act(model)
    expected = [FusedPair("bn1", "relu")]
    for layer in range(1, 5):
        for index in range(len(model.get_submodule(f"layer{layer}"))):
            block = f"layer{layer}.{index}"
            residual = f"{block}.downsample" if index == 0 else "x"
            expected += [FusedPair(f"{block}.bn1", f"{block}.relu"),
                         FusedPair(f"{block}.bn2", f"{block}.relu"),
                         FusedPair(f"{block}.bn3", f"{block}.relu", residual)]
    assert list(converted.fused_pairs) == expected
    assert converted.left_alone == {f"layer{layer}.0.downsample.1":
                                    f"{ENDS}: layer{layer}.0.downsample"
                                    for layer in range(1, 5)}
    assert list(converted.state_dict()) == list(model.state_dict())


class TimmBlock(nn.Module):
    """timm's pattern: BatchNormAct2d with an activation, then one without, whose output goes
    through drop_path into the residual add."""

    def __init__(self, act_layer=nn.SiLU, drop_layer=None, drop_path=None):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 3, 3, padding=1, bias=False)
        self.bn1 = TimmBatchNormAct2d(3, act_layer=act_layer, drop_layer=drop_layer)
        self.conv2 = nn.Conv2d(3, 3, 1, bias=False)
        self.bn2 = TimmBatchNormAct2d(3, apply_act=False)
        self.drop_path = drop_path or nn.Identity()

    def forward(self, x):
        shortcut = x
        x = self.bn2(self.conv2(self.bn1(self.conv1(x))))
        return self.drop_path(x) + shortcut


def timm_act(name):
    return timm.layers.get_act_layer(name)


@pytest.mark.parametrize("act_layer, activation, kwargs", [
    (nn.SiLU, "silu", {}),
    (nn.LeakyReLU, "leaky_relu", {"negative_slope": 0.01}),
    (timm_act("gelu_tanh"), "gelu", {"approximate": "tanh"}),  # timm's own class, traced
    (timm_act("hard_swish"), "hardswish", {}),
], ids=["SiLU", "LeakyReLU", "timm-GELUTanh", "Hardswish"])
def test_timm_batchnorm_act(act_layer, activation, kwargs):
    model = TimmBlock(act_layer, drop_path=DropPath(0.0)).to(DEVICE)
    converted = fuse_bn_act(model)
    assert converted.fused_pairs == (FusedPair("bn1", "bn1.act"),
                                     FusedPair("bn2", None, "x"))
    assert type(converted.bn1) is BatchNormAct2d and type(converted.bn2) is BatchNormAct2d
    assert (converted.bn1.activation, converted.bn1.activation_kwargs) == (activation, kwargs)
    assert converted.bn2.activation == "identity"
    assert list(converted.state_dict()) == list(model.state_dict())
    assert_same_model(model, converted, randn((2, 3, 4, 3)), train_steps=1)


def test_timm_batchnorm_act_without_activation_is_converted_alone():
    model = nn.Sequential(nn.Conv2d(3, 3, 1), TimmBatchNormAct2d(3, apply_act=False),
                          nn.Conv2d(3, 2, 1))
    assert fuse_bn_act(model).fused_pairs == (FusedPair("1", None),)


@pytest.mark.parametrize("make, reason", [
    (lambda: TimmBlock(drop_layer=lambda: DropBlock2d(0.1)),
     "its drop layer DropBlock2d is not a no-op"),
    (lambda: TimmBlock(act_layer=nn.PReLU), "its activation PReLU is not supported"),
    (lambda: TimmBlock(act_layer=nn.CELU), "its activation CELU is not supported"),
], ids=["DropBlock", "PReLU", "CELU"])
def test_timm_batchnorm_act_left_alone(make, reason):
    converted = fuse_bn_act(make())
    assert converted.left_alone == {"bn1": reason}
    assert converted.fused_pairs == (FusedPair("bn2", None, "x"),)


@pytest.mark.parametrize("make, name", [
    (lambda: DropPath(0.2), "DropPath whose drop_prob"),
    (lambda: StochasticDepth(0.2, "row"), "StochasticDepth whose p"),
], ids=["DropPath", "StochasticDepth"])
def test_stochastic_depth_is_not_a_no_op_and_keeps_its_mode(make, name):
    """Converted in eval mode, where the module passes its input through, it still drops paths
    once the model trains: it stays a module call in the graph, not a traced-out branch."""
    model = TimmBlock(drop_path=make()).eval()
    model.bn2 = nn.BatchNorm2d(3)  # timm's would be converted alone
    converted = fuse_bn_act(model)
    assert converted.left_alone == {"bn2": f"feeds a {name} > 0"}
    calls = []
    converted.drop_path.register_forward_hook(lambda *args: calls.append(1))
    converted(torch.randn(2, 3, 4, 4, device=DEVICE))
    assert calls == [1]
    converted.train()
    x = torch.randn(64, 3, 2, 2, device=DEVICE)
    dropped = (converted.drop_path(x) == 0).flatten(1).all(dim=1)
    assert dropped.any() and not dropped.all()


def test_zero_rate_drop_modules_are_no_ops():
    for drop_path in (DropPath(0.0), StochasticDepth(0.0, "row"), DropBlock2d(0.0)):
        converted = fuse_bn_act(TimmBlock(drop_path=drop_path))
        assert converted.fused_pairs[-1] == FusedPair("bn2", None, "x")


def test_zoo_script_writes_counts(tmp_path):
    out = tmp_path / "zoo.csv"
    assert zoo.main(["--models", "timm/resnet50", "--counts-only", "--out", str(out)]) == 0
    header, row = out.read_text().splitlines()
    assert header.split(",")[:5] == ["model", "batchnorms", "fused", "with_activation",
                                     "with_residual"]
    assert row.startswith("timm/resnet50,53,49,49,16,4 its output is its module's output")


def test_zoo_script_never_replaces_rows_with_fewer(tmp_path):
    out = tmp_path / "zoo.csv"
    out.write_text("model,batchnorms\na,1\nb,2\n")
    with pytest.raises(SystemExit, match="refusing to replace .* \\(2 rows\\) with 1 rows"):
        zoo.main(["--models", "torchvision/resnet18", "--counts-only", "--out", str(out)])
    assert out.read_text() == "model,batchnorms\na,1\nb,2\n"


def test_zoo_script_names_the_missing_package_and_fails(tmp_path, monkeypatch, capsys):
    """Without timm a torchvision model still runs, and a timm model stops the run, with a
    message naming timm, exit status 2, and nothing written."""
    import_module = zoo.importlib.import_module

    def without_timm(name):
        if name.split(".")[0] == "timm":
            raise ModuleNotFoundError("No module named 'timm'")
        return import_module(name)

    monkeypatch.setattr(zoo.importlib, "import_module", without_timm)
    out = tmp_path / "zoo.csv"
    assert zoo.main(["--models", "torchvision/resnet18", "--counts-only", "--out", str(out)]) == 0
    assert zoo.main(["--models", "torchvision/resnet18,timm/resnet50", "--counts-only",
                     "--out", str(tmp_path / "other.csv")]) == 2
    error = capsys.readouterr().err
    assert "timm/resnet50 needs timm, which cannot be imported" in error
    assert "resnet18" not in error and not (tmp_path / "other.csv").exists()


class SamePadded(nn.Module):
    """A module timm registers as not traceable (its "same" padding reads the input's size),
    owning the BatchNorm its forward calls."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 3), nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.conv(x))


def test_timm_registered_leaves_are_kept_as_calls_without_a_warning():
    from timm.layers import Conv2dSame
    from timm.layers._fx import register_notrace_module
    register_notrace_module(SamePadded)
    model = nn.Sequential(Conv2dSame(3, 3, 3, stride=2), nn.BatchNorm2d(3), nn.ReLU(),
                          SamePadded())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        converted = fuse_bn_act(model)
    assert converted.leaves == {"3": "timm registers it as not traceable by torch.fx"}
    assert converted.left_alone == {"3.bn": "it is inside a leaf: 3"}
    assert converted.fused_pairs == (FusedPair("1", "2"),)
    assert_same_model(model, converted, randn((2, 3, 7, 7)), train_steps=1)
