"""Reading training rows from files, directories of parquet shards, `save_to_disk` directories or the hub,
and normalizing them to examples, written CHUNK_ROWS at a time into an Arrow file (bounded memory).

Row formats, detected per row by its keys:

- unpaired (TRL's KTO format): {"prompt", "completion", "label"}, label a JSON boolean (true = desirable);
- paired: {"chosen", "rejected"} with an optional "prompt"; each row becomes one desirable and one
  undesirable example sharing a `pair_id`. Without "prompt" the prompt is the shared beginning of the
  two: up to the last "\\n\\nAssistant:" for Anthropic HH text, up to the final assistant turn for
  message lists.

Prompts and completions are either plain text or chat messages [{"role", "content"}].
"""

import array
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
import numpy as np
import pyarrow as pa
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


COLUMNS = pa.schema([("prompt", pa.string()), ("completion", pa.string()), ("chat", pa.bool_()),
                     ("label", pa.bool_()), ("pair_id", pa.int64()), ("source", pa.string())])
CHUNK_ROWS = 10_000  # rows held as Python objects at once while reading
JSON_ARRAY_WARN_BYTES = 256 * 2**20  # a .json array larger than this gets a warning: it is parsed whole


def load_examples(source: str, *, skip_bad_rows: bool = False, path: Path | None = None) -> tuple[datasets.Dataset, int]:
    """Read `source` into an Arrow dataset of examples (columns COLUMNS; a conversation's prompt and
    completion are its messages as JSON, `chat` true) and return it with the number of bad rows
    skipped (0 unless skip_bad_rows).

    Rows are normalized CHUNK_ROWS at a time and written to the Arrow file `path` (memory-mapped
    back), so memory stays bounded whatever the file's size; without `path` the dataset is in memory.
    """
    sink = pa.BufferOutputStream() if path is None else pa.OSFile(str(path), "wb")
    rows = skipped = written = 0
    counts = [0, 0]  # undesirable, desirable
    with pa.ipc.new_stream(sink, COLUMNS) as writer:  # the stream format datasets reads
        chunk: list[Example] = []
        for index, (row_number, where, raw) in enumerate(_read_rows(source)):
            rows += 1
            try:
                chunk.extend(_to_examples(raw, index, f"{source}:{row_number}"))
            except _BadRow as problem:
                if not skip_bad_rows:
                    raise DataError(
                        f"{source}, {where}: {problem} Fix the row, or set skip_bad_rows to skip bad rows."
                    ) from None
                skipped += 1
            if len(chunk) >= CHUNK_ROWS:
                written += _write(writer, chunk, counts)
                chunk = []
        written += _write(writer, chunk, counts)
    if not written:
        found = f"all {rows} rows are bad" if rows else "no rows"
        raise DataError(f"{source}: empty dataset ({found}). Point dataset_name at a file with KTO rows.")
    for count, kind in zip(counts, ("undesirable", "desirable"), strict=True):
        if not count:
            logger.warning("%s has no %s examples; KTO learns from both kinds.", source, kind)
    if path is None:
        return datasets.Dataset(pa.ipc.open_stream(sink.getvalue()).read_all()), skipped
    return datasets.Dataset.from_file(str(path)), skipped


def _write(writer: pa.ipc.RecordBatchStreamWriter, examples: list[Example], counts: list[int]) -> int:
    if examples:
        batch = pa.RecordBatch.from_pydict(_columns(examples), schema=COLUMNS)
        writer.write_batch(batch)
        desirable = sum(e.label for e in examples)
        counts[0], counts[1] = counts[0] + len(examples) - desirable, counts[1] + desirable
    return len(examples)


def _columns(examples: list[Example]) -> dict[str, list]:
    chat = [not isinstance(e.prompt, str) for e in examples]
    return {"prompt": [e.prompt if not c else json.dumps(e.prompt) for e, c in zip(examples, chat, strict=True)],
            "completion": [e.completion if not c else json.dumps(e.completion)
                           for e, c in zip(examples, chat, strict=True)],
            "chat": chat, "label": [e.label for e in examples], "pair_id": [e.pair_id for e in examples],
            "source": [e.source for e in examples]}


def examples_dataset(examples: list[Example]) -> datasets.Dataset:
    """A list of examples as the dataset `load_examples` makes (for examples built in code)."""
    return datasets.Dataset(pa.Table.from_pydict(_columns(examples), schema=COLUMNS))


def turn(text: str, chat: bool) -> Turn:
    """A prompt or completion as `load_examples` stored it, back as text or messages."""
    return json.loads(text) if chat else text


def split_train_eval(
    examples: datasets.Dataset, eval_fraction: float, seed: int
) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """Held-out split; both halves of a pair always land in the same split. Deterministic in (examples, seed).

    A unit is a pair (its two halves) or a lone unpaired example, numbered in order of first
    appearance; the units' order is shuffled with random.Random(seed).shuffle and units are held out until
    eval_fraction of the examples are. Rows keep their order within each split.
    """
    if not 0 <= eval_fraction < 1:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}.")
    if eval_fraction == 0:
        return examples, None
    pair_id = examples.with_format("arrow")[:]["pair_id"].to_numpy()
    # A unit's key: its pair id, or -1 - row for an unpaired example (never equal to a pair id).
    keys = np.where(pair_id >= 0, pair_id, -1 - np.arange(len(pair_id)))
    _, first, unit = np.unique(keys, return_index=True, return_inverse=True)
    unit = np.argsort(np.argsort(first, kind="stable"), kind="stable")[unit]  # numbered by first appearance
    # Python's shuffle, as the list-based path drew it (so the split is unchanged), on an 8-byte-per-unit
    # buffer that numpy then reads in place: no Python object per unit is kept.
    shuffled = array.array("q", range(len(first)))
    random.Random(seed).shuffle(shuffled)
    order = np.frombuffer(shuffled, dtype=np.int64)
    sizes = np.bincount(unit)[order]
    target = max(1, round(eval_fraction * len(keys)))
    taken = int(np.searchsorted(np.cumsum(sizes), target)) + 1  # units until `target` examples are held out
    held_out = np.zeros(len(first), dtype=bool)
    held_out[order[:taken]] = True
    rows = held_out[unit]
    if rows.all():
        raise DataError(f"eval_fraction {eval_fraction} leaves no training examples; lower it.")
    return examples.select(np.flatnonzero(~rows)), examples.select(np.flatnonzero(rows))


# --- reading ---------------------------------------------------------------------------------------


def _read_rows(source: str) -> Iterator[tuple[int, str, object]]:
    """Yield (row number, "line N"/"row N", raw row) from any supported source; JSONL rows stay text
    so that `_to_examples` can report unparseable JSON with its line number."""
    path = Path(source)
    name = path.name.lower()
    if path.is_dir() and not (path / "state.json").exists() and not (path / "dataset_dict.json").exists():
        yield from _read_parquet_shards(path)
    elif path.is_dir():
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
        yield from _numbered(_parquet_rows(path), "row")
    else:
        raise DataError(
            f"{source}: unsupported file type. Use one of {FILE_TYPES} or a save_to_disk directory."
        )


def _parquet_rows(path: Path) -> Iterator[dict]:
    """A parquet file's rows, one record batch at a time (never the whole table as Python objects)."""
    for batch in pq.ParquetFile(path).iter_batches(batch_size=1000):
        yield from batch.to_pylist()


def _read_parquet_shards(directory: Path) -> Iterator[tuple[int, str, object]]:
    """A directory of parquet shards (`*.parquet`, read in name order) as one numbered sequence of rows."""
    shards = sorted(directory.glob("*.parquet"))
    if not shards:
        raise DataError(f"{directory}: a directory, but neither one written by Dataset.save_to_disk nor one "
                        "holding .parquet shards. Point dataset_name at a data file or such a directory.")
    number = 0
    for shard in shards:
        for row_in_shard, row in enumerate(_parquet_rows(shard), start=1):
            number += 1
            yield number, f"{shard.name} row {row_in_shard}", row


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
    """A .json file: one JSON array of rows (parsed whole), or JSON lines (read line by line)."""
    with open(path, "rb") as file:
        if not file.read(4096).lstrip().startswith(b"["):
            yield from _read_jsonl(path)
            return
    if path.stat().st_size > JSON_ARRAY_WARN_BYTES:
        logger.warning("%s is a JSON array of %d MB: it is parsed whole, all its rows in memory at once (several "
                       "times its size). Convert it to JSON lines (.jsonl, one row a line) or parquet, which are read "
                       "in chunks.", path, path.stat().st_size // 2**20)
    data = path.read_bytes()
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
    marker = chosen.rfind(HH_MARKER, 0, _common_prefix_length(chosen, rejected))
    if marker < 0:
        raise _BadRow(
            f"no 'prompt' field, and 'chosen'/'rejected' share no {HH_MARKER!r} marker "
            "to split the prompt off. Add a 'prompt' field."
        )
    cut = marker + len(HH_MARKER)
    return chosen[:cut], chosen[cut:], rejected[cut:]


def _common_prefix_length(a: str, b: str) -> int:
    """The length of the longest common beginning of a and b: a binary search over slice comparisons
    (os.path.commonprefix compares character by character in Python)."""
    low, high = 0, min(len(a), len(b))  # a[:low] == b[:low]; a[:high + 1] != b[:high + 1] or past the end
    while low < high:
        middle = (low + high + 1) // 2
        if a[:middle] == b[:middle]:
            low = middle
        else:
            high = middle - 1
    return low


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
