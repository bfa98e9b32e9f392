"""A converted model is the same model to the tools around it, asked as a user asks: hooks on
its blocks, features by module name, per-block wrappers, pickling, and other libraries'
BatchNorm converters, against the unconverted model."""
import copy
import io

import pytest
import torch
from torch import nn

import tritonbn
from conftest import DEVICE
from tritonbn import dispatch

torchvision = pytest.importorskip("torchvision")


@pytest.fixture
def reference_backend(monkeypatch):
    """Whole torchvision models take PyTorch's reference path on a CPU (through the
    interpreter they take minutes); the small blocks below run the kernels."""
    if DEVICE.type == "cpu":
        monkeypatch.setattr(dispatch, "INTERPRETING", False)


def randomised(model: nn.Module) -> nn.Module:
    """model in float64 with random BatchNorm statistics and affine, so that a dropped
    activation or a misplaced add shows."""
    model = model.to(DEVICE, torch.float64)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.normal_(0, 0.2)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.2)
    return model


def image(size=32, batch=2):
    return torch.randn(batch, 3, size, size, device=DEVICE, dtype=torch.float64)


def block_model() -> nn.Module:
    """Two ResNet basic blocks after a stem: every fused shape, small enough for the kernels
    under the interpreter."""
    blocks = [torchvision.models.resnet.BasicBlock(4, 4) for _ in range(2)]
    return randomised(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4),
                                    nn.ReLU(), *blocks))


def recorded_calls(model: nn.Module, x: torch.Tensor, paths) -> dict:
    """{path: [output of each call]} from forward hooks on the modules at paths."""
    calls = {path: [] for path in paths}
    handles = [model.get_submodule(path).register_forward_hook(
        lambda module, args, output, path=path: calls[path].append(output.detach()))
        for path in paths]
    try:
        model(x)
    finally:
        for handle in handles:
            handle.remove()
    return calls


@pytest.mark.usefixtures("reference_backend")
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_hooks_on_every_module_of_resnet18_fire_as_on_the_original(training):
    """Every module the original calls, but the absorbed activations and the fused
    BatchNorms (whose output is now the activated one), is called as often, with the same
    output: layer4, layer4[-1], each block, conv and downsample."""
    model = randomised(torchvision.models.resnet18(num_classes=10)).train(training)
    fused = tritonbn.fuse_bn_act(model)
    fused_bns = {pair.bn for pair in fused.fused_pairs}
    paths = [path for path, _ in fused.named_modules() if path not in fused_bns]
    assert {"layer4", "layer4.1", "layer2.0.downsample", "fc"} <= set(paths)
    x = image()
    expected = recorded_calls(copy.deepcopy(model), x, paths)
    got = recorded_calls(fused, x, paths)
    for path in paths:
        assert len(got[path]) == len(expected[path]) >= 1, path
        for ours, theirs in zip(got[path], expected[path]):
            torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10, msg=path)


def test_pre_hooks_and_full_backward_hooks_on_a_block_see_the_original_tensors():
    """The kernel path: a block's forward pre-hook and full backward hook fire once each, with
    the original's input and gradients."""
    model = block_model()
    fused = tritonbn.fuse_bn_act(model)
    assert len(fused.fused_pairs) == 5
    seen = []
    x = image(6).requires_grad_()
    for network in (model, fused):
        record = {}
        block = network.get_submodule("3")
        handles = [
            block.register_forward_pre_hook(lambda m, args: record.update(input=args[0])),
            block.register_full_backward_hook(
                lambda m, grad_in, grad_out: record.update(grads=(grad_in, grad_out)))]
        network(x).square().sum().backward()
        for handle in handles:
            handle.remove()
        seen.append(record)
    torch.testing.assert_close(seen[1]["input"], seen[0]["input"])
    for ours, theirs in zip(seen[1]["grads"], seen[0]["grads"]):
        torch.testing.assert_close(ours, theirs)


@pytest.mark.usefixtures("reference_backend")
def test_features_by_module_name_are_the_originals():
    from torchvision.models.feature_extraction import (create_feature_extractor,
                                                       get_graph_node_names)
    model = randomised(torchvision.models.resnet18(num_classes=10)).eval()
    fused = tritonbn.fuse_bn_act(model)
    nodes = {"layer2": "c3", "layer3.1": "c4", "layer4": "c5", "fc": "logits"}
    ours = create_feature_extractor(fused, nodes)
    theirs = create_feature_extractor(model, nodes)
    x = image()
    expected = theirs(x)
    for name, value in ours(x).items():
        torch.testing.assert_close(value, expected[name], rtol=1e-10, atol=1e-10, msg=name)
    train_nodes, eval_nodes = get_graph_node_names(fused)
    assert {"layer1.0.conv1", "layer4.1.conv2", "fc"} <= set(eval_nodes)


def test_activation_checkpointing_per_block_after_conversion():
    """torch.distributed's wrapper, applied to the blocks of a converted model, wraps them and
    gives the same gradients."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointWrapper, apply_activation_checkpointing)
    block = torchvision.models.resnet.BasicBlock
    model = block_model().train()
    fused = tritonbn.fuse_bn_act(copy.deepcopy(model))
    apply_activation_checkpointing(fused, check_fn=lambda module: isinstance(module, block))
    assert sum(isinstance(m, CheckpointWrapper) for m in fused.modules()) == 2
    results = []
    x = image(6)
    for network in (model, fused):
        x.grad = None
        network(x.requires_grad_()).square().sum().backward()
        results.append([x.grad, *(p.grad for p in network.parameters())])
    for ours, theirs in zip(*results):
        torch.testing.assert_close(ours, theirs)


def saved_and_loaded(model: nn.Module) -> nn.Module:
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.usefixtures("reference_backend")
def test_a_whole_converted_googlenet_saves_loads_and_deep_copies():
    """GoogLeNet keeps its forward (it reads the mode) and fuses inside its blocks: the whole
    model saves with torch.save, and the loaded model and a deep copy compute the original's
    function in both modes, with the report."""
    model = randomised(torchvision.models.googlenet(num_classes=10, aux_logits=False,
                                                    init_weights=False))
    fused = tritonbn.fuse_bn_act(model)
    assert len(fused.fused_pairs) == 57
    x = image(64)
    for copied in (saved_and_loaded(fused), copy.deepcopy(fused)):
        assert (copied.fused_pairs, copied.left_alone, copied.leaves) == (
            fused.fused_pairs, fused.left_alone, fused.leaves)
        assert list(copied.state_dict()) == list(model.state_dict())
        original = copy.deepcopy(model)
        for training in (False, True):  # seeded alike: the model's dropout
            outputs = [torch.manual_seed(0) and network.train(training)(x)
                       for network in (copied, original)]
            torch.testing.assert_close(*outputs, rtol=1e-10, atol=1e-10)


def converted_then(convert, model: nn.Module) -> nn.Module:
    return convert(tritonbn.fuse_bn_act(copy.deepcopy(model)))


def assert_same_function(model: nn.Module, other: nn.Module, modes=(True, False)):
    x = image(6)
    for training in modes:
        torch.testing.assert_close(other.train(training)(x), model.train(training)(x),
                                   rtol=1e-10, atol=1e-10, msg=f"training={training}")


def test_torchs_sync_batchnorm_converter_keeps_the_fused_activation():
    """nn.SyncBatchNorm.convert_sync_batchnorm turns every fused layer into a plain
    nn.SyncBatchNorm; the converted model's code still applies the activation and the
    residual around it (outside a process group, SyncBatchNorm runs as BatchNorm)."""
    model = block_model()
    synced = converted_then(nn.SyncBatchNorm.convert_sync_batchnorm, model)
    assert type(synced[1]) is nn.SyncBatchNorm and type(synced[3].bn2) is nn.SyncBatchNorm
    assert_same_function(model, synced)


def test_a_plain_batchnorm_or_torchvisions_frozen_layer_put_back_in_place():
    from torchvision.ops import FrozenBatchNorm2d
    model = block_model()
    plain = randomised(nn.BatchNorm2d(4))
    frozen = FrozenBatchNorm2d(4).to(DEVICE, torch.float64)
    frozen.load_state_dict(randomised(nn.BatchNorm2d(4)).state_dict(), strict=False)
    original, fused = copy.deepcopy(model), tritonbn.fuse_bn_act(model)
    for network in (original, fused):
        network[3].bn2, network[4].bn1 = copy.deepcopy(plain), copy.deepcopy(frozen)
    assert_same_function(original, fused)


def test_timms_converters_keep_the_fused_activation():
    timm_layers = pytest.importorskip("timm.layers")
    model = block_model()
    synced = converted_then(timm_layers.convert_sync_batchnorm, model)
    assert type(synced[3].bn1) is nn.SyncBatchNorm
    assert_same_function(model, synced)
    frozen = converted_then(timm_layers.freeze_batch_norm_2d, model)
    assert type(frozen[3].bn1).__name__ == "FrozenBatchNorm2d"
    assert_same_function(model, frozen, modes=(False,))
    assert_same_function(timm_layers.freeze_batch_norm_2d(copy.deepcopy(model)), frozen)


def test_a_layer_with_an_activation_of_its_own_in_place_of_a_fused_one_raises():
    timm_layers = pytest.importorskip("timm.layers")
    fused = tritonbn.fuse_bn_act(block_model())
    fused[3].bn2 = timm_layers.BatchNormAct2d(4, act_layer=nn.ReLU).to(DEVICE, torch.float64)
    with pytest.raises(ValueError, match=r"fused 3\.bn2 with relu, and 3\.bn2 is now a "
                                         r"BatchNormAct2d that applies an activation of its "
                                         r"own.*tritonbn\.freeze_batch_norm"):
        fused(image(6))


def test_freeze_batch_norm_keeps_the_fused_layers_and_timms_state_dict():
    """tritonbn.freeze_batch_norm on a converted model: fused frozen layers, the original's
    function in eval mode and in training mode as timm's frozen model computes it, and the
    state_dict keys of timm's freeze_batch_norm_2d."""
    timm_layers = pytest.importorskip("timm.layers")
    model = block_model()
    frozen = converted_then(tritonbn.freeze_batch_norm, model)
    assert [type(m).__name__ for m in frozen.modules()].count("FrozenBatchNormAct2d") == 5
    assert frozen[3].bn2.activation == "relu" and frozen[1].activation == "relu"
    assert not any("bn" in name for name, _ in frozen.named_parameters())
    assert_same_function(model, frozen, modes=(False,))
    theirs = timm_layers.freeze_batch_norm_2d(copy.deepcopy(model))
    assert list(frozen.state_dict()) == list(theirs.state_dict())
    assert_same_function(theirs, frozen)
    loaded = copy.deepcopy(frozen)
    loaded.load_state_dict(theirs.state_dict())
    assert_same_function(theirs, loaded)
