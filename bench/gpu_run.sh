#!/usr/bin/env bash
# The GPU bench in one command, on a lent GPU machine that has torch but not our other packages and no
# network. From the repo root, with the folders .whl (wheels of the packages the machine lacks, at our
# versions: bench/wheels.sh fills it) and .gpu_data (a copy of ../shared/data) beside the checkout:
#
#     OUT=/some/dir bash bench/gpu_run.sh [more bench_trl.py options, which win over the preset]
#
# (there the device tool sets OUT and carries .whl and .gpu_data; KTO_SCALE_COMMIT=<hash> names the commit
# in the report where the copy has no .git.) The preset is $PRESET, 8b unless set (--preset 1b in the
# options wins too). It installs the wheels into $SITE (none in $WHEELS: it uses what is installed), prints
# the GPU and the versions, checks the imports and a one-rank process group (bench/gpu_check.py, seconds),
# then runs `bench_trl.py --preset $PRESET` under time limits. What comes back in $OUT: gpu.log (everything
# printed), results-gpu/results.{json,md} (and profile-RUN.{txt,json} with --torch-profile RUN,
# max-batch.{json,md} with --find-max-batch RUNS), and runs.tar.gz (spec, each run's result and log,
# metrics), which holds whatever runs finished even if the bench did not.
#
# The time budget: 6 minutes on a fresh H100/H200, install and model init included (--preset 8b).
#   install + nvidia-smi + gpu_check   ~25 s (the 1.1B call: 1 + 1 + 18 s)
#   inputs (tokenize, no weights)      ~15 s (the 8B weights are built by each run on the GPU, seeded)
#   each run's start-up                ~25-30 s (imports, CUDA, the 8B init on the GPU, engine, data)
#   each run's 2 + 8 steps at B 16, from bench/flops.py at 40% MFU of an H100's 989 TFLOP/s (the steps
#   average 2,711 example tokens, as many KL tokens; Llama-3-8B P = 6.98e9 matmul weights):
#     kto (shared-prompt reference)    165 TFLOP/step  0.42 s/step   ~4 s
#     kto_separate (two passes)        193 TFLOP/step  0.49 s/step   ~5 s
#     kto_cache / trl_pre (no ref.)    116 TFLOP/step  0.29 s/step   ~3 s (+ the precompute, ~3 s)
#     trl (pads each batch: ~70% of B x T is padding, 414 TFLOP/step executed)  1.05 s/step  ~11 s
#   So start-up dominates: 7 children (kto, trl, kto_precompute, kto_cache, trl_pre, kto_separate,
#   kto_kl_quarter; bench_trl.py runs them in that order, most important first) at ~35-55 s each, ~300 s
#   at today's efficiency. The limits below hold whatever happens: no run starts after BUDGET_S, a run
#   is killed after RUN_LIMIT_S, the bench after BENCH_LIMIT_S (>= BUDGET_S + RUN_LIMIT_S + the report,
#   so the report comes out), 25 + 320 + packing < 360 s. The runs left out are named in the report.
set -uo pipefail

OUT=${OUT:?set OUT to the folder the results go to}
PRESET=${PRESET:-8b}                     # bench_trl.py --preset
WHEELS=${WHEELS:-.whl}                   # the wheels to install (none there: the installed packages are used)
CHECK_ARGS=${CHECK_ARGS:-}               # --cpu: a rehearsal on a machine without CUDA (with tiny bench options)
SITE=${SITE:-/tmp/site}                  # where the wheels are installed (--target)
WORK=${WORK:-/tmp/kto_bench_work}        # the bench's work dir: model config, data, run dirs, logs
BENCH_LIMIT_S=${BENCH_LIMIT_S:-320}      # the whole bench is killed after this
BUDGET_S=${BUDGET_S:-220}                # no run starts this long after the bench started
RUN_LIMIT_S=${RUN_LIMIT_S:-90}           # one run is killed after this, and the bench goes on
CHECK_LIMIT_S=${CHECK_LIMIT_S:-90}       # bench/gpu_check.py is given this long (18 s on the H200)

step() { echo "=== $(date -u +%H:%M:%S) $*"; }

main() {
    local wheels=()
    [ -d "$WHEELS" ] && wheels=("$WHEELS"/*.whl)
    [ -e "${wheels[0]:-}" ] || wheels=()
    if [ "${#wheels[@]}" = 0 ]; then
        step "no wheels in $WHEELS: using the packages python3 already has"
    else
        step "install ${#wheels[@]} wheels into $SITE"
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
            "${wheels[@]}" || { echo "FAILED: pip install of $WHEELS/*.whl (was it carried?)"; return 2; }
    fi
    export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}" PATH="$SITE/bin:$PATH" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
    # No network there: nothing may wait on the Hub. One process: NCCL needs no interface but loopback.
    export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
    export NCCL_SOCKET_IFNAME=lo NCCL_DEBUG=WARN

    step "nvidia-smi"
    timeout 15 nvidia-smi || echo "(nvidia-smi failed)"
    step "gpu_check"
    timeout "$CHECK_LIMIT_S" python3 bench/gpu_check.py $CHECK_ARGS || { echo "FAILED: bench/gpu_check.py (above)"; return 3; }

    rm -rf "$WORK"  # a warm machine keeps an earlier call's results, which would be packed again
    step "bench (at most ${BENCH_LIMIT_S} s)"
    local code=0
    timeout -k 15 "$BENCH_LIMIT_S" python3 bench/bench_trl.py --preset "$PRESET" --keep-going --shared-data .gpu_data \
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
