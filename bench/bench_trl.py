"""Benchmark kto-scale against TRL's KTOTrainer on the same model, tokenizer, data, batches and settings.

    python bench/bench_trl.py --pairs 48 --steps 6 --warmup 2 --threads 1 --out bench/results

One command. The parent process builds the shared inputs once, then runs every trainer in its own
subprocess (so each run's peak RSS is its own, read with os.wait4 on that child), one after the other:

  kto          kto-scale, reference log-probs on the fly (adapters disabled)
  kto_cache    kto-scale precompute (launch/precompute_ref.py) then training with --ref_cache
               (skipped with a note when kto_scale/ref_cache.py or launch/precompute_ref.py is missing)
  trl          TRL KTOTrainer + peft LoRA, reference on the fly (adapters disabled)
  trl_pre      TRL KTOTrainer with precompute_ref_log_probs=True (precompute timed separately)
  trl_compact, trl_pre_compact
               the same with TRL's CUDA LM-head path forced on: on CPU, TRL 1.16 projects every position
               through the LM head (its compact, completion-only path needs Triton); these rows are the
               stand-in for a GPU comparison
  kto_grouped  (optional) kto-scale with group_by_length: other batches, compare tokens/s
  bare         a bare torch.inference_mode() forward loop (plain HF model: decoder + LM head on the
               completion positions) over the precompute's batches, the yardstick for the precompute

Shared inputs (in --work-dir, a temp dir by default): a Llama-shaped model with seeded random weights,
saved once with save_pretrained; the Llama 2 tokenizer (BOS added by the tokenizer, pad = <unk>) saved
next to it; the first --pairs pairs of HH-harmless-test split by kto_scale.data into one desirable and
one undesirable {prompt, completion, label} row each, written once as a TRL-format jsonl that both
trainers read. Pairs whose prompt alone fills max_length are left out beforehand, so neither trainer
drops anything and both see the same rows.

Same batches: kto-scale shuffles with its BatchPlan (seed); TRL samples sequentially, so the TRL child
gets the same rows in kto-scale's order, and step k of both holds the same 8 examples. With
--kl-pairs matched (default) the TRL child's KL completions are kto-scale's KL partners (TRL's own
rule, the previous row of the batch, gives other sequences of a similar length); every pass of both
trainers then sees the same tokens, which the report checks per step, and the per-step losses of the
two trainers must agree (same LoRA init seed, same batches, same math).

Timing, the same for both: wall time of each optimizer step after the warm-up steps, data path
included, logging excluded. kto-scale: its metrics.jsonl (examples / examples_per_s per logging window,
logging_steps=1). TRL: a TrainerCallback, from the end of the previous step's logging (on_log) to
this step's on_step_end. Eval and checkpointing are off in both.
"""

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared/data/hh-rlhf-harmless-test.jsonl.gz"
DEFAULT_TOKENIZER = REPO.parent / "shared/data/llama2-tokenizer"
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
TARGETS = {  # what the project wants to meet (reported, not enforced)
    "on_the_fly_vs_trl": 1.3,
    "cache_vs_trl_on_the_fly": 2.0,
    "cache_vs_trl_precompute": 1.3,
    "precompute_vs_bare_loop": 0.9,
}


# --------------------------------------------------------------------------------------------------
# shared helpers
# --------------------------------------------------------------------------------------------------


def _log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _rss_mib() -> float:
    """Current resident set size of this process."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _padding_mask(sequences: dict):
    """The attention mask of padded inputs; all ones for packed (padding-free) ones."""
    import torch

    if "attention_mask" in sequences:
        return sequences["attention_mask"]
    return torch.ones_like(sequences["input_ids"])


def _batch_stats(attention_mask, completion_mask, kl_attention_mask, kl_completion_mask, rows=None) -> dict:
    """Token counts of one micro-batch: non-pad and padded (B*T) for the example and KL sequences."""
    return {
        "rows": int(attention_mask.shape[0]) if rows is None else rows,
        "policy_tokens": int(attention_mask.sum()),
        "policy_padded": int(attention_mask.numel()),
        "completion_tokens": int(completion_mask.sum()),
        "kl_tokens": int(kl_attention_mask.sum()),
        "kl_padded": int(kl_attention_mask.numel()),
        "kl_completion_tokens": int(kl_completion_mask.sum()),
    }


def _busy_cpu_s() -> float:
    """CPU seconds all processes of the machine have used since boot (from /proc/stat)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, idle, iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _git_state() -> dict:
    """The kto-scale commit benchmarked, and the files that differ from it (other work in progress)."""
    def git(*cmd):
        try:
            return subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    dirty = [line[3:] for line in git("status", "--porcelain").splitlines() if line[3:].startswith(("kto_scale/", "launch/"))]
    return {"commit": git("rev-parse", "--short", "HEAD"), "modified_library_files": dirty}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# --------------------------------------------------------------------------------------------------
# parent: shared inputs
# --------------------------------------------------------------------------------------------------


def build_inputs(args, work: Path) -> dict:
    """Model, tokenizer, data file and the kto-scale view of the data; returns the spec the children read."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaTokenizer

    from kto_scale.collate import BatchPlan
    from kto_scale.data import load_examples
    from kto_scale.prepare import tokenize_examples

    model_dir = work / "model"
    tokenizer = LlamaTokenizer.from_pretrained(str(args.tokenizer), add_bos_token=True, add_eos_token=False)
    tokenizer.pad_token = tokenizer.unk_token  # a pad distinct from EOS; padding is masked either way
    assert tokenizer("a").input_ids[0] == tokenizer.bos_token_id, "the tokenizer must add BOS on its own"

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
        max_position_embeddings=2048, tie_word_embeddings=False, attention_dropout=0.0,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    del model

    # The first --pairs pairs (in file order) whose prompt leaves room for a completion token.
    examples, skipped_bad = load_examples(str(args.data), skip_bad_rows=True)
    by_pair = defaultdict(list)
    for e in examples:
        by_pair[e.pair_id].append(e)
    kept, too_long = [], 0
    for pair_id in sorted(by_pair):
        pair = by_pair[pair_id]
        prompts, _ = tokenize_examples(pair, tokenizer)
        if max(len(p) for p in prompts) >= args.max_length:
            too_long += 1
            continue
        kept.extend(pair)
        if len(kept) >= 2 * args.pairs:
            break
    data_file = work / "kto_unpaired.jsonl"
    with open(data_file, "w") as f:
        for e in kept:
            f.write(json.dumps({"prompt": e.prompt, "completion": e.completion, "label": e.label}) + "\n")

    # kto-scale's own view of that file: the same function the trainer calls.
    kto_config_path = write_kto_config(args, work, model_dir, data_file, work / "run_kto", ref_cache=None)
    from kto_scale.config import load_config

    try:  # where the trainer's data preparation lives has moved between versions
        from kto_scale.prepare import prepare_data
    except ImportError:
        from kto_scale.trainer import prepare_data

    kconf = load_config(["--config", str(kto_config_path)])
    train_set, _ = prepare_data(kconf, tokenizer)
    n = len(train_set)
    assert n == len(kept), f"kto-scale kept {n} of {len(kept)} rows; the pre-filter should leave nothing to drop"
    total_steps = args.warmup + args.steps
    plan = BatchPlan(n, args.batch_size, 1, 1)
    if plan.steps_per_epoch < total_steps:
        raise SystemExit(f"{n} examples give {plan.steps_per_epoch} steps of {args.batch_size}; "
                         f"--warmup + --steps = {total_steps}: raise --pairs.")
    # The rows of each kto-scale step (epoch 0); TRL gets the whole permutation in this order.
    order = [i for step in range(plan.steps_per_epoch) for i in plan.micro_batches(step, 0, args.seed, 0)[0]]
    assert sorted(order) == list(range(n))
    spec = {
        "work": str(work), "model_dir": str(model_dir), "data_file": str(data_file), "kto_config": str(kto_config_path),
        "n_examples": n, "n_pairs": len(kept) // 2, "pairs_skipped_too_long": too_long, "bad_rows_skipped": skipped_bad,
        "n_params": n_params, "vocab": len(tokenizer), "order": order, "kl_index": list(train_set["kl_index"]),
        "prompt_ids": list(train_set["prompt_ids"]), "completion_ids": list(train_set["completion_ids"]),
        "kl_completion_ids": list(train_set["kl_completion_ids"]),
    }
    for k in ("batch_size", "max_length", "lr", "beta", "seed", "warmup", "steps", "precompute_batch_size",
              "lora_r", "lora_alpha", "kl_pairs", "threads"):
        spec[k] = getattr(args, k)
    (work / "spec.json").write_text(json.dumps(spec))
    return spec


def write_kto_config(args, work: Path, model_dir: Path, data_file: Path, output_dir: Path, ref_cache) -> Path:
    import yaml

    config = {
        "model_name_or_path": str(model_dir),
        "dataset_name": str(data_file),
        "skip_bad_rows": True,
        "output_dir": str(output_dir),
        "overwrite_output_dir": True,
        "max_length": args.max_length,
        "max_prompt_length": None,  # TRL 1.16 has no prompt truncation; the pre-filter makes this moot
        "per_device_train_batch_size": args.batch_size,
        "gradient_accumulation_steps": 1,
        "learning_rate": args.lr,
        "lr_scheduler_type": "linear",
        "warmup_steps": 0,
        "max_grad_norm": 1.0,
        "beta": args.beta,
        "lora_r": args.lora_r,
        "lora_alpha": args.lora_alpha,
        "lora_dropout": 0.0,
        "lora_target_modules": LORA_TARGETS,
        "max_steps": args.warmup + args.steps,
        "logging_steps": 1,
        "save_steps": 10**9,
        "seed": args.seed,
        "data_seed": args.seed,
        "precompute_batch_size": args.precompute_batch_size,
        "disable_tqdm": True,
        "deepspeed": "ds_configs/zero2.json",
        "padding_free": args.padding_free,
    }
    if ref_cache:
        config["ref_cache"] = str(ref_cache)
    path = work / ("kto_config_cache.yaml" if ref_cache else "kto_config.yaml")
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


# --------------------------------------------------------------------------------------------------
# children
# --------------------------------------------------------------------------------------------------


def _child_env(spec: dict) -> None:
    import torch

    torch.set_num_threads(spec["threads"] or os.cpu_count())


def child_kto(spec: dict, result_path: Path, ref_cache: str | None, grouped: bool = False) -> None:
    """kto-scale's train() as launch/train.py runs it, with collate() wrapped to record each step's tokens."""
    import logging

    import kto_scale.trainer as trainer
    from kto_scale.config import load_config

    _child_env(spec)
    logging.basicConfig(level=logging.WARNING)
    batches = []
    original_collate = trainer.collate

    def recording_collate(dataset, indices, pad_id, packed=False):
        marks.append({"collate_wall": time.perf_counter(), "collate_cpu": time.process_time()})
        batch = original_collate(dataset, indices, pad_id, packed)
        p, k = batch["policy"], batch["kl"]
        batches.append({**_batch_stats(_padding_mask(p), p["completion_mask"], _padding_mask(k), k["completion_mask"],
                                       rows=len(indices)),
                        "indices": [int(i) for i in indices]})
        return batch

    original_train_step = trainer.train_step

    def timed_train_step(*args, **kwargs):
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        out = original_train_step(*args, **kwargs)
        marks[-1].update(step_wall=time.perf_counter() - start_wall, step_cpu=time.process_time() - start_cpu,
                         end_cpu=time.process_time(), rss_mib=_rss_mib())
        return out

    original_build_engine = trainer.build_engine
    rss = {}

    def recording_build_engine(*args, **kwargs):
        out = original_build_engine(*args, **kwargs)
        rss["after_setup_mib"], rss["peak_after_setup_mib"] = _rss_mib(), _maxrss_mib()
        return out

    marks = []
    trainer.collate = recording_collate
    trainer.train_step = timed_train_step
    trainer.build_engine = recording_build_engine
    argv = ["--config", spec["kto_config"]]
    if ref_cache:
        argv += ["--ref_cache", ref_cache, "--output_dir", str(Path(spec["work"]) / "run_kto_cache")]
    if grouped:
        argv += ["--group_by_length", "true", "--output_dir", str(Path(spec["work"]) / "run_kto_grouped")]
    config = load_config(argv)
    start = time.perf_counter()
    trainer.train(config)
    total = time.perf_counter() - start
    metrics = [json.loads(line) for line in open(Path(config.output_dir) / "metrics.jsonl")]
    steps = [m for m in metrics if m.get("split") == "train"]
    rows = []
    for m, b, mark in zip(steps, batches, marks, strict=False):
        # examples_per_s = examples / window wall time; the window is one step (logging_steps=1)
        examples = b["rows"]
        elapsed = examples / m["examples_per_s"]
        rows.append({"step": m["step"], "time_s": elapsed, "examples": examples,
                     "cpu_s": mark["end_cpu"] - mark["collate_cpu"], "train_step_s": mark["step_wall"],
                     "rss_mib": mark["rss_mib"],
                     "tokens_logged": m["tokens_per_s"] * elapsed, "loss": m["loss"], "kl": m.get("kl"), **b})
    result_path.write_text(json.dumps({"steps": rows, "total_s": total, "maxrss_self_mib": _maxrss_mib(),
                                       "n_collate_calls": len(batches), "rss": rss}))


def child_kto_precompute(spec: dict, result_path: Path, cache_dir: str) -> None:
    """launch/precompute_ref.py, with SequenceLogps.forward timed to separate the loop from start-up."""
    import runpy

    import torch

    import kto_scale.model as model_module

    _child_env(spec)
    calls = []
    original_forward = model_module.SequenceLogps.forward

    def timed_forward(self, input_ids, completion_mask, attention_mask=None, sequence_lengths=None):
        start = time.perf_counter()
        out = original_forward(self, input_ids, completion_mask, attention_mask, sequence_lengths)
        mask = _padding_mask({"input_ids": input_ids} if attention_mask is None else {"attention_mask": attention_mask})
        calls.append((start, time.perf_counter(), int(mask.sum()), int(mask.numel())))
        return out

    model_module.SequenceLogps.forward = timed_forward
    sys.argv = [str(REPO / "launch/precompute_ref.py"), "--config", spec["kto_config"], "--ref_cache", cache_dir]
    start = time.perf_counter()
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    except SystemExit as e:
        if e.code not in (0, None):
            raise
    total = time.perf_counter() - start
    loop = (calls[-1][1] - calls[0][0]) if calls else None
    result_path.write_text(json.dumps({
        "total_s": total, "loop_s": loop, "forward_s": sum(c[1] - c[0] for c in calls), "calls": len(calls),
        "tokens": sum(c[2] for c in calls), "padded": sum(c[3] for c in calls), "maxrss_self_mib": _maxrss_mib(),
        "torch_threads": torch.get_num_threads(),
    }))


def child_trl(spec: dict, result_path: Path, precompute: bool, compact: bool = False) -> None:
    """TRL's KTOTrainer on the same model/data/batches, a callback timing each step."""
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoTokenizer, TrainerCallback
    from trl import KTOConfig, KTOTrainer

    _child_env(spec)
    if compact:
        # TRL scores only the completion positions through the LM head when Triton runs (CUDA/XPU) and every
        # position elsewhere; this makes the CPU run take the CUDA branch (its torch tile kernel still runs).
        import trl.trainer.utils as trl_utils

        trl_utils._use_triton = lambda device: True
    work = Path(spec["work"])
    rows = [json.loads(line) for line in open(spec["data_file"])]
    order = spec["order"]
    dataset = datasets.Dataset.from_list([rows[i] for i in order])  # in memory: no cross-run cache reuse
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    matched = spec["kl_pairs"] == "matched"
    record = {"batches": [], "losses": [], "step_end": [], "log_end": [], "precompute_s": None}

    class BenchKTOTrainer(KTOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            dataset = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
            assert len(dataset) == len(order), "TRL dropped rows the pre-filter kept"
            record["trl_prompt_ids"] = [list(x) for x in dataset["prompt_ids"]]
            record["trl_completion_ids"] = [list(x) for x in dataset["completion_ids"]]
            if matched:  # kto-scale's KL completion of each row (its partner's completion, cut as it cuts it)
                kl = [spec["kl_completion_ids"][row] for row in order]
                dataset = dataset.map(lambda _, i: {"KL_completion_ids": kl[i]}, with_indices=True)
            return dataset

        def _precompute_ref_logps(self, dataset, name, batch_size):
            start = time.perf_counter()
            out = super()._precompute_ref_logps(dataset, name, batch_size)
            record["precompute_s"] = time.perf_counter() - start
            return out

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if model.training:
                record["batches"].append(_batch_stats(inputs["attention_mask"], inputs["completion_mask"],
                                                      inputs["KL_attention_mask"], inputs["KL_completion_mask"]))
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if model.training:
                record["losses"].append(float((loss[0] if return_outputs else loss).detach()))
            return loss

    class Timer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            record["log_end"].append((time.perf_counter(), time.process_time()))

        def on_step_end(self, args, state, control, **kwargs):
            record["step_end"].append((time.perf_counter(), time.process_time(), _rss_mib()))

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                record["log_end"].append((time.perf_counter(), time.process_time()))

    args = KTOConfig(
        output_dir=str(work / f"run_trl{'_pre' if precompute else ''}{'_compact' if compact else ''}"),
        per_device_train_batch_size=spec["batch_size"], gradient_accumulation_steps=1,
        max_steps=spec["warmup"] + spec["steps"], learning_rate=spec["lr"], lr_scheduler_type="linear",
        warmup_steps=0, max_grad_norm=1.0, weight_decay=0.0, optim="adamw_torch", beta=spec["beta"],
        max_length=spec["max_length"], bf16=False, fp16=False, gradient_checkpointing=False,
        logging_steps=1, save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(), seed=spec["seed"], data_seed=spec["seed"], dataloader_num_workers=0,
        dataloader_pin_memory=False, disable_dropout=True, precompute_ref_log_probs=precompute,
        precompute_ref_batch_size=spec["precompute_batch_size"],
    )
    peft_config = LoraConfig(r=spec["lora_r"], lora_alpha=spec["lora_alpha"], lora_dropout=0.0,
                             target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
    setup_start = time.perf_counter()
    trainer = BenchKTOTrainer(model=spec["model_dir"], args=args, train_dataset=dataset,
                              processing_class=tokenizer, peft_config=peft_config, callbacks=[Timer()])
    setup_s = time.perf_counter() - setup_start
    rss = {"after_setup_mib": _rss_mib(), "peak_after_setup_mib": _maxrss_mib()}
    start = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - start
    steps = []
    for i, (end, b) in enumerate(zip(record["step_end"], record["batches"], strict=False)):
        begin = record["log_end"][i]  # train begin, then the end of each step's logging
        steps.append({"step": i + 1, "time_s": end[0] - begin[0], "cpu_s": end[1] - begin[1], "examples": b["rows"],
                      "rss_mib": end[2], "loss": record["losses"][i], **b})
    result_path.write_text(json.dumps({
        "steps": steps, "total_s": total, "setup_s": setup_s, "precompute_s": record["precompute_s"],
        "maxrss_self_mib": _maxrss_mib(), "rss": rss,
        "trl_prompt_ids": record["trl_prompt_ids"], "trl_completion_ids": record["trl_completion_ids"],
    }))


def child_bare(spec: dict, result_path: Path) -> None:
    """The yardstick for the precompute: the plain HF model (no peft, no DeepSpeed) under inference_mode,
    decoder + LM head on the completion positions (kto_scale.logprobs), over the precompute's batches:
    rows in kto_scale.ref_cache.length_order (longest first), precompute_batch_size per batch, the
    example and the KL sequences of each batch."""
    import datasets
    import torch
    from transformers import AutoModelForCausalLM

    from kto_scale.collate import collate
    from kto_scale.logprobs import chunked_completion_logps

    _child_env(spec)
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32).eval()
    n = spec["n_examples"]
    dataset = datasets.Dataset.from_dict({
        "prompt_ids": spec["prompt_ids"], "completion_ids": spec["completion_ids"],
        "kl_completion_ids": spec["kl_completion_ids"], "label": [True] * n, "pair_id": [-1] * n,
    })
    try:
        from kto_scale.ref_cache import length_order

        order, batching = [int(i) for i in length_order(dataset)], "ref_cache.length_order (longest first)"
    except ImportError:
        order, batching = list(range(n)), "dataset order"
    size = spec["precompute_batch_size"]
    batches = [collate(dataset, order[i : i + size], 0) for i in range(0, n, size)]
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    tokens = padded = 0
    with torch.inference_mode():
        start = time.perf_counter()
        for batch in batches:
            for part in ("policy", "kl"):
                b = batch[part]
                hidden = decoder(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
                chunked_completion_logps(hidden, head, b["input_ids"], b["completion_mask"], 1024)
                tokens += int(b["attention_mask"].sum())
                padded += b["attention_mask"].numel()
        loop = time.perf_counter() - start
    result_path.write_text(json.dumps({"loop_s": loop, "tokens": tokens, "padded": padded, "batches": len(batches),
                                       "batching": batching, "maxrss_self_mib": _maxrss_mib()}))


# --------------------------------------------------------------------------------------------------
# parent: running children
# --------------------------------------------------------------------------------------------------


def run_child(name: str, child_args: list[str], work: Path, timeout: float, profile: Path | None = None,
              profile_rate: int = 50) -> dict:
    """Run this script as a child; return its result JSON plus wall time and peak RSS (os.wait4)."""
    result_path = work / f"result_{name}.json"
    result_path.unlink(missing_ok=True)
    log_path = work / f"log_{name}.txt"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", *child_args, "--spec", str(work / "spec.json"),
           "--result", str(result_path)]
    if profile is not None:
        cmd = ["py-spy", "record", "--format", "raw", "--rate", str(profile_rate), "-o", str(profile), "--", *cmd]
    _log(f"{name}: {' '.join(cmd[-8:])}  (log: {log_path})")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled",
           "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "TQDM_DISABLE": "1"}
    env.pop("RANK", None)
    start, busy_start = time.perf_counter(), _busy_cpu_s()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        deadline = start + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.2)
    wall = time.perf_counter() - start
    other_cpu = _busy_cpu_s() - busy_start - (usage.ru_utime + usage.ru_stime)
    code = os.waitstatus_to_exitcode(status)
    proc.returncode = code
    if code != 0 or not result_path.exists():
        tail = log_path.read_text()[-3000:]
        raise RuntimeError(f"{name} failed (exit {code}) after {wall:.0f}s; log tail:\n{tail}")
    result = json.loads(result_path.read_text())
    # ru_maxrss of the waited child (KiB): its own peak (py-spy's when profiling, not meaningful then)
    result.update(wall_s=wall, peak_rss_mib=usage.ru_maxrss / 1024, rss_source="os.wait4(child).ru_maxrss",
                  child_cpu_s=usage.ru_utime + usage.ru_stime, other_load_cores=max(other_cpu, 0.0) / wall)
    _log(f"{name}: done in {wall:.0f}s, peak RSS {result['peak_rss_mib']:.0f} MiB, "
         f"other processes used {result['other_load_cores']:.2f} cores meanwhile")
    return result


def cache_available() -> tuple[bool, str]:
    missing = [p for p in ("kto_scale/ref_cache.py", "launch/precompute_ref.py") if not (REPO / p).exists()]
    if missing:
        return False, f"not available: {', '.join(missing)} missing in this checkout"
    return True, ""


# --------------------------------------------------------------------------------------------------
# parent: summary
# --------------------------------------------------------------------------------------------------


RUN_LABELS = {
    "kto": "kto-scale, reference on the fly",
    "kto_cache": "kto-scale, reference from the disk cache",
    "trl": "TRL, reference on the fly",
    "trl_pre": "TRL, precompute_ref_log_probs",
    "trl_compact": "TRL, on the fly, completion-only LM head (its CUDA path)",
    "trl_pre_compact": "TRL, precompute, completion-only LM head (its CUDA path)",
}
TRAIN_RUNS = tuple(RUN_LABELS)


def summarize_run(result: dict, warmup: int) -> dict:
    timed = [s for s in result["steps"] if s["step"] > warmup]
    t = sum(s["time_s"] for s in timed)
    cpu = sum(s["cpu_s"] for s in timed)
    ex = sum(s["examples"] for s in timed)
    tok = sum(s["policy_tokens"] for s in timed)
    kl_tok = sum(s["kl_tokens"] for s in timed)
    step_times = [s["time_s"] for s in timed]
    out = {
        "timed_steps": len(timed), "timed_s": t, "examples_per_s": ex / t, "tokens_per_s": tok / t,
        "all_tokens_per_s": (tok + kl_tok) / t,
        "step_s_median": statistics.median(step_times), "step_s_min": min(step_times), "step_s_max": max(step_times),
        "cpu_s_per_step": cpu / len(timed), "examples_per_cpu_s": ex / cpu,
        "policy_pad_frac": 1 - tok / sum(s["policy_padded"] for s in timed),
        "kl_pad_frac": 1 - kl_tok / sum(s["kl_padded"] for s in timed),
        "peak_rss_mib": result["peak_rss_mib"], "wall_s": result["wall_s"],
        "other_load_cores": result["other_load_cores"],
    }
    if result.get("precompute_s") is not None:
        out["precompute_s"] = result["precompute_s"]
    rss = result.get("rss") or {}
    out["rss_after_setup_mib"] = rss.get("after_setup_mib")
    out["peak_rss_after_setup_mib"] = rss.get("peak_after_setup_mib")
    out["rss_during_training_max_mib"] = max((s["rss_mib"] for s in result["steps"]), default=None)
    out["step_times"] = [round(s["time_s"], 3) for s in timed]
    return out


def check_tokens(spec: dict, results: dict) -> dict:
    """Did both trainers tokenize the same text to the same ids, and process the same tokens each step?"""
    out = {}
    trl = next((results[k] for k in TRAIN_RUNS if k.startswith("trl") and k in results), None)
    if trl is not None:
        order, max_len = spec["order"], spec["max_length"]
        same_prompt = same_completion = 0
        diffs = []
        for pos, row in enumerate(order):
            kp, kc = spec["prompt_ids"][row], spec["completion_ids"][row]
            tp, tc = trl["trl_prompt_ids"][pos], trl["trl_completion_ids"][pos]
            same_prompt += kp == tp
            # kto-scale cuts the completion to fit max_length; TRL's collator cuts the joined sequence
            same_completion += kc == tc[: max_len - len(tp)]
            if kp != tp or kc != tc[: max_len - len(tp)]:
                diffs.append({"row": row, "kto_lens": [len(kp), len(kc)], "trl_lens": [len(tp), len(tc)]})
        out["rows"] = len(order)
        out["identical_prompt_ids"] = same_prompt
        out["identical_completion_ids"] = same_completion
        out["first_differences"] = diffs[:5]
        out["total_text_tokens_kto"] = sum(len(spec["prompt_ids"][r]) + len(spec["completion_ids"][r]) for r in order)
        out["total_text_tokens_trl"] = sum(min(len(p) + len(c), max_len) for p, c in
                                           zip(trl["trl_prompt_ids"], trl["trl_completion_ids"], strict=True))
    keys = ("policy_tokens", "policy_padded", "completion_tokens", "kl_tokens", "kl_padded", "kl_completion_tokens")
    if "kto" in results:
        ref = results["kto"]["steps"]
        for name in TRAIN_RUNS:
            if name == "kto" or name not in results:
                continue
            run = results[name]["steps"]
            n = min(len(ref), len(run))
            per_key = {key: {"equal_steps": sum(a[key] == b[key] for a, b in zip(ref[:n], run[:n], strict=True)),
                             "steps": n, "total_kto": sum(a[key] for a in ref[:n]),
                             f"total_{name}": sum(b[key] for b in run[:n])} for key in keys}
            per_key["loss_max_abs_diff"] = max(abs(a["loss"] - b["loss"]) for a, b in zip(ref[:n], run[:n], strict=True))
            out[f"kto_vs_{name}"] = per_key
    return out


def compute_ratios(runs: dict) -> dict:
    def ratio(a, b, key="examples_per_s"):
        return runs[a][key] / runs[b][key] if a in runs and b in runs else None

    out = {}
    for suffix in ("", "_compact"):
        trl, trl_pre = "trl" + suffix, "trl_pre" + suffix
        out["on_the_fly_vs_trl" + suffix] = ratio("kto", trl)
        out["cache_vs_trl_on_the_fly" + suffix] = ratio("kto_cache", trl)
        out["cache_vs_trl_precompute" + suffix] = ratio("kto_cache", trl_pre)
        out["cpu_time/on_the_fly_vs_trl" + suffix] = ratio("kto", trl, "examples_per_cpu_s")
        out["cpu_time/cache_vs_trl_on_the_fly" + suffix] = ratio("kto_cache", trl, "examples_per_cpu_s")
        out["cpu_time/cache_vs_trl_precompute" + suffix] = ratio("kto_cache", trl_pre, "examples_per_cpu_s")
        out["peak_rss/on_the_fly" + suffix] = ratio("kto", trl, "peak_rss_mib")
        out["peak_rss/cache_vs_precompute" + suffix] = ratio("kto_cache", trl_pre, "peak_rss_mib")
    return out


def padding_report(spec: dict, args) -> dict:
    """Pad share of this data's micro-batches: the random batches both trainers ran, and kto-scale's
    group_by_length batches (epoch 0), for the example and the KL sequences."""
    from kto_scale.collate import BatchPlan

    n, max_len = spec["n_examples"], spec["max_length"]
    example = [len(spec["prompt_ids"][i]) + len(spec["completion_ids"][i]) for i in range(n)]
    kl = [min(len(spec["prompt_ids"][i]) + len(spec["kl_completion_ids"][i]), max_len) for i in range(n)]
    out = {}
    for name, lengths in (("random", None), ("group_by_length", tuple(example))):
        plan = BatchPlan(n, args.batch_size, 1, 1, lengths)
        batches = [plan.micro_batches(step, 0, args.seed, 0)[0] for step in range(plan.steps_per_epoch)]
        for seq, lens in (("example", example), ("kl", kl)):
            real = sum(lens[i] for b in batches for i in b if i >= 0)
            padded = sum(len(b) * max(lens[i] for i in b if i >= 0) for b in batches)
            out[f"{name}/{seq}_pad_pct"] = round(100 * (1 - real / padded), 1)
    return out


def paired_step_ratios(runs: dict) -> dict:
    """Median over timed steps of (TRL step time / kto-scale step time): both ran the same batches, so this
    pairs step k with step k and is less sensitive to bursts of other load than the ratio of totals."""
    out = {}
    for a, b in (("kto", "trl"), ("kto", "trl_compact"), ("kto_cache", "trl"), ("kto_cache", "trl_compact"),
                 ("kto_cache", "trl_pre"), ("kto_cache", "trl_pre_compact")):
        if a in runs and b in runs and len(runs[a]["step_times"]) == len(runs[b]["step_times"]):
            out[f"{a}_vs_{b}"] = statistics.median(tb / ta for ta, tb in
                                                   zip(runs[a]["step_times"], runs[b]["step_times"], strict=True))
    return out


def fmt_ratio(x) -> str:
    return "n/a" if x is None else f"{x:.2f}x"


def _met(value, target, at_most=False) -> str:
    if value is None:
        return "n/a"
    return "yes" if (value <= target if at_most else value >= target) else "**no**"


def write_report(out: Path, summary: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    s, r, m, st = summary["runs"], summary["ratios"], summary["machine"], summary["setup"]
    lines = [
        "# kto-scale vs TRL KTOTrainer",
        "",
        f"Date: {summary['date']}  ",
        f"Machine: {m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads per run), {m['memory_gib']} GiB, "
        f"{m['device']}; torch {m['torch']}, transformers {m['transformers']}, trl {m['trl']}, peft {m['peft']}, "
        f"deepspeed {m['deepspeed']}  ",
        f"Command: `{summary['command']}` ({summary['total_bench_s'] / 60:.1f} min)  ",
        f"kto-scale: commit {m['kto_scale']['commit']}"
        + (f" with uncommitted changes to {', '.join(m['kto_scale']['modified_library_files'])}"
           if m["kto_scale"]["modified_library_files"] else ""),
        "",
        f"Model: Llama, hidden {st['hidden']}, {st['layers']} layers, {st['heads']} heads, MLP {st['intermediate']}, "
        f"vocab {st['vocab']} ({st['n_params'] / 1e6:.1f}M params, fp32, random init, seed {st['seed']}); LoRA r "
        f"{st['lora_r']} alpha {st['lora_alpha']} on q,k,v,o, dropout 0; reference = adapters disabled in both. "
        f"Data: the first {st['n_pairs']} HH-harmless-test pairs that fit = {st['n_examples']} unpaired rows "
        f"({st['pairs_skipped_too_long']} pairs skipped: prompt >= max_length). Micro-batch {st['batch_size']}, "
        f"max_length {st['max_length']} (no prompt cut in either), grad accumulation 1, lr {st['lr']}, "
        f"{st['warmup']} warm-up + {st['steps']} timed steps, precompute batch {st['precompute_batch_size']}, "
        f"KL pairs {st['kl_pairs']}. kto-scale on DeepSpeed ZeRO-2 (1 rank, gloo); TRL on its plain Trainer.",
        "",
        "| run | examples/s | tokens/s | median step s | CPU s/step | peak RSS MiB | pad % (example / KL seqs) "
        "| other load (cores) | precompute s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key, label in {**RUN_LABELS, "kto_grouped": "kto-scale, on the fly, group_by_length (other batches)"}.items():
        run = s.get(key)
        if run is None:
            if key in summary["notes"]:
                lines.append(f"| {label} | {summary['notes'][key]} |||||||")
            continue
        pre = ""
        if key == "kto_cache" and summary.get("precompute", {}).get("kto_precompute_loop_s") is not None:
            pre = f"{summary['precompute']['kto_precompute_loop_s']:.1f} (process {summary['precompute']['kto_precompute_process_s']:.0f})"
        elif run.get("precompute_s") is not None:
            pre = f"{run['precompute_s']:.1f}"
        lines.append(f"| {label} | {run['examples_per_s']:.3f} | {run['tokens_per_s']:.1f} | {run['step_s_median']:.2f} "
                     f"| {run['cpu_s_per_step']:.2f} | {run['peak_rss_mib']:.0f} "
                     f"| {100 * run['policy_pad_frac']:.1f} / {100 * run['kl_pad_frac']:.1f} "
                     f"| {run['other_load_cores']:.2f} | {pre} |")
    lines += [
        "",
        "examples/s and tokens/s: wall time of the timed steps (data path included, logging excluded); tokens = non-pad "
        "tokens of the examples' own sequences (the KL sequences add about as many again). CPU s/step: the trainer "
        "process's CPU time per timed step (all threads), less sensitive to other load on the machine. Peak RSS: "
        "the whole child process (os.wait4 ru_maxrss; the kto-scale cache row excludes the precompute process, "
        "reported below). Other load: CPU used by other processes during the run, in cores.",
        "",
        "| ratio (kto-scale / TRL) | target | vs TRL as it runs here (LM head on all positions) | met "
        "| vs TRL completion-only head (its CUDA path) | met |",
        "|---|---:|---:|---|---:|---|",
    ]
    rows = [("on_the_fly_vs_trl", "on the fly vs TRL on the fly, examples/s", TARGETS["on_the_fly_vs_trl"], False),
            ("cache_vs_trl_on_the_fly", "cache vs TRL on the fly, examples/s", TARGETS["cache_vs_trl_on_the_fly"], False),
            ("cache_vs_trl_precompute", "cache vs TRL precompute, examples/s", TARGETS["cache_vs_trl_precompute"], False),
            ("cpu_time/on_the_fly_vs_trl", "same, per CPU second: on the fly", TARGETS["on_the_fly_vs_trl"], False),
            ("cpu_time/cache_vs_trl_on_the_fly", "same, per CPU second: cache vs on the fly",
             TARGETS["cache_vs_trl_on_the_fly"], False),
            ("cpu_time/cache_vs_trl_precompute", "same, per CPU second: cache vs precompute",
             TARGETS["cache_vs_trl_precompute"], False),
            ("peak_rss/on_the_fly", "peak RSS, on the fly", 1.0, True),
            ("peak_rss/cache_vs_precompute", "peak RSS, cache vs TRL precompute", 1.0, True)]
    for key, label, target, at_most in rows:
        a, b = r.get(key), r.get(key + "_compact")
        lines.append(f"| {label} | {'<=' if at_most else '>='} {target} | {fmt_ratio(a)} | {_met(a, target, at_most)} "
                     f"| {fmt_ratio(b)} | {_met(b, target, at_most)} |")
    pad = summary.get("padding") or {}
    if pad:
        lines += ["", "Padding over the whole epoch (% of B x T that is padding): random batches, example / KL "
                  f"sequences {pad['random/example_pad_pct']} / {pad['random/kl_pad_pct']}; kto-scale "
                  f"group_by_length batches {pad['group_by_length/example_pad_pct']} / "
                  f"{pad['group_by_length/kl_pad_pct']}."]
    paired = r.get("median_paired_step") or {}
    if paired:
        lines += ["", "Median over the timed steps of the per-step ratio (TRL step time / kto-scale step time; "
                  "same batch at each step): " + ", ".join(f"{k.replace('_vs_', ' vs ')} {v:.2f}x"
                                                          for k, v in paired.items())]
    p = summary.get("precompute") or {}
    if p:
        lines += ["", "| precompute (all rows: example + KL sequences) | tokens/s | s |", "|---|---:|---:|"]
        if "kto_precompute_tokens_per_s" in p:
            lines.append(f"| kto-scale launch/precompute_ref.py (loop; process {p['kto_precompute_process_s']:.0f} s, "
                         f"peak RSS {p['kto_precompute_peak_rss_mib']} MiB) | {p['kto_precompute_tokens_per_s']:.0f} "
                         f"| {p['kto_precompute_loop_s']:.1f} |")
        if "bare_loop_tokens_per_s" in p:
            lines.append(f"| bare torch.inference_mode() loop, same batches ({p['bare_batching']}) "
                         f"| {p['bare_loop_tokens_per_s']:.0f} | {p['bare_loop_s']:.1f} |")
        for key in ("trl_pre", "trl_pre_compact"):
            if f"{key}_tokens_per_s" in p:
                lines.append(f"| {RUN_LABELS[key]} | {p[key + '_tokens_per_s']:.0f} | {p[key + '_s']:.1f} |")
        v = r.get("precompute_vs_bare_loop")
        lines += ["", f"kto-scale precompute / bare loop, tokens/s: {fmt_ratio(v)} (target >= "
                      f"{TARGETS['precompute_vs_bare_loop']}: {_met(v, TARGETS['precompute_vs_bare_loop'])})"]
    tc = summary["token_check"]
    lines += ["", "## Same tokens?", ""]
    if "rows" in tc:
        lines.append(f"- Tokenization: {tc['identical_prompt_ids']}/{tc['rows']} rows with identical prompt ids and "
                     f"{tc['identical_completion_ids']}/{tc['rows']} with identical completion ids (after the max_length "
                     f"cut); text tokens kto-scale {tc['total_text_tokens_kto']}, TRL {tc['total_text_tokens_trl']}.")
    for key, value in tc.items():
        if key.startswith("kto_vs_"):
            parts = [f"{k} {v['equal_steps']}/{v['steps']}" for k, v in value.items() if isinstance(v, dict)]
            lines.append(f"- Steps with equal counts, kto vs {key[7:]}: " + ", ".join(parts)
                         + f"; max |loss difference| over all steps {value['loss_max_abs_diff']:.2e}")
    if summary["notes"]:
        lines += ["", "## Notes", ""] + [f"- {k}: {v}" for k, v in summary["notes"].items()]
    if summary.get("profiles"):
        lines += ["", "## Where the time goes (py-spy samples of the training loop, separate short runs)", ""]
        for name, prof in summary["profiles"].items():
            lines += [f"**{name}** ({prof['samples']} samples)", "", "| phase / component | % |", "|---|---:|"]
            lines += [f"| {label} | {pct:.1f} |" for label, pct in prof["phases"] if pct >= 0.3]
            lines.append("")
    (out / "results.md").write_text("\n".join(lines) + "\n")


# --------------------------------------------------------------------------------------------------
# profiling (py-spy raw output -> share of samples per phase)
# --------------------------------------------------------------------------------------------------

class Stack:
    """One py-spy sample: frames root first, each "qualified.name (file:line)"."""

    def __init__(self, frames: list[str]):
        self.frames = []
        for fr in frames:
            name, _, loc = fr.partition(" (")
            file, _, line = loc.rstrip(")").rpartition(":")
            self.frames.append((name, file, int(line) if line.isdigit() else -1))

    def find(self, func: str, file: str | None = None):
        """The innermost frame whose qualified name is func or ends with .func (and whose file contains file)."""
        for frame in reversed(self.frames):
            name, f, _ = frame
            if (name == func or name.endswith("." + func)) and (file is None or file in f):
                return frame
        return None

    def has(self, func: str, file: str | None = None) -> bool:
        return self.find(func, file) is not None


def _source_lines(path: Path, needles: dict[str, str]) -> dict[int, str]:
    """{line number: label} of the first line containing each needle (profiles are told apart by call line)."""
    out = {}
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return out
    for needle, label in needles.items():
        for i, line in enumerate(lines, 1):
            if needle in line:
                out[i] = label
                break
    return out


def _component(st: Stack, lm_head: bool) -> str:
    """What a forward-pass sample was doing."""
    if lm_head:
        return "LM head + log-softmax"
    lora = st.find("forward", "peft/tuners/lora/layer.py")
    if st.has("LlamaAttention.forward"):
        if lora is not None and "lora_B(lora_A" in _peft_line(lora[2]):
            return "LoRA A/B matmuls"
        return "attention (q,k,v,o proj + sdpa)"
    if st.has("LlamaMLP.forward"):
        return "MLP"
    inner = st.frames[-1][1] if st.frames else ""
    if "deepspeed/" in inner:
        return "DeepSpeed wrapper"
    if st.has("LlamaModel.forward"):
        return "decoder other (embed/norm/rope/mask)"
    return "other"


_PEFT_LINES: list[str] = []


def _peft_line(line: int) -> str:
    if not _PEFT_LINES:
        try:
            import peft.tuners.lora.layer as layer

            _PEFT_LINES.extend(Path(layer.__file__).read_text().splitlines())
        except Exception:  # noqa: BLE001 - profiling detail only
            _PEFT_LINES.append("")
    return _PEFT_LINES[line - 1] if 0 < line <= len(_PEFT_LINES) else ""


def make_classify_kto():
    calls = _source_lines(REPO / "kto_scale/trainer.py", {
        'reference, reference_kl = engine(': "reference forwards, example + KL seqs (no grad, adapters off)",
        'policy_kl = engine(': "policy forward on KL seqs (no grad)",
        'cache.lookup(': "reference cache lookup",
    })

    def classify(frames: list[str]) -> str:
        st = Stack(frames)
        if st.has("DeepSpeedEngine.backward"):
            if st.has("_token_logps"):
                return "backward: LM-head chunk recompute"
            if any("deepspeed/runtime/zero" in f[1] for f in st.frames):
                return "backward: DeepSpeed ZeRO-2 gradient hooks (python)"
            return "backward (autograd)"
        if st.has("DeepSpeedEngine.step"):
            return "optimizer step (DeepSpeed ZeRO-2 + AdamW)"
        if st.has("collate", "kto_scale/collate.py"):
            return "data: collate"
        if st.has("_to", "kto_scale/trainer.py"):
            return "data: to device"
        lm_head = st.has("chunked_completion_logps")
        frame = st.find("no_grad_logps")
        if frame is not None:
            return f"{calls.get(frame[2], 'no_grad_logps other')} / {_component(st, lm_head)}"
        if st.has("train_step") and st.has("SequenceLogps.forward"):
            return f"policy forward (grad) / {_component(st, lm_head)}"
        if st.has("train_step"):
            return "train_step: loss, z_ref, metric sums"
        if st.has("summarize_sums") or st.has("MetricsLogger.log"):
            return "logging"
        if st.has("save_adapter"):
            return "train(): final save"
        if st.has("train", "kto_scale/trainer.py"):
            return "train(): setup/other"
        return "process: start-up/import/other"

    return classify


def make_classify_trl():
    try:
        import trl.trainer.kto_trainer as kt

        source = Path(kt.__file__)
    except Exception:  # noqa: BLE001
        source = Path("/nonexistent")
    calls = _source_lines(source, {
        "KL_logps = self._compute_kl_logps(model, batch)": "policy forward on KL seqs (no grad)",
        "outputs = model(**model_kwargs, labels=completion_labels, fused_lm_head=True)": "policy forward (grad)",
        "ref_KL_logps = self._compute_kl_logps(self.model, batch)": "reference forward, KL seqs (adapters off)",
        "ref_outputs = self.model(**ref_model_kwargs": "reference forward, example seqs (adapters off)",
    })

    def classify(frames: list[str]) -> str:
        st = Stack(frames)
        lm_head = st.has("_fused_forward") and not st.has("LlamaModel.forward")
        if st.has("_precompute_ref_logps"):
            return f"precompute reference / {_component(st, lm_head)}"
        if st.has("backward", "torch/_tensor.py") or st.has("Accelerator.backward"):
            chunk = any("chunked_logprob" in f[1] for f in st.frames)
            return "backward" + (": fused LM head backward (python tiles)" if chunk else " (autograd)")
        if st.has("clip_grad_norm_"):
            return "grad clipping"
        if st.has("step", "torch/optim") or st.has("AcceleratedOptimizer.step"):
            return "optimizer step (AdamW)"
        frame = st.find("_compute_loss", "trl/trainer/kto_trainer.py")
        if frame is not None:
            return f"{calls.get(frame[2], 'loss, metrics (.item() syncs)')} / {_component(st, lm_head)}" \
                if frame[2] in calls else "loss, metrics (.item() syncs)"
        if st.has("__next__", "torch/utils/data") or st.has("get_batch_samples"):
            return "data: dataloader + collate"
        if st.has("_maybe_log_save_evaluate") or st.has("log", "trl/trainer/kto_trainer.py"):
            return "logging"
        if st.has("_inner_training_loop") or st.has("_run_epoch"):
            return "train(): loop other"
        return "process: start-up/setup/other"

    return classify


def summarize_profile(path: Path, classify, keep=None) -> dict:
    counts = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        frames = [f for f in stack.split(";") if f and not f.startswith("process ") and not f.startswith("thread ")]
        label = classify(frames)
        if keep is not None and not keep(label):
            continue
        counts[label] += int(n)
        total += int(n)
    return {"samples": total, "phases": [(k, 100 * v / total) for k, v in counts.most_common()]}


# --------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=64, help="HH pairs (each gives 2 unpaired rows)")
    p.add_argument("--steps", type=int, default=8, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=2, help="steps run first and not timed")
    p.add_argument("--out", type=Path, default=REPO / "bench/results", help="where results.json/.md go")
    p.add_argument("--work-dir", type=Path, default=None, help="model/data/run dirs (default: a temp dir, removed)")
    p.add_argument("--only", default="kto,kto_cache,trl,trl_pre,trl_compact,trl_pre_compact,bare",
                   help="comma list of runs: kto, kto_cache, trl, trl_pre, trl_compact, trl_pre_compact, bare, "
                        "kto_grouped (kto-scale with group_by_length, other batches: compare its tokens/s)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=int, default=32)
    p.add_argument("--precompute-batch-size", type=int, default=32,
                   help="kto-scale precompute_batch_size and TRL precompute_ref_batch_size")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--intermediate", type=int, default=1408)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--padding-free", action="store_true",
                   help="kto-scale runs (training and precompute) pack each batch into one row, without padding")
    p.add_argument("--threads", type=int, default=0, help="torch threads in each child (0: all cores)")
    p.add_argument("--kl-pairs", choices=("matched", "native"), default="matched",
                   help="matched: TRL uses kto-scale's KL completions (identical tokens); native: TRL's own rule")
    p.add_argument("--profile", default="kto,trl_compact",
                   help="runs to repeat under py-spy after the timed runs (warm-up + --profile-steps); '' for none")
    p.add_argument("--profile-steps", type=int, default=3)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER)
    p.add_argument("--timeout", type=float, default=1800, help="seconds per child run")
    # internal
    p.add_argument("--child", choices=("kto", "kto_cache", "kto_precompute", *TRAIN_RUNS[2:], "bare", "kto_grouped"),
                   help=argparse.SUPPRESS)
    p.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--ref-cache-dir", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main_child(args) -> None:
    spec = json.loads(args.spec.read_text())
    if args.child == "kto":
        child_kto(spec, args.result, None)
    elif args.child == "kto_grouped":
        child_kto(spec, args.result, None, grouped=True)
    elif args.child == "kto_cache":
        child_kto(spec, args.result, args.ref_cache_dir)
    elif args.child == "kto_precompute":
        child_kto_precompute(spec, args.result, args.ref_cache_dir)
    elif args.child.startswith("trl"):
        child_trl(spec, args.result, precompute="pre" in args.child, compact="compact" in args.child)
    elif args.child == "bare":
        child_bare(spec, args.result)


def _precompute_summary(results: dict, spec: dict, max_length: int) -> tuple[dict, float | None]:
    out, vs_bare = {}, None
    bare = results.get("bare")
    if bare:
        out.update(bare_loop_tokens_per_s=bare["tokens"] / bare["loop_s"], bare_loop_s=bare["loop_s"],
                   bare_batching=bare["batching"], bare_loop_tokens=bare["tokens"], bare_loop_padded=bare["padded"])
    kp = results.get("kto_precompute")
    if kp:
        out.update(kto_precompute_process_s=kp["total_s"], kto_precompute_peak_rss_mib=round(kp["peak_rss_mib"]),
                   kto_precompute_forward_calls=kp["calls"], kto_precompute_tokens=kp["tokens"],
                   kto_precompute_padded=kp["padded"])
        if kp.get("loop_s"):
            out.update(kto_precompute_tokens_per_s=kp["tokens"] / kp["loop_s"], kto_precompute_loop_s=kp["loop_s"])
            if bare:
                vs_bare = out["kto_precompute_tokens_per_s"] / out["bare_loop_tokens_per_s"]
    rows = spec["order"]
    tokens = sum(min(len(spec["prompt_ids"][r]) + len(c), max_length) for r in rows
                 for c in (spec["completion_ids"][r], spec["kl_completion_ids"][r]))
    for key in ("trl_pre", "trl_pre_compact"):
        if results.get(key, {}).get("precompute_s"):
            out[key + "_s"] = results[key]["precompute_s"]
            out[key + "_tokens_per_s"] = tokens / results[key]["precompute_s"]
    return out, vs_bare


def main() -> None:
    args = parse_args()
    if args.child:
        main_child(args)
        return
    import deepspeed
    import peft
    import torch
    import transformers
    import trl

    only = [r for r in args.only.split(",") if r]
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="kto_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    args.threads = args.threads or os.cpu_count()
    started = time.time()
    _log(f"work dir {work}")
    spec = build_inputs(args, work)
    _log(f"inputs ready: {spec['n_examples']} rows, {spec['n_params'] / 1e6:.1f}M params")
    results, notes = {}, {}

    for name in ("kto", "kto_cache", "trl", "trl_compact", "trl_pre", "trl_pre_compact", "bare", "kto_grouped"):
        if name not in only:
            continue
        if name == "kto_cache":
            ok, why = cache_available()
            if not ok:
                notes["kto_cache"] = why
                _log(f"kto_cache: {why}")
                continue
            cache_dir = str(work / "ref_cache")
            shutil.rmtree(cache_dir, ignore_errors=True)
            results["kto_precompute"] = run_child("kto_precompute", ["kto_precompute", "--ref-cache-dir", cache_dir],
                                                  work, args.timeout)
            results["kto_cache"] = run_child("kto_cache", ["kto_cache", "--ref-cache-dir", cache_dir], work, args.timeout)
        elif name == "bare" and not cache_available()[0]:
            notes["bare"] = "skipped: the kto-scale precompute it is the yardstick for is not available"
        else:
            results[name] = run_child(name, [name], work, args.timeout)

    runs = {k: summarize_run(results[k], args.warmup) for k in (*TRAIN_RUNS, "kto_grouped") if k in results}
    ratios = compute_ratios(runs)
    ratios["median_paired_step"] = paired_step_ratios(runs)
    precompute, ratios["precompute_vs_bare_loop"] = _precompute_summary(results, spec, args.max_length)

    profiles = {}
    for name in [r for r in args.profile.split(",") if r]:
        if shutil.which("py-spy") is None:
            notes["profile"] = "py-spy not installed (pip install py-spy)"
            break
        if name not in TRAIN_RUNS or name == "kto_cache":
            notes[f"profile {name}"] = "only kto and the trl runs can be profiled"
            continue
        prof_args = argparse.Namespace(**{**vars(args), "steps": args.profile_steps})
        prof_work = work / "profile"
        prof_work.mkdir(exist_ok=True)
        pspec = dict(spec, steps=args.profile_steps, work=str(prof_work),
                     kto_config=str(write_kto_config(prof_args, prof_work, Path(spec["model_dir"]),
                                                     Path(spec["data_file"]), prof_work / "run_kto", None)))
        (prof_work / "spec.json").write_text(json.dumps(pspec))
        raw = prof_work / f"pyspy_{name}.txt"
        run_child(f"profile_{name}", [name], prof_work, args.timeout, profile=raw)
        classify = make_classify_kto() if name == "kto" else make_classify_trl()
        # the training loop only: start-up, setup, precompute and the final save are left out
        profiles[f"{name}: {RUN_LABELS[name]}"] = summarize_profile(
            raw, classify, keep=lambda label: not label.startswith(("process", "train():", "precompute")))
        if args.work_dir is not None:  # raw py-spy stacks (~1 MB) stay with the work dir
            notes[f"py-spy raw ({name})"] = str(raw)

    summary = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join(["python", *sys.argv]),
        "machine": {"cpu": _cpu_model(), "cores": os.cpu_count(), "torch_threads": args.threads,
                    "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
                    "device": "CUDA" if torch.cuda.is_available() else "CPU only", "torch": torch.__version__,
                    "transformers": transformers.__version__, "trl": trl.__version__, "peft": peft.__version__,
                    "deepspeed": deepspeed.__version__, "python": platform.python_version(),
                    "kto_scale": _git_state()},
        "setup": {k: spec.get(k, getattr(args, k, None)) for k in
                  ("n_pairs", "n_examples", "pairs_skipped_too_long", "n_params", "vocab", "batch_size", "max_length",
                   "lr", "beta", "seed", "warmup", "steps", "precompute_batch_size", "lora_r", "lora_alpha",
                   "kl_pairs", "hidden", "layers", "heads", "intermediate")},
        "runs": runs, "ratios": ratios, "targets": TARGETS, "precompute": precompute,
        "token_check": check_tokens(spec, results), "notes": notes, "profiles": profiles,
        "per_step": {k: [{kk: v for kk, v in s.items() if kk != "indices"} for s in results[k]["steps"]]
                     for k in (*TRAIN_RUNS, "kto_grouped") if k in results},
        "padding": padding_report(spec, args),
        "total_bench_s": round(time.time() - started, 1),
    }
    write_report(args.out, summary)
    _log(f"wrote {args.out / 'results.json'} and {args.out / 'results.md'} in {summary['total_bench_s'] / 60:.1f} min")
    print((args.out / "results.md").read_text())
    if args.work_dir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
