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


def table_rows(text: str) -> list[list[str]]:
    """The cells of a markdown table's rows, the header and the rule left out."""
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")]
            for line in text.splitlines() if line.startswith("|")]
    return rows[2:]


def step_results(summary: str) -> dict:
    return {cells[0]: cells[2] for cells in table_rows(section(summary, "Steps"))}


def key_figures(summary: str) -> dict:
    return dict(table_rows(section(summary, "Key figures")))


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
    for what, step, passed, failed, *_ in table_rows(section(summary, "Tests")):
        assert step == "ok" and int(passed) > 0 and int(failed) == 0, what
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
    figures = key_figures(summary)
    assert figures and all(value == MISSING for value in figures.values())


def test_tests_cut_off_by_their_cap_say_so(tmp_path):
    """JUnit written at the interrupt counts only what finished: the figure says the step
    timed out, so that 0 failed never reads as a pass."""
    (tmp_path / "plan.tsv").write_text("name\twhat\tcap\ngpu_tests\ttests\t90\n")
    (tmp_path / "steps.tsv").write_text("name\trc\tseconds\tcap\ngpu_tests\t124\t99\t90\n")
    (tmp_path / "gpu_tests.xml").write_text(
        '<testsuites><testsuite><testcase classname="tests.test_gpu" name="test_a"/>'
        '<testcase classname="tests.test_gpu" name="test_b"><failure/></testcase>'
        '<testcase classname="tests.test_gpu" name="test_c"><skipped/></testcase>'
        '</testsuite></testsuites>')
    summary = summarize_module().summary(tmp_path)
    assert key_figures(summary)["GPU-first tests: failed / run"] == (
        "1 / 2 (timed out at its cap)")
    assert table_rows(section(summary, "Tests"))[0] == [
        "GPU-first tests", "timed out at its cap", "1", "1", "1", "`tests.test_gpu::test_b`"]


def test_gpu_figures_from_made_up_steps(tmp_path):
    """The summary's GPU-only paths, on made-up step output with known ratios."""
    (tmp_path / "environment.log").write_text("device: NVIDIA H100 80GB HBM3\n"
                                              "UserWarning: not an entry\ntorch: 2.11.0\n")
    case = {"dtype": "bf16", "layout": "channels_last", "activation": "relu", "residual": False,
            "interpreter": False, "pct_copy_bw": 80.0, "max_abs_err": 0.0,
            "max_abs_err_dx": 0.0, "error": None}
    # (ms_p50, gpu_ms) per provider: tritonbn 2x faster than the best peer on GPU time in one
    # shape, 0.5x in the other.
    times = {"8x4x2x2": {"tritonbn": (1.0, 0.25), "eager": (2.0, 1.0), "compile": (3.0, 0.5)},
             "8x4x4x4": {"tritonbn": (4.0, 2.0), "eager": (2.0, 1.5), "compile": (5.0, 1.0)}}
    pd.DataFrame([{**case, "shape": shape, "mode": "train_fwdbwd", "provider": provider,
                   "ms_p50": wall, "gpu_ms": gpu}
                  for shape, by_provider in times.items()
                  for provider, (wall, gpu) in by_provider.items()]).to_csv(
        tmp_path / "headline.csv", index=False)
    pd.DataFrame([{"part": "layer", "provider": provider, "mode": "train_fwdbwd",
                   "shape": "32x64x56x56", "us": us, "stubbed": False}
                  for provider, us in (("tritonbn", 300.0), ("eager", 200.0),
                                       ("tritonbn_compile", 100.0), ("compile", 400.0))]
                 ).to_csv(tmp_path / "host.csv", index=False)
    (tmp_path / "headline.log").write_text("0%| |\r--max-seconds reached: 2 of 26 cases run\n")
    (tmp_path / "resnet").mkdir()
    pd.DataFrame([{"batch_size": 128, "variant": variant, "ms_per_step": ms,
                   "images_per_s": 128e3 / ms, "bn_act_share": 0.5, "interpreter": False,
                   "model": "resnet50"}
                  for variant, ms in (("eager", 40.0), ("converted", 50.0),
                                      ("cudagraphs", 32.0), ("cudagraphs_converted", 30.0))]
                 ).to_csv(tmp_path / "resnet" / "resnet50_h100.csv", index=False)

    summary = summarize_module().summary(tmp_path)
    assert "No GPU" not in summary and "UserWarning" not in summary
    figures = key_figures(summary)
    assert figures["headline gpu_ms speedup vs best peer, geomean"] == "1.00x over 2 of 2 cases"
    assert figures["headline gpu_ms speedup vs best peer, worst"] == (
        "0.50x (8x4x4x4 bf16 channels_last train_fwdbwd)")
    assert figures["headline wall time speedup vs best peer, geomean"] == (
        "1.00x over 2 of 2 cases")
    assert figures["host time per layer, tritonbn / eager, train_fwdbwd"] == "1.50"
    assert figures["host time per layer, tritonbn_compile / compile, train_fwdbwd"] == "0.25"
    assert figures["ResNet-50 bs128 converted vs eager (speedup)"] == "0.80x"
    assert figures["ResNet-50 bs128 cudagraphs_converted vs cudagraphs (speedup)"] == "1.07x"
    assert figures["ResNet-50 bs128 compile_converted vs compile (speedup)"] == MISSING
    headline = section(summary, "Headline: BN + ReLU on the ResNet-50 shapes")
    assert "| bf16 channels_last | train_fwdbwd | 2 | 1.00x |" in headline
    assert "--max-seconds reached: 2 of 26 cases run" in headline
