"""The capacity planner (kto_scale.plan) against measurement: predicted vs measured peak memory per rank.

    python bench/plan_check.py --out bench/results-plan            # on CPU: peak RSS, 1 and 2 ranks
    python bench/plan_check.py --out bench/results-plan --only zero3-2ranks-b4 --allocator "mmap threshold 64 KiB"

Each case is one real training run (launch/train.py: init_random_weights, fp32, one optimizer step)
of a Llama shape built from the packaged tiny tokenizer and a config.json of that shape, on data whose
every row is cut to max_length (so a padded batch is B x T, the planner's worst case). The run itself
logs the planner's estimate at start and every rank's measured peak at the end
(kto_scale.memory_report); this script collects those lines into results.md.

What is compared on CPU: each rank's peak RSS (ru_maxrss) against the estimate where the "GPU" is host
memory: the per-GPU total with the framework overhead taken as the RSS the rank already holds before
the model loads (Python, torch, transformers, DeepSpeed, the data), or the model a rank builds whole
while loading, when that is larger (kto_scale.memory_report.comparable_estimate). On a GPU the run
logs torch.cuda.max_memory_allocated against the estimate less its CUDA allowance.
"""

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from kto_scale.assets import TINY_LLAMA_DIR  # noqa: E402

# A ~60M-parameter Llama (vocab 32000): weights, activations and the LM head chunk all count.
SHAPE = {"hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 8, "num_attention_heads": 8,
         "num_key_value_heads": 4, "head_dim": 64, "vocab_size": 32000}
ZERO2, ZERO3 = str(REPO / "ds_configs/zero2.json"), str(REPO / "ds_configs/zero3.json")
# name: (ranks, launcher, options)
CASES = {
    "zero2-b2": (1, "python", {"per_device_train_batch_size": 2}),
    "zero2-b8": (1, "python", {"per_device_train_batch_size": 8}),
    "zero2-b8-ckpt": (1, "python", {"per_device_train_batch_size": 8, "gradient_checkpointing": True}),
    "zero2-2ranks-b4": (2, "deepspeed", {"per_device_train_batch_size": 4}),
    "zero3-2ranks-b4": (2, "deepspeed", {"per_device_train_batch_size": 4, "deepspeed": ZERO3}),
    "fsdp-2ranks-b4": (2, "torchrun", {"per_device_train_batch_size": 4, "fsdp": "full_shard", "deepspeed": None}),
    "zero2-wide-b2": (1, "python", {"per_device_train_batch_size": 2, "shape": {"hidden_size": 1024,
                                                                               "intermediate_size": 2816}}),
}
# glibc keeps freed blocks of up to 32 MiB in its heap once its mmap threshold has adapted, so peak RSS
# runs above the peak of live tensors; with a fixed 64 KiB threshold every large tensor is its own mapping,
# returned when freed, and peak RSS follows live memory, as torch.cuda.max_memory_allocated does on a GPU.
ALLOCATORS = {"glibc default": {}, "mmap threshold 64 KiB": {"MALLOC_MMAP_THRESHOLD_": "65536"}}
ESTIMATE = re.compile(r"Memory estimate per GPU \(launch/plan.py\): ([\d.]+) GiB")
PEAK = re.compile(r"Measured peak memory \(([^)]+)\) per rank: ([\d., ]+) GiB; the planner estimated ([\d.]+) GiB")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_model(path: Path, shape: dict) -> Path:
    """A model dir: the tiny tokenizer and a config.json of `shape` (weights: init_random_weights)."""
    path.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TINY_LLAMA_DIR / name, path / name)
    config = json.loads((TINY_LLAMA_DIR / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, **SHAPE, **shape}, indent=1))
    return path


def make_data(path: Path, rows: int = 64) -> Path:
    """Short prompts and completions far longer than max_length: every example is cut to exactly max_length
    tokens, nearly all completion (the planner's worst case; the KL pass x + y + y' is about 2 max_length)."""
    words = "the quick brown fox jumps over a lazy dog while seven wise owls count stars above the hill "
    lines = [json.dumps({"prompt": f"Question {i}:", "completion": f" answer {i} " + words * 40,
                         "label": i % 2 == 0}) for i in range(rows)]
    path.write_text("\n".join(lines) + "\n")
    return path


def run_case(name: str, work: Path, max_length: int, allocator: str) -> dict:
    ranks, launcher, options = CASES[name]
    options = dict(options)
    model = make_model(work / f"model-{name}", options.pop("shape", {}))
    config = {"model_name_or_path": str(model), "init_random_weights": True, "dataset_name": str(make_data(work / "data.jsonl")),
              "output_dir": str(work / name), "overwrite_output_dir": True, "max_length": max_length,
              "max_prompt_length": max_length // 2, "gradient_accumulation_steps": 1, "lora_r": 16, "lora_alpha": 32,
              "lora_dropout": 0.0, "max_steps": 1, "logging_steps": 1, "save_steps": 1000, "disable_tqdm": True,
              "deepspeed": ZERO2, "attn_implementation": "sdpa", **options}
    config_path = work / f"{name}.yaml"
    config_path.write_text(yaml.safe_dump(config))
    train = ["launch/train.py", "--config", str(config_path)]
    port = str(free_port())  # not the launchers' default 29500, which another job may hold
    command = {"python": [sys.executable, *train],
               "deepspeed": [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks),
                             "--master_port", port, *train],
               "torchrun": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
                            "--master_port", port, *train]}[launcher]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=1800,
                          env={**os.environ, **ALLOCATORS[allocator], "OMP_NUM_THREADS": "2", "PYTHONPATH": str(REPO)})
    log = done.stdout + done.stderr
    estimate, peak = ESTIMATE.search(log), PEAK.search(log)
    if done.returncode != 0 or not (estimate and peak):
        return {"case": name, "allocator": allocator, "failed": log[-2000:]}
    measured = [float(x) for x in peak.group(2).split(",")]
    predicted = float(peak.group(3))
    return {"case": name, "allocator": allocator, "ranks": ranks, "options": options, "estimate_gib": float(estimate.group(1)),
            "compared": peak.group(1), "predicted_gib": predicted, "measured_gib": measured,
            "worst_error": max(abs(m - predicted) / m for m in measured), "command": " ".join(command)}


def report(rows: list[dict], max_length: int) -> str:
    lines = [f"# Planner vs measured peak per rank (CPU, fp32, max_length {max_length}, one optimizer step)\n",
             f"Shape: {SHAPE} unless the case says otherwise. Error: |measured - predicted| / measured, the "
             "worst rank.\n",
             "| case | ranks | predicted, GiB | allocator | measured per rank, GiB | error |",
             "|---|---:|---:|---|---:|---:|"]
    for r in rows:
        if "failed" in r:
            lines.append(f"| {r['case']} | | | {r['allocator']} | failed | |")
            continue
        lines.append(f"| {r['case']} | {r['ranks']} | {r['predicted_gib']:.3f} | {r['allocator']} | "
                     f"{', '.join(f'{m:.3f}' for m in r['measured_gib'])} | {100 * r['worst_error']:.1f}% |")
    for allocator in ALLOCATORS:
        ok = [r for r in rows if "failed" not in r and r["allocator"] == allocator]
        if ok:
            worst = max(ok, key=lambda r: r["worst_error"])
            lines.append(f"\nWorst case ({allocator}): {worst['case']}, {100 * worst['worst_error']:.1f}%.")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--only", nargs="*", choices=list(CASES), help="these cases (default: all)")
    parser.add_argument("--max_length", type=int, default=256)
    parser.add_argument("--allocator", nargs="*", choices=list(ALLOCATORS), help="these allocators (default: both)")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="plan-check-") as tmp:
        for name in args.only or CASES:
            for allocator in args.allocator or ALLOCATORS:
                rows.append(run_case(name, Path(tmp), args.max_length, allocator))
                print(json.dumps({k: v for k, v in rows[-1].items() if k != "failed"}), rows[-1].get("failed", ""),
                      flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(rows, indent=1))
    (args.out / "results.md").write_text(report(rows, args.max_length))
    print(report(rows, args.max_length))


if __name__ == "__main__":
    main()
