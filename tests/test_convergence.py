"""perf/convergence.py end to end on a few steps: CSV layout, plot, and the agreement check."""
import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import DEVICE

SCRIPT = Path(__file__).resolve().parents[1] / "perf" / "convergence.py"
COLUMNS = ["model", "variant", "bn_impl", "step", "test_loss", "test_acc", "device"]


@pytest.fixture(scope="module")
def convergence():
    spec = importlib.util.spec_from_file_location("convergence", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_short_run_writes_csv_and_plot_and_agrees(convergence, tmp_path, capsys):
    status = convergence.main(["--steps", "4", "--eval-every", "2", "--batch-size", "16",
                               "--test-size", "48", "--device", str(DEVICE),
                               "--out-dir", str(tmp_path)])
    assert status == 0, capsys.readouterr().out
    results = pd.read_csv(tmp_path / "convergence.csv")
    assert list(results.columns) == COLUMNS
    assert (tmp_path / "convergence.png").stat().st_size > 0
    runs = results.groupby(["model", "variant", "bn_impl"]).step.apply(list)
    assert len(runs) == len(convergence.MODELS) * len(convergence.RUNS)
    assert all(steps == [0, 2, 4] for steps in runs)
    assert results.test_loss.notna().all() and results.test_acc.between(0, 100).all()
    # Same weights, same batches: the two BatchNorm implementations start and stay together.
    bn = results[results.variant == "bn"].pivot_table(index=["model", "step"], columns="bn_impl",
                                                      values="test_loss")
    np.testing.assert_allclose(bn.tritonbn, bn.torch, rtol=1e-3, atol=1e-4)
    assert "load_digits" in capsys.readouterr().out


def test_agreement_flags_diverging_curves(convergence):
    def curve(bn_impl, losses, final_acc):
        return [dict(model="mlp", variant="bn", bn_impl=bn_impl, step=step, test_loss=loss,
                     test_acc=final_acc, device="cpu") for step, loss in enumerate(losses)]

    same = pd.DataFrame(curve("torch", [2.3, 0.5], 90.0) + curve("tritonbn", [2.3, 0.5], 90.0))
    assert convergence.agreement(same)[0].startswith("ok")
    loss_gap = pd.DataFrame(curve("torch", [2.3, 0.5], 90.0) + curve("tritonbn", [2.3, 0.6], 90.0))
    assert convergence.agreement(loss_gap)[0].startswith("FAIL")
    acc_gap = pd.DataFrame(curve("torch", [2.3, 0.5], 90.0) + curve("tritonbn", [2.3, 0.5], 89.0))
    assert convergence.agreement(acc_gap)[0].startswith("FAIL")
