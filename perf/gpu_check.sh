#!/usr/bin/env bash
# Everything a GPU machine must prove, in one call of at most 8 minutes, steps in priority order:
#
#   install      tritonbn importable from this checkout (pip install --no-deps -e ., which keeps
#                the machine's own torch and Triton; links if pip cannot)
#   environment  GPU, driver, torch, Triton, numpy, copy bandwidth (perf/sweep.py --environment)
#   gpu_tests    the GPU-only tests first (CUDA graphs, two streams, no host sync, direct
#                launches, half precision, large shapes, past 2^31 elements) and those that only
#                a GPU really tests (float64 exactness, activations over their whole range,
#                torch.compile through the triton_ops)
#   suite        the rest of the test suite, natively
#   headline     perf/sweep.py --headline: BN + ReLU on the ResNet-50 shapes, residual rows,
#                bf16 channels_last and fp32 contiguous, tritonbn, eager and torch.compile
#   host         perf/host_overhead.py: host time per layer, eager and compiled
#   resnet       perf/resnet.py at batch 128: eager, converted, cudagraphs, cudagraphs_converted,
#                then compile and compile_converted as time allows
#
# Each step runs under its own cap, cut to the time left before the deadline, so a hang cannot
# take the next step's time. After each step OUT_DIR gets summary.md (perf/summarize.py), the
# step's CSV and gpu_check.tar.gz (every log, JUnit XML and CSV): 6 files at most (8 while
# one is replaced), and a call cut short still brings back what had finished.
#
# Without a GPU it rehearses the same steps: the kernels through Triton's interpreter, a few
# tests, tiny shapes and step counts, short caps (tests/test_gpu_check.py runs it so in CI).
# The exit status is non-zero if any step failed or did not run.
set -uo pipefail

usage="usage: perf/gpu_check.sh OUT_DIR"
(( $# == 1 )) || { echo "$usage" >&2; exit 2; }
mkdir -p "$1" && out=$(cd "$1" && pwd) || exit 2
cd "$(dirname "$0")/.." || exit 2
repo=$PWD
python=${PYTHON:-python}
command -v "$python" >/dev/null || python=python3
export PYTHONUNBUFFERED=1
deadline=$(( SECONDS + 465 ))  # the rest of the 8 minutes: the last summary and archive
work=$(mktemp -d)
links=""
trap 'rm -rf "$work" $links' EXIT
printf 'name\trc\tseconds\tcap\n' >"$work/steps.tsv"
printf 'name\twhat\tcap\n' >"$work/plan.tsv"
printf '%s\n' \
    $'install\ttritonbn importable from this checkout\t30' \
    $'environment\tGPU, driver, versions, copy bandwidth\t30' \
    $'gpu_tests\tGPU-only tests first\t90' \
    $'suite\tthe rest of the test suite\t75' \
    $'headline\tBN + ReLU on the ResNet-50 shapes, tritonbn vs eager vs compile\t90' \
    $'host\thost time per layer, eager and compiled\t50' \
    $'resnet\tResNet-50 bs128 training step (what time is left)\t465' >>"$work/plan.tsv"
failed=0

seconds_less() {  # A B: A - B, or 0
    echo $(( $1 > $2 ? $1 - $2 : 0 ))
}

planned_cap() {  # STEP: its cap in plan.tsv, cut to the time left less the kill's grace
    local cap left=$(( deadline - SECONDS - 15 ))
    cap=$(awk -F'\t' -v step="$1" '$1 == step { print $3 }' "$work/plan.tsv")
    echo $(( cap < left ? cap : left ))
}

publish() {  # summary.md, the steps' CSVs and the archive, each replaced whole
    if timeout 60 "$python" perf/summarize.py "$work" "$out/summary.md.tmp" \
        >>"$work/summarize.log" 2>&1; then
        mv "$out/summary.md.tmp" "$out/summary.md"
    else
        echo "perf/summarize.py failed: see summarize.log in the archive" >"$out/summary.md"
        failed=1
    fi
    [[ -f $work/environment.log ]] && cp "$work/environment.log" "$out/environment.txt"
    for file in headline.csv host.csv; do
        [[ -f $work/$file ]] && cp "$work/$file" "$out/$file"
    done
    for csv in "$work"/resnet/*.csv; do
        [[ -f $csv ]] && cp "$csv" "$out/resnet.csv"
    done
    tar -czf "$out/gpu_check.tar.gz.tmp" -C "$work" . && mv "$out/gpu_check.tar.gz.tmp" \
        "$out/gpu_check.tar.gz"
}

run_step() {  # STEP CAP COMMAND...: COMMAND under CAP seconds, its output in STEP.log
    local step=$1 cap=$2 began=$SECONDS rc
    shift 2
    if (( cap < 5 )); then
        printf '%s\tskipped\t0\t%s\n' "$step" "$cap" >>"$work/steps.tsv"
        echo "== $step: not started, no time left"
        failed=1
        publish
        return
    fi
    echo "== $step (cap $cap s): $*"
    # SIGINT first, so that pytest still writes its JUnit XML; SIGKILL 15 s later.
    timeout -s INT -k 15 "$cap" "$@" >"$work/$step.log" 2>&1
    rc=$?
    printf '%s\t%s\t%s\t%s\n' "$step" "$rc" $(( SECONDS - began )) "$cap" >>"$work/steps.tsv"
    echo "   exit $rc after $(( SECONDS - began )) s"
    if (( rc != 0 )); then
        failed=1
        tail -n 15 "$work/$step.log"
    fi
    publish
}

# install: an editable install keeps the machine's torch and Triton and needs no network.
# pyproject maps kernels/ to tritonbn.kernels, so without pip, links mirror that mapping.
importable="import pathlib, tritonbn.kernels
assert pathlib.Path(tritonbn.__file__).resolve().parent == pathlib.Path('$repo', 'tritonbn')"
if "$python" -c "$importable" 2>/dev/null; then
    run_step install "$(planned_cap install)" echo "tritonbn already importable from $repo"
else
    run_step install "$(planned_cap install)" "$python" -m pip install --no-deps \
        --no-build-isolation --no-index -e .
    if ! "$python" -c "$importable" 2>/dev/null; then
        links=$(mktemp -d)
        mkdir "$links/tritonbn"
        ln -s "$repo"/tritonbn/*.py "$links/tritonbn/"
        ln -s "$repo/kernels" "$links/tritonbn/kernels"
        export PYTHONPATH="$links${PYTHONPATH:+:$PYTHONPATH}"
        echo "   editable install failed; importing tritonbn through links in $links"
    fi
fi

run_step environment "$(planned_cap environment)" "$python" perf/sweep.py --environment
gpu=1
grep -q '^device: cpu' "$work/environment.log" && gpu=0

# On a GPU: everything, the tests spread over 8 workers. Without one: the same commands on a
# tiny scale. The tests named here are the ones a GPU adds to what CI's interpreter run shows.
gpu_first=(tests/test_gpu.py tests/test_cuda_graphs.py
           tests/test_merge.py::test_cuda_graph_replays_match_eager
           tests/test_merge.py::test_two_streams_at_once_match_sequential_calls
           tests/test_merge.py::test_no_host_sync_in_a_training_step
           tests/test_launch.py::test_direct_launches_match_tritons_own_path)
gpu_tells=(tests/test_forward.py::test_float64_is_exact_to_rounding
           tests/test_forward.py::test_activation_over_its_whole_range
           tests/test_registration.py::test_compile_fullgraph_matches_eager)
suite=(tests)
workers=()
rehearsal=()
sweep_last_case=25  # seconds the last headline case may take: compiles included
host_scale=()
resnet_scale=(--warmup 3 --steps 10)
resnet_last_variant=45  # a compiled variant takes 40-70 s, most of it compiling
if (( gpu )); then
    "$python" -c "import xdist" 2>/dev/null && workers=(-n 8)
else
    deadline=$(( SECONDS + 300 ))  # short caps: a hang costs CI minutes, not ten
    rehearsal=(-k "sigmoid and train and triton")  # one float64 test; the GPU ones skip
    suite=(tests/test_errors.py)
    sweep_last_case=$(planned_cap headline)  # the first case only
    host_scale=(--calls 5 --repeats 1 --profile-rows 0)
    resnet_scale=(--warmup 1 --steps 1)
    resnet_last_variant=0  # eager and converted are all it runs
fi
deselect=()
for test in "${gpu_tells[@]}"; do deselect+=(--deselect "$test"); done

run_step gpu_tests "$(planned_cap gpu_tests)" "$python" -m pytest -q -rfE "${workers[@]}" \
    --junitxml="$work/gpu_tests.xml" "${rehearsal[@]}" "${gpu_first[@]}" "${gpu_tells[@]}"
run_step suite "$(planned_cap suite)" "$python" -m pytest -q -rfE "${workers[@]}" \
    --junitxml="$work/suite.xml" -m "not gpu" "${deselect[@]}" "${suite[@]}"

cap=$(planned_cap headline)
run_step headline "$cap" "$python" perf/sweep.py --headline \
    --max-seconds "$(seconds_less "$cap" "$sweep_last_case")" --out "$work/headline.csv"
run_step host "$(planned_cap host)" "$python" perf/host_overhead.py --compiled --stack \
    "${host_scale[@]}" --out "$work/host.csv"
cap=$(planned_cap resnet)
run_step resnet "$cap" "$python" perf/resnet.py --batch-sizes 128 \
    --variants eager,converted,cudagraphs,cudagraphs_converted,compile,compile_converted \
    "${resnet_scale[@]}" --max-seconds "$(seconds_less "$cap" "$resnet_last_variant")" \
    --out-dir "$work/resnet"

cat "$out/summary.md"
exit $failed
