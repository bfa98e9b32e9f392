"""The installed wheel, used from outside the source tree: run by .ci/run in a virtual
environment holding only the wheel (torch and the rest come from CI's environment)."""
import importlib.metadata
import os
import sys
from pathlib import Path

import torch

import tritonbn

source_tree = Path(sys.argv[1]).resolve()
installed = Path(tritonbn.__file__).resolve()
assert source_tree not in installed.parents, f"tritonbn imported from the source: {installed}"
assert (installed.parent / "kernels" / "forward.py").is_file(), "no kernels in the wheel"
assert tritonbn.__version__ == importlib.metadata.version("tritonbn"), tritonbn.__version__
interpreting = os.environ.get("TRITON_INTERPRET") == "1"
x = torch.randn(4, 6, 5, 3).to(memory_format=torch.channels_last).requires_grad_()
assert tritonbn.backend_for(x) == ("interpreter" if interpreting else "reference")

torch.manual_seed(0)
ours = tritonbn.BatchNormAct2d(6)
theirs = torch.nn.Sequential(torch.nn.BatchNorm2d(6), torch.nn.ReLU())
y, y_ref = ours(x), theirs(x)
torch.testing.assert_close(y, y_ref)
dy = torch.randn_like(y)
got = torch.autograd.grad(y, (x, ours.weight, ours.bias), dy)
expected = torch.autograd.grad(y_ref, (x, theirs[0].weight, theirs[0].bias), dy)
for g, e in zip(got, expected, strict=True):
    torch.testing.assert_close(g, e)
torch.testing.assert_close(ours.running_mean, theirs[0].running_mean)
torch.testing.assert_close(ours.running_var, theirs[0].running_var)

model = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3, bias=False), torch.nn.BatchNorm2d(6),
                            torch.nn.ReLU(), torch.nn.Conv2d(6, 4, 1)).eval()
fused = tritonbn.fuse_bn_act(model)
assert [(pair.bn, pair.activation) for pair in fused.fused_pairs] == [("1", "2")]
images = torch.randn(2, 3, 8, 8)
torch.testing.assert_close(fused(images), model(images))
print(f"tritonbn {tritonbn.__version__} from {installed.parent}: "
      f"{tritonbn.backend_for(x)} path ok")
