"""SyncBatchNormAct: group-wide statistics over torch.distributed.

The group tests start gloo groups of 2 and 3 processes, one start per world size running
every check (start-up is the cost). The children inherit TRITON_INTERPRET=1 from conftest, so
the real kernels run in them. Every rank's output, input gradient, parameter gradients (summed
over the group) and running statistics are held against float64 PyTorch over the
concatenated batch, within twice the error of eager PyTorch in the same dtype on that batch.
"""
import copy
import datetime
import socket
import sys
import traceback
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch._dynamo  # noqa: F401  (see CountOps)
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import tritonbn
from conftest import DEVICE, ON_GPU, max_err, memory_format
from tritonbn import SyncBatchNormAct, convert_sync_batchnorm
from tritonbn.sync import combine_rank_stats, rank_stats


def activate(z, activation, kwargs=None):
    """torch.nn.functional's activation of that name."""
    return z if activation == "identity" else getattr(F, activation)(z, **(kwargs or {}))


# --- in one process ---------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_combined_statistics_at_large_mean(dtype):
    """Ranks whose means differ by a few std, all at |mean| = 1e4 std, one rank empty:
    the combination keeps the mean and variance to a few ulps of the std in the accumulate
    dtype (float64 rounding at |mean| aside). Rounding the mean to float32 would not."""
    C, sizes = 3, (5, 0, 2, 7)
    std = 0.5 + torch.rand(C, 1, dtype=torch.float64)
    xs = [(torch.randn(n, C, 4, dtype=torch.float64) * std + 1e4 + 3 * r).to(DEVICE, dtype)
          for r, n in enumerate(sizes)]
    backend = tritonbn.dispatch.backend(xs[0])
    blocks = torch.stack([
        rank_stats(*backend.batch_stats(x, None, None, 0.1), x.numel() // C) if x.numel()
        else torch.zeros(4, C, dtype=torch.float64, device=DEVICE) for x in xs])
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    shift, mean_d, var, total = combine_rank_stats(blocks, acc)
    var64, mean64 = torch.var_mean(torch.cat(xs).double(), dim=(0, 2), correction=0)
    assert torch.equal(shift.to(acc).double(), shift)  # the kernels subtract it exactly
    assert torch.equal(total, torch.full_like(total, sum(sizes) * 4))
    std, ulp, ulp64 = var64.sqrt(), torch.finfo(acc).eps, torch.finfo(torch.float64).eps
    mean_err = (shift + mean_d.to(acc).double() - mean64).abs()
    assert (mean_err < 8 * ulp * std + 4 * ulp64 * mean64).all(), mean_err / std
    var_err = (var.to(acc).double() - var64).abs()
    assert (var_err < 16 * ulp * var64 + 4 * ulp64 * mean64 * std).all(), var_err / var64


def test_without_a_group_it_is_batchnormact():
    x = torch.randn(5, 3, 4, 3, dtype=torch.float64).to(DEVICE, torch.float32)
    dy, skip = torch.randn_like(x), torch.randn_like(x)
    kwargs = dict(activation="leaky_relu", activation_kwargs=dict(negative_slope=0.3),
                  momentum=None, device=DEVICE)
    ours, theirs = SyncBatchNormAct(3, **kwargs), tritonbn.BatchNormAct2d(3, **kwargs)
    with torch.no_grad():
        for module in (ours, theirs):
            module.weight.copy_(torch.linspace(0.5, 1.5, 3))
            module.bias.copy_(torch.linspace(-1, 1, 3))
    for training in (True, True, False):
        results = []
        for module in (ours.train(training), theirs.train(training)):
            xg, rg = x.clone().requires_grad_(), skip.clone().requires_grad_()
            y = module(xg, rg)
            y.backward(dy)
            results.append([y, xg.grad, rg.grad, module.weight.grad,
                            *module.state_dict().values()])
            module.zero_grad()
        for got, expected in zip(*results, strict=True):
            assert torch.equal(got, expected)
    assert not dist.is_initialized()


def test_state_dict_is_syncbatchnorm():
    plain = nn.SyncBatchNorm(4)
    with torch.no_grad():
        for t in plain.state_dict().values():
            t.copy_(torch.rand(t.shape) * 10 if t.is_floating_point() else 7)
    ours = SyncBatchNormAct(4, activation="tanh")
    ours.load_state_dict(plain.state_dict())
    assert list(ours.state_dict()) == list(plain.state_dict())
    for got, expected in zip(ours.state_dict().values(), plain.state_dict().values()):
        assert torch.equal(got, expected)
    assert ours.process_group is None


def test_unknown_activation_or_kwarg_raises():
    with pytest.raises(ValueError, match="relu"):
        SyncBatchNormAct(3, activation="swish-ish")
    with pytest.raises(ValueError, match="negative_slope"):
        SyncBatchNormAct(3, activation="leaky_relu", activation_kwargs=dict(alpha=1.0))


def test_convert_sync_batchnorm_shares_everything():
    group = object()  # stands for a process group: the converter only passes it on
    model = nn.Sequential(nn.Conv2d(3, 4, 1), tritonbn.BatchNormAct2d(4),
                          nn.Sequential(nn.Linear(4, 5), tritonbn.BatchNormAct1d(
                              5, activation="elu", activation_kwargs=dict(alpha=0.5),
                              momentum=None, affine=False)),
                          nn.BatchNorm2d(4, track_running_stats=False))
    model[2].eval()
    before = {name: t for name, t in model.state_dict(keep_vars=True).items()}
    converted = convert_sync_batchnorm(model, group)
    assert converted is model
    assert type(model[1]) is SyncBatchNormAct and model[1].activation == "relu"
    inner = model[2][1]
    assert type(inner) is SyncBatchNormAct and inner.activation == "elu"
    assert inner.activation_kwargs == dict(alpha=0.5)
    assert inner.momentum is None and not inner.affine and not inner.training
    assert type(model[3]) is SyncBatchNormAct and model[3].activation == "identity"
    assert not model[3].track_running_stats
    assert type(model[0]) is nn.Conv2d
    assert all(m.process_group is group for m in (model[1], inner, model[3]))
    after = model.state_dict(keep_vars=True)
    assert list(after) == list(before)
    assert all(after[name] is t for name, t in before.items())
    root = tritonbn.BatchNormAct3d(2, activation="identity", eps=1e-3)
    twin = convert_sync_batchnorm(root)
    assert type(twin) is SyncBatchNormAct and twin.eps == 1e-3 and twin.weight is root.weight


class _SyncResidualBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.bn = nn.SyncBatchNorm(3, momentum=None)

    def forward(self, x, skip):
        return torch.relu(self.bn(self.conv(x)) + skip)


@pytest.mark.parametrize("skip_shape", [(4, 3, 5, 3), (1, 3, 1, 1)], ids=["residual", "broadcast"])
def test_fuse_bn_act_turns_syncbatchnorm_into_syncbatchnormact(skip_shape):
    """Without a process group nn.SyncBatchNorm runs as BatchNorm, and so does the fused layer;
    a residual that broadcasts takes fuse_bn_act's unfused fallback."""
    model = _SyncResidualBlock().to(DEVICE)
    fused = tritonbn.fuse_bn_act(model)
    assert type(fused.bn) is SyncBatchNormAct and fused.bn.activation == "relu"
    assert fused.bn.momentum is None and fused.bn.process_group is None
    assert fused.fused_pairs[0].residual == "skip"
    assert list(fused.state_dict()) == list(model.state_dict())
    x = torch.randn(4, 3, 5, 3, device=DEVICE)
    skip = torch.randn(skip_shape, device=DEVICE)
    for training in (True, False):
        for m in (model, fused):
            m.train(training)
        assert max_err(fused(x, skip), model(x, skip)) < 1e-5
    for got, expected in zip(fused.state_dict().values(), model.state_dict().values()):
        assert max_err(got, expected) < 1e-6


# --- in gloo groups of processes -------------------------------------------------------------

# Each check: sizes[world] are the per-rank batch sizes, tail the dims after (N, C).
LAYER_CHECKS = [
    dict(name="unequal batches, contiguous, residual", sizes={2: [3, 1], 3: [2, 1, 3]}, C=3,
         tail=(3, 2), activation="relu", residual=True, count_collectives=True),
    dict(name="an empty rank, channels_last, momentum=None", sizes={2: [0, 4], 3: [3, 0, 2]},
         C=4, tail=(2, 3), layout="channels_last", activation="silu", momentum=None,
         residual=True),
    dict(name="2-D float64, one value on a rank, no affine", sizes={2: [1, 3], 3: [1, 2, 2]},
         C=5, tail=(), dtype=torch.float64, activation="gelu",
         activation_kwargs=dict(approximate="tanh"), affine=False),
    dict(name="|mean| >> std, rank means apart", sizes={2: [2, 2], 3: [1, 2, 1]}, C=2,
         tail=(7,), offset=2e3, rank_offset=5.0, activation="leaky_relu",
         activation_kwargs=dict(negative_slope=0.2)),
    dict(name="6-D input", sizes={2: [1, 2], 3: [1, 1, 1]}, C=3, tail=(2, 1, 2, 2),
         activation="elu", activation_kwargs=dict(alpha=0.5), residual=True),
    dict(name="a subgroup", sizes={3: [2, None, 3]}, C=3, tail=(4,), activation="hardswish",
         members=(0, 2)),
]


class CountOps(TorchDispatchMode):
    """Counts the ops dispatched under it: the collectives (namespace c10d) and reads of a
    tensor's value by the host (aten._local_scalar_dense, what .item() runs).

    A dispatch mode's first use imports torch._dynamo (seconds): done once at the top of this
    file, before the group's processes fork, rather than in each of them."""

    def __init__(self):
        super().__init__()
        self.collectives, self.host_reads = [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "c10d":
            self.collectives.append(func.overloadpacket.__name__)
        self.host_reads += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


def _bound(eager_err, reference, dtype):
    """Twice eager PyTorch's error, plus a few ulps of the reference's scale. In float64
    eager PyTorch is the reference, its error 0: the ulps (64, for sums of a few dozen
    terms that cancel) are then the whole bound."""
    ulps = 64 if dtype == torch.float64 else 4
    return 2 * eager_err + ulps * torch.finfo(dtype).eps * (1 + reference.abs().max().item())


def _reference_module(C, dtype, momentum, affine, state):
    module = nn.BatchNorm1d(C, momentum=momentum, affine=affine, dtype=dtype)
    module.load_state_dict(state)
    return module


def check_layer(rank, world, name, sizes, C, tail, activation, activation_kwargs=None,
                layout="contiguous", dtype=torch.float32, momentum=0.1, affine=True,
                residual=False, offset=0.5, rank_offset=0.0, members=None,
                count_collectives=False, steps=2):
    members = list(members or range(world))
    group = dist.new_group(members)  # every rank takes part in making a group
    if rank not in members:
        return
    sizes = [sizes[world][r] for r in members]
    index = members.index(rank)
    lo, hi = sum(sizes[:index]), sum(sizes[:index + 1])
    layer = SyncBatchNormAct(C, momentum=momentum, affine=affine, activation=activation,
                             activation_kwargs=activation_kwargs, process_group=group,
                             device=DEVICE, dtype=dtype)
    with torch.no_grad():  # the same random state on every rank: the seed is shared
        for t in layer.state_dict().values():
            if t.is_floating_point():
                t.copy_(torch.rand(C, dtype=torch.float64) + 0.5)
        if affine:
            layer.bias.normal_()
    state = {k: t.detach().cpu().double() if t.is_floating_point() else t.cpu()
             for k, t in layer.state_dict().items()}
    references = {d: _reference_module(C, d, momentum, affine, state)
                  for d in (torch.float64, dtype)}
    fmt = memory_format(layout, 2 + len(tail))
    for step in range(steps):
        N = sum(sizes)
        full = torch.randn((N, C) + tail, dtype=torch.float64) * (
            0.5 + torch.rand((1, C) + (1,) * len(tail), dtype=torch.float64)) + offset
        full += rank_offset * torch.repeat_interleave(torch.arange(len(sizes)),
                                                      torch.tensor(sizes)).view(
                                                          (N,) + (1,) * (1 + len(tail)))
        full = full.to(dtype).double()  # what every run sees: dtype's rounding of the data
        dy = torch.randn_like(full)
        skip = torch.randn_like(full).to(dtype).double() if residual else None
        expected = {}
        for d, module in references.items():
            x = full.to(d, copy=True).requires_grad_()
            r = None if skip is None else skip.to(d, copy=True).requires_grad_()
            z = module(x.flatten(2) if x.dim() > 2 else x).view(x.shape)
            y = activate(z if r is None else z + r, activation, activation_kwargs)
            y.backward(dy.to(d))
            expected[d] = [y, x.grad] + ([] if r is None else [r.grad])
            expected[d] += [module.weight.grad, module.bias.grad] if affine else []
            expected[d] += [module.running_mean, module.running_var]
            module.zero_grad()

        x = full[lo:hi].to(DEVICE, dtype).contiguous(memory_format=fmt).requires_grad_()
        r = None if skip is None else skip[lo:hi].to(DEVICE, dtype).requires_grad_()
        with CountOps() as forward_ops:
            y = layer(x, r)
        with CountOps() as backward_ops:
            y.backward(dy[lo:hi].to(DEVICE, dtype).contiguous(memory_format=fmt))
        if count_collectives:
            assert forward_ops.collectives == ["_allgather_base_"], forward_ops.collectives
            assert backward_ops.collectives == ["allreduce_"], backward_ops.collectives
            assert forward_ops.host_reads == backward_ops.host_reads == 0
        assert y.dtype == x.grad.dtype == dtype and y.shape == x.shape
        if x.dim() == 4:
            assert y.stride() == x.stride() and x.grad.stride() == x.stride()

        got = [y, x.grad] + ([] if r is None else [r.grad])
        per_sample = len(got)
        if affine:
            local = [layer.weight.grad, layer.bias.grad]
            if hi == lo:  # an empty batch: no contribution, but gradients all the same
                assert all(torch.equal(g, torch.zeros_like(g)) for g in local)
            summed = [g.clone() for g in local]
            for g in summed:
                dist.all_reduce(g, group=group)
            got += summed
        got += [layer.running_mean, layer.running_var]
        for i, (ours, e64, eager) in enumerate(zip(got, expected[torch.float64],
                                                   expected[dtype], strict=True)):
            if i < per_sample:  # this rank's slice
                e64, eager = e64[lo:hi], eager[lo:hi]
            if e64.numel():
                err, eager_err = max_err(ours.cpu(), e64), max_err(eager, e64)
                assert err <= _bound(eager_err, e64, dtype), (name, step, i, err, eager_err)
        assert int(layer.num_batches_tracked) == step + 1
        _assert_same_on_every_rank([layer.running_mean, layer.running_var], group)
        layer.zero_grad()


def _assert_same_on_every_rank(tensors, group):
    for t in tensors:
        gathered = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
        dist.all_gather(gathered, t, group=group)
        assert all(torch.equal(g, t) for g in gathered)


def check_ddp(rank, world):
    """Two SGD steps of a DDP model equal two steps of nn.BatchNorm2d + activations in
    float64 in one process over the whole batch."""
    sizes = [2, 3, 0][:world]
    lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])

    def convs():
        return nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.Conv2d(4, 2, 1)
    conv1, conv2 = convs()
    model = nn.Sequential(OrderedDict(conv1=conv1, bn1=tritonbn.BatchNormAct2d(4), conv2=conv2,
                                      bn2=tritonbn.BatchNormAct2d(2, activation="sigmoid")))
    conv1, conv2 = convs()
    single = nn.Sequential(OrderedDict(conv1=conv1, bn1=nn.BatchNorm2d(4), act1=nn.ReLU(),
                                       conv2=conv2, bn2=nn.BatchNorm2d(2), act2=nn.Sigmoid()))
    single.load_state_dict(model.state_dict())
    single.to(DEVICE, torch.float64)
    ddp = nn.parallel.DistributedDataParallel(convert_sync_batchnorm(model.to(DEVICE)))
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.5) for m in (ddp, single)]
    for _ in range(2):
        x = torch.randn(sum(sizes), 3, 5, 4, dtype=torch.float64, device=DEVICE) + 1
        target = torch.randn(sum(sizes), 2, 5, 4, dtype=torch.float64, device=DEVICE)
        # DDP averages the ranks' gradients: scaled by the world, they add up instead.
        loss = world * (ddp(x[lo:hi].float()) * target[lo:hi].float()).sum()
        (single(x) * target).sum().backward()
        loss.backward()
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()
    for (name, ours), expected in zip(ddp.module.state_dict().items(),
                                      single.state_dict().values(), strict=True):
        scale = 1 + expected.abs().max().item()
        assert max_err(ours, expected) < 2e-5 * scale, name


def check_compiled(rank, world):
    """Under torch.compile the group-wide layer runs eagerly, between graphs."""
    layers = [SyncBatchNormAct(3, activation="sigmoid", device=DEVICE) for _ in range(2)]
    compiled = torch.compile(nn.Sequential(nn.Tanh(), layers[0]), backend="eager",
                             fullgraph=False)
    x = torch.randn(2 + rank, 3, 4, device=DEVICE)
    results = []
    for model, layer in ((compiled, layers[0]), (nn.Sequential(nn.Tanh(), layers[1]), layers[1])):
        xg = x.clone().requires_grad_()
        y = model(xg)
        y.backward(x)
        results.append([y, xg.grad, *layer.state_dict().values()])
    for got, expected in zip(*results, strict=True):
        assert torch.equal(got, expected)


def check_copies_share_the_group(rank, world):
    """A deep copy of a model holding a process group (which cannot be copied) uses the
    same group and owns its own tensors."""
    group = dist.new_group()
    model = nn.Sequential(nn.Linear(3, 3), SyncBatchNormAct(3, process_group=group))
    twin = copy.deepcopy(model)
    assert twin[1].process_group is group
    assert twin[1].running_mean is not model[1].running_mean
    assert torch.equal(twin[1].running_var, model[1].running_var)


def check_fuse_keeps_the_group(rank, world):
    """fuse_bn_act copies a model whose nn.SyncBatchNorm holds a process group, and the
    fused layer synchronises over that group: one all_gather forward, one all_reduce back."""
    group = dist.new_group()
    model = nn.Sequential(nn.Linear(3, 3), nn.SyncBatchNorm(3, process_group=group), nn.SiLU())
    layer = tritonbn.fuse_bn_act(model).get_submodule("1")
    assert type(layer) is SyncBatchNormAct and layer.process_group is group
    with CountOps() as ops:
        layer(torch.randn(2 + rank, 3, device=DEVICE, requires_grad=True)).sum().backward()
    assert ops.collectives == ["_allgather_base_", "allreduce_"], ops.collectives


def check_channel_mismatch(rank, world):
    """Layers that disagree on num_features: with torch.distributed's DETAIL debug level the
    collective raises on every rank, and the group stays usable."""
    level = dist.get_debug_level()
    dist.set_debug_level(dist.DebugLevel.DETAIL)
    try:
        group = dist.new_group()
    finally:
        dist.set_debug_level(level)
    C = 2 + rank
    layer = SyncBatchNormAct(C, process_group=group, device=DEVICE)
    with pytest.raises(RuntimeError, match="mismatch between collectives"):
        layer(torch.randn(3, C, 2, device=DEVICE))
    ok = torch.ones(1, device=DEVICE)
    dist.all_reduce(ok, group=group)
    assert ok.item() == world


def check_bad_input_raises_before_any_collective(rank, world):
    layer = SyncBatchNormAct(3, device=DEVICE)
    with CountOps() as ops, pytest.raises(ValueError, match="num_features=3 channels, got 4"):
        layer(torch.randn(4, 4, 2, device=DEVICE))
    assert ops.collectives == [] and int(layer.num_batches_tracked) == 0


def _group_worker(rank, world, port, seed):
    torch.set_num_threads(1)  # one core per rank, not one per rank per core
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        for check in LAYER_CHECKS:
            if world in check["sizes"]:
                torch.manual_seed(seed)
                check_layer(rank, world, **check)
        # Compiling costs seconds, and a world of 2 shows what it has to show.
        for check in ((check_ddp, check_copies_share_the_group, check_fuse_keeps_the_group,
                       check_channel_mismatch, check_bad_input_raises_before_any_collective)
                      + ((check_compiled,) if world == 2 else ())):
            torch.manual_seed(seed)
            check(rank, world)
    except BaseException:  # spawn reports one rank's error: print every rank's
        print(f"rank {rank} of {world}:\n{traceback.format_exc()}", file=sys.stderr)
        raise
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Forked children inherit this process's modules, Triton's interpreter included, where
# spawned ones re-import torch (seconds each on a CI machine); CUDA cannot start in a fork.
START_METHOD = "spawn" if ON_GPU else "fork"


@pytest.mark.parametrize("world", [2, 3])
def test_group(world):
    mp.start_processes(_group_worker, args=(world, _free_port(), torch.initial_seed()),
                       nprocs=world, start_method=START_METHOD)


def test_bench_script_runs():
    """perf/sync_bench.py, which the GPU runs, on a tiny shape (forked here, as above)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "perf"))
    try:
        import sync_bench
    finally:
        sys.path.pop(0)
    sync_bench.main(["--tiny"])
