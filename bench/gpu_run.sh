#!/usr/bin/env bash
# The GPU bench in one command, on a lent GPU machine that has torch but not our other packages and no
# network. From the repo root, with the folders .whl (wheels of the packages the machine lacks, at our
# versions) and .gpu_data (a copy of ../shared/data) beside the checkout:
#
#     OUT=/some/dir bash bench/gpu_run.sh [more bench_trl.py options, which win over the preset]
#
# (there the device tool sets OUT; KTO_SCALE_COMMIT=<hash> names the commit in the report where the copy
# has no .git.) Expected on one H100: about 4 minutes in all; the limits below end it within about 7.
# It installs the wheels into $SITE, prints the GPU and the versions, checks the imports and a one-rank
# process group (bench/gpu_check.py, seconds), then runs `bench_trl.py --gpu-preset` under a time limit.
# What comes back in $OUT: gpu.log (everything printed), results-gpu/results.{json,md}, and runs.tar.gz
# (spec, each run's result and log, metrics), which holds whatever runs finished even if the bench did not.
set -uo pipefail

OUT=${OUT:?set OUT to the folder the results go to}
WHEELS=${WHEELS:-.whl}                   # the wheels to install
CHECK_ARGS=${CHECK_ARGS:-}               # --cpu: a rehearsal on a machine without CUDA (with tiny bench options)
SITE=${SITE:-/tmp/site}                  # where the wheels are installed (--target)
WORK=${WORK:-/tmp/kto_bench_work}        # the bench's work dir: model, data, run dirs, logs
BENCH_LIMIT_S=${BENCH_LIMIT_S:-360}      # the whole bench is killed after this
BUDGET_S=${BUDGET_S:-240}                # no run starts this long after the bench started
RUN_LIMIT_S=${RUN_LIMIT_S:-110}          # one run is killed after this, and the bench goes on

step() { echo "=== $(date -u +%H:%M:%S) $*"; }

main() {
    step "install $(ls "$WHEELS"/*.whl | wc -l) wheels into $SITE"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        "$WHEELS"/*.whl || { echo "FAILED: pip install of $WHEELS/*.whl (was it carried?)"; return 2; }
    export PYTHONPATH="$SITE:$PWD" PATH="$SITE/bin:$PATH" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
    # No network there: nothing may wait on the Hub. One process: NCCL needs no interface but loopback.
    export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
    export NCCL_SOCKET_IFNAME=lo NCCL_DEBUG=WARN

    step "nvidia-smi"
    timeout 15 nvidia-smi || echo "(nvidia-smi failed)"
    step "gpu_check"
    timeout 90 python3 bench/gpu_check.py $CHECK_ARGS || { echo "FAILED: bench/gpu_check.py (above)"; return 3; }

    rm -rf "$WORK"  # a warm machine keeps an earlier call's results, which would be packed again
    step "bench (at most ${BENCH_LIMIT_S} s)"
    local code=0
    timeout -k 15 "$BENCH_LIMIT_S" python3 bench/bench_trl.py --gpu-preset --keep-going --shared-data .gpu_data \
        --work-dir "$WORK" --out "$OUT/results-gpu" --budget "$BUDGET_S" --timeout "$RUN_LIMIT_S" "$@" || code=$?
    [ "$code" = 124 ] && echo "FAILED: the bench ran past ${BENCH_LIMIT_S} s and was killed"
    step "bench exit $code; packing the runs' results and logs"
    (cd "$WORK" 2>/dev/null && tar czf "$OUT/runs.tar.gz" spec.json result_*.json log_*.txt run_*/metrics.jsonl) \
        2>/dev/null
    ls -la "$OUT" "$OUT/results-gpu" 2>/dev/null
    return "$code"
}

mkdir -p "$OUT"
main "$@" 2>&1 | tee "$OUT/gpu.log"
