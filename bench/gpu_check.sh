#!/usr/bin/env bash
# The one command for a GPU machine (DESIGN.md, "GPU verification"): build the CUDA extension, show
# the environment, run the GPU tests, run the benchmarks, and print a short summary table last.
# Made for a machine without network access: nothing is downloaded.
#
#   bash bench/gpu_check.sh              everything; files go to $OUT, or bench/out/ when OUT is unset
#   bash bench/gpu_check.sh --dry-run    (or GPU_CHECK_DRY=1) no GPU steps: the CLI, --quick CPU
#                                        benches, sanitize's and tune's lists of what they would
#                                        run, and the summary, to check the plumbing without a GPU
#   GPU_CHECK_STEPS="tests block" bash bench/gpu_check.sh
#                                        only these steps (default: all but cuda-tests, which
#                                        tests covers), in the usual order, of: info tests
#                                        cuda-tests sanitize layernorm attention stochastic-depth
#                                        block head-loss model train-step tune sharded (build
#                                        always runs; info includes nvidia-smi)
#   GPU_CHECK_STEPS="cuda-tests sanitize attention stochastic-depth tune" bash bench/gpu_check.sh
#                                        the checks of the CUDA backend alone
#   GPU_CHECK_CUDA=0                     build without the CUDA extension (saves ~40 s when no
#                                        chosen step needs backend='cuda')
#   GPU_CHECK_TESTS="tests/test_block.py"   the GPU tests to run (default: all of tests/)
#   GPU_CHECK_SANITIZE_TOOLS="memcheck"  the compute-sanitizer tools of step sanitize (default:
#                                        memcheck racecheck synccheck); COMPUTE_SANITIZER: its path
#
# Steps of the CUDA backend: cuda-tests runs the GPU tests whose names say cuda (pytest -m gpu -k
# cuda; junit in cuda-tests.xml). sanitize runs bench/sanitize_cuda.py (each op with a CUDA kernel
# forward and backward once, backend='cuda', tiny odd shapes) under compute-sanitizer, once per
# tool, instrumenting only our kernels (--kernel-name kns=dinov2_fast, their namespace) and
# failing on any error it reports (sanitize-TOOL.log). tune runs `dinov2-fast bench tune --out
# $OUT/backend_table.json`: the measured table of backend='auto', to commit as
# dinov2_fast/backend_table_h100.json when it ran on an H100.
#
# Files written: build.log, info.json, gpu-tests.xml, gpu-tests.log, cuda-tests.xml,
# cuda-tests.log, sanitize-TOOL.log, bench.log (every benchmark's output), NAME.json per
# benchmark, train-step.png, backend_table.json, tune.log, summary.txt. Every step has a time
# limit, and all of them together stay within GPU_CHECK_BUDGET_S (default 470 s: under 8
# minutes). Each benchmark asks for a share (layernorm 100 s, attention 150 s, stochastic-depth
# 75 s, block 150 s, head-loss 90 s, model 120 s, train-step 300 s, and likewise sanitize 240 s,
# tune 150 s) and keeps what the later ones ask for while that leaves it a third of what is
# left; it stops starting measurements in time to write its JSON.
# head-loss times the DINO head + loss at 2816 rows, K = 65536 and 131072 (its torch.compile rows
# start only with 30 s of its limit left). train-step times the
# trainer's whole step at ViT-L/14 and 32 images (--arch vit_large --batch 32) and draws
# train-step.png; a torch.compile row starts only with 150 s left, so with less time only the
# eager rows run (GPU_CHECK_STEPS=train-step gives it the whole budget). A failed step does not
# stop the later ones; the exit status is 1 when any step failed. sharded (last, 240 s) trains
# the vitl14 preset for 3 steps on synthetic data under torchrun with one process, i.e. sharded
# with FSDP2 on one GPU, and writes sharded/summary.json (peak GPU memory). Environment: PYTHON
# (default: python, else python3).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

DRY="${GPU_CHECK_DRY:-0}"
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY=1 ;;
        -h | --help)
            sed -n '2,/^[^#]/{/^#/p}' "${BASH_SOURCE[0]}" # the comment above
            exit 0
            ;;
        *)
            echo "gpu_check.sh: unknown argument: $arg (try --help)" >&2
            exit 2
            ;;
    esac
done

# The benchmarks in the order they run, and the seconds each asks for.
BENCHES=(layernorm attention stochastic-depth block head-loss model train-step)
declare -A BENCH_S=([layernorm]=100 [attention]=150 [stochastic-depth]=75 [block]=150
    [head-loss]=90 [model]=120 [train-step]=300)
# Steps outside the benchmarks that share the budget the same way, and the seconds each asks for.
declare -A STEP_S=([sanitize]=240 [tune]=150)
KNOWN_STEPS="build info tests cuda-tests sanitize ${BENCHES[*]} tune sharded"
STEPS="${GPU_CHECK_STEPS:-${KNOWN_STEPS/ cuda-tests/}}"
for name in $STEPS; do
    if [[ " $KNOWN_STEPS " != *" $name "* ]]; then
        echo "gpu_check.sh: unknown step in GPU_CHECK_STEPS: $name (known: $KNOWN_STEPS)" >&2
        exit 2
    fi
done
wanted() {
    [[ " $STEPS " == *" $1 "* ]]
}

OUT_DIR="${OUT:-bench/out}"
mkdir -p "$OUT_DIR"
PYTHON="${PYTHON:-$(command -v python || command -v python3)}"
BUDGET_S="${GPU_CHECK_BUDGET_S:-470}"
BUILD_CUDA="${GPU_CHECK_CUDA:-1}"
TEST_PATHS="${GPU_CHECK_TESTS:-tests}"
SANITIZE_TOOLS="${GPU_CHECK_SANITIZE_TOOLS:-memcheck racecheck synccheck}"
SANITIZER="${COMPUTE_SANITIZER:-$(command -v compute-sanitizer ||
    echo /usr/local/cuda/bin/compute-sanitizer)}"
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
CLI=("$PYTHON" -m dinov2_fast.cli)

STATUS=()
FAILED=0
RUN_BENCHES=()
for name in "${BENCHES[@]}"; do
    if wanted "$name"; then
        RUN_BENCHES+=("$name")
    fi
done
# Logs are appended to step by step: start them empty, and drop the old reports of the benchmarks
# this run makes again (a report that is not written this time must not pass for a new one).
rm -f "$OUT_DIR/build.log" "$OUT_DIR/gpu-tests.log" "$OUT_DIR/bench.log" "$OUT_DIR/cuda-tests.log" \
    "$OUT_DIR/tune.log" "$OUT_DIR"/sanitize-*.log
rm -rf "$OUT_DIR/sharded"
if wanted tune; then
    rm -f "$OUT_DIR/backend_table.json"
fi
for name in "${RUN_BENCHES[@]}"; do
    rm -f "$OUT_DIR/$name.json" "$OUT_DIR/$name.png"
done

# bench_args NAME: sets ARGS to the benchmark's own options: train-step draws its chart, and on
# the GPU runs ViT-L/14 at 32 images a step (the targets' configuration; --dry-run: the tiny one).
bench_args() {
    ARGS=()
    if [[ "$1" == train-step ]]; then
        ARGS=(--plot "$OUT_DIR/train-step.png")
        if [[ "$DRY" != 1 ]]; then
            ARGS+=(--arch vit_large --batch 32)
        fi
    fi
}

# share WANT [RESERVE]: at most WANT seconds of what is left of the budget, keeping RESERVE of it
# for later steps as long as that leaves this step a third of it.
share() {
    local want="$1" reserve="${2:-0}" left=$((BUDGET_S - SECONDS))
    local most=$((left - reserve > left / 3 ? left - reserve : left / 3))
    echo $((most < want ? most : want))
}

# asked_after NAME: the seconds the chosen benchmarks and budgeted steps after NAME ask for.
ORDERED=(sanitize "${BENCHES[@]}" tune)
asked_after() {
    local total=0 seen=0 next
    for next in "${ORDERED[@]}"; do
        if ((seen)) && wanted "$next"; then
            total=$((total + ${BENCH_S[$next]:-${STEP_S[$next]:-0}}))
        fi
        if [[ "$next" == "$1" ]]; then
            seen=1
        fi
    done
    echo "$total"
}

# sanitize_filter: sets FILTER to compute-sanitizer's options that instrument only our kernels (the
# kns= substring "dinov2_fast"), in the spelling this version takes; none if
# it has no kernel filter (then torch's kernels are checked too, only slower).
sanitize_filter() {
    FILTER=()
    local help option=""
    help="$("$SANITIZER" --help 2>&1 || true)"
    if grep -qE -- '--kernel-name( |$)' <<<"$help"; then
        option=--kernel-name
    elif grep -qE -- '--kernel-regex( |$)' <<<"$help"; then
        option=--kernel-regex
    fi
    if [[ -z "$option" ]]; then
        return 0
    fi
    # One substring that every kernel of csrc/ has (its namespace, mangled or not) and torch's and
    # Triton's do not: whether repeated filters combine as "any" differs between versions.
    FILTER=("$option" "kns=dinov2_fast")
}

# bench_limit LIMIT: the --time-limit of a benchmark step of LIMIT seconds, leaving time to start
# Python, finish the measurement under way (a torch.compile can take ~20 s), print and write JSON.
bench_limit() {
    local limit="$1"
    echo $((limit > 80 ? limit - 40 : (limit > 2 ? limit / 2 : 1)))
}

# step NAME LIMIT_S LOG CMD...: run CMD with a time limit (never past the overall budget). LOG "-"
# shows the output here; a file gets it appended and shows its last lines if the step fails.
step() {
    local name="$1" limit="$2" log="$3"
    shift 3
    local left=$((BUDGET_S - SECONDS))
    if ((left < limit)); then
        limit=$left
    fi
    if ((limit < 5)); then
        STATUS+=("SKIPPED $name: out of time (budget ${BUDGET_S}s)")
        FAILED=1
        return 0
    fi
    echo
    echo "=== $name (limit ${limit}s)"
    local start=$SECONDS rc=0
    if [[ "$log" == "-" ]]; then
        timeout --kill-after=10 "$limit" "$@" || rc=$?
    else
        echo "=== $name (limit ${limit}s)" >>"$log"
        timeout --kill-after=10 "$limit" "$@" >>"$log" 2>&1 || rc=$?
    fi
    local took=$((SECONDS - start))
    if ((rc == 0)); then
        STATUS+=("ok      $name (${took}s)")
    else
        local why="exit $rc"
        if ((rc == 124 || rc == 137)); then
            why="timed out after ${limit}s"
        fi
        STATUS+=("FAILED  $name: $why (${took}s)")
        FAILED=1
        if [[ "$log" != "-" ]]; then
            echo "--- last lines of $log"
            tail -n 40 "$log" || true
        fi
    fi
    return 0
}

echo "gpu_check: $(date -u +%Y-%m-%dT%H:%M:%SZ), output in $OUT_DIR, python $PYTHON, steps: $STEPS"
if [[ "$DRY" == 1 ]]; then
    echo "gpu_check: DRY RUN: no build, no GPU tests; --quick benchmarks on the CPU"
    if wanted info; then
        step "info" 60 - "${CLI[@]}" info --json "$OUT_DIR/info.json"
    fi
    if wanted cuda-tests; then
        STATUS+=("skipped cuda-tests: needs a GPU (dry run)")
    fi
    if wanted sanitize; then
        step "sanitize: the kernels and cases it would check (no GPU)" 60 - \
            "$PYTHON" bench/sanitize_cuda.py --list
    fi
    for name in "${RUN_BENCHES[@]}"; do
        bench_args "$name"
        step "bench $name --quick (CPU)" 120 "$OUT_DIR/bench.log" \
            "${CLI[@]}" bench "$name" --quick --device cpu --json "$OUT_DIR/$name.json" \
            ${ARGS[@]+"${ARGS[@]}"}
    done
    if wanted tune; then
        step "bench tune --plan (what it would time; no GPU)" 60 "$OUT_DIR/tune.log" \
            "${CLI[@]}" bench tune --plan
    fi
    if wanted sharded; then
        step "sharded train (torchrun, 1 process, demo preset, CPU)" 180 "$OUT_DIR/bench.log" \
            "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node=1 \
            -m dinov2_fast.cli train --config demo --max-steps 2 --no-progress \
            --output-dir "$OUT_DIR/sharded" train.num_workers=0 train.checkpoint_every=0 \
            evaluation.knn_at_end=false
    fi
else
    if wanted info; then
        step "nvidia-smi" 30 - nvidia-smi \
            --query-gpu=index,name,driver_version,memory.total,clocks.max.sm --format=csv
    fi
    step "build (pip install -e ., DINOV2_FAST_CUDA=$BUILD_CUDA)" 300 "$OUT_DIR/build.log" \
        env DINOV2_FAST_CUDA="$BUILD_CUDA" "$PYTHON" -m pip install -v --no-build-isolation \
        --no-deps --no-index -e .
    if wanted info; then
        step "info" 60 - "${CLI[@]}" info --json "$OUT_DIR/info.json"
    fi
    if wanted tests; then
        # shellcheck disable=SC2086 # GPU_CHECK_TESTS is a list of paths
        step "GPU tests (pytest -m gpu $TEST_PATHS)" 200 "$OUT_DIR/gpu-tests.log" \
            "$PYTHON" -m pytest -m gpu $TEST_PATHS -q -p no:cacheprovider --maxfail=15 --junitxml="$OUT_DIR/gpu-tests.xml"
        tail -n 3 "$OUT_DIR/gpu-tests.log" 2>/dev/null || true
    fi
    if wanted cuda-tests; then
        # shellcheck disable=SC2086 # GPU_CHECK_TESTS is a list of paths
        step "CUDA backend's GPU tests (pytest -m gpu -k cuda $TEST_PATHS)" 150 \
            "$OUT_DIR/cuda-tests.log" "$PYTHON" -m pytest -m gpu -k cuda $TEST_PATHS -q \
            -p no:cacheprovider --maxfail=15 --junitxml="$OUT_DIR/cuda-tests.xml"
        tail -n 3 "$OUT_DIR/cuda-tests.log" 2>/dev/null || true
    fi
    if wanted sanitize; then
        if [[ ! -x "$SANITIZER" ]]; then
            STATUS+=("FAILED  sanitize: compute-sanitizer not found (set COMPUTE_SANITIZER)")
            FAILED=1
        else
            sanitize_filter
            read -ra tools <<<"$SANITIZE_TOOLS"
            limit=$(share "${STEP_S[sanitize]}" "$(asked_after sanitize)")
            which="our $((${#FILTER[@]} / 2)) kernels"
            if ((${#FILTER[@]} == 0)); then
                which="every kernel: this compute-sanitizer has no kernel filter"
            fi
            for tool in "${tools[@]}"; do
                # PYTORCH_NO_CUDA_MEMORY_CACHING: one allocation per tensor, so that memcheck sees
                # an access past a tensor's end instead of into the allocator's next block.
                step "sanitize $tool ($which)" $((limit / ${#tools[@]})) \
                    "$OUT_DIR/sanitize-$tool.log" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
                    "$SANITIZER" --tool "$tool" --error-exitcode 1 --report-api-errors no \
                    ${FILTER[@]+"${FILTER[@]}"} "$PYTHON" bench/sanitize_cuda.py
            done
        fi
    fi
    for i in "${!RUN_BENCHES[@]}"; do
        name="${RUN_BENCHES[$i]}"
        limit=$(share "${BENCH_S[$name]}" "$(asked_after "$name")")
        bench_args "$name"
        step "bench $name" "$limit" "$OUT_DIR/bench.log" \
            "${CLI[@]}" bench "$name" --time-limit "$(bench_limit "$limit")" \
            --json "$OUT_DIR/$name.json" ${ARGS[@]+"${ARGS[@]}"}
    done
    if wanted tune; then
        limit=$(share "${STEP_S[tune]}" 0)
        step "bench tune (the table of backend='auto')" "$limit" "$OUT_DIR/tune.log" \
            "${CLI[@]}" bench tune --out "$OUT_DIR/backend_table.json" \
            --time-limit "$(bench_limit "$limit")"
    fi
    if wanted sharded; then
        step "sharded train (torchrun, 1 process, vitl14, 3 steps)" 240 "$OUT_DIR/bench.log" \
            "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node=1 \
            -m dinov2_fast.cli train --config vitl14 --max-steps 3 --no-progress \
            --output-dir "$OUT_DIR/sharded" train.dataset=synthetic train.num_workers=8 \
            train.checkpoint_every=0
    fi
fi

# The summary, last: the step results, then the numbers the targets are set for.
{
    echo
    echo "=== summary ($(date -u +%Y-%m-%dT%H:%M:%SZ), ${SECONDS}s in all; steps: $STEPS)"
    printf '%s\n' "${STATUS[@]}"
    if wanted info && [[ -f "$OUT_DIR/info.json" ]]; then
        "$PYTHON" - "$OUT_DIR/info.json" <<'PY' || true
import json
import sys

info = json.load(open(sys.argv[1]))
gpus = ", ".join(g["name"] for g in info["gpus"]) or "no CUDA GPU"
v = info["versions"]
print(f"GPU: {gpus}; torch {v['torch']} (CUDA {v['torch_cuda']}), triton {v['triton']}")
for backend, where in info["backends"].items():
    print(f"backend {backend:<6} on CUDA tensors: " + (f"no: {where['cuda']}" if where["cuda"] else "yes"))
PY
    fi
    for name in "${RUN_BENCHES[@]}"; do
        if [[ -f "$OUT_DIR/$name.json" ]]; then
            timeout 60 "${CLI[@]}" report "$OUT_DIR/$name.json" --headline || FAILED=1
        else
            echo "no benchmark report: $OUT_DIR/$name.json is missing"
        fi
    done
    if wanted tune && [[ -f "$OUT_DIR/backend_table.json" ]]; then
        "$PYTHON" - "$OUT_DIR/backend_table.json" <<'PY' || true
import json
import sys
from collections import Counter

from dinov2_fast.backend_table import BackendTable

table = json.load(open(sys.argv[1]))
loaded = BackendTable(sys.argv[1], table)
picks, rejected = Counter(), set()
for op, classes in table["ops"].items():
    for name, records in classes.items():
        measured = list(dict.fromkeys(b for r in records for b in r.get("graph_ms", {})))
        picks[f"{op} -> {loaded.decide(op, name, measured) or 'unmeasured'}"] += 1
        for record in records:
            rejected |= {f"{op}/{b}: {why}" for b, why in record.get("rejected", {}).items()}
print(f"tune: {sum(picks.values())} shape classes on {table['device']} in {table['seconds']} s, "
      f"{len(table['not_measured'])} left out; auto picks (classes): "
      + ", ".join(f"{pick} ({count})" for pick, count in sorted(picks.items())))
for line in sorted(rejected)[:12]:
    print(f"  rejected {line}")
PY
    fi
    if wanted sharded && [[ -f "$OUT_DIR/sharded/summary.json" ]]; then
        echo "sharded train: $(cat "$OUT_DIR/sharded/summary.json" | tr -d '\n' | tr -s ' ')"
    fi
} >"$OUT_DIR/summary.txt" 2>&1
cat "$OUT_DIR/summary.txt"

exit "$FAILED"
