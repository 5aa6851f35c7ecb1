"""Saving what training produces, atomically: adapters, full training checkpoints, and resuming.

- An adapter directory holds `adapter_config.json` + `adapter_model.safetensors` (loadable with
  `PeftModel.from_pretrained`), the tokenizer and the resolved `kto_config.yaml`.
- A training checkpoint `checkpoint-<step>/` is an adapter directory plus the engine's state (optimizer,
  scheduler and LoRA shards; the frozen base is never written): `deepspeed/` (resuming on another rank
  count adds `universal/`, the same states in DeepSpeed's rank-independent layout) or `fsdp/`
  (torch.distributed.checkpoint, resharded on load), and every rank's RNG state.
  The data position needs no saving: batches are a pure function of (seed, step).

Every directory is written under a temporary name and renamed when complete; `<output_dir>/latest`
names the newest complete checkpoint and moves only after every rank has finished writing, so a kill
at any moment never leaves a checkpoint that looks whole.
"""

import json
import logging
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import yaml
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kto_scale.atomic import atomic_directory, replace_directory, write_atomic
from kto_scale.config import OPTIMIZATION_FIELDS, RESUME_OPTIONS, ConfigError, KTOConfig
from kto_scale.config_io import CONFIG_FILE, save_config
from kto_scale.distributed import any_rank, barrier, is_main_process, on_main_process
from kto_scale.engine import DEEPSPEED_TAG, Engine
from kto_scale.fsdp import FSDP_TAG
from kto_scale.outdir import LATEST, checkpoints, latest_checkpoint, record_owned
from kto_scale.sft_adapter import POLICY_ADAPTER

logger = logging.getLogger(__name__)

ENGINE_TAGS = {"deepspeed": DEEPSPEED_TAG, "fsdp": FSDP_TAG}  # each engine's state directory in a checkpoint
TRAINER_STATE = "trainer_state.json"
CHANGES_FILE = "config_changes.jsonl"  # one line per resume with changed settings


def _write_adapter(engine: Engine, tokenizer: PreTrainedTokenizerBase, config: KTOConfig, path: Path,
                   state: dict) -> None:
    """Rank 0 writes the adapter files into `path` from `state`, the LoRA weights gathered from every
    rank by `engine.trainable_state_dict()` (never the base: cheap even for a 70B base)."""
    if is_main_process():
        # Only the policy: with sft_adapter, the frozen reference adapter is not the run's output.
        engine.module.model.save_pretrained(path, selected_adapters=[POLICY_ADAPTER], state_dict=state)
        tokenizer.save_pretrained(path)
        save_config(config, path)


def save_adapter(engine: Engine, tokenizer: PreTrainedTokenizerBase, config: KTOConfig, path: str | Path) -> None:
    """Save the adapter to `path` atomically (all ranks call)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")  # the same name on every rank
    if is_main_process():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _write_adapter(engine, tokenizer, config, tmp, engine.trainable_state_dict())
    if is_main_process():
        replace_directory(tmp, path)
    barrier()  # nobody reads or moves on before the directory is complete


def save_base_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: str | Path) -> None:
    """Save a randomly initialized base (init_random_weights), so its adapter can be merged or
    reloaded later. Called before the engine is built: every rank holds the whole model then, even
    under ZeRO-3 (kto_scale.model builds random models outside zero.Init), so rank 0 writes it as is."""
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


def save_checkpoint(engine: Engine, tokenizer, config: KTOConfig, step: int) -> Path:
    """Write `checkpoint-<step>` (all ranks call), point `latest` at it, keep the newest save_total_limit.

    A rank that cannot write its part (disk full, read-only, no permission) stops every rank with an
    OSError naming the checkpoint; the half-written directory is removed, and the previous checkpoint
    and `latest` stay as they were.
    """
    output = Path(config.output_dir)
    path, tmp = output / f"checkpoint-{step}", output / f".checkpoint-{step}.tmp"

    def start() -> None:
        record_owned(output, [path.name])
        shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed while saving this step
        tmp.mkdir(parents=True)

    on_main_process(start)
    adapter = engine.trainable_state_dict()  # the one collective: before any rank can fail a write
    failure = None
    try:
        engine.save_checkpoint(tmp)
        torch.save(_rng_state(), tmp / f"rng_state_{engine.global_rank}.pt")
        _write_adapter(engine, tokenizer, config, tmp, adapter)
        if is_main_process():
            state = {"step": step, "world_size": engine.world_size,
                     "global_batch_size": _global_batch(config, engine.world_size)}
            write_atomic(tmp / TRAINER_STATE, json.dumps(state))
    except (OSError, RuntimeError) as error:  # torch.save reports a failed write as a RuntimeError
        failure = error
    if any_rank(failure is not None):  # every rank's shards are on disk, or every rank stops
        if is_main_process():
            shutil.rmtree(tmp, ignore_errors=True)
        cause = getattr(failure, "strerror", None) or str(failure or "another rank could not write its part")
        raise OSError(getattr(failure, "errno", None), cause, str(path)) from failure

    def publish() -> None:
        replace_directory(tmp, path)
        write_atomic(output / LATEST, path.name)
        if config.save_total_limit:
            for old in checkpoints(output)[: -config.save_total_limit]:
                shutil.rmtree(old)

    on_main_process(publish)
    return path


def _global_batch(config: KTOConfig, world_size: int) -> int:
    return world_size * config.gradient_accumulation_steps * config.per_device_train_batch_size


def find_checkpoint(config: KTOConfig) -> Path | None:
    """The checkpoint `resume_from_checkpoint` names; "latest" with none saved yet means a fresh start
    (so a requeued job that died before its first save simply starts over)."""
    if not config.resume_from_checkpoint:
        return None
    if config.resume_from_checkpoint == "latest":
        path = latest_checkpoint(config.output_dir)
        if path is None:
            logger.info("No checkpoint in %s yet: starting from step 0.", config.output_dir)
            return None
    else:
        path = Path(config.resume_from_checkpoint)
    if not (path / TRAINER_STATE).is_file() or not any((path / tag).is_dir() for tag in ENGINE_TAGS.values()):
        raise ConfigError(f"resume_from_checkpoint: {path} is not a complete kto-scale checkpoint "
                          f"(it needs {TRAINER_STATE} and {' or '.join(ENGINE_TAGS.values())}/).")
    return path


def check_resume(path: Path, config: KTOConfig, world_size: int) -> int:
    """Check that checkpoint `path` can continue this run; return the rank count that wrote it.

    The engine must be the one that wrote it, and the global batch the same (the data order is a
    function of it); the rank count may differ (see the engines' prepare_resume).
    """
    state = json.loads((path / TRAINER_STATE).read_text())
    engine = "fsdp" if config.fsdp else "deepspeed"
    if not (path / ENGINE_TAGS[engine]).is_dir():
        other = next(name for name, tag in ENGINE_TAGS.items() if (path / tag).is_dir())
        switch = "--fsdp full_shard --deepspeed null" if other == "fsdp" else "--fsdp '' (DeepSpeed)"
        raise ConfigError(f"{path} was written by {other} and this run uses {engine}: resume it with the engine "
                          f"that wrote it ({switch}).")
    _check_changes(path, config)
    global_batch = _global_batch(config, world_size)
    if state["global_batch_size"] != global_batch:
        raise ConfigError(
            f"{path} was trained with a global batch of {state['global_batch_size']} examples and this run has "
            f"{global_batch} (ranks x gradient_accumulation_steps x per_device_train_batch_size): "
            "keep it equal so the resumed run sees the batches the original would have."
        )
    return state["world_size"]


def _check_changes(path: Path, config: KTOConfig) -> None:
    """Compare the settings checkpoint `path` was written with to this run's. A change to what is
    optimized is refused unless resume_with_changes; every accepted change is logged and appended to
    <output_dir>/config_changes.jsonl (kto_config.yaml then holds the run's settings from here on)."""
    saved = yaml.safe_load((path / CONFIG_FILE).read_text()) if (path / CONFIG_FILE).is_file() else {}
    now = config.to_dict()
    changes = {name: [saved.get(name), value] for name, value in now.items()
               if name not in RESUME_OPTIONS and saved.get(name) != value}
    described = {name: f"{name} {old!r} -> {new!r}" for name, (old, new) in changes.items()}
    listed = "; ".join(line for name, line in described.items() if name in OPTIMIZATION_FIELDS)
    if listed and not config.resume_with_changes:
        raise ConfigError(f"{path} was trained with other settings that change the optimization: {listed}. Resume "
                          "with the checkpoint's values, pass --resume_with_changes true to continue with these "
                          f"(each change is recorded in {CHANGES_FILE}), or start a new run.")
    if changes:
        logger.warning("Resuming from %s with changed settings: %s.", path, "; ".join(described.values()))
        if is_main_process():
            with open(Path(config.output_dir) / CHANGES_FILE, "a") as log:
                log.write(json.dumps({"checkpoint": str(path), "changes": changes}) + "\n")


def load_checkpoint(engine: Engine, path: Path) -> int:
    """Restore optimizer, scheduler, LoRA weights and (same rank count) this rank's RNG from `path`; return its step."""
    state = json.loads((path / TRAINER_STATE).read_text())
    engine.load_checkpoint(path, state["world_size"])
    if state["world_size"] == engine.world_size:
        _set_rng_state(torch.load(path / f"rng_state_{engine.global_rank}.pt", weights_only=False))
    else:  # RNG streams are per rank: with dropout, masks from here on differ from an uninterrupted run
        logger.warning("Resumed on %d ranks from a checkpoint of %d: the random streams (dropout) start afresh.",
                       engine.world_size, state["world_size"])
    logger.info("Resumed from %s at step %d.", path, state["step"])
    return state["step"]
