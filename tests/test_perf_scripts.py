"""perf/sweep.py and perf/plot.py end to end on one tiny shape: sweep -> CSV -> PNGs.

The sweep runs where the tests run: through Triton's interpreter without a GPU, natively with one.
"""
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

PERF = Path(__file__).resolve().parents[1] / "perf"
COLUMNS = ["shape", "dtype", "layout", "activation", "mode", "provider", "ms_p20", "ms_p50",
           "ms_p80", "gbps_floor", "gbps_model", "pct_copy_bw", "speedup_vs_eager",
           "speedup_vs_compile", "max_abs_err", "max_abs_err_dx", "host_us", "gpu", "torch",
           "triton", "date", "interpreter"]


def run_script(name: str, *args: str) -> str:
    done = subprocess.run([sys.executable, str(PERF / name), *args], check=False,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.mark.slow
def test_sweep_writes_rows_that_plot_reads(tmp_path):
    csv = tmp_path / "sweep.csv"
    run_script("sweep.py", "--tiny", "--shapes", "2x3x4x4", "--dtypes", "fp32",
               "--layouts", "contiguous", "--activations", "relu", "--modes", "train_fwdbwd",
               "--providers", "tritonbn,eager", "--out", str(csv))

    df = pd.read_csv(csv)
    assert set(COLUMNS) <= set(df.columns)
    assert sorted(df.provider) == ["eager", "tritonbn"]
    assert df.error.isna().all(), df.error.tolist()
    assert (df.ms_p20 <= df.ms_p50).all() and (df.ms_p50 <= df.ms_p80).all()
    assert (df.gbps_model > df.gbps_floor).all()
    tritonbn = df.set_index("provider").loc["tritonbn"]
    assert tritonbn.max_abs_err < 1e-4 and tritonbn.max_abs_err_dx < 1e-4
    assert tritonbn.speedup_vs_eager > 0

    out = run_script("plot.py", str(csv))
    for png in ("sweep-speedup.png", "sweep-copy-bw.png"):
        assert (tmp_path / png).stat().st_size > 0
    assert "| 2x3x4x4 | fp32 | contiguous | relu | train_fwdbwd |" in out
