"""Saving what training produces: the LoRA adapter in standard peft format, atomically.

Every save directory holds `adapter_config.json` + `adapter_model.safetensors` (loadable with
`PeftModel.from_pretrained`), the tokenizer, and the resolved `kto_config.yaml`. A directory is written
under a temporary name and renamed when complete, so a crash never leaves one that looks whole.
"""

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import deepspeed
from peft import PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kto_scale.config import KTOConfig, save_config
from kto_scale.distributed import barrier, is_main_process


@contextlib.contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of `path` to write into; on success it replaces `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    if path.exists():  # rename() cannot replace a non-empty directory: move the old one aside first
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def save_adapter(model: PeftModel, tokenizer: PreTrainedTokenizerBase, config: KTOConfig, path: str | Path) -> None:
    """Save the adapter (all ranks must call: under ZeRO-3 the LoRA weights are gathered from every rank).

    Only the trainable LoRA parameters are gathered, never the base weights, so this stays cheap for a
    70B base.
    """
    lora_params = [p for p in model.parameters() if p.requires_grad]
    # A no-op for parameters that ZeRO-3 does not partition (ZeRO-0/1/2 keep full copies on each rank).
    with deepspeed.zero.GatheredParameters(lora_params, modifier_rank=None):
        if is_main_process():
            with atomic_directory(path) as tmp:
                model.save_pretrained(tmp)
                tokenizer.save_pretrained(tmp)
                save_config(config, tmp)
    barrier()  # nobody reads or moves on before the directory is complete


def save_base_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: str | Path) -> None:
    """Save a randomly initialized base (init_random_weights), so its adapter can be merged or
    reloaded later. Gathers every weight under ZeRO-3: meant for the demo's and tests' tiny models."""
    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
        if is_main_process():
            with atomic_directory(path) as tmp:
                model.save_pretrained(tmp)
                tokenizer.save_pretrained(tmp)
    barrier()
