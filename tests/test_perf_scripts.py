"""perf/sweep.py and perf/plot.py end to end on one tiny shape: sweep -> CSV -> PNGs.

The sweep runs where the tests run: through Triton's interpreter without a GPU, natively with one.
"""
import importlib
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import ON_GPU

PERF = Path(__file__).resolve().parents[1] / "perf"
COLUMNS = ["shape", "dtype", "layout", "activation", "residual", "mode", "provider", "ms_p20",
           "ms_p50", "ms_p80", "gbps_floor", "gbps_model", "pct_copy_bw", "speedup_vs_eager",
           "speedup_vs_compile", "gpu_ms", "gpu_speedup_vs_eager", "gpu_speedup_vs_compile",
           "max_abs_err", "max_abs_err_dx", "host_us", "gpu", "torch", "triton", "date",
           "interpreter"]


def perf_module(name: str):
    sys.path.insert(0, str(PERF))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(PERF))


def run_script(name: str, *args: str) -> str:
    done = subprocess.run([sys.executable, str(PERF / name), *args], check=False,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.mark.slow
def test_sweep_writes_rows_that_plot_reads(tmp_path):
    """One shape, with and without a residual (the first shape also runs the residual case)."""
    csv = tmp_path / "sweep.csv"
    run_script("sweep.py", "--tiny", "--shapes", "2x3x4x4", "--dtypes", "fp32",
               "--layouts", "contiguous", "--activations", "relu", "--modes", "train_fwdbwd",
               "--providers", "tritonbn,eager", "--out", str(csv))

    df = pd.read_csv(csv)
    assert set(COLUMNS) <= set(df.columns)
    assert sorted(zip(df.residual, df.provider)) == [(False, "eager"), (False, "tritonbn"),
                                                     (True, "eager"), (True, "tritonbn")]
    assert df.error.isna().all(), df.error.tolist()
    assert (df.ms_p20 <= df.ms_p50).all() and (df.ms_p50 <= df.ms_p80).all()
    tritonbn = df[df.provider == "tritonbn"]
    assert (tritonbn.max_abs_err < 1e-4).all() and (tritonbn.max_abs_err_dx < 1e-4).all()
    gpu_only = ["copy_gbps", "gbps_floor", "gbps_model", "pct_copy_bw", "speedup_vs_eager",
                "gpu_ms", "gpu_speedup_vs_eager"]
    if ON_GPU:
        assert (df.gbps_model > df.gbps_floor).all()
        # 11 passes against 8 with a residual, on the same tensor size.
        gbps_per_ms = (df.gbps_model * df.ms_p50).groupby(df.residual).first()
        assert gbps_per_ms[True] / gbps_per_ms[False] == pytest.approx(11 / 8)
        # CUDA-graph replays: GPU time only, so never more than the wall time around it.
        assert (df.gpu_ms > 0).all() and (df.gpu_ms < df.ms_p80).all()
        assert (tritonbn[[c for c in gpu_only if "speedup" in c]] > 0).all().all()
    else:  # the interpreter's times say nothing of bandwidth or speedups
        assert df[gpu_only].isna().all().all()

    out = run_script("plot.py", str(csv))
    for png in ("sweep-speedup.png", "sweep-copy-bw.png"):
        assert (tmp_path / png).exists() == ON_GPU
    assert "| 2x3x4x4 | fp32 | contiguous | relu | False | train_fwdbwd |" in out
    assert "| 2x3x4x4 | fp32 | contiguous | relu | True | train_fwdbwd |" in out
    for column in ("gpu_speedup_vs_best_peer", "pct_copy_bw", "speedup_vs_best_peer"):
        assert (column in out) == ON_GPU


def test_sweep_never_overwrites_more_rows(tmp_path):
    """A results file that holds more rows than a run stays as it was; the run's rows go
    beside it, and replace it once the run has as many."""
    ResultsCsv = perf_module("results_csv").ResultsCsv
    path = tmp_path / "h100.csv"
    pd.DataFrame({"row": range(3)}).to_csv(path, index=False)
    results = ResultsCsv(path)
    assert results.write(pd.DataFrame({"row": range(2)})) == tmp_path / "h100.partial.csv"
    assert len(pd.read_csv(path)) == 3
    assert results.write(pd.DataFrame({"row": range(4)})) == path
    assert len(pd.read_csv(path)) == 4 and not (tmp_path / "h100.partial.csv").exists()


def test_plot_puts_gpu_speedups_beside_wall_speedups(tmp_path):
    """plot.py on a made-up two-case sweep with GPU times: the speedup over the faster peer,
    on each clock, in the table and the figure."""
    plot = perf_module("plot")
    case = {"dtype": "bf16", "layout": "channels_last", "activation": "relu",
            "mode": "train_fwdbwd", "pct_copy_bw": 50.0, "max_abs_err": 0.0,
            "max_abs_err_dx": 0.0, "gpu": "test", "copy_gbps": 1.0, "interpreter": False}
    times = {"eager": (1.0, 0.8), "compile": (2.0, 0.4), "tritonbn": (0.5, 0.2)}
    df = pd.DataFrame([{**case, "shape": shape, "provider": provider, "ms_p50": wall * scale,
                        "gpu_ms": gpu * scale}
                       for shape, scale in (("8x4x2x2", 1.0), ("8x4x4x4", 3.0))
                       for provider, (wall, gpu) in times.items()])
    table = plot.p50_by_provider(df)
    assert table["speedup_vs_best_peer"].tolist() == [2.0, 2.0]  # eager's wall time
    assert table["gpu_speedup_vs_best_peer"].tolist() == [2.0, 2.0]  # compile's GPU time
    assert ("| 8x4x4x4 | bf16 | channels_last | relu | False | train_fwdbwd |"
            in plot.summary_table(df))  # a sweep from before residual rows: none had one
    for draw in (plot.plot_speedup, plot.plot_copy_bandwidth):
        draw(df, tmp_path / "figure.png")
        assert (tmp_path / "figure.png").stat().st_size > 0
        (tmp_path / "figure.png").unlink()
    assert not plot.has_gpu_times(df.assign(gpu_ms=float("nan")))
