#!/usr/bin/env bash
# The biggest model a 2-core, 24 GB CPU machine trains: Llama-3-8B's shape (8.03B parameters, 16 GB in
# bf16) on 2 gloo ranks, FSDP2 and DeepSpeed ZeRO-3 with offload. Each engine precomputes one batch of
# reference log-probs, then trains two optimizer steps from that cache; the training log ends with each
# rank's peak RSS beside the planner's estimate, which this script collects.
#
#   bench/cpu_8b.sh [WORK]      # WORK defaults to /tmp/kto-cpu-8b (needs ~17 GB of disk for the model)
#   ENGINES=fsdp bench/cpu_8b.sh   # chosen engines: fsdp, zero3_offload, zero3 (a ds_configs/ name)
#
# Sequences are short (max_length 32) so that a step takes minutes, not hours, on two cores: what is
# measured is the memory of holding, sharding and updating an 8B model, which the length barely changes.
# On a 23.5 GiB host with AMX-BF16 (docs/scaling.md, 356654d): FSDP2 5.5 min in all (1:23 precompute, 4:01 training at 104 s a step);
# ZeRO-3 (live parameters 1e8, 3643166) trains its two steps; with offload it is OOM-killed in step 2. bf16 on an
# AVX2-only CPU runs at 7-8 GFLOP/s a core: expect about an hour there.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-/tmp/kto-cpu-8b}
PY=${PYTHON:-.venv/bin/python}
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
mkdir -p "$WORK"
[ -f "$WORK/model/config.json" ] || $PY bench/load_memory.py --make-model "$WORK/model" --shape 8b
$PY - "$WORK/data.jsonl" <<'EOF'
import json, sys
rows = [{"prompt": f"Question {i}: what is {i} + {i + 1}?", "completion": f" {2 * i + 1 + (k % 2)}.", "label": k % 2 == 0}
        for i in range(2) for k in range(2)]
open(sys.argv[1], "w").write("".join(json.dumps(r) + "\n" for r in rows))
EOF
for engine in ${ENGINES:-fsdp zero3_offload}; do
  case $engine in
    fsdp) options=(--fsdp full_shard --deepspeed null) ;;
    *)  # zero3_offload, zero3: the shipped JSON with DeepSpeed's live-parameter cache at 1e8 parameters
        # (0.2 GB) instead of 1e9 (2 GB), which a rank of this host cannot spare (docs/scaling.md)
        $PY -c 'import json, sys; c = json.load(open(sys.argv[1])); c["zero_optimization"].update(
stage3_max_live_parameters=1e8, stage3_max_reuse_distance=1e8); json.dump(c, open(sys.argv[2], "w"), indent=1)' \
          "ds_configs/$engine.json" "$WORK/$engine.json"
        options=(--deepspeed "$WORK/$engine.json") ;;
  esac
  common=(--model_name_or_path "$WORK/model" --dataset_name "$WORK/data.jsonl" --eval_fraction 0 --bf16 true
          --max_length 32 --max_prompt_length 24 --per_device_train_batch_size 1 --per_device_eval_batch_size 2
          --gradient_accumulation_steps 1 --max_steps 2 --logging_steps 1 --save_steps 1000 --disable_tqdm true
          --ref_cache "$WORK/cache-$engine" --output_dir "$WORK/run-$engine" --overwrite_output_dir true "${options[@]}")
  rm -rf "$WORK/cache-$engine"
  /usr/bin/time -v $PY -m torch.distributed.run --nproc_per_node 2 --master_port $((29500 + RANDOM % 1000)) \
    launch/precompute_ref.py "${common[@]}" 2>&1 | tee "$WORK/precompute-$engine.log" | grep -E "error|Maximum resident|Elapsed" || true
  /usr/bin/time -v $PY -m torch.distributed.run --nproc_per_node 2 --master_port $((29500 + RANDOM % 1000)) \
    launch/train.py "${common[@]}" 2>&1 | tee "$WORK/train-$engine.log" | grep -E "error|Memory estimate|Measured peak|Elapsed|'loss'|loss=" || true
done
