"""The tools people use around a model work with the BatchNormAct layers and with fused models
as with nn.BatchNorm*d + the activation: ONNX (both exporters, run by onnxruntime), torch.export
and its decompositions, torch.jit.trace and script, torch.fx and torchvision's feature
extractor, torch.func transforms. The reference is always the unfused PyTorch model, in
training and in eval mode wherever PyTorch has both."""
import copy
import io
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, jacrev, jvp, stack_module_state, vmap

import tritonbn
from tritonbn import reference
from tritonbn.kernels import launch
from tritonbn.modules import run_layer
from conftest import ACTIVATION_CASES, DEVICE, EAGER_ACTIVATIONS, case_id, make_input, make_params

MODES = pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])


class Unfused(nn.Module):
    """nn.BatchNorm*d, the optional residual add, then the activation: what a BatchNormAct
    layer must compute."""

    def __init__(self, layer):
        super().__init__()
        plain = {tritonbn.BatchNormAct1d: nn.BatchNorm1d, tritonbn.BatchNormAct2d: nn.BatchNorm2d,
                 tritonbn.BatchNormAct3d: nn.BatchNorm3d,
                 tritonbn.SyncBatchNormAct: nn.SyncBatchNorm}[type(layer)]
        self.bn = plain(layer.num_features, layer.eps, layer.momentum, layer.affine,
                        layer.track_running_stats, device=DEVICE)
        self.bn.load_state_dict(layer.state_dict())
        self.activation, self.activation_kwargs = layer.activation, layer.activation_kwargs
        self.train(layer.training)

    def forward(self, x, residual=None):
        z = self.bn(x) if residual is None else self.bn(x) + residual
        return EAGER_ACTIVATIONS[self.activation](z, **self.activation_kwargs)


def layer_pair(cls=tritonbn.BatchNormAct2d, channels=3, training=True, activation="relu",
               activation_kwargs=None, **options):
    """(BatchNormAct layer with random parameters and statistics, its Unfused twin)."""
    ours = cls(channels, activation=activation, activation_kwargs=activation_kwargs,
               device=DEVICE, **options).train(training)
    weight, bias, running_mean, running_var = make_params(channels)
    state = {"weight": weight, "bias": bias, "running_mean": running_mean,
             "running_var": running_var, "num_batches_tracked": torch.tensor(3)}
    ours.load_state_dict({k: v for k, v in state.items() if k in ours.state_dict()})
    return ours, Unfused(ours)


def assert_same_state(ours, theirs):
    expected = theirs.bn.state_dict() if isinstance(theirs, Unfused) else theirs.state_dict()
    for (name, got), want in zip(ours.state_dict().items(), expected.values()):
        torch.testing.assert_close(got, want, msg=name)


def small_net(layer_cls=tritonbn.BatchNormAct2d):
    """conv, a fused layer with a residual, conv, a fused layer: what fuse_bn_act makes."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
            self.bn1 = layer_cls(4, activation="silu")
            self.conv2 = nn.Conv2d(4, 4, 1)
            self.bn2 = layer_cls(4, activation="leaky_relu",
                                 activation_kwargs={"negative_slope": 0.2})

        def forward(self, x):
            y = self.conv1(x)
            y = self.bn1(y, y)
            return self.bn2(self.conv2(y))
    return Net().to(DEVICE)


def unfused_net(net):
    twin = copy.deepcopy(net)
    twin.bn1, twin.bn2 = Unfused(net.bn1), Unfused(net.bn2)
    return twin


@MODES
def test_jit_trace(training):
    ours, theirs = layer_pair(training=training, activation="gelu")
    x, r = make_input((4, 3, 5, 5)), make_input((4, 3, 5, 5))
    traced = torch.jit.trace(ours, (x, r))
    reference = torch.jit.trace(theirs, (x, r))
    x = make_input((4, 3, 5, 5), requires_grad=True)
    y, y_ref = traced(x, r), reference(x, r)
    torch.testing.assert_close(y, y_ref)
    assert_same_state(ours, theirs)
    dy = torch.randn_like(y)
    torch.testing.assert_close(torch.autograd.grad(y, (x, ours.weight), dy),
                               torch.autograd.grad(y_ref, (x, theirs.bn.weight), dy))


@MODES
@pytest.mark.parametrize("case", ACTIVATION_CASES, ids=case_id)
def test_jit_script_every_activation(case, training):
    """Scripted, saved and loaded: the parameters and buffers stay the layer's own."""
    activation, kwargs = case
    ours, theirs = layer_pair(tritonbn.BatchNormAct1d, training=training, activation=activation,
                              activation_kwargs=kwargs, momentum=None)
    scripted = torch.jit.script(ours)
    assert scripted.weight is ours.weight and scripted.running_var is ours.running_var
    assert list(scripted.state_dict()) == list(ours.state_dict())
    x, r = make_input((6, 3)), make_input((6, 3))
    torch.testing.assert_close(scripted(x, r), theirs(x, r))
    assert_same_state(ours, theirs)
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    torch.testing.assert_close(loaded(x), theirs(x))


def test_jit_script_model_and_options():
    """A model with BatchNormAct2d layers scripts whole; affine=False and
    track_running_stats=False script too; a wrong rank is rejected as nn.BatchNorm2d does."""
    net = small_net()
    reference = unfused_net(net)
    scripted = torch.jit.script(net)
    x = make_input((2, 3, 5, 5))
    torch.testing.assert_close(scripted(x), reference(x))
    ours, theirs = layer_pair(tritonbn.BatchNormAct3d, affine=False, track_running_stats=False)
    x = make_input((2, 3, 2, 2, 2))
    torch.testing.assert_close(torch.jit.script(ours)(x), theirs(x))
    with pytest.raises(torch.jit.Error, match=r"expected 5D input \(got 3D input\)"):
        torch.jit.script(ours)(make_input((2, 3, 2)))


@MODES
def test_fx_symbolic_trace_runs_the_kernels_in_the_current_mode(training):
    """The layer traces as one node that takes the layer, so the traced model launches the
    kernels and follows the layer's mode after tracing."""
    net = small_net().train(not training)
    traced = torch.fx.symbolic_trace(net)
    calls = [n for n in traced.graph.nodes if n.op == "call_function"]
    assert [n.target for n in calls] == [run_layer, run_layer]
    traced.train(training)
    reference = unfused_net(net).train(training)
    x = make_input((2, 3, 5, 5))
    outputs = []
    launches = launch.launches_in(lambda: outputs.append(traced(x)))
    assert launches > 0 or not tritonbn.dispatch.runs_triton(x)
    torch.testing.assert_close(outputs[0], reference(x))
    assert_same_state(traced.bn1, reference.bn1)


@MODES
@pytest.mark.parametrize("function", ["vmap", "grad", "jvp", "jacrev", "hvp",
                                      "per_sample_grads"])
def test_torch_func(function, training):
    """torch.func transforms give PyTorch's results. They train without running statistics,
    as PyTorch requires (an in-place update of a captured buffer is refused)."""
    ours, theirs = layer_pair(activation="elu", activation_kwargs={"alpha": 0.5},
                              training=training, track_running_stats=not training)
    x = make_input((3, 4, 3, 2, 2))
    params = {"weight": ours.weight, "bias": ours.bias}

    def run(layer, prefix):
        def loss(p, t):
            named = {prefix + name: value for name, value in p.items()}
            return functional_call(layer, named, (t,)).square().sum()
        if function == "vmap":
            return vmap(layer)(x)
        if function == "grad":
            return grad(loss, argnums=(0, 1))(params, x[0])
        if function == "jvp":
            return jvp(layer, (x[0],), (x[1],))
        if function == "jacrev":
            return jacrev(layer)(x[0, :2, :, :1])
        if function == "hvp":
            return jvp(lambda t: grad(loss, argnums=1)(params, t), (x[0],), (x[1],))
        return vmap(grad(lambda p, t: loss(p, t.unsqueeze(0).expand(2, -1, -1, -1))),
                    in_dims=(None, 0))(params, x[0])

    torch.testing.assert_close(run(ours, ""), run(theirs, "bn."))
    assert_same_state(ours, theirs)


@MODES
def test_model_ensemble(training):
    """stack_module_state + functional_call under vmap, as for nn.BatchNorm2d."""
    layers = [layer_pair(activation="hardswish", training=training) for _ in range(3)]
    x = make_input((2, 3, 4, 4))

    def ensemble(modules):
        params, buffers = stack_module_state(modules)
        base = copy.deepcopy(modules[0]).to("meta")
        out = vmap(lambda p, b: functional_call(base, (p, b), (x,)))(params, buffers)
        return out, buffers
    (y, buffers), (y_ref, buffers_ref) = ensemble([o for o, _ in layers]), ensemble(
        [t for _, t in layers])
    torch.testing.assert_close(y, y_ref)
    for name, value in buffers.items():
        torch.testing.assert_close(value, buffers_ref["bn." + name])


@pytest.mark.slow
def test_torch_export_keeps_the_op_and_decomposes_to_core_aten(tmp_path):
    """Plain export keeps tritonbn.normalize_act (for AOTInductor); run_decompositions() gives
    core ATen only, and the saved program loads and runs where tritonbn is not installed."""
    net = small_net().eval()
    x = make_input((2, 3, 5, 5))
    expected = unfused_net(net)(x)
    ep = torch.export.export(net, (x,))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert "tritonbn.normalize_act.default" in targets
    torch.testing.assert_close(ep.module()(x), expected)
    core = ep.run_decompositions()
    assert not any("tritonbn" in str(n.target) for n in core.graph.nodes)
    torch.testing.assert_close(core.module()(x), expected)
    torch.export.save(core, tmp_path / "net.pt2")
    torch.save((x, expected), tmp_path / "io.pt")
    script = ("import sys, torch\n"
              "sys.modules['tritonbn'] = None  # not installed\n"
              f"x, expected = torch.load({str(tmp_path / 'io.pt')!r})\n"
              f"ep = torch.export.load({str(tmp_path / 'net.pt2')!r})\n"
              "torch.testing.assert_close(ep.module()(x), expected)\n")
    subprocess.run([sys.executable, "-c", script], check=True, timeout=300)


def test_torch_export_training():
    """A training graph exports as nn.BatchNorm's does: core ATen with the buffer updates."""
    ours, theirs = layer_pair(activation="mish")
    x, r = make_input((4, 3, 3, 3)), make_input((4, 3, 3, 3))
    core = torch.export.export(ours, (x, r)).run_decompositions()
    assert not any("tritonbn" in str(n.target) for n in core.graph.nodes)
    module = core.module()
    torch.testing.assert_close(module(x, r), theirs(x, r))
    for name, value in module.state_dict().items():
        torch.testing.assert_close(value, theirs.bn.state_dict()[name], msg=name)


def run_onnx(model, x, dynamo: bool):
    import onnxruntime
    buffer = io.BytesIO()
    if dynamo:
        buffer.write(torch.onnx.export(model, (x,), dynamo=True, verbose=False)
                     .model_proto.SerializeToString())
    else:
        torch.onnx.export(model, (x,), buffer, dynamo=False)
    session = onnxruntime.InferenceSession(buffer.getvalue(),
                                           providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {session.get_inputs()[0].name: x.cpu().numpy()})
    return torch.from_numpy(y)


@pytest.mark.slow
@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_onnx_export(dynamo):
    net = small_net().eval()
    x = make_input((2, 3, 5, 5))
    torch.testing.assert_close(run_onnx(net, x, dynamo), unfused_net(net)(x).cpu())


@pytest.fixture(scope="module")
def fused_resnet18():
    """torchvision's resnet18 with random statistics, and fuse_bn_act of it, both in eval."""
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18(num_classes=10).to(DEVICE)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.1)
    return model.eval(), tritonbn.fuse_bn_act(model).eval()


@pytest.mark.slow
@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_onnx_export_fused_resnet18(fused_resnet18, dynamo):
    model, fused = fused_resnet18
    x = make_input((2, 3, 32, 32))
    torch.testing.assert_close(run_onnx(fused, x, dynamo), model(x).cpu(), rtol=1e-4,
                               atol=1e-4)


@pytest.mark.slow
def test_create_feature_extractor_on_fused_resnet18(fused_resnet18, monkeypatch):
    """The same features, asked by the same module names, as from the unconverted model: a
    block's output (its fused residual add and activation), a stage's, the logits. The fused
    model's code wraps convert.call_fused, so torchvision's tracer keeps it one call. The layers
    run the reference launchers: twenty layers in the interpreter take minutes, and the same
    call reaches them."""
    from torchvision.models.feature_extraction import create_feature_extractor
    monkeypatch.setattr(tritonbn.dispatch, "backend", lambda x: reference)
    model, fused = fused_resnet18
    nodes = {"layer1.0": "a", "layer3.1": "b", "layer4": "c", "fc": "logits"}
    ours = create_feature_extractor(fused, nodes)
    theirs = create_feature_extractor(model, nodes)
    x = make_input((2, 3, 32, 32))
    expected = theirs(x)
    for key, value in ours(x).items():
        torch.testing.assert_close(value, expected[key], rtol=1e-4, atol=1e-4)


def test_create_feature_extractor_on_fused_model():
    """Both modes: the extractor traces each, and the fused layers read the mode as they run."""
    from torchvision.models.feature_extraction import create_feature_extractor
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1),
                          nn.BatchNorm2d(4), nn.SiLU()).to(DEVICE)
    fused = tritonbn.fuse_bn_act(model)
    assert len(fused.fused_pairs) == 2
    # The activations' outputs, which the fused layers now give.
    ours = create_feature_extractor(fused, {"1": "first", "4": "second"})
    theirs = create_feature_extractor(model, {"2": "first", "5": "second"})
    x = make_input((2, 3, 4, 4))
    for training in (True, False):
        ours.train(training), theirs.train(training)
        expected = theirs(x)
        for key, value in ours(x).items():
            torch.testing.assert_close(value, expected[key])
        assert_same_state(ours, theirs)


@pytest.mark.slow
def test_sync_batchnorm_act_outside_a_process_group():
    """SyncBatchNormAct as nn.SyncBatchNorm: eval scripts, traces and exports; training
    outside a process group traces and differentiates twice."""
    ours, theirs = layer_pair(tritonbn.SyncBatchNormAct, training=False, activation="tanh")
    x = make_input((2, 3, 4))
    torch.testing.assert_close(torch.jit.script(ours)(x), theirs(x))
    core = torch.export.export(ours, (x,)).run_decompositions()
    torch.testing.assert_close(core.module()(x), theirs(x))
    ours.train(), theirs.train()
    torch.testing.assert_close(torch.jit.trace(ours, x)(x), torch.jit.trace(theirs, x)(x))
    assert_same_state(ours, theirs)
    x.requires_grad_()
    results = []
    for layer in (ours, theirs):
        (dx,) = torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)
        results.append(torch.autograd.grad(dx.square().sum(), x))
    torch.testing.assert_close(*results)
