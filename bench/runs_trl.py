"""The TRL child: KTOTrainer (trl 1.16) + peft LoRA on the spec's model, data, batches and settings.

    python bench/runs_trl.py NAME --spec SPEC --result RESULT [--precompute] [--compact]

--precompute: precompute_ref_log_probs=True (the precompute timed on its own). --compact: TRL's CUDA
LM-head path forced on (see `force_compact_lm_head`).
"""

import argparse
import json
import time
from pathlib import Path

from measure import batch_stats, child_args, maxrss_mib, rss_mib, write_result
from model_init import load_bench_model
from torch_profile import StepProfiler


def force_compact_lm_head() -> None:
    """On CPU, TRL 1.16's fused LM head projects every position (prompt and padding too) through the LM
    head: its completion-only path is taken only where `_use_triton(device)` is true (CUDA/XPU). This
    private switch, read by trl.trainer.utils' fused forward alone, makes a CPU run take the GPU branch
    (the torch tile kernel still does the math): the stand-in for a GPU comparison."""
    import trl.trainer.utils as trl_utils

    trl_utils._use_triton = lambda device: True


def trl_config(spec: dict, output_dir: Path, precompute: bool):
    """KTOConfig with kto-scale's settings (see bench/README.md, "Settings shared by both"). The model comes
    built (bench/model_init.py: on the GPU when there is one, in kto-scale's dtype and attention)."""
    import torch
    from trl import KTOConfig

    return KTOConfig(
        output_dir=str(output_dir), per_device_train_batch_size=spec["batch_size"], gradient_accumulation_steps=1,
        max_steps=spec["warmup"] + spec["steps"], learning_rate=spec["lr"], lr_scheduler_type="linear",
        warmup_steps=0, max_grad_norm=1.0, weight_decay=0.0, optim="adamw_torch", beta=spec["beta"],
        max_length=spec["max_length"], bf16=spec["dtype"] == "bf16", fp16=False, gradient_checkpointing=False,
        logging_steps=1, save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(), seed=spec["seed"], data_seed=spec["seed"], dataloader_num_workers=0,
        dataloader_pin_memory=False, disable_dropout=True, precompute_ref_log_probs=precompute,
        precompute_ref_batch_size=spec["precompute_batch_size"],
        train_sampling_strategy="sequential",  # the rows come in kto-scale's batch order: keep it
    )


def bench_trainer_class(spec: dict, record: dict):
    """KTOTrainer with the two hooks the bench needs; everything else is TRL's own code."""
    from trl import KTOTrainer

    order = spec["order"]
    matched = spec["kl_pairs"] == "matched"

    class BenchKTOTrainer(KTOTrainer):
        # Private hook, overridden because TRL builds its KL completions here, before the precompute reads
        # them: with --kl-pairs matched each row's KL completion becomes kto-scale's (its partner's
        # completion, cut as kto-scale cuts it), so both trainers run identical tokens.
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            dataset = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
            if matched:
                kl = [spec["kl_completion_ids"][row] for row in order]
                dataset = dataset.map(lambda _, i: {"KL_completion_ids": kl[i]}, with_indices=True)
            return dataset

        # Private method, wrapped to time the precompute apart from the rest of TRL's set-up.
        def _precompute_ref_logps(self, dataset, name, batch_size):
            start = time.perf_counter()
            out = super()._precompute_ref_logps(dataset, name, batch_size)
            record["precompute_s"] = time.perf_counter() - start
            return out

        # Public hook (Trainer.compute_loss): each training step's batch token counts and loss.
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if model.training:
                record["batches"].append(batch_stats(
                    inputs["attention_mask"], inputs["completion_mask"], inputs["KL_attention_mask"],
                    inputs["KL_completion_mask"], int(inputs["attention_mask"].shape[0])))
                record["losses"].append(float((loss[0] if return_outputs else loss).detach()))
            return loss

    return BenchKTOTrainer


def step_timer(record: dict, profiler: StepProfiler):
    """A callback timing each step from the end of the previous step's logging (or the start of training)
    to its on_step_end: the data path is in, logging is out, as in kto-scale's metrics. On a GPU the step's
    queued work (backward, optimizer) is waited for before the clock stops, as kto-scale's logging does."""
    import torch
    from transformers import TrainerCallback

    sync = torch.cuda.synchronize if torch.cuda.is_available() else lambda: None

    class StepTimer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            record["begins"].append((time.perf_counter(), time.process_time()))

        def on_step_begin(self, args, state, control, **kwargs):
            profiler.step_begins(state.global_step + 1)

        def on_step_end(self, args, state, control, **kwargs):
            sync()
            record["ends"].append((time.perf_counter(), time.process_time(), rss_mib()))
            profiler.step_ends(state.global_step)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:  # a step's log, not the final train summary ("train_loss")
                record["begins"].append((time.perf_counter(), time.process_time()))

    return StepTimer()


def run(spec: dict, name: str, precompute: bool, compact: bool) -> dict:
    import datasets
    from peft import LoraConfig
    from transformers import AutoTokenizer

    if compact:
        force_compact_lm_head()
    rows = [json.loads(line) for line in Path(spec["data_file"]).read_text().splitlines()]
    dataset = datasets.Dataset.from_list([rows[i] for i in spec["order"]])  # in memory: no cache between runs
    record = {"batches": [], "losses": [], "begins": [], "ends": [], "precompute_s": None}
    peft_config = LoraConfig(r=spec["lora_r"], lora_alpha=spec["lora_alpha"], lora_dropout=0.0,
                             target_modules=list(spec["lora_targets"]), task_type="CAUSAL_LM")
    setup_start = time.perf_counter()
    weights: dict = {}
    trainer = bench_trainer_class(spec, record)(
        model=load_bench_model(spec, weights),
        args=trl_config(spec, Path(spec["work"]) / f"run_{name}", precompute),
        train_dataset=dataset, processing_class=AutoTokenizer.from_pretrained(spec["model_dir"]),
        peft_config=peft_config, callbacks=[step_timer(record, StepProfiler(spec.get("torch_profile")))])
    setup_s = time.perf_counter() - setup_start
    rss = {"after_setup_mib": rss_mib(), "peak_after_setup_mib": maxrss_mib()}
    tokenized = trainer.train_dataset
    if len(tokenized) != len(spec["order"]):
        raise RuntimeError(f"TRL kept {len(tokenized)} of {len(spec['order'])} rows; the pre-filter should leave "
                           "it nothing to drop")
    start = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - start
    return {"steps": step_records(record), "total_s": total, "setup_s": setup_s,
            "precompute_s": record["precompute_s"], "maxrss_self_mib": maxrss_mib(), "rss": rss, "weights": weights,
            "trl_prompt_ids": [list(x) for x in tokenized["prompt_ids"]],
            "trl_completion_ids": [list(x) for x in tokenized["completion_ids"]]}


def step_records(record: dict) -> list[dict]:
    """Per step: its time (from the previous step's log, or the start, to its end), batch and loss."""
    begins, ends = record["begins"], record["ends"]
    if len(begins) != len(ends) + 1:  # the start, then one log per step (logging_steps=1)
        raise RuntimeError(f"{len(ends)} steps but {len(begins) - 1} step logs: logging_steps must be 1")
    joined = zip(begins[:-1], ends, record["batches"], record["losses"], strict=True)
    return [{"step": i, "time_s": end[0] - begin[0], "cpu_s": end[1] - begin[1], "examples": batch["rows"],
             "rss_mib": end[2], "loss": loss, **batch}
            for i, (begin, end, batch, loss) in enumerate(joined, 1)]


def main() -> None:
    def options(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("name", help="the run's name: its output dir is run_NAME in the spec's work dir")
        parser.add_argument("--precompute", action="store_true", help="precompute_ref_log_probs=True")
        parser.add_argument("--compact", action="store_true", help="force TRL's completion-only LM head")

    args, spec = child_args(__doc__, options)
    write_result(args.result, run(spec, args.name, args.precompute, args.compact))


if __name__ == "__main__":
    main()
