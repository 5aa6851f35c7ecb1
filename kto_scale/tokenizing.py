"""Tokenizing examples, the first stage of preparing them (kto_scale.prepare truncates and KL-pairs them).

Each example becomes `prompt_ids` followed by `completion_ids`; only the completion is scored. The
prompt starts with exactly one BOS when the tokenizer adds one on its own (Llama does). A plain-text
completion ends with EOS. Conversations are rendered with the tokenizer's chat template, and the
completion is the part of the full conversation's text after the prompt's text (with the generation
prompt), ending exactly where the template ends the assistant turn: at its end-of-turn special token
(`<|im_end|>`, `<|eot_id|>`, ...), without the newline some templates put between turns and without
another EOS. A template that ends the turn with no special token gets EOS appended.
"""

import itertools
import json
import uuid
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import tokenizers

from kto_scale.data import DataError
from kto_scale.ragged import gather, list_array

ROWS_PER_PROCESS = 10_000  # fewer rows than this per process: tokenizing beats starting processes
MAP_BATCH_ROWS = 4096  # rows per tokenizer call and per written batch of the map
TOKENS = datasets.List(datasets.Value("int32"))
TOKENIZED = datasets.Features({"prompt_ids": TOKENS, "completion_ids": TOKENS, "label": datasets.Value("bool"),
                               "pair_id": datasets.Value("int64"), "source": datasets.Value("string")})


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts a BOS in front of its input on its own (as Llama's does)."""
    return tokenizer.bos_token_id is not None and tokenizer("a").input_ids[:1] == [tokenizer.bos_token_id]


def tokenize_dataset(examples: datasets.Dataset, tokenizer, num_proc: int, cache_file: Path) -> datasets.Dataset:
    """The examples with prompt_ids (one BOS first if the tokenizer uses one) and completion_ids (ending
    with EOS, or for a conversation with the template's end-of-turn token) in place of their texts:
    a batched `datasets.map` over Arrow batches in up to `num_proc` processes, written to `cache_file`."""
    processes = max(1, min(num_proc, len(examples) // ROWS_PER_PROCESS))
    return examples.with_format("arrow").map(
        Tokenize(tokenizer), batched=True, batch_size=MAP_BATCH_ROWS, writer_batch_size=MAP_BATCH_ROWS,
        num_proc=processes if processes > 1 else None, features=TOKENIZED, cache_file_name=str(cache_file),
        load_from_cache_file=False, new_fingerprint=uuid.uuid4().hex,  # no hashing of the tokenizer
        desc="Tokenizing",
    ).with_format(None)


class Tokenize:
    """The map function: a batch of examples (an Arrow table) to their token columns (an Arrow table).

    Each distinct text of the batch is encoded once (both halves of a pair share their prompt), by the
    fast tokenizer's Rust backend in one call (what `tokenizer(texts, add_special_tokens=False)` runs,
    without building its Python dicts), and the ids go to numpy without a Python loop per token.
    """

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.specials = tuple(token.content for token in tokenizer.added_tokens_decoder.values() if token.special)
        self.bos = tokenizer.bos_token_id if adds_bos(tokenizer) else None
        self.eos = tokenizer.eos_token_id
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self.backend = None
        if isinstance(backend, tokenizers.Tokenizer):  # a copy: the call below never truncates or pads
            self.backend = tokenizers.Tokenizer.from_str(backend.to_str())
            self.backend.no_truncation()
            self.backend.no_padding()

    def __call__(self, batch: pa.Table) -> pa.Table:
        prompts, completions = batch.column("prompt").to_pylist(), batch.column("completion").to_pylist()
        ended = np.zeros(len(batch), dtype=bool)
        chat = np.flatnonzero(batch.column("chat").to_numpy(zero_copy_only=False))
        if len(chat):
            self._render(chat, prompts, completions, ended, batch.column("source"))
        prompt_ids = self._encode(prompts)
        if self.bos is not None:  # a chat template may render the BOS itself: add it where missing, never twice
            prompt_ids = _add_token(*prompt_ids, self.bos, ~_edge_is(*prompt_ids, self.bos, last=False), at_end=False)
        completion_ids = self._encode(completions)
        if self.eos is not None:
            has_eos = _edge_is(*completion_ids, self.eos, last=True)
            completion_ids = _add_token(*completion_ids, self.eos, ~(ended | has_eos), at_end=True)
        return pa.table([list_array(*prompt_ids), list_array(*completion_ids),
                         *(batch.column(name) for name in ("label", "pair_id", "source"))],
                        schema=TOKENIZED.arrow_schema)

    def _render(self, rows: np.ndarray, prompts: list[str], completions: list[str], ended: np.ndarray,
                sources: pa.ChunkedArray) -> None:
        """Replace the conversations at `rows` (messages as JSON) by their prompt and completion text
        (see `_texts`), rendering each distinct prompt once and the batch's conversations in two calls."""
        distinct = list(dict.fromkeys(prompts[row] for row in rows))
        rendered = dict(zip(distinct, self.tokenizer.apply_chat_template(
            [json.loads(p) for p in distinct], tokenize=False, add_generation_prompt=True), strict=True))
        fulls = self.tokenizer.apply_chat_template(
            [json.loads(prompts[row]) + json.loads(completions[row]) for row in rows], tokenize=False)
        for row, full in zip(rows, fulls, strict=True):
            prompts[row], completions[row], ended[row] = _texts(rendered[prompts[row]], full,
                                                                sources[int(row)].as_py(), self.specials)

    def _encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Token ids of each text, without special tokens: ([n + 1] offsets, int32 ids)."""
        index: dict[str, int] = {}
        rows = np.fromiter((index.setdefault(text, len(index)) for text in texts), np.int64, len(texts))
        if self.backend is not None:
            self.backend.encode_special_tokens = getattr(self.tokenizer, "split_special_tokens", False)
            ids = [encoding.ids for encoding in self.backend.encode_batch_fast(list(index), add_special_tokens=False)]
        else:  # verbose=False: no "longer than the maximum sequence length" warning (truncation comes later)
            ids = self.tokenizer(list(index), add_special_tokens=False, verbose=False).input_ids
        lengths = np.fromiter(map(len, ids), np.int64, len(ids))
        offsets = np.zeros(len(ids) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        values = np.fromiter(itertools.chain.from_iterable(ids), np.int32, int(offsets[-1]))
        return gather(values, offsets[rows], lengths[rows])


def _edge_is(offsets: np.ndarray, values: np.ndarray, token: int, last: bool) -> np.ndarray:
    """[n] whether each row is not empty and its first (or `last`) value is `token`."""
    lengths = np.diff(offsets)
    if not len(values):
        return np.zeros(len(lengths), dtype=bool)
    at = np.clip(offsets[1:] - 1 if last else offsets[:-1], 0, len(values) - 1)
    return (lengths > 0) & (values[at] == token)


def _add_token(offsets: np.ndarray, values: np.ndarray, token: int, where: np.ndarray,
               at_end: bool) -> tuple[np.ndarray, np.ndarray]:
    """Rows with `token` put in front of (or after, `at_end`) the rows where `where` is true."""
    lengths = np.diff(offsets)
    new_offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths + where, out=new_offsets[1:])
    out = np.empty(new_offsets[-1], dtype=values.dtype)
    shift = new_offsets[:-1] - offsets[:-1] + (0 if at_end else where)
    out[np.arange(len(values)) + np.repeat(shift, lengths)] = values
    out[(new_offsets[1:] - 1 if at_end else new_offsets[:-1])[where]] = token
    return new_offsets, out


def _texts(rendered: str, full: str, source: str, specials: tuple[str, ...]) -> tuple[str, str, bool]:
    """A conversation's prompt text (`rendered`: the prompt messages with the generation prompt) and
    completion text (what the whole conversation's text, `full`, adds to it), and whether the completion
    already ends its turn with a special token."""
    if not full.startswith(rendered):
        raise DataError(
            f"{source}: the chat template renders the conversation so that it does not "
            "start with the rendered prompt, so the completion cannot be split off. Use a chat "
            "template that renders a prefix of the messages as a prefix of the text."
        )
    text = full[len(rendered) :]
    # Whitespace after the end-of-turn token (ChatML's "<|im_end|>\n") only separates turns: a chat
    # model stops at the token and never generates it, so it is not scored.
    ended = text.rstrip().endswith(specials)
    return rendered, text.rstrip() if ended else text, ended
