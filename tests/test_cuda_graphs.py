"""GPU-only: whole training steps captured in CUDA graphs, by torch.compile's
mode="reduce-overhead" and by torch.cuda.make_graphed_callables, match the same steps run
eagerly. Skipped without a CUDA device."""
import copy

import torch
from torch._dynamo.utils import counters

from conftest import DEVICE, gpu_only, make_input
from test_registration import ConvNet

pytestmark = gpu_only
STEPS = 3


def assert_same_step(graphed_model, eager_model, outputs, grads, x, dy):
    """One eager step of eager_model against the captured step's outputs and gradients."""
    y = eager_model(x)
    expected = torch.autograd.grad(y, [x, *eager_model.parameters()], dy)
    torch.testing.assert_close(outputs, y, atol=1e-5, rtol=1e-5)
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    for (name, got), (_, want) in zip(graphed_model.named_buffers(),
                                      eager_model.named_buffers(), strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5, msg=name)


def test_reduce_overhead_captures_the_whole_step():
    """Inductor's CUDA graph trees take the compiled training step: no op in it (our ops'
    running-statistics mutation included) makes Inductor skip the capture."""
    eager = ConvNet().to(DEVICE).to(memory_format=torch.channels_last)
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    counters.clear()
    for _ in range(STEPS):
        torch.compiler.cudagraph_mark_step_begin()
        x = make_input((4, 3, 8, 8), layout="channels_last", requires_grad=True)
        y = compiled(x)
        dy = torch.randn_like(y)
        grads = torch.autograd.grad(y, [x, *model.parameters()], dy)
        outputs = y.clone()  # the next replay writes over the graph's output
        assert_same_step(model, eager, outputs, [g.clone() for g in grads], x, dy)
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    assert int(model.bn1.num_batches_tracked) == STEPS


def test_make_graphed_callables_replays_eager_steps():
    eager = ConvNet().to(DEVICE).to(memory_format=torch.channels_last)
    model = copy.deepcopy(eager)
    sample = make_input((4, 3, 8, 8), layout="channels_last", requires_grad=True)
    # Capture runs warm-up steps, which update the running statistics: start both from there.
    graphed = torch.cuda.make_graphed_callables(model, (sample,))
    eager.load_state_dict(model.state_dict())
    for _ in range(STEPS):
        x = make_input((4, 3, 8, 8), layout="channels_last", requires_grad=True)
        y = graphed(x)
        dy = torch.randn_like(y)
        grads = torch.autograd.grad(y, [x, *model.parameters()], dy)
        assert_same_step(model, eager, y.clone(), [g.clone() for g in grads], x, dy)
