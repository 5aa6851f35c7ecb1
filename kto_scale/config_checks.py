"""The rules a run configuration must satisfy: each field's range and the settings that contradict
each other, checked on load (kto_scale.config_io), and the DeepSpeed JSON it names.

Every broken rule is a ConfigError naming the setting and the fix.
"""

import json
from pathlib import Path

from kto_scale.config import REPO_ROOT, ConfigError, KTOConfig

SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")
REPORTERS = ("none", "wandb", "tensorboard")
KL_BASELINES = ("effective_batch", "micro_batch")
QUANT_STORAGES = ("uint8", "bfloat16", "float16", "float32")
INIT_DEVICES = ("cpu", "cuda")


def validate_config(config: KTOConfig) -> None:
    """Check every cross-field rule; raise ConfigError naming the setting and the fix."""
    if not config.model_name_or_path:
        raise ConfigError("model_name_or_path is not set: give a local model directory or a hub id.")
    if not config.dataset_name:
        raise ConfigError("dataset_name is not set: give a data file, a save_to_disk dir or a hub name.")
    positive = ["per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                "max_length", "logging_steps", "save_steps", "lora_r", "logprob_chunk_size", "dist_timeout_s", "max_bad_steps",
                "precompute_batch_size", "sigterm_timeout_s"]
    for name in positive:
        if getattr(config, name) <= 0:
            raise ConfigError(f"{name} must be > 0, got {getattr(config, name)}.")
    if config.keep_previous_runs is not None and config.keep_previous_runs < 0:
        raise ConfigError(f"keep_previous_runs must be >= 0 or null, got {config.keep_previous_runs}.")
    if config.save_total_limit is not None and config.save_total_limit <= 0:
        raise ConfigError(f"save_total_limit must be > 0 or null, got {config.save_total_limit}.")
    if config.eval_steps is not None and config.eval_steps <= 0:
        raise ConfigError(f"eval_steps must be > 0 or null, got {config.eval_steps}.")
    if config.dataset_num_proc is not None and config.dataset_num_proc < 1:
        raise ConfigError(f"dataset_num_proc must be > 0 or null (the cores this process may use), got "
                          f"{config.dataset_num_proc}.")
    if config.generate_during_eval and not (config.eval_dataset_name or config.eval_fraction > 0):
        raise ConfigError("generate_during_eval completes held-out prompts: set eval_dataset_name or "
                          "eval_fraction, or turn generate_during_eval off.")
    for name in ("num_generation_prompts", "max_new_tokens", "generation_temperature"):
        if getattr(config, name) <= 0:
            raise ConfigError(f"{name} must be > 0, got {getattr(config, name)}.")
    if not 0.0 < config.generation_top_p <= 1.0:
        raise ConfigError(f"generation_top_p must be in (0, 1], got {config.generation_top_p}.")
    if config.bf16 and config.fp16:
        raise ConfigError("bf16 and fp16 are both set: choose one.")
    if config.load_in_4bit and config.load_in_8bit:
        raise ConfigError("load_in_4bit and load_in_8bit are both set: choose one.")
    if (config.load_in_4bit or config.load_in_8bit) and config.init_random_weights:
        raise ConfigError("init_random_weights cannot be quantized: save the model first and load it.")
    if config.init_device not in (None, *INIT_DEVICES):
        raise ConfigError(f"init_device must be one of {INIT_DEVICES} or null, got {config.init_device!r}.")
    if config.init_device is not None and not config.init_random_weights:
        raise ConfigError(f"init_device {config.init_device} places the weights init_random_weights builds: set "
                          "init_random_weights: true, or leave init_device unset (loaded weights go where the "
                          "engine puts them).")
    if config.bnb_4bit_quant_storage not in (None, *QUANT_STORAGES):
        raise ConfigError(f"bnb_4bit_quant_storage must be one of {QUANT_STORAGES} or null, got "
                          f"{config.bnb_4bit_quant_storage!r}.")
    if config.bnb_4bit_quant_type not in ("nf4", "fp4"):
        raise ConfigError(f"bnb_4bit_quant_type must be nf4 or fp4, got {config.bnb_4bit_quant_type!r}.")
    if config.max_prompt_length is not None and not 0 < config.max_prompt_length < config.max_length:
        raise ConfigError(
            f"max_prompt_length ({config.max_prompt_length}) must be in [1, max_length={config.max_length}) "
            "so that at least one completion token fits."
        )
    if config.dataloader_num_workers is not None and config.dataloader_num_workers < 0:
        raise ConfigError(f"dataloader_num_workers must be >= 0 or null, got {config.dataloader_num_workers}.")
    if config.dataloader_prefetch_factor is not None and (config.dataloader_prefetch_factor <= 0
                                                        or config.dataloader_num_workers == 0):
        raise ConfigError(f"dataloader_prefetch_factor {config.dataloader_prefetch_factor} needs "
                          "dataloader_num_workers > 0 and must be > 0: set both, or leave it null.")
    if config.max_tokens_per_batch is not None and (config.max_tokens_per_batch <= 0 or not config.padding_free):
        raise ConfigError(f"max_tokens_per_batch {config.max_tokens_per_batch} needs padding_free: true (padded "
                          "batches are sized in rows) and must be > 0: set padding_free, or leave it null.")
    if config.max_completion_length is not None and config.max_completion_length <= 0:
        raise ConfigError(f"max_completion_length must be > 0 or null, got {config.max_completion_length}.")
    if not 0.0 <= config.eval_fraction < 1.0:
        raise ConfigError(f"eval_fraction must be in [0, 1), got {config.eval_fraction}.")
    if config.eval_fraction > 0 and config.eval_dataset_name:
        raise ConfigError("eval_fraction and eval_dataset_name are both set: choose one eval source.")
    if config.beta <= 0:
        raise ConfigError(f"beta must be > 0, got {config.beta}.")
    for name in ("desirable_weight", "undesirable_weight"):
        value = getattr(config, name)
        if value != "auto" and (isinstance(value, str) or value <= 0):
            raise ConfigError(f"{name} must be a positive number or 'auto', got {value!r}.")
    if config.lr_scheduler_type not in SCHEDULERS:
        raise ConfigError(f"lr_scheduler_type {config.lr_scheduler_type!r} is not one of {SCHEDULERS}.")
    if config.kl_baseline not in KL_BASELINES:
        raise ConfigError(f"kl_baseline {config.kl_baseline!r} is not one of {KL_BASELINES}.")
    if config.kl_pairs_per_step < 0:
        raise ConfigError(f"kl_pairs_per_step must be >= 0 (0: every pair), got {config.kl_pairs_per_step}.")
    if config.kl_pairs_per_step and config.kl_baseline == "micro_batch":
        raise ConfigError("kl_pairs_per_step samples pairs from the whole effective batch: it needs kl_baseline "
                          "effective_batch (a micro-batch could get no pair at all).")
    if not 0.0 <= config.warmup_ratio < 1.0:
        raise ConfigError(f"warmup_ratio must be in [0, 1), got {config.warmup_ratio}.")
    if config.warmup_ratio > 0 and config.warmup_steps > 0:
        raise ConfigError("warmup_ratio and warmup_steps are both set: choose one.")
    unknown = [r for r in config.report_to if r not in REPORTERS]
    if unknown:
        raise ConfigError(f"report_to has {unknown}; valid entries are {REPORTERS}.")
    if config.max_steps <= 0 and config.num_train_epochs <= 0:
        raise ConfigError("Set max_steps > 0 or num_train_epochs > 0: there is nothing to train.")
    if config.fsdp:
        _check_fsdp(config)
    elif not config.deepspeed:
        raise ConfigError("Neither deepspeed nor fsdp is set: give a DeepSpeed JSON (e.g. ds_configs/zero2.json) "
                          "or fsdp: full_shard.")
    else:
        find_deepspeed_config(config.deepspeed)


def _check_fsdp(config: KTOConfig) -> None:
    words = config.fsdp.split()
    if "full_shard" not in words or set(words) - {"full_shard", "offload"}:
        raise ConfigError(f"fsdp {config.fsdp!r}: use \"full_shard\" or \"full_shard offload\" (or leave it "
                          "empty to train on DeepSpeed).")
    if config.deepspeed:
        raise ConfigError(f"fsdp: {config.fsdp} and deepspeed: {config.deepspeed} are both set: they are two "
                          "engines; choose one (--deepspeed null for FSDP2, or drop fsdp for DeepSpeed).")
    if config.fp16:
        raise ConfigError("fsdp with fp16 is not supported (it needs a sharded loss scaler): use bf16, or "
                          "DeepSpeed for fp16.")
    if config.load_in_4bit or config.load_in_8bit:
        raise ConfigError("fsdp cannot shard a bitsandbytes-quantized base (FSDP2 all-gathers a 4-bit weight as a "
                          "plain tensor without its quantization state, and its rank-0 broadcast load cannot "
                          "carry that state): train QLoRA on DeepSpeed ZeRO-3 (deepspeed: ds_configs/zero3.json), "
                          "which shards the 4-bit base, or fsdp with a bf16 base.")


def check_zero3_quantization(config: KTOConfig) -> None:
    """The bitsandbytes settings a ZeRO-3 DeepSpeed JSON cannot partition (the engine and the planner ask)."""
    if config.load_in_8bit:
        raise ConfigError(f"{config.deepspeed} is ZeRO-3, which cannot partition bitsandbytes' 8-bit weights (int8 "
                          "with separate scales): use load_in_4bit on ZeRO-3, or ds_configs/zero2.json for 8-bit.")
    compute = "bfloat16" if config.bf16 else "float16" if config.fp16 else "float32"
    if config.load_in_4bit and config.bnb_4bit_quant_storage not in (None, compute):
        raise ConfigError(f"bnb_4bit_quant_storage {config.bnb_4bit_quant_storage} on ZeRO-3 ({config.deepspeed}): "
                          f"ZeRO-3 partitions weights in the training dtype; set it to {compute} or leave it unset.")


def find_deepspeed_config(path: str) -> Path:
    """The JSON file, relative to the working directory or, failing that, to the kto-scale checkout;
    a file that is not valid JSON is an error naming its line and column."""
    for candidate in (Path(path), REPO_ROOT / path):
        if candidate.is_file():
            try:
                json.loads(candidate.read_text())
            except json.JSONDecodeError as error:
                raise ConfigError(f"deepspeed config {candidate}, line {error.lineno} column {error.colno}: "
                                  f"invalid JSON ({error.msg}). Fix the file.") from None
            return candidate
    raise ConfigError(f"deepspeed config {path!r} does not exist (the shipped ones are in ds_configs/).")
