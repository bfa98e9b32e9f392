"""One launch per reduction: the last program to finish merges the partials (kernels/merge.py).

Launch counts per mode, bitwise repeatability with shapes interleaved (a counter left dirty
by one launch would derail the next), counters back at zero, two-level merges with a ragged
last group; on a GPU also CUDA-graph replays, concurrent streams and no host sync."""
import pytest
import torch

import tritonbn
from tritonbn.kernels.layout import strides_ncs
from tritonbn.kernels import merge, tiling
from tritonbn.kernels.launch import launches_in
from conftest import (DEVICE, float64_bn_act, gpu_only, make_input, make_params, max_err,
                      memory_format)


@pytest.mark.parametrize("training, forward_launches", [(True, 2), (False, 1)],
                         ids=["train", "eval"])
def test_launches_per_forward_and_backward(training, forward_launches):
    m = tritonbn.BatchNormAct2d(6, device=DEVICE).train(training)
    x = make_input((3, 6, 5, 4), layout="channels_last", requires_grad=True)
    y = None

    def forward():
        nonlocal y
        y = m(x)
    assert launches_in(forward) == forward_launches
    backward_launches = 2 if training else 1
    assert launches_in(lambda: y.backward(torch.randn_like(y))) == backward_launches


def step(shape, layout, seed, momentum=0.1):
    """One training forward+backward of a fresh module on seeded inputs: every output."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator, dtype=torch.float64) * 2 + 1
    x = x.float().to(DEVICE).contiguous(memory_format=memory_format(layout, len(shape)))
    x.requires_grad_()
    dy = torch.randn(shape, generator=generator).to(DEVICE)
    m = tritonbn.BatchNormAct2d(shape[1], momentum=momentum, device=DEVICE)
    with torch.no_grad():
        m.weight.copy_(torch.rand(shape[1], generator=generator) + 0.5)
    y = m(x)
    dx, dweight, dbias = torch.autograd.grad(y, (x, m.weight, m.bias), dy)
    return y, dx, dweight, dbias, m.running_mean, m.running_var, m.num_batches_tracked


@pytest.mark.slow
def test_bitwise_repeatable_with_shapes_interleaved(monkeypatch):
    monkeypatch.setattr(tiling, "TILE_BYTES", 256)  # several splits, so the merge has work
    tiling._plan.cache_clear()
    cases = [((4, 3, 7, 5), "contiguous"), ((5, 16, 3, 3), "channels_last"),
             ((2, 7, 9, 2), "contiguous")]
    runs = []
    for _ in range(3):
        runs.append([step(shape, layout, seed) for seed, (shape, layout) in enumerate(cases)])
    tiling._plan.cache_clear()
    for run in runs[1:]:
        for first, again in zip(runs[0], run):
            for a, b in zip(first, again):
                assert torch.equal(a, b)
    for found in merge._workspaces.values():  # every counter back at zero
        assert not found.counters.any()


@pytest.mark.slow
@pytest.mark.parametrize("sms", [3, 5])
def test_two_level_merge_with_a_ragged_last_group(monkeypatch, sms):
    """Enough splits for several groups, the last one short: still the float64 result."""
    monkeypatch.setattr(tiling, "TILE_BYTES", 64)
    monkeypatch.setattr(tiling, "_sm_count", lambda index: sms)
    monkeypatch.setattr(tiling, "INTERPRETER_SMS", sms)
    tiling._plan.cache_clear()
    try:
        x = make_input((37, 2, 3, 5), offset=3.0, requires_grad=True)
        plan = tiling.make_plan(x.detach(), strides_ncs(x))
        groups = -(-plan.splits // plan.group)
        assert groups > 2 and plan.splits % plan.group, (plan.splits, plan.group)
        weight, bias, running_mean, running_var = make_params(2)
        x64 = x.detach().double().requires_grad_()
        y64, rm64, rv64 = float64_bn_act(x64, running_mean, running_var, weight, bias, True,
                                         0.1, 1e-5, "relu")
        y = tritonbn.bn_act(x, running_mean, running_var, weight, bias, True)
        assert max_err(y, y64) < 2e-5
        assert max_err(running_mean, rm64) < 1e-6 and max_err(running_var, rv64) < 1e-6
        dy = torch.randn_like(y)
        dx, = torch.autograd.grad(y, x, dy)
        dx64, = torch.autograd.grad(y64, x64, dy.double())
        assert max_err(dx, dx64) < 2e-5
    finally:
        tiling._plan.cache_clear()


def test_a_grown_workspace_keeps_the_buffers_it_replaced():
    """A CUDA graph captured with a scratch buffer writes to it at every replay: growing the
    workspace for a larger shape must not free it, and growth doubles so that few pile up."""
    counters, partials = merge.workspace(DEVICE, 10, 3000, torch.float64)
    grown_counters, grown_partials = merge.workspace(DEVICE, 10, partials.numel() + 1,
                                                     torch.float64)
    assert grown_counters is counters  # big enough already
    assert grown_partials.numel() == 2 * partials.numel()
    assert any(buffer is partials for buffer in merge._replaced)


def test_cumulative_momentum_counts_on_the_device():
    """momentum=None: the count and 1 / count both live on the device, over several steps."""
    ours = tritonbn.BatchNormAct2d(4, momentum=None, device=DEVICE)
    theirs = torch.nn.BatchNorm2d(4, momentum=None, device=DEVICE)
    for _ in range(5):
        x = make_input((3, 4, 2, 5), offset=1.0, scale=2.0)
        assert max_err(ours(x), torch.relu(theirs(x))) < 2e-5
    assert ours.num_batches_tracked.item() == theirs.num_batches_tracked.item() == 5
    assert max_err(ours.running_mean, theirs.running_mean) < 1e-6
    assert max_err(ours.running_var, theirs.running_var) < 1e-6


def training_step(m, x, dy):
    y = m(x)
    return (y, *torch.autograd.grad(y, (x, m.weight, m.bias), dy))


@gpu_only
def test_cuda_graph_replays_match_eager():
    x = make_input((8, 32, 7, 7), layout="channels_last", requires_grad=True)
    dy = torch.randn_like(x)
    captured = tritonbn.BatchNormAct2d(32, device=DEVICE)
    eager = tritonbn.BatchNormAct2d(32, device=DEVICE)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        training_step(captured, x, dy)  # compile and allocate outside the capture
    torch.cuda.current_stream().wait_stream(side)
    captured.load_state_dict(eager.state_dict())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = training_step(captured, x, dy)
    captured.load_state_dict(eager.state_dict())  # the capture ran no kernels
    for _ in range(3):
        graph.replay()
        expected = training_step(eager, x, dy)
        for got, want in zip(outputs, expected):
            assert torch.equal(got, want)
        for name, buffer in eager.named_buffers():
            assert torch.equal(captured.get_buffer(name), buffer), name


@gpu_only
def test_two_streams_at_once_match_sequential_calls():
    shapes = [(16, 64, 14, 14), (32, 24, 9, 9)]
    inputs = [(make_input(s, layout="channels_last", requires_grad=True),
               make_input(s, layout="channels_last")) for s in shapes]
    modules = [tritonbn.BatchNormAct2d(s[1], device=DEVICE) for s in shapes]
    twins = [tritonbn.BatchNormAct2d(s[1], device=DEVICE) for s in shapes]
    expected = [training_step(m, x, dy) for m, (x, dy) in zip(twins, inputs)]
    streams = [torch.cuda.Stream() for _ in shapes]
    results = [None] * len(shapes)
    for _ in range(3):  # both streams in flight together, each with its own counters
        for i, (m, (x, dy), stream) in enumerate(zip(modules, inputs, streams)):
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                results[i] = training_step(m, x, dy)
        torch.cuda.synchronize()
        for got, want in zip(results, expected):
            for a, b in zip(got, want):
                assert torch.equal(a, b)
        expected = [training_step(m, x, dy) for m, (x, dy) in zip(twins, inputs)]


@gpu_only
def test_no_host_sync_in_a_training_step():
    m = tritonbn.BatchNormAct2d(16, momentum=None, device=DEVICE)
    x = make_input((4, 16, 5, 5), layout="channels_last", requires_grad=True)
    dy = torch.randn_like(x)
    training_step(m, x, dy)  # compile first: Triton's first launch may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            training_step(m, x, dy)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert m.num_batches_tracked.item() == 4
