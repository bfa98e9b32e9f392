"""The kernels compile for every GPU generation we name, offline, and the code ptxas makes for
an H100 keeps the widths and register use that perf/static_h100.csv records.

Triton's interpreter runs the kernels' Python, not Triton's compiler, so code it accepts can
still fail to compile. perf/offline_compile.py drives the real launchers on CPU tensors in a
subprocess without the interpreter and compiles each launch for the target GPUs instead of
running it: every variant the launchers ask for for sm_90 (H100), a representative subset for
sm_80 (A100), sm_89 (L4, L40), sm_100 (B200), gfx90a (MI200) and gfx942 (MI300). No GPU, CUDA
toolkit or ROCm is needed. It fails on the approximate float32 instructions `/` and tl.exp would
give (div.full, ex2.approx without libdevice's ftz form; exp2 or fast-math division on AMD):
the kernels divide and exponentiate as eager does.

perf/static_gpu.py --check compiles the ResNet-50 layers of the static table for sm_90 and
fails on a spill the table does not record, or on a load or store of x, dy, y, dx or a residual
narrower than the table records.
"""
import ast
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

PERF = Path(__file__).resolve().parents[1] / "perf"
pytestmark = pytest.mark.slow
offline = pytest.mark.skipif(torch.cuda.is_available(),
                             reason="a GPU compiles the kernels in its tests")


def run_script(*args) -> str:
    done = subprocess.run([sys.executable, *args], env={**os.environ, "TRITON_INTERPRET": "0"},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr[-5000:]
    return done.stdout


@offline
def test_every_kernel_variant_compiles_for_sm90():
    assert "sm_90: compiled" in run_script(PERF / "offline_compile.py", "--targets", "sm_90")


@offline
def test_kernels_compile_for_every_other_target():
    out = run_script(PERF / "offline_compile.py", "--targets", "sm_80,sm_89,sm_100,gfx90a,gfx942")
    for target in ("sm_80", "sm_89", "sm_100", "gfx90a", "gfx942"):
        assert f"{target}: compiled" in out


@offline
def test_static_table_holds_for_sm90():
    """A subset of the table's layers: C = 64 and 2048 (the narrowest and widest channel
    tiles of bf16 channels_last), H*W = 3136 and 49 (float32 rows that are and are not a
    multiple of 16 bytes long)."""
    out = run_script(PERF / "static_gpu.py", "--check", PERF / "static_h100.csv", "--shapes",
                     "64x56x56,2048x7x7")
    assert "launches hold the widths and spills" in out


def test_static_check_fails_on_a_spill_or_a_narrower_access(monkeypatch):
    monkeypatch.syspath_prepend(str(PERF))
    static_gpu = importlib.import_module("static_gpu")
    committed = [dict(shape="128x64x56x56", dtype="bfloat16", layout="channels_last",
                      residual="False", kernel="dx_kernel", spill_bytes="0",
                      loads="dy:128 x:128", stores="dx:128", **{"pass": "train_bwd"})]
    assert static_gpu.regressions(committed, committed) == []
    for change, problem in (({"spill_bytes": "8"}, "spill_bytes 0 -> 8"),
                            ({"loads": "dy:128 x:64"}, "loads of x 128 bits -> 64 bits"),
                            ({"stores": ""}, "stores of dx 128 bits -> none")):
        [found] = static_gpu.regressions(committed, [{**committed[0], **change}])
        assert found.endswith(problem)
    assert static_gpu.regressions(committed, []) == []  # a layer the check did not compile


def test_static_table_covers_resnet50():
    """perf/static_gpu.py's RESNET50_CHW are the distinct inputs of torchvision's resnet50's
    BatchNorm2d layers."""
    torchvision = pytest.importorskip("torchvision")
    module = ast.parse((PERF / "static_gpu.py").read_text())
    listed = next(ast.literal_eval(node.value) for node in module.body
                  if isinstance(node, ast.Assign) and node.targets[0].id == "RESNET50_CHW")
    seen = set()
    model = torchvision.models.resnet50().to("meta")
    for layer in model.modules():
        if isinstance(layer, torch.nn.BatchNorm2d):
            layer.register_forward_pre_hook(lambda _, args: seen.add(tuple(args[0].shape[1:])))
    model(torch.empty(1, 3, 224, 224, device="meta"))
    assert sorted(listed) == sorted(seen)
