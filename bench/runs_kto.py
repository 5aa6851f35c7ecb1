"""The kto-scale children: training (one step record per optimizer step) and the reference precompute.

    python bench/runs_kto.py train NAME --spec SPEC --result RESULT [-- kto-scale options]
    python bench/runs_kto.py precompute NAME --spec SPEC --result RESULT [-- kto-scale options]

Both run the library as launch/train.py and launch/precompute_ref.py do, on the spec's config plus the
options after `--` (a run's own settings: --ref_cache, --group_by_length, ...).
"""

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from measure import batch_stats, child_args, maxrss_mib, padding_mask, rss_mib, write_result
from model_init import recorded
from torch_profile import StepProfiler


def kto_argv(spec: dict, name: str, options: list[str]) -> list[str]:
    """The trainer's command line: the shared config, this run's output dir, step count and micro-batch
    (--find-max-batch changes it), its options."""
    output_dir = Path(spec["work"]) / f"run_{name}"
    return ["--config", spec["kto_config"], "--output_dir", str(output_dir),
            "--max_steps", str(spec["warmup"] + spec["steps"]),
            "--per_device_train_batch_size", str(spec["batch_size"]), *options]


def train(spec: dict, name: str, options: list[str]) -> dict:
    """kto_scale.trainer.train, with two of its functions wrapped to see each step from inside."""
    import kto_scale.trainer as trainer
    from kto_scale.config_io import load_config

    steps: list[dict] = []
    setup: dict = {}
    weights: dict = {}
    # Wrapped to time the base model's build and checksum its weights (built where init_device says).
    trainer.load_base_model = recorded(trainer.load_base_model, weights, profiled="torch_profile" in spec)
    # The trainer saves a random base beside its adapter (to merge it later); the bench never does, and at
    # 8B that would be 16 GB written per run.
    trainer.save_base_model = lambda *args, **kwargs: None
    profiler = StepProfiler(spec.get("torch_profile"))
    to_device, train_step = trainer.to_device, trainer.train_step

    # Wrapped because the loop moves each step's collated batch (from the DataLoader, still on the host)
    # to the device here: its token counts, and the start of the step's CPU time in this process
    # (collation itself runs in the DataLoader's workers; wall time comes from metrics.jsonl).
    def recording_to_device(batch, device):
        if not setup:  # the first batch: model, engine and data are set up
            setup.update(after_setup_mib=rss_mib(), peak_after_setup_mib=maxrss_mib())
        profiler.step_begins(len(steps) + 1)
        start_cpu = time.process_time()
        policy, kl = batch["policy"], batch["kl"]
        steps.append({"start_cpu": start_cpu, **batch_stats(padding_mask(policy), policy["completion_mask"],
                                                            padding_mask(kl), kl["completion_mask"],
                                                            len(batch["weight"]))})
        return to_device(batch, device)

    # Wrapped to end the step's CPU time before logging (as its wall time ends) and to read its RSS.
    def timed_train_step(*args, **kwargs):
        out = train_step(*args, **kwargs)
        steps[-1].update(cpu_s=time.process_time() - steps[-1].pop("start_cpu"), rss_mib=rss_mib())
        profiler.step_ends(len(steps))
        return out

    trainer.to_device, trainer.train_step = recording_to_device, timed_train_step
    config = load_config(kto_argv(spec, name, options))
    start = time.perf_counter()
    trainer.train(config)
    total = time.perf_counter() - start
    lines = [json.loads(line) for line in (Path(config.output_dir) / "metrics.jsonl").read_text().splitlines()]
    logged = [m for m in lines if m["split"] == "train"]
    return {"steps": [step_record(i, m, s) for i, (m, s) in enumerate(zip(logged, steps, strict=True), 1)],
            "total_s": total, "maxrss_self_mib": maxrss_mib(), "rss": setup, "weights": weights}


def step_record(number: int, logged: dict, step: dict) -> dict:
    """One step's record: the trainer's own metrics line (logging_steps=1) joined to what the wrappers saw."""
    if logged["step"] != number:
        raise RuntimeError(f"metrics.jsonl line {number} is step {logged['step']}: logging_steps must be 1")
    time_s = step["rows"] / logged["examples_per_s"]  # examples_per_s = examples / the step's wall time
    tokens_logged = logged["tokens_per_s"] * time_s
    if abs(tokens_logged - step["policy_tokens"]) > 1e-3 * step["policy_tokens"]:
        raise RuntimeError(f"step {number}: the trainer logged {tokens_logged:.0f} tokens, the recorded batch "
                           f"holds {step['policy_tokens']}: the wrapped collate saw another batch")
    return {"step": number, "time_s": time_s, "examples": step["rows"], "tokens_logged": tokens_logged,
            "loss": logged["loss"], "kl": logged["kl"], **step}


class LoopLog(logging.Handler):
    """Keeps the arguments of precompute's summary line per split ("%s: %d examples, %d tokens scored in
    %.1f s ..."): the loop's own time and token count, read without patching the library."""

    def __init__(self):
        super().__init__()
        self.splits: dict[str, dict] = {}

    def emit(self, record: logging.LogRecord) -> None:
        if "tokens scored in" in str(record.msg):
            split, examples, tokens, seconds = record.args[:4]
            self.splits[split] = {"examples": examples, "tokens": tokens, "loop_s": seconds}


def precompute(spec: dict, name: str, options: list[str]) -> dict:
    """kto_scale.precompute.precompute, as launch/precompute_ref.py runs it."""
    import torch

    import kto_scale.model as kto_model
    from kto_scale.config_io import load_config
    from kto_scale.precompute import precompute as precompute_reference

    weights: dict = {}
    # Wrapped as in train(); precompute's load_model calls kto_scale.model's own load_base_model.
    kto_model.load_base_model = recorded(kto_model.load_base_model, weights)
    loop_log = LoopLog()
    logging.getLogger("kto_scale.precompute").addHandler(loop_log)
    start = time.perf_counter()
    precompute_reference(load_config(kto_argv(spec, name, options)))
    total = time.perf_counter() - start
    if "train" not in loop_log.splits:
        raise RuntimeError("kto_scale.precompute.precompute logged no 'tokens scored in' line for train: its log "
                           "changed; update LoopLog in bench/runs_kto.py")
    return {**loop_log.splits["train"], "total_s": total, "maxrss_self_mib": maxrss_mib(),
            "torch_threads": torch.get_num_threads(), "weights": weights}


def main() -> None:
    argv, options = sys.argv[1:], []
    if "--" in argv:
        argv, options = argv[: argv.index("--")], argv[argv.index("--") + 1 :]

    def positional(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("job", choices=("train", "precompute"))
        parser.add_argument("name", help="the run's name: its output dir is run_NAME in the spec's work dir")

    args, spec = child_args(__doc__, positional, argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    job = train if args.job == "train" else precompute
    write_result(args.result, job(spec, args.name, options))


if __name__ == "__main__":
    main()
