"""FSDP2's sliced load: every rank reads only its own shard of every base weight from the checkpoint.

kto_scale.fsdp.shard gives a sharded model its weights one of three ways:
- sliced (this module): every rank builds the model empty (placeholders: kto_scale.model.load_base_model),
  shards it, and reads from the safetensors files only the rows of each weight it keeps, through
  torch.distributed.checkpoint's HuggingFaceStorageReader (safetensors' `get_slice`: just those bytes,
  cast to the training dtype as they are copied, as from_pretrained casts them). No rank ever holds more
  than its shards: a node needs about model/ranks of host memory per rank, and its ranks read in parallel.
- random (init_random_weights): every rank builds the model empty, shards it, and draws the seeded weights
  module by module, keeping its rows of each (kto_scale.random_init.init_shards).
- broadcast: rank 0 loads the whole model with from_pretrained and broadcasts it one tensor at a time. The
  fallback, for checkpoints the sliced read cannot take as they are (.bin files, quantized weights, names
  or shapes transformers converts while loading); the log says which.
Each gives the weights one process loads or draws, bit for bit (tests/test_sliced_load.py).
"""

import json
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError, safe_open
from torch import nn
from torch.distributed.checkpoint import HuggingFaceStorageReader
from transformers import AutoModelForCausalLM
from transformers.utils import cached_file

from kto_scale.config import ConfigError, KTOConfig
from kto_scale.model import base_config

# The stored dtypes a copy into the training dtype reads correctly (quantized ones need their scales).
_FLOAT_DTYPES = ("F32", "F16", "BF16")


def _download(config: KTOConfig, name: str) -> str | None:
    """A file of the model (a local directory or a hub id, downloaded as from_pretrained would), or None."""
    return cached_file(config.model_name_or_path, name, revision=config.model_revision,
                       _raise_exceptions_for_missing_entries=False)


def checkpoint_dir(config: KTOConfig) -> Path | None:
    """The directory holding the model's safetensors weights, or None if it has none."""
    index = _download(config, "model.safetensors.index.json")
    if index is not None:
        for name in sorted(set(json.loads(Path(index).read_text()).get("weight_map", {}).values())):
            _download(config, name)
        return Path(index).parent
    single = _download(config, "model.safetensors")
    return Path(single).parent if single is not None else None


def checkpoint_name(name: str) -> str:
    """A base weight's name in the checkpoint, from its name in the base model under peft (which wraps each
    adapted layer, keeping the original as `base_layer`)."""
    return name.replace(".base_layer.", ".")


def _stored_tensors(directory: Path) -> tuple[dict[str, tuple[tuple[int, ...], str]], str | None]:
    """Shape and dtype of every tensor in every .safetensors file of `directory` (the files the reader reads),
    from their headers; and why they cannot be read as one checkpoint (a name in two files), else None."""
    stored: dict[str, tuple[tuple[int, ...], str]] = {}
    for path in sorted(directory.glob("*.safetensors")):
        try:
            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    if name in stored:
                        return stored, f"{name} is in two of its .safetensors files"
                    header = f.get_slice(name)
                    stored[name] = (tuple(header.get_shape()), header.get_dtype())
        except SafetensorError as error:
            raise ConfigError(f"{path} is not a readable safetensors file ({error}): a partial download or copy? "
                              "Download or save the model again.") from None
    return stored, None


def sliced_checkpoint(config: KTOConfig) -> tuple[Path | None, str]:
    """The checkpoint directory every rank can read its slices from, or None and why not."""
    model_config = base_config(config)
    if getattr(model_config, "quantization_config", None):
        return None, "the checkpoint is quantized (quantization_config)"
    directory = checkpoint_dir(config)
    if directory is None:
        return None, "the checkpoint has no model.safetensors(.index.json)"
    stored, why = _stored_tensors(directory)
    if why:
        return None, why
    with torch.device("meta"):  # names and shapes, nothing allocated
        model = AutoModelForCausalLM.from_config(model_config, trust_remote_code=config.trust_remote_code)
    for name, param in model.named_parameters():  # each tied weight once, by its first name
        shape, dtype = stored.get(name, (None, None))
        if shape != tuple(param.shape) or dtype not in _FLOAT_DTYPES:
            found = "absent" if shape is None else f"{dtype} {list(shape)}"
            return None, (f"the checkpoint's {name} ({found}) is not the model's ({list(param.shape)}, a float): "
                          "transformers converts it while loading")
    return directory, ""


def allocate_shards(module: nn.Module, device: torch.device) -> dict[str, nn.Parameter]:
    """Allocate the fully_shard-ed `module`'s meta parameters (this rank's shards, uninitialized) on `device`
    and return every parameter by name.

    The other parameters (the adapters) and the buffers keep their values: `to_empty`, FSDP2's way to
    allocate sharded meta parameters, replaces every tensor of the module, so they are put back."""
    adapters = {name: p.to_local().clone() for name, p in module.named_parameters() if not p.is_meta}
    buffers = [(owner, name, b) for owner in module.modules() for name, b in owner._buffers.items() if b is not None]
    module.to_empty(device=device)
    params = dict(module.named_parameters())
    with torch.no_grad():
        for name, value in adapters.items():
            params[name].to_local().copy_(value)
    for owner, name, b in buffers:
        owner._buffers[name] = b
    return params


def read_shards(shards: dict[str, nn.Parameter], directory: Path) -> None:
    """Read this rank's slices of `shards` (sharded parameters by their names in the checkpoint) from
    `directory`'s safetensors files."""
    dcp.load(shards, storage_reader=HuggingFaceStorageReader(str(directory)))
