"""Run configuration: one typed dataclass, every option with its type, default and meaning.

Option names follow TRL's `KTOConfig`/`ModelConfig` and transformers' `TrainingArguments` where they
overlap, so a TRL user's YAML mostly carries over. The docstring under each field is the option's
documentation (`--help` reads it: kto_scale.usage). Loading a config from YAML and the command line
and saving the resolved one is kto_scale.config_io; the rules a config must satisfy are
kto_scale.config_checks.
"""

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]  # the checkout: the shipped ds_configs/ and configs/

# Settings a resumed run may not change without resume_with_changes: they change what is optimized (the
# global batch is checked on its own; max_steps and num_train_epochs may grow a run).
OPTIMIZATION_FIELDS = (
    "model_name_or_path", "model_revision", "init_random_weights", "init_device", "load_in_4bit", "load_in_8bit",
    "bnb_4bit_quant_type", "use_bnb_nested_quant", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules",
    "sft_adapter", "dataset_name", "eval_fraction", "skip_bad_rows", "max_length", "max_prompt_length",
    "max_completion_length", "group_by_length", "data_seed", "beta", "desirable_weight", "undesirable_weight",
    "kl_pairs_per_step", "kl_baseline", "learning_rate", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon",
    "max_grad_norm", "lr_scheduler_type", "warmup_ratio", "warmup_steps", "seed", "bf16", "fp16",
)
# How a run is resumed, not what it computes: never a change worth recording.
RESUME_OPTIONS = ("resume_from_checkpoint", "resume_with_changes", "overwrite_output_dir")


class ConfigError(ValueError):
    """A setting is missing, has the wrong type, or contradicts another one."""


@dataclass
class KTOConfig:
    # --- model ---
    model_name_or_path: str | None = None
    """Local directory or hub id of a transformers causal LM (Llama first)."""
    model_revision: str | None = None
    """Hub revision (branch, tag or commit) of the model and tokenizer."""
    init_random_weights: bool = False
    """Build the model from its config.json with random weights (seeded) instead of loading weights:
    the same weights on every ZeRO stage and rank count (on DeepSpeed each rank builds the whole model
    before it partitions it; on FSDP2 rank 0 builds it and broadcasts it). For the demo and tests only."""
    init_device: str | None = None
    """Where init_random_weights builds the weights: null = on the host (the CPU); "cuda" builds them on
    this rank's GPU (an 8B model in seconds, not minutes). The same seed gives the same weights on the
    same device, not across devices (their random number generators differ)."""
    trust_remote_code: bool = False
    """Allow model code from the hub repository to run. Off unless you trust it."""
    attn_implementation: str | None = None
    """transformers attention backend ("sdpa", "flash_attention_2", "flex_attention", "eager"); None lets it
    choose (sdpa). flex_attention (CUDA only) masks packed rows and the shared-prompt pass with a BlockMask
    instead of a dense T x T mask (docs/performance.md)."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory (about 30% slower)."""
    use_liger_kernel: bool = False
    """Liger-Kernel's fused Triton kernels for the RMSNorm, SwiGLU MLP and RoPE of Llama layers (not its
    losses: the log-probs are already a chunked fp32 head). CUDA and the liger-kernel package only."""
    torch_compile: bool = False
    """torch.compile each decoder layer (regional: one graph for all layers, dynamic shapes, so a new packed
    length does not recompile). Needs Triton on CUDA, a C++ compiler on the CPU; the first steps compile."""
    load_in_4bit: bool = False
    """QLoRA: load the base in 4 bits with bitsandbytes (DeepSpeed ZeRO-2 or ZeRO-3). The reference uses
    the same quantized weights."""
    load_in_8bit: bool = False
    """Load the base in 8 bits with bitsandbytes (DeepSpeed ZeRO-2 only)."""
    bnb_4bit_quant_type: str = "nf4"
    """4-bit data type: "nf4" (QLoRA's) or "fp4"."""
    use_bnb_nested_quant: bool = True
    """Double quantization: quantize the 4-bit quantization constants too (saves ~0.4 bits/weight)."""
    bnb_4bit_quant_storage: str | None = None
    """The dtype the packed 4-bit weights are stored in (two 4-bit values per byte, viewed as this
    dtype; the values are the same): "uint8", "bfloat16", "float16" or "float32". None: the training
    dtype on ZeRO-3 (which partitions every weight as one flat buffer of that dtype), uint8 elsewhere."""

    # --- LoRA (the policy) ---
    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: int = 32
    """LoRA scaling numerator: the update is scaled by lora_alpha / lora_r."""
    lora_dropout: float = 0.05
    """Dropout on the LoRA input."""
    lora_target_modules: list[str] | None = None
    """Module names to adapt; None adapts every attention and MLP projection ("all-linear")."""
    sft_adapter: str | None = None
    """Start from this LoRA adapter (a peft adapter dir or hub id, e.g. the output of an SFT run): the
    reference is base + this adapter, frozen, and the policy starts as an exact, trainable copy of it.
    Its own r, alpha, target modules and rsLoRA setting are used; lora_r/lora_alpha/lora_target_modules
    are then ignored (a differing value is logged), while lora_dropout still applies to the policy."""

    # --- data ---
    dataset_name: str | None = None
    """Training data: a .jsonl/.jsonl.gz/.json/.parquet file, a `save_to_disk` directory, or a hub name."""
    eval_dataset_name: str | None = None
    """Evaluation data, same forms as dataset_name. Exclusive with eval_fraction."""
    eval_fraction: float = 0.0
    """Hold out this fraction of the training data for evaluation (pairs stay together)."""
    skip_bad_rows: bool = False
    """Skip and count malformed rows instead of stopping at the first one."""
    dataset_num_proc: int | None = None
    """Processes that tokenize the data (TRL's name). None: the CPU cores this process may use."""
    prepared_data_dir: str | None = None
    """Where prepared (tokenized, truncated, KL-paired) data is kept for later runs, one subdirectory per
    fingerprint of what it depends on. None: .kto-prepared next to output_dir (docs/prepared-data.md)."""
    max_length: int = 1024
    """Maximum prompt + completion tokens; completions are cut at the tail to fit."""
    max_prompt_length: int | None = 512
    """Prompts keep their last max_prompt_length tokens. None: never cut (too-long examples are dropped)."""
    max_completion_length: int | None = None
    """Completions keep their first max_completion_length tokens."""
    padding_free: bool = False
    """Pack each micro-batch's sequences back to back into one row (position ids restart per
    sequence, attention never crosses them): no padding at all. On GPU, "flash_attention_2" (its
    variable-length kernel) or "flex_attention" (a BlockMask) skip the other sequences; sdpa and eager
    build a dense block-diagonal mask instead."""
    max_tokens_per_batch: int | None = None
    """With padding_free: fill each micro-batch to this many tokens (each example counted by its longer
    sequence, prompt + completion or prompt + KL completion) instead of per_device_train_batch_size
    rows, so every forward does about the same work. The optimizer step still takes the same global
    batch of examples; docs/performance.md, "Micro-batches by token budget", says how it is split."""
    dataloader_num_workers: int | None = None
    """Processes that collate the next steps' batches while the GPU runs this one (0: in the training
    process, between steps). None: 2 on CUDA, 0 on CPU, where training already uses every core."""
    dataloader_pin_memory: bool = True
    """Collate into pinned host memory on CUDA, so the copies to the GPU do not block the host."""
    dataloader_prefetch_factor: int | None = None
    """Steps each worker collates ahead (None: torch's default, 2); unused where no workers run."""
    group_by_length: bool = False
    """Put examples of similar length into the same batches (less padding; batches are still
    shuffled by epoch and cover every example once)."""
    data_seed: int = 42
    """Seed of the eval split and the KL pairing. Fixed at data preparation, so that a precomputed
    reference cache stays valid when the training seed changes."""

    # --- KTO ---
    beta: float = 0.1
    """KTO temperature: how far the policy may move from the reference."""
    desirable_weight: float | str = 1.0
    """lambda_D, or "auto" to balance the classes: lambda_D n_D / (lambda_U n_U) = 1."""
    undesirable_weight: float | str = 1.0
    """lambda_U, or "auto" (see desirable_weight)."""
    ref_cache: str | None = None
    """Directory of reference log-probs precomputed by launch/precompute_ref.py; training then skips
    the reference forward passes and reads them from there."""
    precompute_batch_size: int = 32
    """Examples per forward pass of the reference precompute (no gradients: larger than training's)."""
    shared_prompt_reference: bool = True
    """The reference scores an example (x, y) and its KL pair (x, y') in one forward pass over
    x + y + y' (y' attends to x and itself, its positions continue from x), so the prompt is computed
    once, on the fly and in launch/precompute_ref.py. Needs attention that takes a 4D mask (sdpa,
    eager, flex_attention); with others (flash_attention_2) the two passes stay separate, which is logged."""
    kl_pairs_per_step: int = 0
    """Estimate z_ref from this many KL pairs per optimizer step, drawn without replacement from the
    effective batch (seeded by seed and step: the same on any number of ranks and on resume), and skip
    the KL passes of the other examples. 0: every example's pair (the paper's estimate). At most the
    global batch. docs/loss.md, "Fewer KL passes", gives the noise it adds and the time it saves."""
    kl_baseline: str = "effective_batch"
    """Where z_ref is estimated: "effective_batch" (all ranks and accumulation micro-batches of an
    optimizer step, the default) or "micro_batch" (each accumulation micro-batch on its own, summed
    over the ranks, as TRL does; for comparison only: the step's logged `kl` is then the mean of its
    micro-batches' z_refs)."""

    # --- optimization ---
    output_dir: str = "outputs/run"
    """Where the adapter, checkpoints, metrics and the resolved config go."""
    overwrite_output_dir: bool = False
    """Allow writing into an output_dir that already holds another run."""
    per_device_train_batch_size: int = 4
    """Examples per micro-batch on each rank."""
    per_device_eval_batch_size: int = 8
    """Examples per evaluation batch on each rank."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step on each rank."""
    learning_rate: float = 5e-5
    """Peak learning rate of AdamW."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.999
    """AdamW beta2."""
    adam_epsilon: float = 1e-8
    """AdamW epsilon."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0 disables)."""
    num_train_epochs: float = 1.0
    """Passes over the training data (may be fractional). Ignored when max_steps > 0."""
    max_steps: int = -1
    """Optimizer steps to run; -1 derives them from num_train_epochs."""
    lr_scheduler_type: str = "linear"
    """Learning-rate schedule after warmup: linear, cosine, constant, constant_with_warmup."""
    warmup_ratio: float = 0.0
    """Fraction of the steps spent warming up linearly from 0. Exclusive with warmup_steps."""
    warmup_steps: int = 0
    """Warmup steps; overrides warmup_ratio when > 0."""
    seed: int = 42
    """Seed of random init, dropout, the per-epoch shuffling of training batches and sampled generation."""
    bf16: bool = False
    """Train in bfloat16 (fp32 master weights in the optimizer)."""
    fp16: bool = False
    """Train in float16 with dynamic loss scaling."""
    deepspeed: str | None = "ds_configs/zero2.json"
    """DeepSpeed JSON config; its "auto" fields are filled from this config. Exclusive with fsdp."""
    fsdp: str = ""
    """Train on PyTorch FSDP2 instead of DeepSpeed (launch with torchrun): "full_shard" shards every
    weight over the ranks; "full_shard offload" also keeps shards and optimizer state on the CPU."""
    logprob_chunk_size: int = 1024
    """Completion tokens whose logits are computed at once (bounds the [tokens, vocab] buffer)."""
    max_bad_steps: int = 5
    """Stop after this many optimizer steps in a row are skipped for non-finite gradients."""
    dist_timeout_s: int = 1800
    """Seconds a collective may wait for another rank before the run fails."""

    # --- logging, evaluation, saving ---
    logging_steps: int = 10
    """Log metrics every this many optimizer steps."""
    eval_steps: int | None = None
    """Evaluate every this many optimizer steps (and at the end); None: only at the end."""
    generate_during_eval: bool = False
    """At step 0 and every evaluation, complete num_generation_prompts held-out prompts with the policy
    (and once with the reference) into <output_dir>/generations.jsonl and, with wandb, a table."""
    num_generation_prompts: int = 8
    """How many distinct eval prompts to complete (chosen by data_seed; the same ones all run)."""
    max_new_tokens: int = 128
    """Most tokens generated per prompt (generation stops earlier at EOS)."""
    generation_do_sample: bool = False
    """Sample (seeded with `seed` at every evaluation) instead of greedy decoding."""
    generation_temperature: float = 1.0
    """Sampling temperature (with generation_do_sample)."""
    generation_top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens with this much probability (1.0 keeps all)."""
    save_steps: int = 500
    """Write a full training checkpoint (adapter + optimizer, scheduler, RNG) every this many steps."""
    save_total_limit: int | None = None
    """Keep only the newest this many checkpoints; None keeps all."""
    resume_from_checkpoint: str | None = None
    """Continue a run: "latest" (the newest complete checkpoint in output_dir, or a fresh start when
    the run saved none yet, convenient for requeued jobs) or a checkpoint directory."""
    resume_with_changes: bool = False
    """Resume even though settings that change the optimization (beta, learning rate, weights, data,
    LoRA, seeds) differ from the checkpoint's; each change is logged and appended to
    <output_dir>/config_changes.jsonl. Off: such a resume is refused with the list of changes."""
    keep_previous_runs: int | None = None
    """With overwrite_output_dir, keep at most this many runs set aside in output_dir/.previous-run-*
    and delete the oldest (only folders kto-scale set aside; each deletion is logged). None keeps all."""
    sigterm_timeout_s: int = 300
    """After SIGTERM (preemption, a time limit), seconds to finish the step and write a checkpoint
    before the run exits anyway; a second SIGTERM exits at once."""
    report_to: list[str] = field(default_factory=lambda: ["none"])
    """Trackers besides the always-written metrics.jsonl: wandb, tensorboard, or none."""
    run_name: str | None = None
    """Run name shown by the trackers."""
    disable_tqdm: bool = False
    """Turn off the progress bar."""

    def warmup_steps_for(self, total_steps: int) -> int:
        """Warmup steps for a run of total_steps optimizer steps."""
        return self.warmup_steps if self.warmup_steps > 0 else int(self.warmup_ratio * total_steps + 0.5)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
