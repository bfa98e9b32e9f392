#!/usr/bin/env bash
# GPU tests, perf sweep, plots, kernel tuning table and the ResNet-50 benchmark, logs, CSVs and
# PNGs in one folder. One step per call keeps each call inside a 10-minute limit:
#
#   perf/gpu_run.sh OUT_DIR tests            the whole test suite, natively on the GPU (~2 min
#                                            on an H100 with pytest-xdist, ~5 without)
#   perf/gpu_run.sh OUT_DIR sweep [ARGS...]  perf/sweep.py ARGS and its plots (the full sweep:
#                                            93 cases in 385 s on an H100)
#   perf/gpu_run.sh OUT_DIR quick            tests, then sweep --quick and its plots
#   perf/gpu_run.sh OUT_DIR extras           perf/tune.py, convergence.py, host_overhead.py
#                                            (eager, then compiled with triton_op and with
#                                            custom_op), sync_bench.py (2 gloo ranks)
#   perf/gpu_run.sh OUT_DIR resnet [ARGS...] perf/resnet.py ARGS, every variant by default
#                                            (six compiles: the longest step)
#
# A test failure does not stop a later step; the exit status is non-zero if any step failed.
set -uo pipefail

usage="usage: perf/gpu_run.sh OUT_DIR tests|sweep|quick|extras|resnet [ARGS...]"
out=${1:?$usage}
step=${2:?$usage}
shift 2
[[ $step =~ ^(tests|sweep|quick|extras|resnet)$ ]] || { echo "$usage" >&2; exit 2; }
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

status=0
if [[ $step == tests || $step == quick ]]; then
    {
        nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
        python -c "import numpy, torch, triton; print('torch', torch.__version__, 'triton',
                    triton.__version__, 'numpy', numpy.__version__)"
        # Tests are independent: with pytest-xdist, several share the GPU.
        workers=()
        python -c "import xdist" 2>/dev/null && workers=(-n 4)
        python -m pytest -q -rf --durations=10 "${workers[@]}" tests
    } 2>&1 | tee "$out/tests.log"
    (( PIPESTATUS[0] == 0 )) || status=1
fi

if [[ $step == sweep || $step == quick ]]; then
    sweep_args=(--out "$out" "$@")
    [[ $step == quick ]] && sweep_args+=(--quick)
    python perf/sweep.py "${sweep_args[@]}" 2>&1 | tee "$out/sweep.log"
    (( PIPESTATUS[0] == 0 )) || status=1
    for csv in "$out"/*.csv; do
        [[ -e $csv ]] || break
        python perf/plot.py "$csv" 2>&1 | tee "$out/plot.log"
        (( PIPESTATUS[0] == 0 )) || status=1
    done
fi

if [[ $step == extras ]]; then
    python perf/tune.py 2>&1 | tee "$out/tune.log"
    (( PIPESTATUS[0] == 0 )) || status=1
    python perf/convergence.py --device cuda --out-dir "$out" 2>&1 | tee "$out/convergence.log"
    (( PIPESTATUS[0] == 0 )) || status=1
    python perf/host_overhead.py --stack 2>&1 | tee "$out/host.log"
    (( PIPESTATUS[0] == 0 )) || status=1
    python perf/host_overhead.py --compiled 2>&1 | tee "$out/host_compiled.log"
    (( PIPESTATUS[0] == 0 )) || status=1
    TRITONBN_TRITON_OP=0 python perf/host_overhead.py --compiled 2>&1 \
        | tee "$out/host_compiled_custom_op.log"
    (( PIPESTATUS[0] == 0 )) || status=1
    # NCCL needs a GPU per rank: on one GPU, gloo puts both ranks on it.
    python perf/sync_bench.py --out "$out/sync.csv" 2>&1 | tee "$out/sync.log"
    (( PIPESTATUS[0] == 0 )) || status=1
fi

if [[ $step == resnet ]]; then
    resnet_args=("$@")
    (( ${#resnet_args[@]} )) || resnet_args=(--variants \
        eager,converted,compile,compile_converted,cudagraphs,cudagraphs_converted)
    python perf/resnet.py --out-dir "$out" "${resnet_args[@]}" 2>&1 | tee "$out/resnet.log"
    (( PIPESTATUS[0] == 0 )) || status=1
fi

echo "exit status: $status"
exit $status
