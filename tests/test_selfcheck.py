"""tritonbn.check() / python -m tritonbn: it says which path runs, passes where tritonbn is
right, and fails (exit status 1) where a case is wrong or raises. .ci/run runs
`python -m tritonbn` itself from the installed wheel, on the reference path and the
interpreter."""
import io
import sys

import pytest
import torch

import tritonbn
from tritonbn import dispatch, environment, reference, selfcheck
from conftest import ON_GPU


def run_check(**kwargs) -> tuple[bool, str]:
    out = io.StringIO()
    passed = tritonbn.check(speed_test=False, out=out, **kwargs)
    return passed, out.getvalue()


@pytest.mark.slow
def test_every_case_passes_on_the_kernels():
    passed, text = run_check()
    assert passed, text
    cases = len(selfcheck.CASES) + (len(selfcheck.GPU_CASES) if ON_GPU else 0)
    assert f"{cases}/{cases} cases passed" in text and "FAIL" not in text
    assert ("kernels" if ON_GPU else "tensors run on: interpreter") in text
    assert f"torch          {torch.__version__}" in text


def test_a_wrong_result_fails_its_case(monkeypatch):
    """Off by 1e-3 of the output, which float16 tolerates and float32 does not; a case that
    raises fails too."""
    def off(*args):
        if args[0].shape == (7, 3):
            raise RuntimeError("no kernel for this")
        return selfcheck._eager(*args) * (1 + 1e-3)
    monkeypatch.setattr(selfcheck, "bn_act", off)
    passed, text = run_check(device="cpu")
    assert not passed
    lines = [line for line in text.splitlines() if line.startswith("  ok") or "FAIL" in line]
    assert [line.split()[2] for line in lines if line.startswith("  ok")] == ["float16"]
    assert "RuntimeError: no kernel for this" in text
    assert f"1/{len(selfcheck.CASES)} cases passed ({len(selfcheck.CASES) - 1} FAILED)" in text
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    assert selfcheck.main(["--device", "cpu"]) == 1


def test_backend_for_names_the_path(monkeypatch):
    x = torch.randn(2, 3)
    assert tritonbn.backend_for(x) == ("interpreter" if dispatch.INTERPRETING else "reference")
    monkeypatch.setattr(dispatch, "backend", lambda t: reference)
    assert tritonbn.backend_for(x) == "reference"
    _, text = run_check(device="cpu")
    assert "cpu tensors run on: reference" in text


def test_versions_below_the_supported_ranges_are_named(monkeypatch):
    assert environment.release("2.13.0+cu130") == (2, 13, 0)
    assert environment.release("3.10.0rc1") == (3, 10, 0)
    assert not environment.unsupported_versions()  # what the tests run on is supported
    found = {**environment.versions(), "torch": "2.7.1+cu126"}
    monkeypatch.setattr(environment, "versions", lambda: found)
    assert environment.unsupported_versions() == [
        "torch 2.7.1+cu126 is older than the 2.8 tritonbn needs"]
