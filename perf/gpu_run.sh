#!/usr/bin/env bash
# GPU tests, perf sweep and plots in one call, every log, CSV and PNG in one folder.
#
#   perf/gpu_run.sh OUT_DIR          full sweep
#   perf/gpu_run.sh OUT_DIR quick    sweep --quick
#
# OUT_DIR receives 7 files: install.log, tests.log (GPU and versions first), sweep.log,
# <gpu>.csv, <gpu>-speedup.png, <gpu>-copy-bw.png, plot.log (the README table).
# A test failure does not stop the sweep, whose rows record their own errors; the exit status
# is non-zero if any step failed.
set -uo pipefail

usage="usage: perf/gpu_run.sh OUT_DIR [quick]"
out=${1:?$usage}
preset=${2:-full}
[[ $preset == full || $preset == quick ]] || { echo "$usage" >&2; exit 2; }
mkdir -p "$out" && out=$(cd "$out" && pwd) || exit 2
cd "$(dirname "$0")/.." || exit 2
export PYTHONUNBUFFERED=1

# pyproject maps kernels/ to tritonbn.kernels, so a bare PYTHONPATH cannot find the kernels.
# Without pip, mirror that mapping with links.
if ! python -m pip install --no-deps --no-build-isolation -e . >"$out/install.log" 2>&1; then
    links=$(mktemp -d)
    mkdir "$links/tritonbn"
    ln -s "$PWD"/tritonbn/*.py "$links/tritonbn/"
    ln -s "$PWD/kernels" "$links/tritonbn/kernels"
    export PYTHONPATH="$links${PYTHONPATH:+:$PYTHONPATH}"
    echo "editable install failed; importing tritonbn through links in $links" \
        | tee -a "$out/install.log"
fi
python -c "import tritonbn.kernels" 2>&1 | tee -a "$out/install.log" || exit 1

{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    python -c "import numpy, torch, triton; print('torch', torch.__version__, 'triton',
                triton.__version__, 'numpy', numpy.__version__)"
    python -m pytest -x -q tests
} 2>&1 | tee "$out/tests.log"
tests_rc=${PIPESTATUS[0]}

sweep_args=(--out "$out")
[[ $preset == quick ]] && sweep_args+=(--quick)
python perf/sweep.py "${sweep_args[@]}" 2>&1 | tee "$out/sweep.log"
sweep_rc=${PIPESTATUS[0]}

plot_rc=1
for csv in "$out"/*.csv; do
    [[ -e $csv ]] || break
    python perf/plot.py "$csv" 2>&1 | tee "$out/plot.log"
    plot_rc=${PIPESTATUS[0]}
done

echo "exit status: tests $tests_rc, sweep $sweep_rc, plot $plot_rc"
(( tests_rc == 0 && sweep_rc == 0 && plot_rc == 0 ))
