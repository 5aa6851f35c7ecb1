"""Reading training rows from files, `save_to_disk` directories or the hub, and normalizing them to examples.

Row formats, detected per row by its keys:

- unpaired (TRL's KTO format): {"prompt", "completion", "label"}, label a JSON boolean (true = desirable);
- paired: {"chosen", "rejected"} with an optional "prompt"; each row becomes one desirable and one
  undesirable example sharing a `pair_id`. Without "prompt" the prompt is the shared beginning of the
  two: up to the last "\\n\\nAssistant:" for Anthropic HH text, up to the final assistant turn for
  message lists.

Prompts and completions are either plain text or chat messages [{"role", "content"}].
"""

import gzip
import json
import logging
import os
import random
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import datasets
import pyarrow.parquet as pq

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
HH_MARKER = "\n\nAssistant:"  # where an Anthropic HH assistant turn begins
FILE_TYPES = (".jsonl", ".jsonl.gz", ".json", ".parquet")

Turn = str | list[dict[str, str]]  # plain text, or chat messages


class DataError(ValueError):
    """Bad input data; the message names the file, the row, the problem and the fix."""


class _BadRow(Exception):
    """A problem with one row; `load_examples` adds the file and row number to it."""


@dataclass(frozen=True)
class Example:
    """One KTO example: a prompt, a completion and whether the completion is desirable."""

    prompt: Turn
    completion: Turn
    label: bool  # True = desirable
    pair_id: int = -1  # for rows split from a {chosen, rejected} pair: the pair's index in its source
    source: str = ""  # "path:row", for messages later in the pipeline


def load_examples(source: str, *, skip_bad_rows: bool = False) -> tuple[list[Example], int]:
    """Return the examples and the number of bad rows skipped (0 unless skip_bad_rows)."""
    examples: list[Example] = []
    rows = skipped = 0
    for index, (row_number, where, raw) in enumerate(_read_rows(source)):
        rows += 1
        try:
            examples.extend(_to_examples(raw, index, f"{source}:{row_number}"))
        except _BadRow as problem:
            if not skip_bad_rows:
                raise DataError(
                    f"{source}, {where}: {problem} Fix the row, or set skip_bad_rows to skip bad rows."
                ) from None
            skipped += 1
    if not examples:
        found = f"all {rows} rows are bad" if rows else "no rows"
        raise DataError(f"{source}: empty dataset ({found}). Point dataset_name at a file with KTO rows.")
    for label, kind in ((True, "desirable"), (False, "undesirable")):
        if not any(e.label == label for e in examples):
            logger.warning("%s has no %s examples; KTO learns from both kinds.", source, kind)
    return examples, skipped


def split_train_eval(
    examples: list[Example], eval_fraction: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """Held-out split; both halves of a pair always land in the same split. Deterministic in (examples, seed)."""
    if not 0 <= eval_fraction < 1:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}.")
    if eval_fraction == 0:
        return list(examples), []
    # A unit is a pair (its two halves) or a lone unpaired example; units are what gets shuffled.
    units: dict[tuple[int, int], list[int]] = {}
    for i, example in enumerate(examples):
        key = (example.pair_id, -1) if example.pair_id >= 0 else (-1, i)
        units.setdefault(key, []).append(i)
    order = list(units.values())
    random.Random(seed).shuffle(order)
    target = max(1, round(eval_fraction * len(examples)))
    held_out: set[int] = set()
    for unit in order:
        if len(held_out) >= target:
            break
        held_out.update(unit)
    if len(held_out) == len(examples):
        raise DataError(f"eval_fraction {eval_fraction} leaves no training examples; lower it.")
    train = [e for i, e in enumerate(examples) if i not in held_out]
    evaluation = [e for i, e in enumerate(examples) if i in held_out]
    return train, evaluation


# --- reading ---------------------------------------------------------------------------------------


def _read_rows(source: str) -> Iterator[tuple[int, str, object]]:
    """Yield (row number, "line N"/"row N", raw row) from any supported source; JSONL rows stay text
    so that `_to_examples` can report unparseable JSON with its line number."""
    path = Path(source)
    name = path.name.lower()
    if path.is_dir():
        yield from _numbered(_load_from_disk(source), "row")
    elif not path.exists():
        if name.endswith(FILE_TYPES):  # clearly meant as a file: don't ask the hub about it
            raise DataError(f"{source}: no such file. Check the path (relative to {os.getcwd()}).")
        yield from _numbered(_load_from_hub(source), "row")
    elif name.endswith((".jsonl", ".jsonl.gz")):
        yield from _read_jsonl(path)
    elif name.endswith(".json"):
        yield from _read_json(path)
    elif name.endswith(".parquet"):
        yield from _numbered(pq.read_table(path).to_pylist(), "row")
    else:
        raise DataError(
            f"{source}: unsupported file type. Use one of {FILE_TYPES} or a save_to_disk directory."
        )


def _numbered(rows, word: str) -> Iterator[tuple[int, str, object]]:
    for number, row in enumerate(rows, start=1):
        yield number, f"{word} {number}", row


def _read_jsonl(path: Path) -> Iterator[tuple[int, str, object]]:
    """Lines of a .jsonl(.gz) file as bytes, numbered from 1; blank lines are skipped. Lines are decoded
    one by one in `_parse`, so bytes that are not UTF-8 are a bad row with its line number."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    number = 0
    try:
        with opener(path, "rb") as lines:
            for number, line in enumerate(lines, start=1):
                if line.strip():
                    yield number, f"line {number}", line.strip()
    except (EOFError, gzip.BadGzipFile, zlib.error) as error:
        raise DataError(f"{path}: the gzip stream is truncated or corrupt after line {number} ({error}). "
                        "Copy or compress the file again (gzip -t checks it).") from None


def _read_json(path: Path) -> Iterator[tuple[int, str, object]]:
    """A .json file: one JSON array of rows, or JSON lines."""
    data = path.read_bytes()
    if not data.lstrip().startswith(b"["):
        yield from _read_jsonl(path)
        return
    try:
        rows = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise DataError(f"{path}, line {line}: bytes that are not UTF-8 text ({error.reason}). "
                        "Save the file as UTF-8.") from None
    except json.JSONDecodeError as error:
        raise DataError(f"{path}, line {error.lineno}: invalid JSON ({error.msg}). Fix the file.") from None
    yield from _numbered(rows, "row")


def _load_from_disk(source: str) -> datasets.Dataset:
    """A directory written by `save_to_disk`: a Dataset, or the "train" split of a DatasetDict."""
    try:
        loaded = datasets.load_from_disk(source)
    except FileNotFoundError as error:
        raise DataError(
            f"{source}: a directory, but not one written by Dataset.save_to_disk ({error})."
        ) from None
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise DataError(
                f"{source}: a DatasetDict without a 'train' split (it has {list(loaded)}). "
                "Save the split to train on as 'train', or point at that split's directory."
            )
        return loaded["train"]
    return loaded


def _load_from_hub(name: str) -> datasets.Dataset:
    try:
        return datasets.load_dataset(name, split="train")
    except Exception as error:  # the hub raises many kinds; all mean "could not get it"
        offline = os.environ.get("HF_HUB_OFFLINE", "")
        raise DataError(
            f"{name!r} is neither an existing local path nor a reachable hub dataset ({error}). "
            f"Check the path, or the network (HF_HUB_OFFLINE={offline!r}) if it is a hub name."
        ) from None


# --- normalizing rows ------------------------------------------------------------------------------


def _to_examples(raw: object, index: int, source: str) -> list[Example]:
    """The one (unpaired row) or two (paired row) examples of a raw row."""
    row = _parse(raw)
    if "chosen" in row or "rejected" in row:
        return _paired(row, index, source)
    _require(row, ("prompt", "completion", "label"), "unpaired KTO rows")
    label = row["label"]
    if not isinstance(label, bool):
        raise _BadRow(
            f"'label' is {json.dumps(label, default=repr)}, not a boolean. Use true (desirable) or false."
        )
    prompt, completion = _turns(row["prompt"], "prompt"), _turns(row["completion"], "completion")
    _check_pair(prompt, completion, "completion")
    return [Example(prompt, completion, label, -1, source)]


def _parse(raw: object) -> dict:
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise _BadRow(f"bytes that are not UTF-8 text at column {error.start + 1} ({error.reason}); "
                          "save the file as UTF-8.") from None
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as error:
            raise _BadRow(f"invalid JSON ({error.msg} at column {error.colno}).") from None
    if not isinstance(raw, dict):
        raise _BadRow(f"a row must be a JSON object, got {type(raw).__name__}.")
    return raw


def _require(row: dict, fields: tuple[str, ...], kind: str) -> None:
    missing = [f for f in fields if f not in row]
    if missing:
        raise _BadRow(f"missing field(s) {missing} ({kind} need {list(fields)}; the row has {list(row)}).")


def _turns(value: object, field: str) -> Turn:
    """Validate a prompt/completion: text, or a list of {"role", "content"} messages."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise _BadRow(f"'{field}' must be text or a list of messages, got {value!r:.50}.")
    messages = []
    for message in value:
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise _BadRow(f'\'{field}\' has a message that is not {{"role": ..., "content": <text>}}.')
        if message.get("role") not in ROLES:
            raise _BadRow(
                f"'{field}' has a message with unknown role {message.get('role')!r}; use one of {ROLES}."
            )
        messages.append({"role": message["role"], "content": message["content"]})
    return messages


def _check_pair(prompt: Turn, completion: Turn, field: str) -> None:
    """Prompt and completion are of the same kind, and the completion is not empty."""
    if isinstance(prompt, str) != isinstance(completion, str):
        raise _BadRow(f"'prompt' and '{field}' must both be text or both be message lists.")
    text = completion if isinstance(completion, str) else "".join(m["content"] for m in completion)
    if not text.strip():
        raise _BadRow(f"'{field}' is empty or only whitespace.")


def _paired(row: dict, index: int, source: str) -> list[Example]:
    """Split a {chosen, rejected[, prompt]} row into a desirable and an undesirable example."""
    _require(row, ("chosen", "rejected"), "paired rows")
    chosen, rejected = _turns(row["chosen"], "chosen"), _turns(row["rejected"], "rejected")
    if row.get("prompt") is not None:
        prompt = _turns(row["prompt"], "prompt")
    elif isinstance(chosen, str) and isinstance(rejected, str):
        prompt, chosen, rejected = _split_text(chosen, rejected)
    elif isinstance(chosen, list) and isinstance(rejected, list):
        prompt, chosen, rejected = _split_messages(chosen, rejected)
    else:
        raise _BadRow("'chosen' and 'rejected' must both be text or both be message lists.")
    _check_pair(prompt, chosen, "chosen")
    _check_pair(prompt, rejected, "rejected")
    return [Example(prompt, chosen, True, index, source), Example(prompt, rejected, False, index, source)]


def _split_text(chosen: str, rejected: str) -> tuple[str, str, str]:
    """Anthropic HH text: the prompt runs through the last "\\n\\nAssistant:" the two texts share."""
    shared = os.path.commonprefix([chosen, rejected])
    marker = shared.rfind(HH_MARKER)
    if marker < 0:
        raise _BadRow(
            f"no 'prompt' field, and 'chosen'/'rejected' share no {HH_MARKER!r} marker "
            "to split the prompt off. Add a 'prompt' field."
        )
    cut = marker + len(HH_MARKER)
    return chosen[:cut], chosen[cut:], rejected[cut:]


def _split_messages(chosen: list, rejected: list) -> tuple[list, list, list]:
    """Message lists: the prompt is the longest shared beginning after which both continue with an
    assistant message; the completions are the rest of each."""
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    for cut in range(shared, -1, -1):
        sides = (chosen[cut : cut + 1], rejected[cut : cut + 1])
        if all(side and side[0]["role"] == "assistant" for side in sides):
            return chosen[:cut], chosen[cut:], rejected[cut:]
    raise _BadRow(
        "no 'prompt' field, and 'chosen'/'rejected' have no shared beginning followed by an "
        "assistant message. Add a 'prompt' field."
    )
