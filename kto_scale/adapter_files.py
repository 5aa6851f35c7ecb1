"""Reading and validating LoRA adapter files: a peft adapter directory or a DeepSpeed checkpoint,
checked against an allow-list of the plain-LoRA settings kto-scale can merge or continue, its
lora_A/lora_B pairs matched to a base model's weight shapes.

Used by the export (kto_scale.export, which merges and writes) and by training from an SFT adapter
(kto_scale.sft_adapter, which refuses an adapter it cannot continue before the model loads).
DeepSpeed checkpoints are pickles read by DeepSpeed's zero_to_fp32: read only checkpoints you trust.
"""

import dataclasses
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig
from peft.utils.other import get_pattern_key
from safetensors.torch import load_file

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# The allow-list: adapter_config.json settings the merge implements with these values (None: any value).
# They are metadata, choose or scale the adapted modules (plan_merge reads them), or act only in training.
# Every other setting must hold peft's LoraConfig default (a key this peft does not know: null, false or
# empty), so a layer that computes more than W x + scale * B A x is refused, never merged wrongly.
_MERGEABLE = {
    **dict.fromkeys(("peft_type", "task_type", "auto_mapping", "peft_version", "base_model_name_or_path",
                     "revision", "inference_mode", "r", "lora_alpha", "rank_pattern", "alpha_pattern",
                     "use_rslora", "fan_in_fan_out", "target_modules", "exclude_modules", "layers_to_transform",
                     "layers_pattern", "lora_dropout", "eva_config")),
    # The other initialisations (PiSSA, OLoRA, CorDA, LoftQ, ...) rewrite the base weights.
    "init_lora_weights": (True, False, "gaussian", "eva", "orthogonal"),
}
_LORA_DEFAULTS = {f.name: f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
                  for f in dataclasses.fields(LoraConfig)}
_OFF = (None, False, {}, [])
# Names for the messages, where the option's name alone does not say what it is.
_WHAT = {"use_dora": "DoRA", "lora_bias": "LoRA bias terms", "trainable_token_indices": "trainable token embeddings",
         "target_parameters": "LoRA on nn.Parameters", "init_lora_weights": "an init that rewrites the base weights"}
# A normalised adapter key: `base_model.model.<module>.lora_A.weight` (peft drops the adapter name on save).
_LORA_KEY = re.compile(r"base_model\.model\.(?P<module>.+)\.lora_(?P<half>[AB])\.weight")


class AdapterError(ValueError):
    """Bad adapter (or base) files: the message names the file or setting and what to do."""


@dataclass(frozen=True)
class LoraPair:
    """The LoRA factors of one base weight and the scale peft applies to `B @ A`."""

    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [out, r]
    scale: float


def read_json(path: Path) -> dict:
    """A JSON file's content, with an error that names the file."""
    if not path.is_file():
        raise AdapterError(f"{path} is missing.")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise AdapterError(f"{path} is not valid JSON ({err}).") from err


def load_pickle(path: Path) -> dict[str, torch.Tensor]:
    """A torch.save'd state dict, memory-mapped so that only the tensors we touch are read."""
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def normalize_key(key: str) -> str:
    """peft's saved name of an adapter tensor: no wrapper prefix before `base_model.model.`, no `.default`."""
    start = key.find("base_model.model.")
    return re.sub(r"\.default(?=\.|$)", "", key[start:] if start >= 0 else key)


def _deepspeed_lora_tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The LoRA tensors of a DeepSpeed checkpoint (any ZeRO stage), gathered from all ranks in fp32."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), exclude_frozen_parameters=True)
    # The gathered tensors are views into one flat buffer; safetensors needs each to own its storage.
    return {k: v.clone() for k, v in state.items() if "lora_" in k}


def load_adapter(source: Path, allow_pickle: bool) -> tuple[dict, dict[str, torch.Tensor]]:
    """adapter_config.json and the normalised LoRA tensors of a peft adapter dir or a DeepSpeed checkpoint dir."""
    if (source / "latest").is_file():  # written by DeepSpeed's save_checkpoint
        if not (source / ADAPTER_CONFIG).is_file():
            raise AdapterError(f"{source} is a DeepSpeed checkpoint without {ADAPTER_CONFIG}; kto-scale saves it "
                              "next to the DeepSpeed files. Copy the run's adapter_config.json into it.")
        tensors = _deepspeed_lora_tensors(source)
    elif (source / ADAPTER_WEIGHTS).is_file():
        tensors = load_file(source / ADAPTER_WEIGHTS)
    elif (source / "adapter_model.bin").is_file() and allow_pickle:
        tensors = load_pickle(source / "adapter_model.bin")
    else:
        raise AdapterError(f"{source} is neither a peft adapter dir (with {ADAPTER_WEIGHTS}; a pickled "
                          "adapter_model.bin needs --allow_pickle) nor a DeepSpeed checkpoint dir (with 'latest').")
    normalized = {normalize_key(k): v for k, v in tensors.items()}
    if len(normalized) != len(tensors):
        raise AdapterError(f"{source} holds some LoRA tensors twice (with and without an adapter name).")
    return read_json(source / ADAPTER_CONFIG), normalized


def _mergeable(key: str, value) -> bool:
    """Whether a LoRA adapter_config setting leaves its layers plain `W + scale * B @ A` on the original base."""
    if key in _MERGEABLE:
        return _MERGEABLE[key] is None or value in _MERGEABLE[key]
    return value == _LORA_DEFAULTS[key] if key in _LORA_DEFAULTS else value in _OFF


def unsupported_settings(config: dict) -> list[str]:
    """The settings of a LoRA adapter_config outside the allow-list: each as `what (key=value)`."""
    refused = [(key, value) for key, value in config.items() if not _mergeable(key, value)]
    return [f"{_WHAT[key]} ({key}={value!r})" if key in _WHAT else f"{key}={value!r}" for key, value in refused]


def not_plain_lora(config: dict) -> str | None:
    """Why an adapter_config is not plain `W + scale * B @ A` LoRA (to merge or to continue), or None."""
    if config.get("peft_type") != "LORA":
        return f"peft_type {config.get('peft_type')!r} is not LoRA"
    used = unsupported_settings(config)
    return f"uses {', '.join(used)}" if used else None


def lora_modules(tensors: dict[str, torch.Tensor], source: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Module name -> (A, B) from normalised adapter tensors; anything but plain linear LoRA is refused."""
    embedding = [key for key in tensors if "lora_embedding_" in key]
    if embedding:
        raise AdapterError(f"{source}: {embedding[0]} is embedding-layer LoRA, which kto-scale does not export "
                          "or merge. The adapter can still be served unmerged with peft.")
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _LORA_KEY.fullmatch(key)
        if match:
            halves.setdefault(match["module"], {})[match["half"]] = tensor
        else:
            raise AdapterError(f"{source}: unexpected adapter tensor {key}; kto-scale exports plain LoRA "
                              "(lora_A/lora_B of linear layers) only. Serve this adapter unmerged with peft.")
    incomplete = sorted(m for m, h in halves.items() if len(h) != 2)
    if incomplete:
        raise AdapterError(f"{source}: LoRA modules without both lora_A and lora_B: {incomplete}")
    return {module: (h["A"], h["B"]) for module, h in halves.items()}


def _pattern_value(patterns: dict, module: str, default: float) -> float:
    """The rank_pattern/alpha_pattern value for a module, matched the way peft matches it."""
    return patterns.get(get_pattern_key(patterns.keys(), module), default)


def plan_merge(config: dict, tensors: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]],
               source: Path) -> dict[str, LoraPair]:
    """Base weight name -> its LoRA pair, after checking every pair against the base's weights."""
    plan, problems = {}, []
    for module, (a, b) in sorted(lora_modules(tensors, source).items()):
        key = f"{module}.weight"
        r = _pattern_value(config.get("rank_pattern") or {}, module, config["r"])
        alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"])
        expected = (b.shape[0], a.shape[1])
        if config.get("fan_in_fan_out"):
            expected = expected[::-1]
        if key not in shapes:
            problems.append(f"{module}: the base has no weight {key}")
        elif a.shape[0] != r or b.shape[1] != r:
            problems.append(f"{module}: adapter_config says r={r}, but lora_A is {tuple(a.shape)} and lora_B "
                            f"{tuple(b.shape)}")
        elif shapes[key] != expected:
            problems.append(f"{module}: the base weight is {shapes[key]}, but lora_B @ lora_A is {expected}")
        else:
            plan[key] = LoraPair(a, b, alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r)
    if problems:
        raise AdapterError(f"The adapter {source} does not fit the base model; it was probably trained on "
                          "another model. Problems:\n  " + "\n  ".join(problems))
    return plan
