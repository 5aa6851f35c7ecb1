"""Starting KTO from an SFT LoRA adapter (`sft_adapter`): the reference is base + that adapter, frozen.

Both live on one PeftModel over the same base weights (never a second model), as two named adapters
loaded from the same files:
- "default", the policy: trainable, the only adapter the optimizer, checkpoints and saved adapters
  see, so `PeftModel.from_pretrained` and `launch/merge_lora.py` read a saved one as usual;
- "reference": frozen (requires_grad False, so out of the optimizer and of DeepSpeed's checkpoints,
  which exclude frozen parameters); `reference_mode` makes it the active adapter.
Both are loaded before `deepspeed.initialize`, which partitions them under ZeRO-3 like the rest.

An adapter that cannot be continued as plain LoRA on this base is refused before the model loads.
"""

import contextlib
import hashlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from kto_scale.adapter_files import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    AdapterError,
    load_adapter,
    not_plain_lora,
    plan_merge,
)
from kto_scale.config import ConfigError, KTOConfig

logger = logging.getLogger(__name__)

POLICY_ADAPTER = "default"  # the name PeftModel.from_pretrained gives the adapter it loads
REFERENCE_ADAPTER = "reference"
# adapter_config.json fields that do not change what the adapter computes (a cache stays valid without them).
_NOT_COMPUTED = ("base_model_name_or_path", "revision", "inference_mode", "peft_version", "lora_dropout", "task_type",
                 "auto_mapping")  # (dropout is off in every reference pass)


def adapter_dir(config: KTOConfig) -> Path:
    """The local directory of `sft_adapter`: as given, or the hub adapter's files in the local HF cache."""
    path = Path(config.sft_adapter)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(config.sft_adapter, allow_patterns=["*.json", "*.safetensors", "*.model",
                                                                          "*.txt", "*.jinja"]))
    except Exception as e:  # offline, unknown repo, no access: all end the same way for the user
        raise ConfigError(f"sft_adapter {config.sft_adapter!r} is not a local directory and could not be "
                          f"fetched from the hub ({type(e).__name__}: {e}).") from e


def check_sft_adapter(config: KTOConfig, tokenizer: PreTrainedTokenizerBase) -> None:
    """Refuse an sft_adapter that cannot be continued as plain LoRA on this base, before the model loads.

    Call before `resolve_deepspeed_config`: the shapes come from a meta-device copy of the model,
    which ZeRO-3's partitioned initialisation would otherwise intercept.
    """
    if not config.sft_adapter:
        return
    path = adapter_dir(config)
    where = f"sft_adapter {path}"
    try:
        settings, tensors = load_adapter(path, allow_pickle=False)
    except AdapterError as e:
        raise ConfigError(f"{where}: {e}") from e
    reason = not_plain_lora(settings)
    if reason:
        raise ConfigError(f"{where}/{ADAPTER_CONFIG}: {reason}; kto-scale continues plain LoRA adapters "
                          "(lora_A/lora_B on linear layers of the original base) only.")
    model_config = AutoConfig.from_pretrained(config.model_name_or_path, revision=config.model_revision,
                                              trust_remote_code=config.trust_remote_code)
    recorded = (settings.get("auto_mapping") or {}).get("base_model_class")
    if recorded and recorded not in (model_config.architectures or [recorded]):
        raise ConfigError(f"{where} was trained on a {recorded}, but {config.model_name_or_path} is a "
                          f"{model_config.architectures}: train the SFT adapter on this base.")
    with torch.device("meta"):  # module shapes without allocating any weight
        meta = AutoModelForCausalLM.from_config(model_config, trust_remote_code=config.trust_remote_code)
    try:
        plan_merge(settings, tensors, {k: tuple(v.shape) for k, v in meta.state_dict().items()}, path)
    except AdapterError as e:
        raise ConfigError(f"{where}: {e}") from e
    if (path / "tokenizer_config.json").is_file():  # SFT trainers usually save the tokenizer with the adapter
        if AutoTokenizer.from_pretrained(path).get_vocab() != tokenizer.get_vocab():
            raise ConfigError(f"{where} holds a tokenizer whose vocabulary differs from {config.model_name_or_path}'s: "
                              "the adapter was trained with other token ids. Use the SFT run's base and tokenizer.")
    run = {"lora_r": (config.lora_r, settings.get("r")), "lora_alpha": (config.lora_alpha, settings.get("lora_alpha"))}
    if config.lora_target_modules:  # None means "whatever the adapter targets" here
        theirs = settings.get("target_modules") or []
        run["lora_target_modules"] = (sorted(config.lora_target_modules),
                                      theirs if isinstance(theirs, str) else sorted(theirs))  # a str is a regex
    ignored = [f"{name}={ours}" for name, (ours, theirs) in run.items() if ours != theirs]
    if ignored:
        logger.info("The policy continues %s with its own settings (r=%s, lora_alpha=%s, target_modules=%s); "
                    "the run's %s are not used.", path, settings.get("r"), settings.get("lora_alpha"),
                    settings.get("target_modules"), ", ".join(ignored))


def sft_adapter_fingerprint(config: KTOConfig) -> dict | None:
    """What the reference adapter contributes to the reference: hashes of its settings and weights."""
    if not config.sft_adapter:
        return None
    path = adapter_dir(config)
    settings = {k: v for k, v in json.loads((path / ADAPTER_CONFIG).read_text()).items() if k not in _NOT_COMPUTED}
    return {"config": hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest(),
            "weights": hashlib.sha256((path / ADAPTER_WEIGHTS).read_bytes()).hexdigest()}


def add_sft_adapters(model: PreTrainedModel, config: KTOConfig) -> PeftModel:
    """The policy (a trainable copy of sft_adapter, with the run's lora_dropout) plus the frozen reference."""
    path = adapter_dir(config)
    settings = LoraConfig.from_pretrained(str(path))
    settings.lora_dropout = config.lora_dropout  # a training choice; the weights are what is continued
    model = PeftModel.from_pretrained(model, str(path), is_trainable=True, config=settings)
    add_reference_adapter(model, config)
    return model


def add_reference_adapter(model: PeftModel, config: KTOConfig) -> None:
    """Load sft_adapter into `model` as the frozen "reference" adapter (the policy stays the active one)."""
    was_training = model.training
    model.load_adapter(str(adapter_dir(config)), adapter_name=REFERENCE_ADAPTER, is_trainable=False)
    model.train(was_training)  # peft puts the whole model in eval mode for an inference adapter: LoRA dropout off
    model.set_requires_grad(REFERENCE_ADAPTER, requires_grad=False)


def has_reference_adapter(model: PeftModel) -> bool:
    """Whether `model` carries a frozen reference adapter (else the reference is the bare base)."""
    return REFERENCE_ADAPTER in model.peft_config


@contextlib.contextmanager
def reference_adapter_active(model: PeftModel) -> Iterator[None]:
    """Make the reference the active adapter of every LoRA layer inside this block.

    Only the layers' active adapter changes: peft's `set_adapter` would also flip requires_grad, from
    which DeepSpeed set up its gradient hooks and ZeRO-3 its parameter handling.
    """
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    active = [layer.active_adapters for layer in layers]
    for layer in layers:
        layer._active_adapter = [REFERENCE_ADAPTER]
    try:
        yield
    finally:
        for layer, names in zip(layers, active, strict=True):
            layer._active_adapter = names
