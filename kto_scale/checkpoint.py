"""Saving what training produces, atomically: adapters, full training checkpoints, and resuming.

- An adapter directory holds `adapter_config.json` + `adapter_model.safetensors` (loadable with
  `PeftModel.from_pretrained`), the tokenizer and the resolved `kto_config.yaml`.
- A training checkpoint `checkpoint-<step>/` is an adapter directory plus `deepspeed/` (DeepSpeed's
  optimizer, scheduler and LoRA shards; the frozen base is never written) and every rank's RNG state;
  resuming on another rank count adds `universal/`, the same states in DeepSpeed's rank-independent layout.
  The data position needs no saving: batches are a pure function of (seed, step).

Every directory is written under a temporary name and renamed when complete; `<output_dir>/latest`
names the newest complete checkpoint and moves only after every rank has finished writing, so a kill
at any moment never leaves a checkpoint that looks whole.
"""

import json
import logging
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import deepspeed
import numpy as np
import torch
from peft import PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kto_scale.atomic import atomic_directory, replace_directory, write_atomic
from kto_scale.config import CONFIG_FILE, ConfigError, KTOConfig, save_config
from kto_scale.distributed import barrier, is_main_process, on_main_process
from kto_scale.outdir import LOCK_FILE, lock_directory, move_previous_run
from kto_scale.sft_adapter import POLICY_ADAPTER

logger = logging.getLogger(__name__)

LATEST = "latest"
DEEPSPEED_TAG = "deepspeed"
UNIVERSAL_TAG = "universal"  # the rank-independent copy made to resume on another rank count
TRAINER_STATE = "trainer_state.json"
# What a run writes into output_dir, and overwrite_output_dir moves aside (prepared/, the tokenized
# data, is rewritten by every run and stays).
RUN_FILES = re.compile(r"adapter|base_model|\.?checkpoint-\d+(\.tmp)?|latest|kto_config\.yaml|metrics\.jsonl|"
                       r"generations\.jsonl|plots\.png|tensorboard|wandb")
INPUTS = ("model_name_or_path", "sft_adapter", "dataset_name", "eval_dataset_name", "ref_cache")
_CHECKPOINT = re.compile(r"checkpoint-(\d+)")


def _write_adapter(model: PeftModel, tokenizer: PreTrainedTokenizerBase, config: KTOConfig, path: Path) -> None:
    """Rank 0 writes the adapter files into `path`; every rank must call (ZeRO-3 gathers from all).

    Only the trainable LoRA parameters are gathered, never the base weights, so this stays cheap for
    a 70B base. GatheredParameters is a no-op for parameters ZeRO does not partition (stages 0-2).
    """
    lora_params = [p for p in model.parameters() if p.requires_grad]
    with deepspeed.zero.GatheredParameters(lora_params, modifier_rank=None):
        if is_main_process():
            # Only the policy: with sft_adapter, the frozen reference adapter is not the run's output.
            model.save_pretrained(path, selected_adapters=[POLICY_ADAPTER])
            tokenizer.save_pretrained(path)
            save_config(config, path)


def save_adapter(model: PeftModel, tokenizer: PreTrainedTokenizerBase, config: KTOConfig, path: str | Path) -> None:
    """Save the adapter to `path` atomically (all ranks call)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")  # the same name on every rank
    if is_main_process():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _write_adapter(model, tokenizer, config, tmp)
    if is_main_process():
        replace_directory(tmp, path)
    barrier()  # nobody reads or moves on before the directory is complete


def save_base_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: str | Path) -> None:
    """Save a randomly initialized base (init_random_weights), so its adapter can be merged or
    reloaded later. Gathers every weight under ZeRO-3: meant for the demo's and tests' tiny models."""
    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
        if is_main_process():
            with atomic_directory(path) as tmp:
                model.save_pretrained(tmp)
                tokenizer.save_pretrained(tmp)
    barrier()


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoint directories of a run, oldest first."""
    found = [p for p in Path(output_dir).glob("checkpoint-*") if _CHECKPOINT.fullmatch(p.name)]
    return sorted(found, key=lambda p: int(_CHECKPOINT.fullmatch(p.name).group(1)))


def save_checkpoint(engine, model: PeftModel, tokenizer, config: KTOConfig, step: int) -> Path:
    """Write `checkpoint-<step>` (all ranks call), point `latest` at it, keep the newest save_total_limit."""
    output = Path(config.output_dir)
    path, tmp = output / f"checkpoint-{step}", output / f".checkpoint-{step}.tmp"
    if is_main_process():
        shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed while saving this step
        tmp.mkdir(parents=True)
    barrier()
    # save_latest writes DeepSpeed's own `latest` (naming the tag) inside the checkpoint, so that
    # merge_lora.py can also read it as a DeepSpeed checkpoint (fp32 master weights, any ZeRO stage).
    engine.save_checkpoint(str(tmp), tag=DEEPSPEED_TAG, save_latest=True, exclude_frozen_parameters=True)
    torch.save(_rng_state(), tmp / f"rng_state_{engine.global_rank}.pt")
    _write_adapter(model, tokenizer, config, tmp)
    if is_main_process():
        state = {"step": step, "world_size": engine.world_size, "global_batch_size": engine.train_batch_size()}
        (tmp / TRAINER_STATE).write_text(json.dumps(state))
    barrier()  # every rank's shards are on disk before the checkpoint becomes visible
    if is_main_process():
        replace_directory(tmp, path)
        write_atomic(output / LATEST, path.name)
        if config.save_total_limit:
            for old in checkpoints(output)[: -config.save_total_limit]:
                shutil.rmtree(old)
    barrier()
    return path


def find_checkpoint(config: KTOConfig) -> Path | None:
    """The checkpoint `resume_from_checkpoint` names; "latest" with none saved yet means a fresh start
    (so a requeued job that died before its first save simply starts over)."""
    if not config.resume_from_checkpoint:
        return None
    if config.resume_from_checkpoint == "latest":
        pointer = Path(config.output_dir) / LATEST
        if not pointer.exists():
            logger.info("No checkpoint in %s yet: starting from step 0.", config.output_dir)
            return None
        path = Path(config.output_dir) / pointer.read_text().strip()
    else:
        path = Path(config.resume_from_checkpoint)
    if not (path / TRAINER_STATE).is_file() or not (path / DEEPSPEED_TAG).is_dir():
        raise ConfigError(f"resume_from_checkpoint: {path} is not a complete kto-scale checkpoint "
                          f"(it needs {TRAINER_STATE} and {DEEPSPEED_TAG}/).")
    return path


def resume_tag(path: Path, config: KTOConfig, ds_config: dict, world_size: int) -> str:
    """Check that `path` can continue this run and return the DeepSpeed tag to load from it.

    All ranks call, before the engine exists. On the rank count that wrote it, DeepSpeed's own shards.
    On another, DeepSpeed 0.19 cannot re-partition ZeRO optimizer shards, so rank 0 converts them once
    with DeepSpeed's ds_to_universal into a rank-independent copy (`<path>/universal/`, only the LoRA
    states: seconds even for a 70B base) and `ds_config` is switched to load that.
    """
    state = json.loads((path / TRAINER_STATE).read_text())
    global_batch = world_size * config.gradient_accumulation_steps * config.per_device_train_batch_size
    if state["global_batch_size"] != global_batch:
        raise ConfigError(
            f"{path} was trained with a global batch of {state['global_batch_size']} examples and this run has "
            f"{global_batch} (ranks x gradient_accumulation_steps x per_device_train_batch_size): "
            "keep it equal so the resumed run sees the batches the original would have."
        )
    if state["world_size"] == world_size:
        return DEEPSPEED_TAG
    def convert() -> None:
        if (path / UNIVERSAL_TAG).is_dir():
            return
        logger.info("%s was written by %d ranks and this run has %d: converting it with ds_to_universal.",
                    path, state["world_size"], world_size)
        with atomic_directory(path / UNIVERSAL_TAG) as tmp:
            command = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                       str(path / DEEPSPEED_TAG), "--output_folder", str(tmp), "--inject_missing_state"]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                raise ConfigError(f"Could not convert {path} for {world_size} ranks (resume on "
                                  f"{state['world_size']} ranks instead):\n{done.stdout[-2000:]}{done.stderr[-3000:]}")
        write_atomic(path / "latest_universal", UNIVERSAL_TAG)  # the converter's names its temporary folder

    on_main_process(convert)  # rank 0 converts; a failure is raised on every rank, none waits for it
    ds_config["checkpoint"] = {**ds_config.get("checkpoint", {}), "load_universal": True}
    return UNIVERSAL_TAG


def load_checkpoint(engine, path: Path, tag: str) -> int:
    """Restore optimizer, scheduler, LoRA weights and (same rank count) this rank's RNG from `path`; return its step."""
    state = json.loads((path / TRAINER_STATE).read_text())
    loaded, _ = engine.load_checkpoint(str(path), tag=tag, load_module_strict=False,
                                       load_optimizer_states=True, load_lr_scheduler_states=True)
    if loaded is None:
        raise ConfigError(f"resume_from_checkpoint: DeepSpeed could not load {path / tag}.")
    if state["world_size"] == engine.world_size:
        _set_rng_state(torch.load(path / f"rng_state_{engine.global_rank}.pt", weights_only=False))
    else:  # RNG streams are per rank: with dropout, masks from here on differ from an uninterrupted run
        logger.warning("Resumed on %d ranks from a checkpoint of %d: the random streams (dropout) start afresh.",
                       engine.world_size, state["world_size"])
    logger.info("Resumed from %s at step %d.", path, state["step"])
    return state["step"]


def prepare_output_dir(config: KTOConfig) -> None:
    """Lock output_dir for this run (rank 0 holds the lock) and refuse to mix two runs in one directory.

    All ranks call; a refusal is raised on every rank. Nothing is moved or deleted here: with
    overwrite_output_dir the old run is moved aside by `set_aside_previous_run`, once this run has
    passed its checks (config, data, model) and is about to write.
    """
    output = Path(config.output_dir)

    def check() -> None:
        lock_directory(output / LOCK_FILE, f"output_dir {output}")
        if not _holds_run(output) or config.resume_from_checkpoint:
            return
        if not config.overwrite_output_dir:
            raise ConfigError(
                f"{output} already holds a run (its config or checkpoints): pass --resume_from_checkpoint latest "
                "to continue it, --overwrite_output_dir true to replace it, or pick another output_dir."
            )
        for name in INPUTS:  # e.g. sft_adapter: outputs/run/adapter with output_dir outputs/run
            value = getattr(config, name)
            inside = value and _inside_run_files(Path(value), output)
            if inside:
                raise ConfigError(f"{name} {value} lies inside {inside}, which overwrite_output_dir would move "
                                  "aside before it is read: copy it out of output_dir, or pick another output_dir.")

    on_main_process(check)


def set_aside_previous_run(config: KTOConfig) -> None:
    """With overwrite_output_dir, move the run already in output_dir into `.previous-run-<time>/` inside
    it, out of the new run's way (all ranks call). Nothing is deleted: remove it when no longer needed."""
    output = Path(config.output_dir)

    def move() -> None:
        if not config.overwrite_output_dir or config.resume_from_checkpoint or not _holds_run(output):
            return
        aside = move_previous_run(output, RUN_FILES)
        logger.warning("overwrite_output_dir: the previous run in %s was moved to %s (delete it when you no "
                       "longer need it).", output, aside)

    on_main_process(move)


def _inside_run_files(path: Path, output: Path) -> Path | None:
    """The entry of output/ that `path` is or lies inside, when it is one a run writes."""
    path, output = path.resolve(), output.resolve()
    if output not in path.parents:
        return None
    entry = output / path.relative_to(output).parts[0]
    return entry if RUN_FILES.fullmatch(entry.name) else None


def _holds_run(output: Path) -> bool:
    return (output / CONFIG_FILE).exists() or bool(checkpoints(output))
