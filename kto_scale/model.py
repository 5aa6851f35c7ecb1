"""The policy (LoRA adapters on the base model) and the reference (the same base with adapters off).

There is never a second copy of the model: `reference_mode` disables the adapters for a forward pass
(with `sft_adapter`, it switches to the frozen reference adapter instead: kto_scale.sft_adapter).
`SequenceLogps` is the module DeepSpeed wraps; its forward returns one completion log-prob per row,
computed from the decoder's hidden states by the chunked LM head of `kto_scale.logprobs`.
"""

import contextlib
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from accelerate import init_empty_weights
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import Tensor, nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.integrations import is_deepspeed_zero3_enabled

from kto_scale.attention import CUSTOM_MASK_ATTENTION, layout_mask
from kto_scale.collate import ReferenceLayout
from kto_scale.config import ConfigError, KTOConfig
from kto_scale.kernels import apply_kernels, check_attention_device
from kto_scale.logprobs import chunked_completion_logps, scored_token_logps
from kto_scale.random_init import RandomWeights, random_model
from kto_scale.sft_adapter import add_sft_adapters, has_reference_adapter, reference_adapter_active

logger = logging.getLogger(__name__)

# Models whose logits are not just lm_head(hidden): the chunked head would score them wrongly.
_LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale")


def train_dtype(config: KTOConfig) -> torch.dtype:
    """The dtype the model's weights are loaded in (DeepSpeed keeps fp32 master weights for bf16/fp16)."""
    return torch.bfloat16 if config.bf16 else torch.float16 if config.fp16 else torch.float32


def load_tokenizer(config: KTOConfig) -> PreTrainedTokenizerBase:
    """The model's tokenizer, with a pad token set (EOS when it has none; padding is always masked).
    The first thing read from the model: a path or hub id that does not load is a ConfigError here."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            config.model_name_or_path, revision=config.model_revision, trust_remote_code=config.trust_remote_code
        )
    except OSError as e:  # transformers' error for a missing local dir, an unknown hub id, or no network
        where = Path(config.model_name_or_path).resolve()
        found = f"{where} holds no loadable tokenizer" if where.exists() else f"there is no {where}"
        raise ConfigError(f"model_name_or_path {config.model_name_or_path!r}: {found}, and as a Hugging Face Hub "
                          f"id it did not load ({str(e).splitlines()[0]}). Check the path or the id.") from e
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ValueError(f"The tokenizer of {config.model_name_or_path} has neither a pad nor an EOS token.")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def quant_storage(config: KTOConfig) -> str:
    """bnb_4bit_quant_storage, resolved: ZeRO-3 partitions and gathers each module's weights as flat
    buffers of one dtype, so there the packed 4-bit bytes are viewed as the training dtype (peft's
    "DeepSpeed ZeRO-3 + QLoRA" recipe); elsewhere bitsandbytes' own uint8."""
    if config.bnb_4bit_quant_storage:
        return config.bnb_4bit_quant_storage
    return str(train_dtype(config)).removeprefix("torch.") if is_deepspeed_zero3_enabled() else "uint8"


def bnb_config(config: KTOConfig) -> BitsAndBytesConfig:
    """The bitsandbytes settings of a 4/8-bit base (kto_scale.quantized_base rebuilds the same rounding)."""
    return BitsAndBytesConfig(
        load_in_4bit=config.load_in_4bit, load_in_8bit=config.load_in_8bit,
        bnb_4bit_quant_type=config.bnb_4bit_quant_type, bnb_4bit_use_double_quant=config.use_bnb_nested_quant,
        bnb_4bit_compute_dtype=train_dtype(config), bnb_4bit_quant_storage=quant_storage(config),
    )


def _quantization(config: KTOConfig) -> dict:
    """from_pretrained arguments for a bitsandbytes 4/8-bit base (none without quantization).

    Under ZeRO-3, transformers loads a quantized model whole on each rank (no zero.Init: the weights
    are quantized as they are read), and DeepSpeed partitions it when the engine is created: each
    rank briefly holds the 4-bit base (~0.56 bytes per weight), never a 16-bit copy."""
    if not (config.load_in_4bit or config.load_in_8bit):
        return {}
    # No device_map (ZeRO-3 refuses one): bitsandbytes' quantizer then quantizes each weight as it is
    # placed, straight onto this rank's current GPU (or the CPU), not moved later.
    return {"quantization_config": bnb_config(config)}


def base_config(config: KTOConfig) -> PretrainedConfig:
    """The base model's config.json (a local directory or a hub id), no weights read."""
    return AutoConfig.from_pretrained(
        config.model_name_or_path, revision=config.model_revision, trust_remote_code=config.trust_remote_code
    )


def _empty_model(config: KTOConfig, dtype: torch.dtype) -> PreTrainedModel:
    """The model's structure without its weights: every parameter a placeholder (see is_placeholder: no
    memory, nothing read), its buffers (RoPE's frequencies, which no checkpoint holds) computed as usual.

    Placeholders on the CPU rather than meta parameters, because peft builds adapters on the CPU (drawing
    the same random numbers as for a loaded model, or reading a saved adapter) and then moves each to its
    base weight's device: onto the meta device, which would drop their values. kto_scale.fsdp.shard turns
    the placeholders into meta parameters before sharding."""
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(base_config(config), dtype=dtype,
                                                 trust_remote_code=config.trust_remote_code,
                                                 attn_implementation=config.attn_implementation)
    model.tie_weights()  # init_empty_weights re-creates each parameter as it is registered, untying them
    for param in list(model.parameters()):  # each shared (tied) parameter once, swapped in place: ties hold
        placeholder = torch.empty((), dtype=param.dtype).expand(param.shape)
        torch.utils.swap_tensors(param, nn.Parameter(placeholder, requires_grad=param.requires_grad))
    return model


def is_placeholder(param: Tensor) -> bool:
    """Whether `param` is an empty model's placeholder: one element expanded to the weight's shape (every
    stride 0), which no real weight of a model is."""
    return param.dim() > 0 and not any(param.stride())


def random_weights(config: KTOConfig) -> RandomWeights:
    """init_random_weights's draw (kto_scale.random_init): seeded by config.seed, the same on every engine,
    stage and rank count, on config.init_device (the CPU by default; "cuda": this rank's GPU).

    Under ZeRO-3 each rank builds the model whole (kto_scale.random_init.random_model) and DeepSpeed
    partitions it when the engine is created: fine for the tiny models random weights are meant for, and
    on the GPU for a large model's benchmark. FSDP2's ranks build it empty and draw only their shards."""
    if config.init_device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("init_device cuda: this machine has no CUDA GPU; leave init_device unset to build the "
                          "random weights on the CPU.")
    device = torch.device("cuda", torch.cuda.current_device()) if config.init_device == "cuda" else torch.device("cpu")
    return RandomWeights(base_config(config), train_dtype(config), config.seed, device,
                         config.trust_remote_code, config.attn_implementation)


def load_base_model(config: KTOConfig, empty: bool = False) -> PreTrainedModel:
    """The base causal LM, frozen weights as loaded (or seeded random weights with init_random_weights).

    empty: its parameters are placeholders instead (no memory, nothing read): FSDP2's ranks, which get
    their shards when the model is sharded (kto_scale.fsdp.shard), by reading their own slices of the
    checkpoint or from rank 0, so that no rank, or only rank 0, holds the whole model."""
    check_attention_device(config)
    dtype = train_dtype(config)
    if empty:
        model = _empty_model(config, dtype)
    elif config.init_random_weights:
        model = random_model(random_weights(config))
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(
                config.model_name_or_path, revision=config.model_revision, dtype=dtype,
                trust_remote_code=config.trust_remote_code, attn_implementation=config.attn_implementation,
                **_quantization(config),
            )
        except (ImportError, ValueError) as error:  # an attention backend not installed (ImportError) or unknown
            if config.attn_implementation and (isinstance(error, ImportError) or "attn_implementation" in str(error)):
                raise ConfigError(f"attn_implementation {config.attn_implementation!r} cannot be used here: "
                                  f"{' '.join(str(error).split())} Install it, or choose sdpa or eager.") from None
            raise
    for name in _LOGIT_POSTPROCESSING:
        if getattr(model.config, name, None) not in (None, 1.0):
            raise ValueError(
                f"{config.model_name_or_path} post-processes its logits ({name}={getattr(model.config, name)}); "
                "kto-scale scores completions with lm_head(hidden) and does not support it."
            )
    for module in model.modules():
        # bitsandbytes (0.50) repacks a 4-bit weight in place for its AVX-512-BF16 CPU kernel at the first
        # eval-mode pass without gradients. Under ZeRO-3 that weight is a gathered copy, freed after the
        # pass, and re-gathered in the original packing: the quant state would then describe the wrong
        # one. And in later training passes the LoRA layers over a repacked weight get no gradient
        # (q_proj/v_proj lora_A/B .grad None, which DeepSpeed's ZeRO-2 hook trips on). One kernel for
        # every pass, on every CPU.
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    model.config.use_cache = False  # no generation during training; the KV cache only costs memory
    apply_kernels(model, config)
    return model


def load_model(config: KTOConfig, empty: bool = False) -> PeftModel:
    """The base model with fresh LoRA adapters attached: the trainable policy (empty: see load_base_model)."""
    return add_lora(load_base_model(config, empty), config)


def add_lora(model: PreTrainedModel, config: KTOConfig) -> PeftModel:
    """Attach fresh LoRA adapters (or, with sft_adapter, the SFT adapter twice: policy and reference)
    to a loaded base model (peft injects them in place)."""
    if config.load_in_4bit or config.load_in_8bit:
        # peft's preparation: norms in fp32 and input gradients on, so LoRA trains through frozen
        # quantized layers; it also turns on gradient checkpointing when asked.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=config.gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    elif config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if config.sft_adapter:  # continue an SFT adapter: its own settings and weights
        return add_sft_adapters(model, config)
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=config.lora_target_modules or "all-linear",
        task_type="CAUSAL_LM",
    )
    # Seed here so the adapters' initial weights do not depend on how much randomness loading used
    # (ZeRO-3's partitioned loading consumes it differently from a plain load).
    torch.manual_seed(config.seed)
    try:
        return get_peft_model(model, lora)
    except ValueError as error:  # peft: "Target modules {...} not found in the base model"
        linear = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ConfigError(f"lora_target_modules {config.lora_target_modules}: {error} The model's linear layers are "
                          f"named {linear}.") from None


def reference_layout(config: KTOConfig, model: PreTrainedModel, cached: bool) -> ReferenceLayout:
    """How the run computes reference log-probs: CACHED with a precomputed cache (no reference passes),
    else SHARED, one forward over x + y + y' per example (config.shared_prompt_reference), unless the
    model's attention cannot take that mask (said in the log), else SEPARATE."""
    if cached:
        return ReferenceLayout.CACHED
    if not config.shared_prompt_reference:
        return ReferenceLayout.SEPARATE
    attention = model.config._attn_implementation
    if attention not in CUSTOM_MASK_ATTENTION or getattr(model.config, "sliding_window", None):
        logger.info("shared_prompt_reference: %s attention%s cannot take the x + y + y' mask; the reference scores "
                    "each example and its KL pair in two passes.", attention,
                    " with a sliding window" if getattr(model.config, "sliding_window", None) else "")
        return ReferenceLayout.SEPARATE
    logger.info("Reference passes: one forward over prompt + completion + KL completion per example "
                "(shared_prompt_reference).")
    return ReferenceLayout.SHARED


@contextlib.contextmanager
def adapters_disabled(model: PeftModel) -> Iterator[None]:
    """Every LoRA layer computes its base layer alone inside this block.

    Only the layers' switch changes: peft's `disable_adapter` also sets requires_grad False on the
    adapters, and an engine that looks at requires_grad meanwhile (FSDP2 decides its gradient dtypes at
    the first forward pass, which may be a reference pass) would treat them as frozen.
    """
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        layer._disable_adapters = True
    try:
        yield
    finally:
        for layer in layers:
            layer._disable_adapters = False


@contextlib.contextmanager
def reference_mode(model: PeftModel) -> Iterator[None]:
    """Forward passes inside this block are the reference: adapters off (or, with sft_adapter, the
    frozen reference adapter on), no gradients, no dropout (the reference is a fixed function,
    whether computed on the fly or precomputed)."""
    was_training = model.training
    model.eval()
    adapters = reference_adapter_active(model) if has_reference_adapter(model) else adapters_disabled(model)
    try:
        with adapters, torch.no_grad():
            yield
    finally:
        model.train(was_training)


class _HeadScoring(nn.Module):
    """Calls a scoring function of kto_scale.logprobs inside a module of its own (it has no parameters).

    That function runs the LM head in checkpointed chunks, recomputed during backward. DeepSpeed ZeRO-3
    charges the weights a recompute gathers to the innermost module whose backward is running and frees
    them when that backward ends: without this module that was the root, so the head (V x H: 1 GiB in
    Llama-3-8B) stayed gathered on every rank through the decoder's whole backward."""

    def forward(self, score: Callable[..., Tensor], *args) -> Tensor:
        return score(*args)


class SequenceLogps(nn.Module):
    """Maps a padded batch to per-row completion log-probs; the module `deepspeed.initialize` wraps.

    Going through the decoder and the LM head separately (rather than `model(...).logits`) lets the
    head run only at completion positions, a chunk at a time. Both are called as modules, so
    DeepSpeed ZeRO-3's parameter-gathering hooks fire as usual.
    """

    def __init__(self, model: PeftModel, chunk_size: int = 1024):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size
        self.head_scoring = _HeadScoring()

    def generate(self, input_ids: Tensor, attention_mask: Tensor, **kwargs) -> Tensor:
        """`model.generate`'s token ids [B, T + new]. Under FSDP2 the engine registers this method with
        `register_fsdp_forward_method`, so the root's parameters are gathered around it as around forward."""
        return self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def forward(
        self,
        input_ids: Tensor,
        completion_mask: Tensor | None = None,
        attention_mask: Tensor | None = None,
        sequence_lengths: Tensor | None = None,
        segments: Tensor | None = None,
        position_ids: Tensor | None = None,
        score_positions: Tensor | None = None,
        score_targets: Tensor | None = None,
        score_sequences: Tensor | None = None,
    ) -> Tensor:
        """Completion log-probs, one float32 per sequence.

        Padded: [B, T] input_ids, completion_mask and attention_mask -> [B].
        Packed (padding-free): [1, N] input_ids and completion_mask holding B sequences back to back,
        and [B] sequence_lengths -> [B]. Position ids restart at 0 for each sequence, which
        transformers turns into attention that never crosses sequences (with flex_attention, the
        BlockMask of kto_scale.attention does it). With the score_* lists (kto_scale.collate lists them
        for every layout), the LM head runs at exactly those positions.
        Shared prompt (kto_scale.collate's "reference" inputs): x + y + y' rows given as input_ids,
        segments, position_ids and the score_* lists (packed: and sequence_lengths) -> [2B], the B
        examples' log-probs then their KL pairs'.
        """
        base = self.model.get_base_model()
        sequence_ids = None
        if sequence_lengths is not None:
            # Computed on the device from static sizes: no host sync.
            total = input_ids.shape[1]
            sequence_ids = torch.repeat_interleave(
                torch.arange(len(sequence_lengths), device=input_ids.device), sequence_lengths, output_size=total
            )
            if position_ids is None:
                starts = torch.cumsum(sequence_lengths, 0) - sequence_lengths
                position_ids = (torch.arange(total, device=input_ids.device) - starts[sequence_ids]).unsqueeze(0)
            sequence_ids = sequence_ids.unsqueeze(0)
        # base.dtype, not the embedding's .weight: under ZeRO-3, reading a weight inside forward gathers it
        # for the rest of the forward and backward (DeepSpeed's "external parameter"): a V x H copy per rank.
        attention_mask = layout_mask(base.config._attn_implementation, input_ids, attention_mask, segments,
                                     sequence_ids, base.dtype)
        hidden = base.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                    use_cache=False).last_hidden_state
        if score_positions is not None:  # listed by collate on the host: no `nonzero` sync here
            token_logps = self.head_scoring(scored_token_logps, hidden.flatten(0, 1)[score_positions], score_targets,
                                            base.get_output_embeddings(), self.chunk_size)
            examples = input_ids.shape[0] if sequence_lengths is None else len(sequence_lengths)
            sums = torch.zeros(examples * (1 if segments is None else 2), dtype=torch.float32, device=hidden.device)
            return sums.index_add(0, score_sequences, token_logps)
        return self.head_scoring(
            chunked_completion_logps, hidden, base.get_output_embeddings(), input_ids, completion_mask,
            self.chunk_size, sequence_ids, None if sequence_lengths is None else len(sequence_lengths),
        )
