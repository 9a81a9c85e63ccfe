#!/usr/bin/env bash
# The GPU check in one command, for a fresh CUDA machine without network (bench/README.md, "On the device
# machine"): install the carried wheels and exl2core, build exllamav2's and exl2core's extensions, run the
# CUDA tests and the real exllamav2 compatibility test, and time both converters on SmolLM2-135M at
# reduced settings, side by side.
#
#   bench/device_check.sh [--dry-run] [--only STEP[,STEP…]] [RESULTS_DIR]
#
# RESULTS_DIR (or $EXL2_DEVICE_OUT) receives summary.md (one row per step, rewritten after each step),
# log.txt (every step's output) and compare.md / compare.json (the converter table) as the run goes, so a
# run cut off still reports what finished. Inputs, from $EXL2_DEVICE_ASSETS (default .cache/device):
# wheels/*.whl and the SmolLM2 GGUF in parts smollm2.gguf.NN. The parts may arrive over several calls on
# one machine: everything lives under $EXL2_DEVICE_STATE (default /tmp/exl2-device), and a rerun skips the
# steps that succeeded and picks up the parts carried so far. $EXL2_DEVICE_BUDGET_S (default 540) bounds
# the wall time of all calls together: each step's timeout is cut to what is left, and steps that no longer
# fit are reported as not run. The steps that need the model run in the last call; the tiny-model
# compatibility test, the least telling, runs last of all.
set -u -o pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 1

DRY_RUN=0
ONLY=""
RESULTS=${EXL2_DEVICE_OUT:-}
while [ $# -gt 0 ]; do
    case $1 in
        --dry-run) DRY_RUN=1 ;;
        --only) ONLY=${2:?--only needs step names}; shift ;;
        -h|--help) awk 'NR > 1 && /^#/ {sub(/^# ?/, ""); print; next} NR > 1 {exit}' "$0"; exit 0 ;;
        -*) echo "device_check.sh: unknown option $1" >&2; exit 2 ;;
        *) RESULTS=$1 ;;
    esac
    shift
done

PY=${PYTHON:-python3}
ASSETS=${EXL2_DEVICE_ASSETS:-$REPO/.cache/device}
STATE=${EXL2_DEVICE_STATE:-/tmp/exl2-device}
BUDGET=${EXL2_DEVICE_BUDGET_S:-540}
RESULTS=${RESULTS:-$STATE/results}
GGUF_SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
GGUF=$STATE/SmolLM2-135M-Instruct.gguf
WORK=$STATE/compare
SMOLLM2_OUT=$WORK/exl2core/4.0/model
# Reduced settings: one bitrate, no full conversion, 4 × 512 measurement and 16 × 512 quantization rows
# (both tools then calibrate on one shared parquet file), 8 evaluation windows of 2048 tokens.
COMPARE="$PY bench/compare_exllamav2.py --model $GGUF --work $WORK --bits 4.0 --no-full -mr 4 -ml 512 -r 16 -l 512 --eval-rows 8 --append-to '' --step-timeout 240"
PYTEST="$PY -m pytest -q -rs -p no:cacheprovider"

export PYTHONPATH=$STATE/site${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 EXLLAMA_NO_SDPA=1 EXL2_CACHE=$STATE/cache MAX_JOBS=${MAX_JOBS:-8}

START=$(date +%s)
USED_BEFORE=$(cat "$STATE/used_s" 2>/dev/null || echo 0)  # seconds spent by earlier calls
used() { echo $(( USED_BEFORE + $(date +%s) - START )); }
remaining() { echo $(( BUDGET - $(used) )); }

# -- the record --------------------------------------------------------------------------------------------

record() {  # name status seconds note
    mkdir -p "$STATE/done"
    printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >> "$STATE/steps.tsv"
    [ "$2" = ok ] && touch "$STATE/done/$1"
    used > "$STATE/used_s"
    summary
}

summary() {
    mkdir -p "$RESULTS"
    {
        echo "# device check — $(date -u '+%Y-%m-%d %H:%M UTC')"
        echo
        echo "GPU: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo none)"
        echo "Wall time so far: $(used) s of the $BUDGET s budget, all calls. Latest result of each step:"
        echo
        echo "| step | status | seconds | note |"
        echo "|---|---|---|---|"
        if [ -f "$STATE/steps.tsv" ]; then
            awk -F'\t' '{last[$1] = $0; if (!($1 in seen)) {order[++n] = $1; seen[$1] = 1}}
                END {for (i = 1; i <= n; i++) {split(last[order[i]], f, "\t");
                     printf "| %s | %s | %s | %s |\n", f[1], f[2], f[3], f[4]}}' "$STATE/steps.tsv"
        fi
    } > "$RESULTS/summary.md.tmp" && mv "$RESULTS/summary.md.tmp" "$RESULTS/summary.md"
}

collect_compare() {
    [ -f "$WORK/results.md" ] && cp "$WORK/results.md" "$RESULTS/compare.md"
    [ -f "$WORK/results.json" ] && cp "$WORK/results.json" "$RESULTS/compare.json"
    return 0
}

# -- steps -------------------------------------------------------------------------------------------------

wanted() { [ -z "$ONLY" ] || [[ ",$ONLY," == *",$1,"* ]]; }

step() {  # name max_seconds needs_model command
    local name=$1 cap=$2 needs_model=$3 command=$4
    if [ $DRY_RUN = 1 ]; then
        printf 'step %s (at most %s s%s): %s\n' "$name" "$cap" "$([ "$needs_model" = 1 ] && echo ', needs the model')" "$command"
        return 0
    fi
    wanted "$name" || return 0
    if [ -e "$STATE/done/$name" ]; then
        echo "== $name: done in an earlier call, kept"
        return 0
    fi
    if [ "$needs_model" = 1 ] && [ ! -f "$GGUF" ]; then
        record "$name" "waiting" 0 "needs the SmolLM2 GGUF: carry its remaining parts and rerun"
        return 0
    fi
    local left; left=$(remaining)
    if [ "$left" -lt 30 ]; then
        record "$name" "not run" 0 "out of time (${left} s of the budget left)"
        return 0
    fi
    local limit=$(( cap < left ? cap : left ))
    echo "== $name (timeout $limit s): $command" | tee -a "$RESULTS/log.txt"
    local t0 log=$STATE/logs/$name.log; t0=$(date +%s)
    mkdir -p "$STATE/logs"
    timeout --kill-after=10 "$limit" bash -c "$command" 2>&1 | tee "$log" | tee -a "$RESULTS/log.txt" | tail -n 25
    local rc=${PIPESTATUS[0]} secs=$(( $(date +%s) - t0 ))
    local last; last=$(note_of "$log")
    case $rc in
        0) record "$name" ok "$secs" "$last" ;;
        124|137) record "$name" "timed out" "$secs" "killed after $limit s; $last" ;;
        *) record "$name" "failed (exit $rc)" "$secs" "$last" ;;
    esac
}

note_of() {  # log → one line for the summary: compare's step counts, else the last telling line
    local counts
    counts=$(grep -E '^\[[0-9]+/[0-9]+\] [^ ]+: (ok|FAILED|skipped|done before)' "$1" | awk '
        / ok \(| done before/ {ok++} / FAILED/ {bad++} / skipped/ {skip++}
        END {if (NR) printf "compare steps: %d ok, %d failed, %d skipped", ok, bad, skip}')
    if [ -n "$counts" ]; then echo "$counts"; return; fi
    grep -E ' passed| failed| skipped| error|Error|installed|extension built|^kernels:' "$1" | tail -n 1 \
        | tr '|\t' '/ ' | cut -c1-160
}

background() {  # name command: started now, its outcome recorded by wait_background
    local name=$1 command=$2
    if [ $DRY_RUN = 1 ]; then
        printf 'step %s (in the background): %s\n' "$name" "$command"
        return 0
    fi
    wanted "$name" || return 0
    [ -e "$STATE/done/$name" ] && return 0
    echo "== $name (background): $command" | tee -a "$RESULTS/log.txt"
    date +%s > "$STATE/$name.start"
    bash -c "$command" > "$STATE/$name.log" 2>&1 &
    echo $! > "$STATE/$name.pid"
}

wait_background() {  # name
    local name=$1
    [ $DRY_RUN = 1 ] && return 0
    wanted "$name" || return 0
    [ -e "$STATE/done/$name" ] && return 0
    local pid; pid=$(cat "$STATE/$name.pid")
    while kill -0 "$pid" 2>/dev/null && [ "$(remaining)" -gt 0 ]; do sleep 2; done
    local secs=$(( $(date +%s) - $(cat "$STATE/$name.start") ))
    { echo "== $name (background) output:"; tail -n 60 "$STATE/$name.log"; } >> "$RESULTS/log.txt"
    if kill -0 "$pid" 2>/dev/null; then
        kill -- "$pid" 2>/dev/null
        record "$name" "timed out" "$secs" "still running when the budget ran out"
    elif wait "$pid"; then
        record "$name" ok "$secs" "$(tail -n 1 "$STATE/$name.log" | cut -c1-160)"
    else
        record "$name" "failed (exit $?)" "$secs" "$(tail -n 1 "$STATE/$name.log" | cut -c1-160)"
    fi
    rm -f "$STATE/$name.pid"
}

gather_assets() {  # copy what this call carried into the state dir; join the model once all parts are there
    mkdir -p "$STATE/parts" "$STATE/wheels"
    for part in "$ASSETS"/smollm2.gguf.[0-9]*; do
        [ -f "$part" ] && cp "$part" "$STATE/parts/"
    done
    for wheel in "$ASSETS"/wheels/*.whl; do
        [ -f "$wheel" ] && cp "$wheel" "$STATE/wheels/"
    done
    [ -f "$GGUF" ] && return 0
    compgen -G "$STATE/parts/smollm2.gguf.*" > /dev/null || return 0
    cat "$STATE"/parts/smollm2.gguf.* > "$GGUF.tmp"
    if [ "$(sha256sum "$GGUF.tmp" | cut -d' ' -f1)" = "$GGUF_SHA256" ]; then
        mv "$GGUF.tmp" "$GGUF"
        record model ok 0 "joined $(ls "$STATE/parts" | tr '\n' ' ')"
    else
        rm -f "$GGUF.tmp"
        record model waiting 0 "have $(ls "$STATE/parts" | tr '\n' ' '); the checksum needs the rest"
    fi
}

# -- the plan ----------------------------------------------------------------------------------------------

if [ $DRY_RUN = 1 ]; then
    echo "results: $RESULTS; assets: $ASSETS; state: $STATE; budget: $BUDGET s"
    echo "step model: cp $ASSETS/wheels/*.whl $STATE/wheels/; cp $ASSETS/smollm2.gguf.* $STATE/parts/; cat $STATE/parts/smollm2.gguf.* > $GGUF once its sha256 is $GGUF_SHA256"
else
    mkdir -p "$STATE" "$RESULTS"
    summary
    gather_assets
fi

step gpu 30 0 "nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv"
step install 120 0 "$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $STATE/site $STATE/wheels/*.whl && $PY -m pip install -q --no-index --no-deps --no-build-isolation -e . && $PY -c 'import exl2core, gguf, fastparquet; print(\"installed\")'"
background exllamav2-build "$PY -c 'import exllamav2, exllamav2.ext; print(\"exllamav2\", exllamav2.__version__, \"extension built\")'"
step kernels-build 300 0 "$PY -m exl2core.cli doctor"
step cuda-tests 240 0 "$PYTEST tests/test_kernels.py && $PYTEST -m cuda tests/test_gptq.py"
step loader-test 120 0 "EXL2_EXLLAMAV2_WHEEL=$STATE/wheels/exllamav2-0.3.2-py3-none-any.whl $PYTEST tests/test_exllamav2_loader.py"
wait_background exllamav2-build
step compare-exl2core 240 1 "$COMPARE --tools exl2core"
collect_compare
step compat-smollm2 120 1 "EXL2_COMPAT_MODEL=$SMOLLM2_OUT $PYTEST tests/test_exllamav2_compat.py -k real_model"
step compare-exllamav2 240 1 "$COMPARE --tools exllamav2"
step compare-table 60 1 "$COMPARE"
collect_compare
step compat-tiny 300 1 "$PYTEST tests/test_exllamav2_compat.py -k 'not real_model'"

if [ $DRY_RUN = 0 ]; then
    used > "$STATE/used_s"
    summary
    echo "device check: $(( $(date +%s) - START )) s; results in $RESULTS"
    cat "$RESULTS/summary.md"
fi
