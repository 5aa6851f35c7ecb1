"""Generations to read: the policy's and the reference's completions of a fixed set of held-out prompts.

With `generate_during_eval`, a run picks `num_generation_prompts` distinct prompts of the eval split
(by `data_seed`, so every run on the same data reads the same prompts), completes them once with the
reference (adapters off; with sft_adapter, base + that adapter) and, at step 0 and every evaluation, with the policy (adapters on), and
appends one line per prompt to `<output_dir>/generations.jsonl`:

    {"step": 200, "prompt": "...", "reference": "...", "policy": "..."}

Every rank generates all the prompts, in one left-padded batch with the KV cache: the same inputs and
weights give the same text on each rank, whatever the rank count, and rank 0 writes it. Under ZeRO-3
or FSDP with several ranks, `synced_gpus` keeps every rank in each forward pass (each holds a shard of
every weight) until all are done. Generation runs in eval mode (no LoRA dropout) inside a forked RNG seeded
with `seed`: sampled text is reproducible, the same seed is used at every evaluation (differences
between steps come from the model, not the draw), and the training's random stream is untouched.
"""

import json
import random
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence
from transformers import PreTrainedTokenizerBase

from kto_scale.config import KTOConfig
from kto_scale.engine import Engine
from kto_scale.metrics import MetricsLogger, open_log
from kto_scale.model import SequenceLogps, reference_mode
from kto_scale.prepare import CHUNK_ROWS, prompt_keys

GENERATIONS_FILE = "generations.jsonl"


@dataclass(frozen=True)
class GenerationSettings:
    """The KTOConfig fields generation reads."""

    num_prompts: int  # num_generation_prompts
    prompt_seed: int  # data_seed: which prompts
    max_new_tokens: int
    do_sample: bool  # generation_do_sample
    temperature: float  # generation_temperature
    top_p: float  # generation_top_p
    seed: int  # the draw of sampled text

    @classmethod
    def from_config(cls, config: KTOConfig) -> "GenerationSettings":
        return cls(config.num_generation_prompts, config.data_seed, config.max_new_tokens, config.generation_do_sample,
                   config.generation_temperature, config.generation_top_p, config.seed)


def generation_prompts(dataset: datasets.Dataset, n: int, seed: int) -> list[list[int]]:
    """`n` distinct prompts of the dataset's `prompt_ids` (all of them when there are fewer), chosen by
    `seed`, in dataset order. Prompts are told apart by `prepare.prompt_keys`, read CHUNK_ROWS rows at a
    time; only the chosen rows are read as Python lists."""
    keys = np.concatenate([prompt_keys(table.column("prompt_ids"))
                           for table in dataset.with_format("arrow").iter(batch_size=CHUNK_ROWS)])
    first = np.sort(np.unique(keys, return_index=True)[1])  # each distinct prompt's first row, in dataset order
    chosen = sorted(random.Random(seed).sample(range(len(first)), min(n, len(first))))
    return dataset.select(first[chosen].tolist())[:]["prompt_ids"]


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """([B, T] input_ids, [B, T] attention_mask), padded on the left so every prompt ends at column T."""
    input_ids = pad_sequence([torch.tensor(p, dtype=torch.long) for p in prompts], batch_first=True,
                             padding_value=pad_id, padding_side="left")
    attention_mask = pad_sequence([torch.ones(len(p), dtype=torch.long) for p in prompts], batch_first=True,
                                  padding_side="left")
    return input_ids, attention_mask


def generate_texts(module: SequenceLogps, prompts: list[list[int]], tokenizer: PreTrainedTokenizerBase,
                   settings: GenerationSettings, synced_gpus: bool, device: torch.device) -> list[str]:
    """Complete `prompts` with `module.model` as it is (adapters on or off) on `device` (the engine's:
    under ZeRO-3 a parameter's own tensor is an empty placeholder, on the CPU with offload); all ranks call."""
    input_ids, attention_mask = left_pad(prompts, tokenizer.pad_token_id)
    sampling = {}
    if settings.do_sample:  # top_k=0: only temperature and top_p shape the distribution
        sampling = dict(temperature=settings.temperature, top_p=settings.top_p, top_k=0)
    was_training = module.training
    module.eval()  # no LoRA dropout
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
            torch.manual_seed(settings.seed)
            output = module.generate(
                input_ids.to(device), attention_mask.to(device), max_new_tokens=settings.max_new_tokens,
                do_sample=settings.do_sample, **sampling, use_cache=True, synced_gpus=synced_gpus,
                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            )
    finally:
        module.train(was_training)
    texts = []
    for tokens in output[:, input_ids.shape[1]:].tolist():
        if tokenizer.eos_token_id in tokens:  # what follows the first EOS is padding
            tokens = tokens[: tokens.index(tokenizer.eos_token_id)]
        texts.append(tokenizer.decode(tokens, skip_special_tokens=True))
    return texts


class PromptGenerations:
    """A fixed set of prompts and the reference's completions of them; the policy's on request."""

    def __init__(self, engine: Engine, dataset: datasets.Dataset, tokenizer: PreTrainedTokenizerBase,
                 settings: GenerationSettings) -> None:
        """Pick the prompts from a split's `prompt_ids` and generate the reference (all ranks call).
        Under ZeRO-3 or FSDP with several ranks, `synced_gpus` keeps every rank in each forward pass."""
        self._args = (tokenizer, settings, engine.shards_weights and engine.world_size > 1, engine.device)
        self.module = engine.module
        self.prompt_ids = generation_prompts(dataset, settings.num_prompts, settings.prompt_seed)
        self.prompts = tokenizer.batch_decode(self.prompt_ids, skip_special_tokens=True)
        with reference_mode(self.module.model):
            self.reference = generate_texts(self.module, self.prompt_ids, *self._args)

    def rows(self, step: int | None) -> list[dict]:
        """The policy's completions now, one row per prompt with the reference's (all ranks call)."""
        policy = generate_texts(self.module, self.prompt_ids, *self._args)
        return [{"step": step, "prompt": prompt, "reference": reference, "policy": text}
                for prompt, reference, text in zip(self.prompts, self.reference, policy, strict=True)]


class GenerationLog:
    """Appends rows to `<output_dir>/generations.jsonl` and shows them all as a wandb table (rank 0)."""

    def __init__(self, output_dir: str | Path, metrics: MetricsLogger, resume_step: int | None) -> None:
        """Open the file; resume_step keeps the lines up to that step (like metrics.jsonl), None starts empty."""
        self._metrics = metrics
        self._file, self._rows = None, []
        if metrics.enabled:
            self._file, self._rows = open_log(Path(output_dir) / GENERATIONS_FILE, resume_step)

    def write(self, rows: list[dict], step: int) -> None:
        if self._file is None:
            return
        self._file.write("".join(json.dumps(row) + "\n" for row in rows))
        self._file.flush()
        self._rows += rows
        self._metrics.log_table("eval/generations", self._rows, step=step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
