"""The engine seam: what the training loop, scoring, generation and checkpoints ask of an engine, and
the DeepSpeed implementation (the FSDP2 one is kto_scale.fsdp).

Both implement `Engine` with the same semantics, so the loop has one code path:
- `engine(**batch)` runs SequenceLogps; `backward(loss, boundary)` takes one micro-batch's loss, sums
  gradients over the step's micro-batches and averages them over ranks; `boundary` marks the step's last
  micro-batch (a step may have any number of them: max_tokens_per_batch); `step()` is called after
  every micro-batch and updates (clip, AdamW, schedule) after the boundary, skipping and counting an
  update whose gradient norm is not finite.
- `shards_weights`: every rank holds a shard of every weight, so every rank must take part in every
  forward pass (ZeRO-3, FSDP); `trainable_state_dict()` gathers the LoRA weights whole on rank 0.
- `save_checkpoint(dir)`/`load_checkpoint(dir)` write and read the engine's own state (optimizer,
  schedule, LoRA shards) into the checkpoint directory kto_scale.checkpoint builds around it.

kto_scale.startup picks the implementation (DeepSpeedSetup or kto_scale.fsdp.FSDPSetup) before the
model loads, because ZeRO-3 loads the model already partitioned.

DeepSpeed: "auto" fields in the JSON are filled from KTOConfig (as a TrainingArguments) by transformers' own
`HfTrainerDeepSpeedConfig`, exactly as the HF Trainer does, and explicit values that contradict the
training config are errors. That object also tells `from_pretrained` to load ZeRO-3 models already
partitioned, so it must exist (and stay referenced) before the model is loaded.
"""

import logging
import subprocess
import sys
from pathlib import Path
from typing import Protocol

import deepspeed
import torch
from torch import Tensor
from transformers import TrainingArguments
from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

from kto_scale.atomic import atomic_directory, write_atomic
from kto_scale.config import ConfigError, KTOConfig
from kto_scale.config_checks import check_zero3_quantization, find_deepspeed_config
from kto_scale.distributed import is_main_process, on_main_process
from kto_scale.model import SequenceLogps
from kto_scale.optimizer import OptimizerSettings, optimizer_and_schedule

logger = logging.getLogger(__name__)

DEEPSPEED_TAG = "deepspeed"  # the engine's state inside a kto-scale checkpoint directory
UNIVERSAL_TAG = "universal"  # DeepSpeed's rank-independent copy, made to resume on another rank count


class Engine(Protocol):
    """The calls the loop, scoring, generation and checkpoints make; one implementation per engine."""

    module: SequenceLogps
    device: torch.device
    world_size: int
    global_rank: int
    shards_weights: bool
    skipped_steps: int
    state_tag: str  # the subdirectory of a checkpoint holding this engine's state

    def __call__(self, **inputs) -> Tensor: ...
    def backward(self, loss: Tensor, boundary: bool) -> None: ...
    def step(self) -> None: ...
    def was_step_applied(self) -> bool: ...
    def get_global_grad_norm(self) -> float: ...
    def learning_rate(self) -> float: ...
    def train(self) -> None: ...
    def eval(self) -> None: ...
    def trainable_state_dict(self) -> dict[str, Tensor] | None: ...
    def save_checkpoint(self, path: Path) -> None: ...
    def load_checkpoint(self, path: Path, saved_world_size: int) -> None: ...


def training_arguments(config: KTOConfig, warmup_steps: int = 0) -> TrainingArguments:
    """The transformers TrainingArguments HfTrainerDeepSpeedConfig fills the JSON's "auto" fields from, with
    KTOConfig's values (the same names). Its world size is the process group's (1 before there is one);
    warmup_steps is resolved by the caller (KTOConfig.warmup_steps_for), as the schedule uses it."""
    return TrainingArguments(
        output_dir=config.output_dir, report_to="none", use_cpu=not torch.cuda.is_available(),  # bf16 on CPU too
        per_device_train_batch_size=config.per_device_train_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps, max_grad_norm=config.max_grad_norm,
        learning_rate=config.learning_rate, adam_beta1=config.adam_beta1, adam_beta2=config.adam_beta2,
        adam_epsilon=config.adam_epsilon, weight_decay=config.weight_decay, fp16=config.fp16, bf16=config.bf16,
        warmup_steps=warmup_steps,
    )


def resolve_deepspeed_config(config: KTOConfig, world_size: int) -> HfTrainerDeepSpeedConfig:
    """Read the JSON and fill the fields that need only the training config (call before loading the model)."""
    ds_config = HfTrainerDeepSpeedConfig(str(find_deepspeed_config(config.deepspeed)))
    args = training_arguments(config)
    if args.world_size != world_size:  # train_batch_size is computed from it
        raise RuntimeError(f"TrainingArguments sees {args.world_size} ranks, the process group {world_size}.")
    ds_config.trainer_config_process(args)
    if ds_config.is_zero3():
        check_zero3_quantization(config)
    if ds_config.mismatches:  # fail now, before any heavy work, not after the model is loaded
        raise ConfigError(f"{config.deepspeed} contradicts the training config (set these to \"auto\"):\n"
                          + "\n".join(ds_config.mismatches))
    return ds_config


class DeepSpeedSetup:
    """The DeepSpeed JSON resolved against the config; builds the training or inference engine."""

    def __init__(self, config: KTOConfig, world_size: int) -> None:
        self.config, self.world_size = config, world_size
        self.ds_config = resolve_deepspeed_config(config, world_size)
        self.shards_weights = self.ds_config.is_zero3()

    def loads_weights(self, rank: int) -> bool:
        """Every rank loads the model (ZeRO-3: its partition, as transformers reads it)."""
        return True

    def _finalize(self, args: TrainingArguments, model, total_steps: int) -> None:
        try:  # fills the "auto" sizes that depend on the model's hidden size and the schedule length
            self.ds_config.trainer_config_finalize(args, model, total_steps)
        except ValueError as e:  # mismatches between the JSON and our config
            raise ConfigError(f"{self.config.deepspeed}: {e}") from e

    def prepare_resume(self, path: Path, saved_world_size: int) -> None:
        """Make checkpoint `path` loadable on this rank count (all ranks call, before `training_engine`).

        DeepSpeed 0.19 cannot re-partition ZeRO optimizer shards, so on another rank count rank 0
        converts them once with DeepSpeed's ds_to_universal into a rank-independent copy
        (`<path>/universal/`, only the LoRA states: seconds even for a 70B base), and the engine is
        built to load that.
        """
        if saved_world_size == self.world_size:
            return

        def convert() -> None:
            if (path / UNIVERSAL_TAG).is_dir():
                return
            logger.info("%s was written by %d ranks and this run has %d: converting it with ds_to_universal.",
                        path, saved_world_size, self.world_size)
            with atomic_directory(path / UNIVERSAL_TAG) as tmp:
                command = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                           str(path / DEEPSPEED_TAG), "--output_folder", str(tmp), "--inject_missing_state"]
                done = subprocess.run(command, capture_output=True, text=True)
                if done.returncode != 0:
                    raise ConfigError(f"Could not convert {path} for {self.world_size} ranks (resume on "
                                      f"{saved_world_size} ranks instead):\n{done.stdout[-2000:]}{done.stderr[-3000:]}")
            write_atomic(path / "latest_universal", UNIVERSAL_TAG)  # the converter's names its temporary folder

        on_main_process(convert)  # a failure is raised on every rank, none waits for it
        self.ds_config.config["checkpoint"] = {**self.ds_config.config.get("checkpoint", {}), "load_universal": True}

    def training_engine(self, module: SequenceLogps, total_steps: int) -> "DeepSpeedEngine":
        """The engine with its optimizer and schedule: the JSON's "optimizer"/"scheduler" sections when it
        has them, otherwise AdamW over the LoRA parameters and transformers' schedule."""
        args = training_arguments(self.config, warmup_steps=self.config.warmup_steps_for(total_steps))
        self._finalize(args, module.model, total_steps)
        trainable = [p for p in module.parameters() if p.requires_grad]
        optimizer, schedule = optimizer_and_schedule(OptimizerSettings.from_config(self.config, total_steps), trainable)
        engine, _, _, scheduler = deepspeed.initialize(
            model=module, model_parameters=trainable, config=self.ds_config.config,
            optimizer=None if "optimizer" in self.ds_config.config else optimizer,
            lr_scheduler=None if "scheduler" in self.ds_config.config else schedule,
        )
        return DeepSpeedEngine(engine, scheduler, self.shards_weights)

    def inference_engine(self, model) -> "DeepSpeedEngine":
        """SequenceLogps(model) for forward passes only: no optimizer, no scheduler."""
        config = self.ds_config.config
        for section in ("optimizer", "scheduler"):  # a training JSON is reused as is
            config.pop(section, None)
        if not self.shards_weights:
            # ZeRO-1/2 partition only optimizer state and gradients, and DeepSpeed refuses them without an
            # optimizer; stage 0 keeps the same full copy of the weights on each rank.
            config["zero_optimization"] = {"stage": 0}
        self._finalize(training_arguments(self.config), model, 1)
        engine, *_ = deepspeed.initialize(model=SequenceLogps(model, self.config.logprob_chunk_size), config=config)
        engine.eval()
        return DeepSpeedEngine(engine, None, self.shards_weights)


class DeepSpeedEngine:
    """`Engine` on a deepspeed.DeepSpeedEngine (which already has most of these calls)."""

    state_tag = DEEPSPEED_TAG

    def __init__(self, engine: deepspeed.DeepSpeedEngine, scheduler, shards_weights: bool) -> None:
        self.engine, self.scheduler, self.shards_weights = engine, scheduler, shards_weights
        self.module, self.device = engine.module, engine.device
        self.world_size, self.global_rank = engine.world_size, engine.global_rank

    def __call__(self, **inputs) -> Tensor:
        return self.engine(**inputs)

    def backward(self, loss: Tensor, boundary: bool) -> None:
        # The caller says where the step ends (DeepSpeed would count gradient_accumulation_steps
        # micro-batches) and scales the loss itself (DeepSpeed would divide by that count).
        self.engine.set_gradient_accumulation_boundary(boundary)
        self.engine.backward(loss, scale_wrt_gas=False)

    def step(self) -> None:
        self.engine.step()

    def was_step_applied(self) -> bool:
        return self.engine.was_step_applied()

    @property
    def skipped_steps(self) -> int:
        return self.engine.skipped_steps

    def get_global_grad_norm(self) -> float:
        return float(self.engine.get_global_grad_norm() or 0.0)

    def learning_rate(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def train(self) -> None:
        self.engine.train()

    def eval(self) -> None:
        self.engine.eval()

    def trainable_state_dict(self) -> dict[str, Tensor] | None:
        """The LoRA weights, whole, on rank 0 (None elsewhere); every rank calls (ZeRO-3 gathers from all).
        Only trainable parameters are gathered, never the base: cheap even for a 70B base."""
        params = {name: p for name, p in self.module.model.named_parameters() if p.requires_grad}
        # A no-op for parameters ZeRO does not partition (stages 0-2).
        with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None):
            return {name: p.detach().cpu().clone() for name, p in params.items()} if is_main_process() else None

    def save_checkpoint(self, path: Path) -> None:
        # save_latest writes DeepSpeed's own `latest` (naming the tag) into the checkpoint, so that
        # merge_lora.py can also read it as a DeepSpeed checkpoint (fp32 master weights, any ZeRO stage).
        self.engine.save_checkpoint(str(path), tag=DEEPSPEED_TAG, save_latest=True, exclude_frozen_parameters=True)

    def load_checkpoint(self, path: Path, saved_world_size: int) -> None:
        tag = DEEPSPEED_TAG if saved_world_size == self.world_size else UNIVERSAL_TAG  # see prepare_resume
        loaded, _ = self.engine.load_checkpoint(str(path), tag=tag, load_module_strict=False,
                                                load_optimizer_states=True, load_lr_scheduler_states=True)
        if loaded is None:
            raise ConfigError(f"resume_from_checkpoint: DeepSpeed could not load {path / tag}.")
