"""The base weights a QLoRA run trained against, rebuilt for the merge: bitsandbytes' 4-bit rounding
of the 16-bit checkpoint, tensor by tensor.

An adapter trained on a 4-bit base learned a correction to the dequantized weights, not to the
original ones, so the merge adds it to those: each weight the 4-bit load quantized is quantized here
by the same bitsandbytes call (`quantize_4bit`: the same data type, block size and nested
quantization, from the weight cast to the training dtype, as transformers casts it before quantizing),
dequantized to float32, and only then gets `scale * B @ A`. The merged model is written in 16 bits:
merging into 4-bit weights would round the update away (transformers #31293). Which weights are
quantized is transformers' own decision, read from the model's structure on the meta device.

8-bit bases are not rebuilt: LLM.int8 computes outlier features in 16 bits at run time, so no fixed
weight equals the layer; such an adapter merges into the original weights (logged).
"""

import logging
from collections.abc import Callable
from pathlib import Path

import bitsandbytes.functional as bnb_functional
import torch
import yaml
from accelerate import init_empty_weights
from bitsandbytes.nn import Linear4bit
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.quantizers import AutoHfQuantizer

from kto_scale.config import KTOConfig
from kto_scale.config_io import CONFIG_FILE
from kto_scale.model import bnb_config, train_dtype

logger = logging.getLogger(__name__)

# What decides the rounding: the quantization, the dtype weights are cast to before it, the model code.
SETTINGS = ("load_in_4bit", "load_in_8bit", "bnb_4bit_quant_type", "use_bnb_nested_quant", "bf16", "fp16",
            "trust_remote_code")


def training_config(adapter: Path) -> KTOConfig | None:
    """The quantization settings of the run that wrote a kto-scale adapter or checkpoint directory (from
    the kto_config.yaml it carries; None: not one of ours). Only those are read: the run's other paths
    need not exist where the merge runs."""
    if not (adapter / CONFIG_FILE).is_file():
        return None
    saved = yaml.safe_load((adapter / CONFIG_FILE).read_text()) or {}
    return KTOConfig(**{name: saved[name] for name in SETTINGS if name in saved})


def quantized_weight_names(base: Path, config: KTOConfig) -> set[str]:
    """The weights transformers quantizes when it loads `base` in 4 bits (every decoder linear layer,
    not the LM head), found by letting its bitsandbytes quantizer convert an empty (meta) model."""
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base, trust_remote_code=config.trust_remote_code),
                                                 trust_remote_code=config.trust_remote_code)
    AutoHfQuantizer.from_config(bnb_config(config)).preprocess_model(model, device_map={"": "cpu"})
    return {f"{name}.weight" for name, module in model.named_modules() if isinstance(module, Linear4bit)}


def as_trained(weight: torch.Tensor, config: KTOConfig) -> torch.Tensor:
    """`weight` as the 4-bit run computed with it: quantized as bitsandbytes quantized it at load,
    dequantized, in float32."""
    quantized, state = bnb_functional.quantize_4bit(
        weight.to(train_dtype(config)), blocksize=64, compress_statistics=config.use_bnb_nested_quant,
        quant_type=config.bnb_4bit_quant_type,
    )
    return bnb_functional.dequantize_4bit(quantized, state).float()


def weights_as_trained(base: Path, adapter: Path) -> Callable[[str, torch.Tensor], torch.Tensor]:
    """f(name, base tensor) -> the tensor the adapter was trained against: `as_trained` for the weights a
    kto-scale 4-bit run quantized, the tensor itself otherwise."""
    config = training_config(adapter)
    if config is not None and config.load_in_8bit:
        logger.warning("%s was trained on an 8-bit base; it merges into the original 16-bit weights.", adapter)
    if config is None or not config.load_in_4bit:
        return lambda name, tensor: tensor
    names = quantized_weight_names(base, config)
    logger.info("%s was trained on a 4-bit (%s) base: its %d quantized weights are merged dequantized.",
                adapter, config.bnb_4bit_quant_type, len(names))
    return lambda name, tensor: as_trained(tensor, config) if name in names else tensor
