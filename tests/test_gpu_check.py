"""perf/gpu_check.sh, the one-call GPU check, rehearsed without a GPU, and the summary it
writes, so that a typo or a missing argument fails here rather than on a GPU machine."""
import importlib
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pandas as pd
import pytest
from conftest import ON_GPU

PERF = Path(__file__).resolve().parents[1] / "perf"
STEPS = ("install", "environment", "gpu_tests", "suite", "headline", "host", "resnet")
SECTIONS = ("Steps", "Environment", "Tests", "Headline: BN + ReLU on the ResNet-50 shapes",
            "Host time per layer", "ResNet-50 training step", "Key figures")
MISSING = "did not run / failed"


def summarize_module():
    sys.path.insert(0, str(PERF))
    try:
        return importlib.import_module("summarize")
    finally:
        sys.path.remove(str(PERF))


def section(summary: str, title: str) -> str:
    return summary.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def step_results(summary: str) -> dict:
    rows = [line.split(" | ") for line in section(summary, "Steps").splitlines()
            if line.startswith("| ") and not line.startswith("| step ")]
    return {cells[0].removeprefix("| "): cells[2] for cells in rows}


@pytest.mark.slow
@pytest.mark.skipif(ON_GPU, reason="on a GPU the script is the check itself, minutes long")
def test_the_rehearsal_runs_every_step(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run(["bash", str(PERF / "gpu_check.sh"), str(out)], check=False,
                          capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, PYTHON=sys.executable))
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    files = sorted(path.name for path in out.iterdir())
    assert len(files) <= 8
    assert files == ["environment.txt", "gpu_check.tar.gz", "headline.csv", "host.csv",
                     "resnet.csv", "summary.md"]
    summary = (out / "summary.md").read_text()
    assert "No GPU: a rehearsal" in summary
    for title in SECTIONS:
        assert f"## {title}\n" in summary
    assert step_results(summary) == {step: "ok" for step in STEPS}
    assert "| GPU-first tests | 1 | 0 |" in section(summary, "Tests")
    for csv in ("headline.csv", "host.csv", "resnet.csv"):
        assert pd.read_csv(out / csv).shape[0] > 0
    with tarfile.open(out / "gpu_check.tar.gz") as archive:
        names = {Path(name).name for name in archive.getnames()}
    assert {f"{step}.log" for step in STEPS} | {"gpu_tests.xml", "suite.xml"} <= names


def test_missing_output_shows_as_missing(tmp_path):
    """Nothing ran but the install, then the environment step timed out: every section says
    so and no figure appears."""
    (tmp_path / "plan.tsv").write_text("name\twhat\tcap\n" + "".join(
        f"{step}\t{step} step\t60\n" for step in STEPS))
    (tmp_path / "steps.tsv").write_text("name\trc\tseconds\tcap\ninstall\t0\t3\t60\n"
                                        "environment\t124\t45\t45\n")
    summary = summarize_module().summary(tmp_path)
    assert step_results(summary) == {"install": "ok", "environment": "timed out at its cap",
                                     **{step: MISSING for step in STEPS[2:]}}
    for title in SECTIONS[1:]:
        assert MISSING in section(summary, title), title
    figures = [line.rsplit(" | ", 1)[1] for line in section(summary, "Key figures").splitlines()
               if line.startswith("| ") and not line.startswith("| figure")]
    assert figures and all(value == f"{MISSING} |" for value in figures)
