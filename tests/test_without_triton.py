"""Where Triton has no wheel, tritonbn still imports and runs CPU tensors on the reference."""
import os
import subprocess
import sys

SCRIPT = """
import sys
sys.modules["triton"] = None  # hidden: `import triton` now raises ImportError
import torch
import tritonbn
from tritonbn import dispatch
# Only the Triton-free modules of the kernels' package are imported.
assert not dispatch.HAS_TRITON
assert {name for name in sys.modules if name.startswith("tritonbn.kernels.")} == {
    "tritonbn.kernels.activation_codes", "tritonbn.kernels.dtypes", "tritonbn.kernels.layout"}
assert not hasattr(tritonbn.kernels, "batch_stats") and "batch_stats" in dir(tritonbn.kernels)
torch.manual_seed(0)
ours = tritonbn.BatchNormAct2d(3, activation="silu")
theirs = torch.nn.Sequential(torch.nn.BatchNorm2d(3), torch.nn.SiLU())
x = torch.randn(4, 3, 5, 5, requires_grad=True)
y, y_ref = ours(x), theirs(x)
torch.testing.assert_close(y, y_ref)
dy = torch.randn_like(y)
got = torch.autograd.grad(y, (x, ours.weight, ours.bias), dy)
expected = torch.autograd.grad(y_ref, (x, theirs[0].weight, theirs[0].bias), dy)
for g, e in zip(got, expected):
    torch.testing.assert_close(g, e)
torch.testing.assert_close(ours.running_var, theirs[0].running_var)
dispatch.runs_triton = lambda x: True  # as for a CUDA tensor, which this machine may not have
try:
    dispatch.backend(x)
except RuntimeError as error:
    assert "pip install triton" in str(error), error
else:
    raise AssertionError("a tensor for the kernels must ask for the missing package")
print("ok")
"""


def test_import_and_train_with_triton_hidden():
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                            timeout=300, env={**os.environ, "TRITON_INTERPRET": "1"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
