"""The DeepSpeed engine: its JSON config resolved against ours, the optimizer and the LR schedule.

"auto" fields in the DeepSpeed JSON are filled from KTOConfig by transformers' own
`HfTrainerDeepSpeedConfig`, exactly as the HF Trainer does, and explicit values that contradict the
training config are errors. The object also tells `from_pretrained` to load ZeRO-3 models already
partitioned, so it must exist (and stay referenced) before the model is loaded.
"""

from types import SimpleNamespace

import deepspeed
import torch
from transformers import get_scheduler
from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

from kto_scale.config import ConfigError, KTOConfig, find_deepspeed_config
from kto_scale.model import SequenceLogps


def _trainer_args(config: KTOConfig, world_size: int) -> SimpleNamespace:
    """The TrainingArguments fields HfTrainerDeepSpeedConfig reads, taken from our config."""
    return SimpleNamespace(
        world_size=world_size,
        per_device_train_batch_size=config.per_device_train_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        max_grad_norm=config.max_grad_norm,
        learning_rate=config.learning_rate,
        adam_beta1=config.adam_beta1,
        adam_beta2=config.adam_beta2,
        adam_epsilon=config.adam_epsilon,
        weight_decay=config.weight_decay,
        save_on_each_node=False,
        fp16=config.fp16,
        fp16_full_eval=False,
        bf16=config.bf16,
        bf16_full_eval=False,
        get_warmup_steps=config.warmup_steps_for,
    )


def resolve_deepspeed_config(config: KTOConfig, world_size: int) -> HfTrainerDeepSpeedConfig:
    """Read the JSON and fill the fields that need only the training config (call before loading the model)."""
    ds_config = HfTrainerDeepSpeedConfig(str(find_deepspeed_config(config.deepspeed)))
    ds_config.trainer_config_process(_trainer_args(config, world_size))
    if ds_config.is_zero3() and (config.load_in_4bit or config.load_in_8bit):
        raise ConfigError(f"{config.deepspeed} is ZeRO-3, which partitions weights and cannot shard a "
                          "bitsandbytes-quantized base: use ds_configs/zero2.json with load_in_4bit/load_in_8bit.")
    if ds_config.mismatches:  # fail now, before any heavy work, not after the model is loaded
        raise ConfigError(f"{config.deepspeed} contradicts the training config (set these to \"auto\"):\n"
                          + "\n".join(ds_config.mismatches))
    return ds_config


def build_engine(
    config: KTOConfig, ds_config: HfTrainerDeepSpeedConfig, module: SequenceLogps, world_size: int, total_steps: int
) -> tuple[deepspeed.DeepSpeedEngine, object]:
    """Finish the DeepSpeed config (hidden-size buckets, schedule length) and create the engine.

    The optimizer and scheduler come from the JSON when it has "optimizer"/"scheduler" sections;
    otherwise AdamW over the LoRA parameters and transformers' schedule named by lr_scheduler_type.
    """
    try:
        ds_config.trainer_config_finalize(_trainer_args(config, world_size), module.model, total_steps)
    except ValueError as e:  # mismatches between the JSON and our config
        raise ConfigError(f"{config.deepspeed}: {e}") from e
    trainable = [p for p in module.parameters() if p.requires_grad]
    optimizer = lr_scheduler = None
    if "optimizer" not in ds_config.config:
        optimizer = torch.optim.AdamW(
            trainable, lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
            eps=config.adam_epsilon, weight_decay=config.weight_decay,
        )
    if "scheduler" not in ds_config.config:
        # A callable: DeepSpeed hands it the optimizer it actually steps (its ZeRO wrapper).
        def lr_scheduler(opt):
            return get_scheduler(
                config.lr_scheduler_type, opt, num_warmup_steps=config.warmup_steps_for(total_steps),
                num_training_steps=total_steps,
            )
    engine, _, _, scheduler = deepspeed.initialize(
        model=module, model_parameters=trainable, optimizer=optimizer, lr_scheduler=lr_scheduler,
        config=ds_config.config,
    )
    return engine, scheduler


def build_inference_engine(config: KTOConfig, ds_config: HfTrainerDeepSpeedConfig, model) -> deepspeed.DeepSpeedEngine:
    """A DeepSpeed engine around SequenceLogps(model) for forward passes only: no optimizer, no scheduler."""
    for section in ("optimizer", "scheduler"):  # a training JSON is reused as is
        ds_config.config.pop(section, None)
    if not ds_config.is_zero3():
        # ZeRO-1/2 partition only optimizer state and gradients, and DeepSpeed refuses them without an
        # optimizer; stage 0 keeps the same full copy of the weights on each rank.
        ds_config.config["zero_optimization"] = {"stage": 0}
    try:  # fills the "auto" sizes that depend on the model's hidden size
        ds_config.trainer_config_finalize(SimpleNamespace(get_warmup_steps=lambda steps: 0), model, 1)
    except ValueError as e:
        raise ConfigError(f"{config.deepspeed}: {e}") from e
    engine, *_ = deepspeed.initialize(model=SequenceLogps(model, config.logprob_chunk_size), config=ds_config.config)
    engine.eval()
    return engine
