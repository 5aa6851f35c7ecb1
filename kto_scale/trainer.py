"""The KTO training loop: one explicit loop built from functions, the same for 1 to N ranks and for both
engines (DeepSpeed, FSDP2: kto_scale.engine).

Each optimizer step takes this rank's micro-batches (`gradient_accumulation_steps` of them, or as many
as max_tokens_per_batch cuts its share into; collated ahead by kto_scale.batches) and
1. runs the no-grad passes of all of them first: the reference (adapters off) on each example and on
   its mismatched KL pair, and the policy on the KL pair;
2. reduces the KL baseline z_ref over every micro-batch of every rank (the whole effective batch);
3. runs the gradient passes with that one z_ref, normalizing each micro-batch's loss by the global
   number of examples, so the step's gradient is the exact mean over the effective batch.
"""

import logging
import math
import time
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from kto_scale.batches import StepBatches, train_loader
from kto_scale.checkpoint import (
    check_resume,
    find_checkpoint,
    load_checkpoint,
    save_adapter,
    save_base_model,
    save_checkpoint,
)
from kto_scale.collate import BatchPlan, desirable_count, sequence_lengths, to_device
from kto_scale.config import ConfigError, KTOConfig
from kto_scale.config_io import save_config
from kto_scale.distributed import all_reduce_sum, any_rank, on_main_process, shutdown
from kto_scale.engine import Engine
from kto_scale.generate import GenerationLog, GenerationSettings, PromptGenerations
from kto_scale.loss import balanced_weights, kl_baseline, kto_losses
from kto_scale.memory_report import log_estimate, log_peak
from kto_scale.metrics import MetricsLogger
from kto_scale.model import SequenceLogps, add_lora, load_base_model, reference_layout
from kto_scale.outdir import prepare_output_dir, set_aside_previous_run
from kto_scale.plot import plot_runs
from kto_scale.preemption import Preempted, SigtermStop
from kto_scale.ref_cache import open_ref_cache
from kto_scale.scoring import evaluation_metrics, no_grad_logps, score_dataset
from kto_scale.startup import setup

logger = logging.getLogger(__name__)


def global_kl_baseline(kl_ratio_sum: Tensor, pairs: Tensor, examples: Tensor) -> tuple[Tensor, Tensor]:
    """z_ref over every rank's mismatched pairs, and the global number of examples (one all-reduce).

    Sums and counts are all-reduced (not per-rank means), so z_ref does not depend on how the pairs
    fall on ranks. Returns ([] z_ref, [] global example count).
    """
    totals = all_reduce_sum(torch.stack([kl_ratio_sum.float(), pairs.float(), examples.float()]))
    return kl_baseline(totals[0], totals[1]), totals[2]


def train_step(
    engine: Engine, batches: list[dict], config: KTOConfig, weights: tuple[float, float]
) -> tuple[dict[str, Tensor], Tensor]:
    """One optimizer step over this rank's micro-batches (on the device); returns (named metric sums,
    [] z_ref), all device tensors: nothing here waits for the device (metrics are read at logging).

    The z_ref returned (logged as `kl`) is the one the step used; with kl_baseline "micro_batch", the
    mean of its micro-batches' z_refs.
    """
    no_grad = [no_grad_logps(engine, b) for b in batches]
    kl_ratios = [(policy_kl - reference_kl) * b["kl_weight"]
                 for b, (_, reference_kl, policy_kl) in zip(batches, no_grad, strict=True)]
    kl_sum = torch.stack([k.sum() for k in kl_ratios]).sum()
    z_ref, n_global = global_kl_baseline(kl_sum, sum(b["kl_weight"].sum() for b in batches),
                                         sum(b["weight"].sum() for b in batches))
    z_refs = [z_ref] * len(batches)
    if config.kl_baseline == "micro_batch":  # TRL's estimate, for comparison: micro-batch i of every rank
        z_refs = [global_kl_baseline(kl.sum(), b["kl_weight"].sum(), b["weight"].sum())[0]
                  for b, kl in zip(batches, kl_ratios, strict=True)]
        z_ref = torch.stack(z_refs).mean()
    # Both engines sum gradients over a step's micro-batches and average them over ranks; undo the
    # average and divide by the global example count, so the step's gradient is the mean over the
    # effective batch's real examples, however many micro-batches carry them.
    scale = engine.world_size / n_global

    sums: dict[str, Tensor] = {}
    for i, (batch, (reference, _, _), micro_z_ref) in enumerate(zip(batches, no_grad, z_refs, strict=True)):
        policy = engine(**batch["policy"])
        losses, rewards = kto_losses(policy, reference, batch["desirable"], micro_z_ref, config.beta, *weights)
        engine.backward((losses * batch["weight"]).sum() * scale, boundary=i == len(batches) - 1)
        engine.step()
        sums = add_sums(sums, metric_sums(batch, losses.detach(), rewards, policy.detach()))
    return sums, z_ref


def metric_sums(batch: dict, losses: Tensor, rewards: Tensor, policy: Tensor) -> dict[str, Tensor]:
    """A micro-batch's metric sums over its real examples (filler rows have weight 0), as device scalars."""
    w = batch["weight"]
    desirable, undesirable = w * batch["desirable"], w * ~batch["desirable"]
    return {"loss": (losses * w).sum(), "examples": w.sum(),
            "rewards/desirable": (rewards * desirable).sum(), "desirable": desirable.sum(),
            "rewards/undesirable": (rewards * undesirable).sum(), "undesirable": undesirable.sum(),
            "logps/desirable": (policy * desirable).sum(), "logps/undesirable": (policy * undesirable).sum(),
            "tokens": (batch["tokens"] * w).sum()}


def add_sums(total: dict[str, Tensor], more: dict[str, Tensor]) -> dict[str, Tensor]:
    """Sums added name by name, on the device (no host sync per step)."""
    return {name: total.get(name, 0) + value for name, value in more.items()}


def summarize_sums(sums: dict[str, Tensor]) -> dict[str, float]:
    """Reduce metric sums over ranks and turn them into means (a host sync: only at logging time).
    Every rank holds the same names in the same order (metric_sums builds them), so one all-reduce."""
    s = dict(zip(sums, all_reduce_sum(torch.stack(list(sums.values()))).tolist(), strict=True))
    out = {"loss": s["loss"] / max(s["examples"], 1)}
    for label in ("desirable", "undesirable"):
        if s[label] > 0:  # a window may hold no example of a class: leave its metrics out
            out[f"rewards/{label}"] = s[f"rewards/{label}"] / s[label]
            out[f"logps/{label}"] = s[f"logps/{label}"] / s[label]
    if "rewards/desirable" in out and "rewards/undesirable" in out:
        out["margins"] = out["rewards/desirable"] - out["rewards/undesirable"]
    out["examples"], out["tokens"] = s["examples"], s["tokens"]
    return out


def class_balance_warning(n_desirable: int, n_undesirable: int, weights: tuple[float, float]) -> str | None:
    """What is wrong with the training set's class balance for KTO, or None when nothing is."""
    if not n_desirable or not n_undesirable:
        present, missing = ("desirable", "undesirable") if n_desirable else ("undesirable", "desirable")
        return (f"The training set has no {missing} examples (all {n_desirable + n_undesirable} are {present}): KTO "
                f"then only moves {present} completions against the KL baseline and never learns what to avoid "
                f"(or prefer); class weights cannot change that. Add {missing} examples (label "
                f"{str(missing == 'desirable').lower()}) or pairs.")
    ratio = weights[0] * n_desirable / (weights[1] * n_undesirable)
    if not 1.0 <= ratio <= 4 / 3:
        return (f"lambda_D n_D / (lambda_U n_U) = {ratio:.3f} is outside the paper's recommended [1, 4/3]; "
                "consider desirable_weight/undesirable_weight 'auto'.")
    return None


def train(config: KTOConfig) -> Path:
    """Train the LoRA policy with KTO; returns the directory of the final adapter."""
    start = setup(config, lambda: on_main_process(lambda: prepare_output_dir(config)))
    rank, world_size, tokenizer, train_set, eval_set = (start.rank, start.world_size, start.tokenizer,
                                                         start.train_set, start.eval_set)
    n_desirable = desirable_count(train_set)
    weights = balanced_weights(config.desirable_weight, config.undesirable_weight,
                               n_desirable, len(train_set) - n_desirable)
    balance = class_balance_warning(n_desirable, len(train_set) - n_desirable, weights)
    if balance:
        logger.warning(balance)

    lengths = sequence_lengths(train_set) if config.group_by_length or config.max_tokens_per_batch else None
    plan = BatchPlan(len(train_set), config.per_device_train_batch_size, config.gradient_accumulation_steps,
                     world_size, lengths if config.group_by_length else None, config.max_tokens_per_batch, lengths)
    if config.kl_pairs_per_step > plan.global_batch_size:
        raise ConfigError(f"kl_pairs_per_step ({config.kl_pairs_per_step}) is more than the global batch "
                          f"({plan.global_batch_size} = {world_size} ranks x {config.gradient_accumulation_steps} "
                          f"accumulation x {config.per_device_train_batch_size}): lower it, or 0 for every pair.")
    total_steps = config.max_steps if config.max_steps > 0 else math.ceil(config.num_train_epochs * plan.steps_per_epoch)
    caches = {}
    if config.ref_cache:
        caches = {split: open_ref_cache(config.ref_cache, config, tokenizer, split, data)
                  for split, data in (("train", train_set), ("eval", eval_set)) if data is not None}
    memory_estimate = log_estimate(config, world_size)
    checkpoint = find_checkpoint(config)
    if checkpoint:
        start.engine.prepare_resume(checkpoint, check_resume(checkpoint, config, world_size))
    base = load_base_model(config, empty=not start.engine.loads_weights(rank))
    reference = reference_layout(config, base, cached=bool(caches))
    on_main_process(lambda: set_aside_previous_run(config))  # every check passed: only now does the old run make way
    if config.init_random_weights:  # the adapter is only meaningful next to these exact weights
        save_base_model(base, tokenizer, Path(config.output_dir) / "base_model")
    model = add_lora(base, config)
    engine = start.engine.training_engine(SequenceLogps(model, config.logprob_chunk_size), total_steps)
    start_step = load_checkpoint(engine, checkpoint) if checkpoint else 0
    if rank == 0:
        save_config(config, config.output_dir)
    metrics = MetricsLogger(config.output_dir, config.report_to, config.to_dict(), enabled=rank == 0,
                            run_name=config.run_name, resume_step=start_step if checkpoint else None)
    logger.info("Training %d steps of %d examples (%d ranks x %d accumulation x %d per micro-batch) on %s; "
                "lambda_D=%.3f lambda_U=%.3f.", total_steps, plan.global_batch_size, world_size,
                config.gradient_accumulation_steps, config.per_device_train_batch_size,
                f"FSDP2 ({config.fsdp})" if config.fsdp else f"DeepSpeed ({Path(config.deepspeed).name})", *weights)

    generations = generation_log = None
    if config.generate_during_eval:
        generations = PromptGenerations(engine, eval_set, tokenizer,
                                        GenerationSettings.from_config(config))
        generation_log = GenerationLog(config.output_dir, metrics, start_step if checkpoint else None)
        if start_step == 0:  # the untrained policy: "before" text for every later step to compare with
            generation_log.write(generations.rows(0), step=0)

    def run_eval(step: int) -> dict[str, float]:
        result = evaluation_metrics(score_dataset(engine, eval_set, config.per_device_eval_batch_size,
                                                  tokenizer.pad_token_id, caches.get("eval"), config.padding_free,
                                                  reference),
                                    config.beta, weights)
        metrics.log(result, step=step, split="eval")
        if generations is not None:
            generation_log.write(generations.rows(step), step=step)
        return result

    stop = SigtermStop(config.sigterm_timeout_s)  # before the loader's workers start: they ignore SIGTERM
    steps = range(start_step + 1, total_steps + 1)
    loader = train_loader(StepBatches(plan, train_set, rank, config, tokenizer.pad_token_id, reference,
                                      caches.get("train")), steps, config, engine.device)
    sums, z_refs, window_start = {}, [], time.perf_counter()
    progress = tqdm(total=total_steps, initial=start_step, disable=rank != 0 or config.disable_tqdm, desc="kto")
    last_eval, bad_steps = None, 0
    for step, micro_batches in zip(steps, loader, strict=True):
        epoch, step_in_epoch = divmod(step - 1, plan.steps_per_epoch)
        step_sums, z_ref = train_step(engine, [to_device(b, engine.device) for b in micro_batches], config, weights)
        # The engine skips an update whose gradient norm is not finite (fp16 overflow, NaN/inf in
        # fp32/bf16); the decision is global, so every rank takes the same branch here.
        bad_steps = 0 if engine.was_step_applied() else bad_steps + 1
        if bad_steps:
            logger.warning("Step %d skipped: non-finite gradients (%d in a row).", step, bad_steps)
        if bad_steps >= config.max_bad_steps:
            raise RuntimeError(f"{bad_steps} optimizer steps in a row had non-finite gradients (max_bad_steps="
                               f"{config.max_bad_steps}); stopping at step {step}. Lower the learning rate or "
                               "check the data of these steps.")
        sums = add_sums(sums, step_sums)
        z_refs.append(z_ref)
        progress.update(1)
        if step % config.logging_steps == 0 or step == total_steps:
            logged = summarize_sums(sums)  # a host sync: the window's device work is done after it
            elapsed = time.perf_counter() - window_start
            logged.update(kl=torch.stack(z_refs).mean().item(), grad_norm=engine.get_global_grad_norm(),
                          learning_rate=engine.learning_rate(), epoch=(step_in_epoch + 1) / plan.steps_per_epoch + epoch,
                          examples_per_s=logged.pop("examples") / elapsed, tokens_per_s=logged.pop("tokens") / elapsed,
                          skipped_steps=engine.skipped_steps)
            metrics.log(logged, step=step)
            progress.set_postfix(loss=f"{logged['loss']:.4f}", kl=f"{logged['kl']:.3f}")
            sums = {}
            z_refs, window_start = [], time.perf_counter()
        if eval_set is not None and config.eval_steps and step % config.eval_steps == 0:
            last_eval = (step, run_eval(step))
        if step % config.save_steps == 0:
            save_checkpoint(engine, tokenizer, config, step)
        if any_rank(stop.requested):  # SIGTERM on any rank: every rank stops after this step
            if step % config.save_steps:
                save_checkpoint(engine, tokenizer, config, step)
            for log in (progress, generation_log, metrics):
                if log is not None:
                    log.close()
            shutdown()
            raise Preempted(f"stopped by SIGTERM after step {step} of {total_steps}; checkpoint-{step} is written: "
                            "continue with --resume_from_checkpoint latest.")
    progress.close()
    log_peak(memory_estimate, engine.device)

    final = Path(config.output_dir) / "adapter"
    save_adapter(engine, tokenizer, config, final)
    if eval_set is not None and (last_eval is None or last_eval[0] != total_steps):
        last_eval = (total_steps, run_eval(total_steps))
    if generation_log is not None:
        generation_log.close()
    metrics.close()
    shutdown()
    if rank == 0:
        if last_eval is not None:
            print("eval: " + "  ".join(f"{k}={v:.4f}" for k, v in last_eval[1].items()))
        print(f"adapter saved to {final}")
        print(f"plots saved to {plot_runs([config.output_dir])}")
    return final
