"""The start every command shares (train, precompute, evaluate), written once.

Distributed init, then the command's claim on its output (a lock, a refusal), then the tokenizer, the
SFT adapter check, the prepared data and the engine's setup: all before the model loads, so that a
mistake in any of them fails in seconds, and because ZeRO-3 loads the model already partitioned.
"""

import logging
from collections.abc import Callable
from dataclasses import dataclass

import datasets
from transformers import PreTrainedTokenizerBase

from kto_scale.config import KTOConfig
from kto_scale.distributed import init_distributed
from kto_scale.engine import DeepSpeedSetup
from kto_scale.fsdp import FSDPSetup
from kto_scale.model import load_tokenizer
from kto_scale.prepared_cache import shared_prepared_data
from kto_scale.sft_adapter import check_sft_adapter


@dataclass
class Start:
    rank: int
    world_size: int
    tokenizer: PreTrainedTokenizerBase
    train_set: datasets.Dataset
    eval_set: datasets.Dataset | None
    engine: DeepSpeedSetup | FSDPSetup  # builds the engine once the model is loaded


def setup(config: KTOConfig, claim_output: Callable[[], None]) -> Start:
    """Everything before the model (all ranks call); `claim_output` runs right after distributed init."""
    rank, world_size, _ = init_distributed(config.dist_timeout_s)
    if rank != 0:  # one copy of the log, not one per rank
        logging.getLogger("kto_scale").setLevel(logging.WARNING)
    claim_output()
    tokenizer = load_tokenizer(config)
    check_sft_adapter(config, tokenizer)  # before the data and the model: fail fast
    train_set, eval_set = shared_prepared_data(config, tokenizer)  # kept in prepared_data_dir for later runs
    # The engine is set up before the model loads: ZeRO-3 loads it already partitioned.
    return Start(rank, world_size, tokenizer, train_set, eval_set, engine_setup(config, world_size))


def engine_setup(config: KTOConfig, world_size: int) -> DeepSpeedSetup | FSDPSetup:
    """The engine the config asks for, before the model is loaded (FSDP2 if `fsdp` is set, else DeepSpeed)."""
    return FSDPSetup(config, world_size) if config.fsdp else DeepSpeedSetup(config, world_size)
