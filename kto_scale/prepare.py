"""Tokenizing examples, truncating them, and pairing each with a mismatched completion for KTO's KL baseline.

`prepare_dataset` does it for a dataset of examples (kto_scale.data's columns); `prepare_data` for a
run's configured train and eval sources (kto_scale.prepared_cache keeps the result for later runs).

Everything runs over Arrow: tokenization is a batched `datasets.map` in `num_proc` processes, truncation
and KL pairing are numpy operations on the token columns' buffers, CHUNK_ROWS rows at a time, and each
stage is written to an Arrow file that the next one memory-maps. No stage holds the examples as Python
objects.

Tokenizing (kto_scale.tokenizing) turns each example into `prompt_ids` followed by `completion_ids`;
only the completion is scored.

Truncation, in this order:
1. if max_prompt_length is set, the prompt keeps its LAST max_prompt_length tokens (cut from the left;
   a leading BOS is kept and counts in the length);
2. if max_completion_length is set, the completion keeps its FIRST max_completion_length tokens;
3. if prompt + completion still exceed max_length, the completion's tail is cut to fit.
An example whose prompt leaves no room for at least one completion token is dropped and counted.

KL pairing: KTO's reference point z_ref is estimated from mismatched (prompt, completion) pairs. Every
example i gets a partner kl_index[i] with a different prompt, and `kl_completion_ids` is that partner's
completion cut to fit after prompt i. The pairing depends only on the examples and the seed (not on
batch size or ranks), so reference log-probs of the KL sequences can be computed ahead of time (see
`kl_partners`).
"""

import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa

from kto_scale.config import ConfigError, KTOConfig
from kto_scale.data import DataError, Example, examples_dataset, load_examples, split_train_eval
from kto_scale.ragged import gather, list_array, ragged
from kto_scale.tokenizing import TOKENS, adds_bos, tokenize_dataset

logger = logging.getLogger(__name__)

CHUNK_ROWS = 65_536  # rows per numpy step and per written record batch
PREPARED = datasets.Features({"prompt_ids": TOKENS, "completion_ids": TOKENS, "label": datasets.Value("bool"),
                              "pair_id": datasets.Value("int64"), "kl_index": datasets.Value("int64"),
                              "kl_completion_ids": TOKENS})


@dataclass
class PrepareStats:
    """What `prepare_dataset` kept and dropped."""

    examples: int  # kept
    dropped_too_long: int
    desirable: int
    undesirable: int
    completions_cut: int = 0  # kept examples whose completion lost tokens to truncation
    lost_eos: int = 0  # of those, the ones whose EOS was cut off (the model never learns to stop there)


@dataclass(frozen=True)
class Lengths:
    """The settings of the truncation rule."""

    max_length: int
    max_prompt_length: int | None
    max_completion_length: int | None


def prepare_dataset(
    examples: datasets.Dataset | list[Example],
    tokenizer,
    *,
    max_length: int,
    max_prompt_length: int | None,
    max_completion_length: int | None,
    seed: int,
    num_proc: int = 1,
    path: Path | None = None,
) -> tuple[datasets.Dataset, PrepareStats]:
    """Tokenize, truncate and KL-pair `examples`.

    Returns a Dataset with columns prompt_ids, completion_ids, label (bool), pair_id, kl_index (row of
    the KL partner in this dataset) and kl_completion_ids, and the counts of what was kept. With `path`
    it is the Arrow file written there (memory-mapped); without, it is in memory.
    """
    if isinstance(examples, list):
        examples = examples_dataset(examples)
    if not len(examples):
        raise DataError("No examples to prepare: the dataset (or its eval split) is empty.")
    lengths = Lengths(max_length, max_prompt_length, max_completion_length)
    with tempfile.TemporaryDirectory(dir=None if path is None else path.parent, prefix=".prepare-") as work:
        work = Path(work)
        tokenized = tokenize_dataset(examples, tokenizer, num_proc, work / "tokenized.arrow")
        bos = tokenizer.bos_token_id if adds_bos(tokenizer) else None
        truncated, stats, columns = _truncate_all(tokenized, bos, tokenizer.eos_token_id, lengths, work)
        partners = kl_partners(columns["prompt_key"], seed, lambda row: truncated[row]["source"])
        output = work / "prepared.arrow" if path is None else path
        _write_prepared(truncated, partners, columns, lengths.max_length, work / "completions.bin", output)
        return datasets.Dataset.from_file(str(output), in_memory=path is None), stats


# --- truncating ------------------------------------------------------------------------------------


def truncate(prompts: pa.Array, completions: pa.Array, bos: int | None, eos: int | None,
             lengths: Lengths) -> tuple[np.ndarray, pa.ListArray, pa.ListArray, np.ndarray, np.ndarray]:
    """The module's truncation rule on a chunk's prompt and completion columns.

    Returns (rows kept: those whose prompt leaves room for a completion token, their prompts, their
    completions, [kept] whether the completion was cut, [kept] whether the cut took its EOS off).
    """
    (p_offsets, p_ids), (c_offsets, c_ids) = ragged(prompts), ragged(completions)
    p_len, c_len = np.diff(p_offsets), np.diff(c_offsets)
    new_p_len = p_len if lengths.max_prompt_length is None else np.minimum(p_len, lengths.max_prompt_length)
    rows = np.flatnonzero(lengths.max_length - new_p_len >= 1)
    p_len, new_p_len, c_len = p_len[rows], new_p_len[rows], c_len[rows]
    # The prompt keeps its last tokens; a cut prompt that began with BOS keeps it in front.
    p_out_offsets, p_out = gather(p_ids, p_offsets[rows] + p_len - new_p_len, new_p_len)
    if bos is not None:
        cut = np.flatnonzero((new_p_len < p_len) & (new_p_len > 0))
        had_bos = cut[p_ids[p_offsets[rows][cut]] == bos]
        p_out[p_out_offsets[had_bos]] = bos
    keep = c_len if lengths.max_completion_length is None else np.minimum(c_len, lengths.max_completion_length)
    keep = np.minimum(keep, lengths.max_length - new_p_len)
    c_out_offsets, c_out = gather(c_ids, c_offsets[rows], keep)
    cut = keep < c_len
    lost_eos = np.zeros(len(rows), dtype=bool)
    if eos is not None and len(c_ids):  # the last token was EOS, and is no longer there
        ended = (c_len > 0) & (c_ids[np.maximum(c_offsets[rows] + c_len - 1, 0)] == eos)
        still = (keep > 0) & (c_out[np.maximum(c_out_offsets[1:] - 1, 0)] == eos) if len(c_out) else False
        lost_eos = cut & ended & ~still
    return rows, list_array(p_out_offsets, p_out), list_array(c_out_offsets, c_out), cut, lost_eos


def prompt_keys(prompts: pa.ListArray) -> np.ndarray:
    """[n] uint64: a hash of each prompt's token ids; equal prompts get equal keys.

    Sum over positions t of (id_t + 1) * M_t plus length * M_-1 (mod 2^64, M fixed random odd numbers),
    computed with one cumulative sum. Two different prompts sharing a key (chance ~2^-64 per pair) would
    only never be KL partners of each other: the pairing's guarantee holds either way.
    """
    offsets, ids = ragged(prompts)
    lengths = np.diff(offsets)
    multipliers = np.random.default_rng(0).integers(0, 2**63, size=int(lengths.max(initial=0)) + 1,
                                                    dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    position = np.arange(len(ids)) - np.repeat(offsets[:-1], lengths)
    sums = np.zeros(len(ids) + 1, dtype=np.uint64)
    np.cumsum((ids.astype(np.uint64) + np.uint64(1)) * multipliers[position + 1], out=sums[1:])
    return sums[offsets[1:]] - sums[offsets[:-1]] + lengths.astype(np.uint64) * multipliers[0]


def _truncate_all(tokenized: datasets.Dataset, bos: int | None, eos: int | None, lengths: Lengths,
                  work: Path) -> tuple[datasets.Dataset, PrepareStats, dict[str, np.ndarray]]:
    """Truncate every chunk of `tokenized` into work/truncated.arrow; the kept completions' ids also go
    to work/completions.bin, for the KL gather. Returns that dataset, the counts, and [kept] columns:
    prompt_length, completion_offsets ([kept + 1] into completions.bin) and prompt_key."""
    kept = {"prompt_length": [], "completion_length": [], "prompt_key": []}
    total = dropped = cut = lost_eos = desirable = 0
    schema = pa.schema([("prompt_ids", pa.list_(pa.int32())), ("completion_ids", pa.list_(pa.int32())),
                        ("label", pa.bool_()), ("pair_id", pa.int64()), ("source", pa.string())])
    with pa.OSFile(str(work / "truncated.arrow"), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer, \
            open(work / "completions.bin", "wb") as completions:
        for table in tokenized.with_format("arrow").iter(batch_size=CHUNK_ROWS):
            rows, prompts, chunk_completions, was_cut, no_eos = truncate(
                table.column("prompt_ids"), table.column("completion_ids"), bos, eos, lengths)
            total, dropped = total + len(table), dropped + len(table) - len(rows)
            cut, lost_eos = cut + int(was_cut.sum()), lost_eos + int(no_eos.sum())
            labels = table.column("label").combine_chunks().take(rows)
            desirable += int(np.count_nonzero(labels.to_numpy(zero_copy_only=False)))
            writer.write_batch(pa.record_batch(
                [prompts, chunk_completions, labels, *(table.column(name).combine_chunks().take(rows)
                                                       for name in ("pair_id", "source"))], schema=schema))
            completions.write(ragged(chunk_completions)[1].astype(np.int32).tobytes())
            kept["prompt_length"].append(np.diff(ragged(prompts)[0]))
            kept["completion_length"].append(np.diff(ragged(chunk_completions)[0]))
            kept["prompt_key"].append(prompt_keys(prompts))
    columns = {name: np.concatenate(parts) for name, parts in kept.items()}
    examples = len(columns["prompt_key"])
    if dropped:
        logger.warning("Dropped %d of %d examples whose prompt leaves no room for the completion "
                       "(max_length=%d, max_prompt_length=%s).", dropped, total, lengths.max_length,
                       lengths.max_prompt_length)
    if not examples:
        # The length settings did this, not the data: a ConfigError, never blamed on (eval) data.
        raise ConfigError(f"max_length={lengths.max_length} with max_prompt_length={lengths.max_prompt_length} leaves "
                          f"no room for a completion in any of the {total} examples: raise max_length, or set "
                          "max_prompt_length to cut long prompts.")
    _warn_if_cut(cut, lost_eos, examples, lengths)
    offsets = np.zeros(examples + 1, dtype=np.int64)
    np.cumsum(columns.pop("completion_length"), out=offsets[1:])
    columns["completion_offsets"] = offsets
    stats = PrepareStats(examples, dropped, desirable, examples - desirable, cut, lost_eos)
    return datasets.Dataset.from_file(str(work / "truncated.arrow")), stats, columns


def _warn_if_cut(cut: int, lost_eos: int, kept: int, lengths: Lengths) -> None:
    """Say how many completions truncation cut, loudly when it is most of them."""
    if not cut:
        return
    limits = (f"max_length={lengths.max_length}, max_prompt_length={lengths.max_prompt_length}, "
              f"max_completion_length={lengths.max_completion_length}")
    if 2 * cut > kept:
        logger.warning("TRUNCATION CUTS MOST OF THE DATA: %d of %d completions were cut and %d lost their EOS (%s). "
                       "KTO then scores only their first tokens; raise max_length or lower max_prompt_length.",
                       cut, kept, lost_eos, limits)
    else:
        logger.info("Truncation cut %d of %d completions (%d lost their EOS; %s).", cut, kept, lost_eos, limits)


# --- KL pairing ------------------------------------------------------------------------------------


def kl_partners(prompt_keys: np.ndarray, seed: int, source: Callable[[int], str]) -> np.ndarray:
    """[n] for each example, the row of another example with a different prompt (its KL partner).

    Examples are grouped by prompt key; with numpy's generator seeded by `seed`, the groups (in key
    order) get a random place in a ring and their members a random order within it; every example
    takes the one k places further round the ring, k being the size of the largest group: a group of
    size s <= k <= n - k never reaches itself. Deterministic in (prompt keys, seed); `source(row)`
    names an example for the error when one prompt holds more than half of them.
    """
    _, first, group, counts = np.unique(prompt_keys, return_index=True, return_inverse=True, return_counts=True)
    n, k = len(prompt_keys), int(counts.max())
    if 2 * k > n:
        largest = int(first[counts == k].min())  # of the largest groups, the one seen first
        raise DataError(
            f"KL pairing needs completions from other prompts, but the prompt of {source(largest)} "
            f"has {k} of the {n} examples (more than half). Add examples with other prompts."
        )
    rng = np.random.default_rng(seed)
    place = rng.permutation(len(counts))
    ring = np.lexsort((rng.random(n), place[group]))  # by group place, then randomly within the group
    partners = np.empty(n, dtype=np.int64)
    partners[ring] = np.roll(ring, -k)
    return partners


def _write_prepared(truncated: datasets.Dataset, partners: np.ndarray, columns: dict[str, np.ndarray],
                    max_length: int, completions_file: Path, output: Path) -> None:
    """The prepared split: the truncated examples plus kl_index and kl_completion_ids (the partner's
    completion cut to fit after the example's prompt), read from the memory-mapped completions file."""
    completions = np.memmap(completions_file, dtype=np.int32, mode="r") if columns["completion_offsets"][-1] else \
        np.zeros(0, dtype=np.int32)
    start = 0
    with pa.OSFile(str(output), "wb") as sink, pa.ipc.new_stream(sink, PREPARED.arrow_schema) as writer:
        for table in truncated.with_format("arrow").iter(batch_size=CHUNK_ROWS):
            mine = partners[start : start + len(table)]
            room = max_length - columns["prompt_length"][start : start + len(table)]
            offsets = columns["completion_offsets"]
            kl = gather(completions, offsets[mine], np.minimum(offsets[mine + 1] - offsets[mine], room))
            writer.write_batch(pa.record_batch(
                [table.column(name).combine_chunks() for name in ("prompt_ids", "completion_ids", "label", "pair_id")]
                + [pa.array(mine), list_array(*kl)], schema=PREPARED.arrow_schema))
            start += len(table)


# --- a run's data ----------------------------------------------------------------------------------


def dataset_num_proc(config: KTOConfig) -> int:
    """Processes for tokenizing: dataset_num_proc, or the CPU cores this process may use."""
    return config.dataset_num_proc or len(os.sched_getaffinity(0))


def _load_logged(source: str, skip_bad_rows: bool, path: Path | None) -> datasets.Dataset:
    """load_examples, with a warning that counts the rows skip_bad_rows skipped."""
    examples, skipped = load_examples(source, skip_bad_rows=skip_bad_rows, path=path)
    if skipped:
        logger.warning("Skipped %d bad rows of %s (skip_bad_rows is on).", skipped, source)
    return examples


def prepare_data(config: KTOConfig, tokenizer, directory: Path | None = None) -> tuple:
    """Load, split and tokenize the training (and eval) data; returns (train, eval or None). With
    `directory`, the splits are the Arrow files train.arrow and eval.arrow there; without, in memory."""
    def file(name: str) -> Path | None:
        return None if directory is None else directory / name

    examples = _load_logged(config.dataset_name, config.skip_bad_rows, file("rows-train.arrow"))
    eval_examples = None
    if config.eval_dataset_name:
        eval_examples = _load_logged(config.eval_dataset_name, config.skip_bad_rows, file("rows-eval.arrow"))
    elif config.eval_fraction > 0:
        examples, eval_examples = split_train_eval(examples, config.eval_fraction, config.data_seed)
    settings = dict(max_length=config.max_length, max_prompt_length=config.max_prompt_length,
                    max_completion_length=config.max_completion_length, seed=config.data_seed,
                    num_proc=dataset_num_proc(config))
    train, stats = prepare_dataset(examples, tokenizer, **settings, path=file("train.arrow"))
    logger.info("Training examples: %d (%d desirable, %d undesirable, %d dropped as too long, %d completions cut, "
                "%d without EOS).", stats.examples, stats.desirable, stats.undesirable, stats.dropped_too_long,
                stats.completions_cut, stats.lost_eos)
    try:
        evaluation = None if eval_examples is None else \
            prepare_dataset(eval_examples, tokenizer, **settings, path=file("eval.arrow"))[0]
    except DataError as error:  # say it is the eval split, and how to get a usable one
        source = (f"eval_dataset_name {config.eval_dataset_name}" if config.eval_dataset_name else
                  f"the {len(eval_examples)} examples eval_fraction={config.eval_fraction} holds out of {config.dataset_name}")
        raise DataError(f"The eval split ({source}) cannot be used: {error} Give more eval data (a larger "
                        "eval_fraction or eval_dataset_name), or set eval_fraction 0 to train without evaluation.") from None
    for rows in [] if directory is None else directory.glob("rows-*.arrow"):
        rows.unlink()  # read rows: only tokenizing needed them (open memory maps stay valid)
    return train, evaluation
