"""Tokenizing examples, truncating them, and pairing each with a mismatched completion for KTO's KL baseline.

`prepare_dataset` does it for a list of examples; `prepare_data` for a run's configured train and eval
sources; `shared_prepared_data` once per command (train, precompute, evaluate) rather than once per rank.

Each example becomes `prompt_ids` followed by `completion_ids`; only the completion is scored. The
prompt starts with exactly one BOS when the tokenizer adds one on its own (Llama does). A plain-text
completion ends with EOS. Conversations are rendered with the tokenizer's chat template, and the
completion is the part of the full conversation's text after the prompt's text (with the generation
prompt), ending exactly where the template ends the assistant turn: at its end-of-turn special token
(`<|im_end|>`, `<|eot_id|>`, ...), without the newline some templates put between turns and without
another EOS. A template that ends the turn with no special token gets EOS appended.

Truncation, in this order:
1. if max_prompt_length is set, the prompt keeps its LAST max_prompt_length tokens (cut from the left;
   a leading BOS is kept and counts in the length);
2. if max_completion_length is set, the completion keeps its FIRST max_completion_length tokens;
3. if prompt + completion still exceed max_length, the completion's tail is cut to fit.
An example whose prompt leaves no room for at least one completion token is dropped and counted.

KL pairing: KTO's reference point z_ref is estimated from mismatched (prompt, completion) pairs. Every
example i gets a partner kl_index[i] with a different prompt, and `kl_completion_ids` is that partner's
completion cut to fit after prompt i. The pairing depends only on the examples and the seed (not on
batch size or ranks), so reference log-probs of the KL sequences can be computed ahead of time.
"""

import logging
import random
from dataclasses import dataclass
from pathlib import Path

import datasets

from kto_scale.atomic import atomic_directory
from kto_scale.config import ConfigError, KTOConfig
from kto_scale.data import DataError, Example, load_examples, split_train_eval
from kto_scale.distributed import on_main_process

logger = logging.getLogger(__name__)


@dataclass
class PrepareStats:
    """What `prepare_dataset` kept and dropped."""

    examples: int  # kept
    dropped_too_long: int
    desirable: int
    undesirable: int
    completions_cut: int = 0  # kept examples whose completion lost tokens to truncation
    lost_eos: int = 0  # of those, the ones whose EOS was cut off (the model never learns to stop there)


def prepare_dataset(
    examples: list[Example],
    tokenizer,
    *,
    max_length: int,
    max_prompt_length: int | None,
    max_completion_length: int | None,
    seed: int,
) -> tuple[datasets.Dataset, PrepareStats]:
    """Tokenize, truncate and KL-pair `examples`.

    Returns a Dataset with columns prompt_ids, completion_ids, label (bool), pair_id, kl_index (row of
    the KL partner in this dataset) and kl_completion_ids, and the counts of what was kept.
    """
    prompts, completions = tokenize_examples(examples, tokenizer)
    bos = tokenizer.bos_token_id if adds_bos(tokenizer) else None
    cuts = [
        truncate(prompt, completion, bos, max_length, max_prompt_length, max_completion_length)
        for prompt, completion in zip(prompts, completions, strict=True)
    ]
    keep = [i for i, cut in enumerate(cuts) if cut is not None]
    dropped = len(examples) - len(keep)
    if dropped:
        logger.warning(
            "Dropped %d of %d examples whose prompt leaves no room for the completion "
            "(max_length=%d, max_prompt_length=%s).",
            dropped,
            len(examples),
            max_length,
            max_prompt_length,
        )
    if not keep:
        # The length settings did this, not the data: a ConfigError, never blamed on (eval) data.
        raise ConfigError(
            f"max_length={max_length} with max_prompt_length={max_prompt_length} leaves no room for a completion in "
            f"any of the {len(examples)} examples: raise max_length, or set max_prompt_length to cut long prompts."
        )
    cut = [i for i in keep if len(cuts[i][1]) < len(completions[i])]
    eos = [tokenizer.eos_token_id]
    lost_eos = sum(completions[i][-1:] == eos and cuts[i][1][-1:] != eos for i in cut)
    _warn_if_cut(len(cut), lost_eos, len(keep), max_length, max_prompt_length, max_completion_length)
    prompts, completions = [cuts[i][0] for i in keep], [cuts[i][1] for i in keep]
    partners = kl_partners(prompts, [examples[i].source for i in keep], seed)
    labels = [examples[i].label for i in keep]
    columns = {
        "prompt_ids": prompts,
        "completion_ids": completions,
        "label": labels,
        "pair_id": [examples[i].pair_id for i in keep],
        "kl_index": partners,
        "kl_completion_ids": [
            completions[j][: max_length - len(p)] for p, j in zip(prompts, partners, strict=True)
        ],
    }
    stats = PrepareStats(len(keep), dropped, sum(labels), len(labels) - sum(labels), len(cut), lost_eos)
    return datasets.Dataset.from_dict(columns), stats


def _warn_if_cut(cut: int, lost_eos: int, kept: int, max_length: int, max_prompt_length: int | None,
                 max_completion_length: int | None) -> None:
    """Say how many completions truncation cut, loudly when it is most of them."""
    if not cut:
        return
    limits = f"max_length={max_length}, max_prompt_length={max_prompt_length}, max_completion_length={max_completion_length}"
    if 2 * cut > kept:
        logger.warning("TRUNCATION CUTS MOST OF THE DATA: %d of %d completions were cut and %d lost their EOS (%s). "
                       "KTO then scores only their first tokens; raise max_length or lower max_prompt_length.",
                       cut, kept, lost_eos, limits)
    else:
        logger.info("Truncation cut %d of %d completions (%d lost their EOS; %s).", cut, kept, lost_eos, limits)


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts a BOS in front of its input on its own (as Llama's does)."""
    return tokenizer.bos_token_id is not None and tokenizer("a").input_ids[:1] == [tokenizer.bos_token_id]


def tokenize_examples(examples: list[Example], tokenizer) -> tuple[list[list[int]], list[list[int]]]:
    """Prompt ids (one BOS first if the tokenizer uses one) and completion ids of each example, ending
    with EOS, or for a conversation with the template's end-of-turn token."""
    if not examples:
        raise DataError("No examples to prepare: the dataset (or its eval split) is empty.")
    specials = tuple(token.content for token in tokenizer.added_tokens_decoder.values() if token.special)
    texts = [_texts(example, tokenizer, specials) for example in examples]
    prompts = _encode(tokenizer, [p for p, _, _ in texts])
    completions = _encode(tokenizer, [c for _, c, _ in texts])
    # A chat template may render the BOS itself: add it only where it is missing, never twice.
    bos = tokenizer.bos_token_id if adds_bos(tokenizer) else None
    if bos is not None:
        prompts = [p if p[:1] == [bos] else [bos, *p] for p in prompts]
    eos = tokenizer.eos_token_id
    if eos is not None:
        completions = [
            c if ended or c[-1:] == [eos] else [*c, eos]
            for c, (_, _, ended) in zip(completions, texts, strict=True)
        ]
    return prompts, completions


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens."""
    # One batched call (far faster than a call per text on 100k+ rows) over the distinct texts only:
    # prompts repeat (both halves of a pair, several KTO rows per prompt). verbose=False silences the
    # "longer than the maximum sequence length" warning: truncation comes later.
    distinct = list(dict.fromkeys(texts))
    ids = dict(
        zip(distinct, tokenizer(distinct, add_special_tokens=False, verbose=False).input_ids, strict=True)
    )
    return [ids[text] for text in texts]


def _texts(example: Example, tokenizer, specials: tuple[str, ...]) -> tuple[str, str, bool]:
    """The prompt and completion text of an example, and whether the completion already ends its turn
    with a special token; conversations go through the chat template."""
    if isinstance(example.prompt, str):
        return example.prompt, example.completion, False
    prompt = tokenizer.apply_chat_template(example.prompt, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(example.prompt + example.completion, tokenize=False)
    if not full.startswith(prompt):
        raise DataError(
            f"{example.source}: the chat template renders the conversation so that it does not "
            "start with the rendered prompt, so the completion cannot be split off. Use a chat "
            "template that renders a prefix of the messages as a prefix of the text."
        )
    completion = full[len(prompt) :]
    # Whitespace after the end-of-turn token (ChatML's "<|im_end|>\n") only separates turns: a chat
    # model stops at the token and never generates it, so it is not scored.
    ended = completion.rstrip().endswith(specials)
    return prompt, completion.rstrip() if ended else completion, ended


def truncate(
    prompt: list[int],
    completion: list[int],
    bos: int | None,
    max_length: int,
    max_prompt_length: int | None,
    max_completion_length: int | None,
) -> tuple[list[int], list[int]] | None:
    """Apply the module's truncation rule; None when the prompt leaves no room for a completion token."""
    if max_prompt_length is not None and len(prompt) > max_prompt_length:
        head = prompt[:1] if bos is not None and prompt[:1] == [bos] else []
        prompt = head + prompt[len(prompt) - max_prompt_length + len(head) :]
    if max_completion_length is not None:
        completion = completion[:max_completion_length]
    room = max_length - len(prompt)
    if room < 1:
        return None
    return prompt, completion[:room]


def kl_partners(prompts: list[list[int]], sources: list[str], seed: int) -> list[int]:
    """For each example, the index of another example with a different prompt (its KL partner).

    Examples are grouped by prompt, the groups and their members shuffled, laid out in a ring and every
    example takes the one k places further, k being the size of the largest group: a group of size
    s <= k <= n - k never reaches itself. Deterministic in (prompts, seed).
    """
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, prompt in enumerate(prompts):
        groups.setdefault(tuple(prompt), []).append(i)
    largest = max(groups.values(), key=len)
    n, k = len(prompts), len(largest)
    if 2 * k > n:
        raise DataError(
            f"KL pairing needs completions from other prompts, but the prompt of {sources[largest[0]]} "
            f"has {k} of the {n} examples (more than half). Add examples with other prompts."
        )
    rng = random.Random(seed)
    order = list(groups.values())
    rng.shuffle(order)
    for group in order:
        rng.shuffle(group)
    ring = [i for group in order for i in group]
    partners = [0] * n
    for position, i in enumerate(ring):
        partners[i] = ring[(position + k) % n]
    return partners


def _load_logged(source: str, skip_bad_rows: bool) -> list:
    """load_examples, with a warning that counts the rows skip_bad_rows skipped."""
    examples, skipped = load_examples(source, skip_bad_rows=skip_bad_rows)
    if skipped:
        logger.warning("Skipped %d bad rows of %s (skip_bad_rows is on).", skipped, source)
    return examples


def prepare_data(config: KTOConfig, tokenizer) -> tuple:
    """Load, split and tokenize the training (and eval) data; returns (train, eval or None)."""
    examples = _load_logged(config.dataset_name, config.skip_bad_rows)
    eval_examples = []
    if config.eval_dataset_name:
        eval_examples = _load_logged(config.eval_dataset_name, config.skip_bad_rows)
    elif config.eval_fraction > 0:
        examples, eval_examples = split_train_eval(examples, config.eval_fraction, config.data_seed)
    lengths = dict(max_length=config.max_length, max_prompt_length=config.max_prompt_length,
                   max_completion_length=config.max_completion_length, seed=config.data_seed)
    train, stats = prepare_dataset(examples, tokenizer, **lengths)
    logger.info("Training examples: %d (%d desirable, %d undesirable, %d dropped as too long, %d completions cut, "
                "%d without EOS).", stats.examples, stats.desirable, stats.undesirable, stats.dropped_too_long,
                stats.completions_cut, stats.lost_eos)
    if not eval_examples:
        return train, None
    try:
        return train, prepare_dataset(eval_examples, tokenizer, **lengths)[0]
    except DataError as error:  # say it is the eval split, and how to get a usable one
        source = (f"eval_dataset_name {config.eval_dataset_name}" if config.eval_dataset_name else
                  f"the {len(eval_examples)} examples eval_fraction={config.eval_fraction} holds out of {config.dataset_name}")
        raise DataError(f"The eval split ({source}) cannot be used: {error} Give more eval data (a larger "
                        "eval_fraction or eval_dataset_name), or set eval_fraction 0 to train without evaluation.") from None


def shared_prepared_data(config: KTOConfig, tokenizer, path: Path) -> tuple:
    """`prepare_data` run once, not once per rank: rank 0 tokenizes and KL-pairs, saves the result to
    `path`, and every rank loads it from there (memory-mapped Arrow, so the ranks of a node share one
    copy through the page cache). Like DeepSpeed's checkpoints, this assumes `path` is on storage
    every node sees."""

    def prepare_and_save() -> None:
        train, evaluation = prepare_data(config, tokenizer)
        with atomic_directory(path) as tmp:
            train.save_to_disk(tmp / "train")
            if evaluation is not None:
                evaluation.save_to_disk(tmp / "eval")

    on_main_process(prepare_and_save)  # bad data fails every rank at once, none waits for rank 0
    evaluation = datasets.load_from_disk(path / "eval") if (path / "eval").exists() else None
    return datasets.load_from_disk(path / "train"), evaluation
