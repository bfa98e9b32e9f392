"""PyTorch's own test inputs for nn.BatchNorm1d/2d/3d (module_db in
torch.testing._internal.common_modules) run through BatchNormAct1d/2d/3d: for every activation,
float32 and float64, train and eval, the output, the gradients of the input and of every
parameter, and every buffer must match F.<activation>(nn.BatchNorm*d(x)). The same
computation in another order: float64 to assert_close's tolerances, float32 within twice eager's
own error against the float64 computation.

Only the identity cases run in the quick loop (`-m "not slow"`): they are the drop-in check.
"""
import copy
import json
import subprocess
import sys

import pytest
import torch
from torch import nn

import tritonbn
from conftest import DEVICE, EAGER_ACTIVATIONS, max_err

OURS = {nn.BatchNorm1d: tritonbn.BatchNormAct1d, nn.BatchNorm2d: tritonbn.BatchNormAct2d,
        nn.BatchNorm3d: tritonbn.BatchNormAct3d}
# Lists the inputs in another process: importing torch.testing._internal freezes
# torch.backends' flags and patches torch.jit for the rest of the process it runs in.
LIST_INPUTS = """
import json
import torch
from torch.testing._internal.common_modules import module_db
names = ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d")
rows = []
for info in module_db:
    if info.module_cls.__name__ not in names:
        continue
    listed = {}
    for training in (True, False):
        samples = info.module_inputs_func(info, device="meta", dtype=torch.float32,
                                          requires_grad=False, training=training)
        listed[training] = [dict(module=info.module_cls.__name__, desc=s.desc,
                                 args=s.constructor_input.args,
                                 kwargs=s.constructor_input.kwargs,
                                 shapes=[list(t.shape) for t in s.forward_input.args],
                                 forward_kwargs=s.forward_input.kwargs) for s in samples]
    assert listed[True] == listed[False], "inputs that depend on the mode"
    rows += listed[True]
assert sorted({row["module"] for row in rows}) == list(names), "module_db lost a BatchNorm"
print(json.dumps(rows))
"""


def module_db_inputs() -> list:
    """module_db's inputs for BatchNorm1d/2d/3d: constructor arguments and input shapes."""
    done = subprocess.run([sys.executable, "-c", LIST_INPUTS], capture_output=True, text=True,
                          check=False, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def cases():
    return [pytest.param(row, id=f"{row['module']}-{row['desc'] or 'default'}")
            for row in module_db_inputs()]


def activations():
    return [pytest.param(name, marks=() if name == "identity" else pytest.mark.slow)
            for name in tritonbn.SUPPORTED_ACTIVATIONS]


def randomise(module: nn.Module) -> None:
    """Parameters and running statistics away from their initial ones and zero."""
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if name == "num_batches_tracked":  # momentum=None averages over it
                tensor.fill_(int(torch.randint(1, 5, ())))
            elif name in ("weight", "running_var"):
                tensor.copy_(torch.rand_like(tensor) + 0.5)
            else:
                tensor.copy_(torch.randn_like(tensor))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("activation", activations())
@pytest.mark.parametrize("row", cases())
def test_matches_pytorch_on_its_own_inputs(row, activation, dtype, training):
    module_cls = getattr(nn, row["module"])
    theirs = module_cls(*row["args"], **row["kwargs"], device=DEVICE, dtype=dtype)
    ours = OURS[module_cls](*row["args"], **row["kwargs"], activation=activation, device=DEVICE,
                            dtype=dtype)
    randomise(theirs)
    ours.load_state_dict(theirs.state_dict())
    theirs.train(training)
    ours.train(training)
    assert len(row["shapes"]) == 1 and not row["forward_kwargs"]
    # As module_db makes them: uniform in [-9, 9].
    x = torch.testing.make_tensor(row["shapes"][0], device=DEVICE, dtype=dtype,
                                  requires_grad=True)

    # The float64 computation of the same module on the same input judges both orders of
    # summation: ours may differ from eager float32 by twice eager's own error against it, plus
    # a few ulps of the tensor's scale (tanh and mish are built from exp and log in the kernels,
    # a few ulps from libm's). float64 is compared to its own rounding.
    reference = copy.deepcopy(theirs).double()
    x64 = x.detach().double().requires_grad_()
    expected = EAGER_ACTIVATIONS[activation](theirs(x))
    exact = EAGER_ACTIVATIONS[activation](reference(x64))
    got = ours(x)

    def assert_agrees(name, ours_value, eager_value, exact_value):
        if dtype == torch.float64 or exact_value.numel() == 0:
            torch.testing.assert_close(ours_value, eager_value, msg=lambda m: f"{name}: {m}")
            return
        # A parameter's gradient sums the channel's elements: in another order its rounding
        # differs by about sqrt(elements) ulps of their scale, however small the sum ends up.
        terms = x.numel() // x.shape[1] if name in ("weight", "bias") else 1
        ulps = 4 * torch.finfo(dtype).eps * (exact_value.abs().max().item() + 1) * terms ** 0.5
        assert max_err(ours_value, exact_value) <= 2 * max_err(eager_value, exact_value) + ulps, \
            name

    assert_agrees("output", got, expected, exact)
    dy = torch.randn_like(expected)
    leaves = {"input": (x, x, x64)}
    for name, param in ours.named_parameters():
        leaves[name] = (param, theirs.get_parameter(name), reference.get_parameter(name))
    mine, eagers, exacts = zip(*leaves.values())
    grads = torch.autograd.grad(got, mine, dy, allow_unused=True)
    expected_grads = torch.autograd.grad(expected, eagers, dy, allow_unused=True)
    exact_grads = torch.autograd.grad(exact, exacts, dy.double(), allow_unused=True)
    for name, grad, expected_grad, exact_grad in zip(leaves, grads, expected_grads, exact_grads,
                                                     strict=True):
        if expected_grad is None:
            assert grad is None, name
        else:
            assert_agrees(name, grad, expected_grad, exact_grad)

    buffers = dict(ours.named_buffers())
    assert buffers.keys() == dict(theirs.named_buffers()).keys()
    for name, expected_buffer in theirs.named_buffers():
        torch.testing.assert_close(buffers[name], expected_buffer, msg=lambda m: f"{name}: {m}")
