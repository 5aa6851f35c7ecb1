"""Prepared data, kept for later runs: tokenized, truncated and KL-paired once per fingerprint.

The prepared splits (kto_scale.prepare) depend only on what `data_fingerprint` lists: the data files
(path, size and modification time; a hub dataset by its name), the eval split settings, the
tokenizer, its chat template, the length settings, skip_bad_rows and data_seed. They are kept in
`<prepared_data_dir>/<first 16 hex digits of the fingerprint's sha256>/` (train.arrow, eval.arrow,
fingerprint.json), so a run that changes only training options (beta, learning rate, steps, ranks)
memory-maps them in seconds, and a run that changes one of those fields prepares again and logs which
field differs from the prepared data used last.

Rank 0 (of node 0) prepares, under a lock on `.<key>.lock`: a second process preparing the same data
waits for the first and then reuses its result. The entry is written under a temporary name and
renamed when complete, so a killed preparation leaves no half-written entry. Every rank then reads
the entry, which must therefore be on storage every node sees.
"""

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import datasets

from kto_scale.atomic import atomic_directory, write_atomic
from kto_scale.config import ConfigError, KTOConfig
from kto_scale.distributed import on_main_process
from kto_scale.prepare import prepare_data
from kto_scale.ref_cache import fingerprint_differences

logger = logging.getLogger(__name__)

PREPARE_VERSION = 2  # of the prepared files and rules; 2: Arrow int32 columns and the vectorized KL pairing
FINGERPRINT = "fingerprint.json"
DEFAULT_DIR = ".kto-prepared"  # next to output_dir


def prepared_data_dir(config: KTOConfig) -> Path:
    """prepared_data_dir, or .kto-prepared next to output_dir (runs side by side share it)."""
    if config.prepared_data_dir:
        return Path(config.prepared_data_dir)
    return Path(config.output_dir).resolve().parent / DEFAULT_DIR


def _source_identity(source: str | None) -> dict | None:
    """A data file by path, size and mtime; a directory by those of every file in it; else a hub name."""
    if not source:
        return None
    path = Path(source)
    if path.is_file():
        stat = path.stat()
        return {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        listing = [(str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
        return {"path": str(path.resolve()), "files": hashlib.sha256(json.dumps(listing).encode()).hexdigest()}
    return {"hub": source}


def _tokenizer_fingerprint(tokenizer) -> str:
    """A hash of what turns text into ids: the fast tokenizer's whole definition (vocabulary, merges,
    normalizer, added tokens, post-processor), or a slow one's vocabulary, and the special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # Without its truncation and padding: runtime state that every call with other settings changes.
        definition = {k: v for k, v in json.loads(backend.to_str()).items() if k not in ("truncation", "padding")}
        definition = json.dumps(definition, sort_keys=True)
    else:
        definition = json.dumps(sorted(tokenizer.get_vocab().items()))
    specials = json.dumps([type(tokenizer).__name__, tokenizer.bos_token_id, tokenizer.eos_token_id,
                           sorted(map(str, tokenizer.all_special_tokens))])
    return hashlib.sha256((definition + specials).encode()).hexdigest()


def data_fingerprint(config: KTOConfig, tokenizer) -> dict:
    """Everything the prepared splits depend on, as JSON values."""
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else json.dumps(tokenizer.chat_template)
    return {
        "version": PREPARE_VERSION,
        "dataset_name": _source_identity(config.dataset_name),
        "eval_dataset_name": _source_identity(config.eval_dataset_name),
        "eval_fraction": config.eval_fraction,
        "skip_bad_rows": config.skip_bad_rows,
        "tokenizer": _tokenizer_fingerprint(tokenizer),
        "chat_template": hashlib.sha256((template or "").encode()).hexdigest(),
        "max_length": config.max_length,
        "max_prompt_length": config.max_prompt_length,
        "max_completion_length": config.max_completion_length,
        "data_seed": config.data_seed,
    }


@contextlib.contextmanager
def _exclusive(lock_file: Path) -> Iterator[None]:
    """Hold an exclusive flock on `lock_file`, waiting for another holder (the OS drops it when a
    holder dies, however it dies). The file stays: removing it would let two holders lock two files."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("Waiting for another process that is preparing the same data (%s is locked).", lock_file)
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _last_used(root: Path, but: Path) -> Path | None:
    """The prepared entry used most recently (its fingerprint file is touched at each use), other than `but`."""
    entries = [p for p in root.glob(f"*/{FINGERPRINT}") if p.parent != but]
    return max(entries, key=lambda p: p.stat().st_mtime_ns).parent if entries else None


def _prepare_entry(config: KTOConfig, tokenizer) -> Path:
    """The entry of this run's data fingerprint, prepared unless a finished one is there (rank 0 only)."""
    fingerprint = data_fingerprint(config, tokenizer)
    key = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]
    entry = prepared_data_dir(config) / key
    with _exclusive(entry.with_name(f".{entry.name}.lock")):
        if (entry / FINGERPRINT).is_file():
            os.utime(entry / FINGERPRINT)  # marks it the last used
            logger.info("Reusing the prepared data in %s: the same data, tokenizer, lengths and data_seed.", entry)
            return entry
        previous = _last_used(entry.parent, entry)
        if previous is None:
            logger.info("Preparing the data into %s.", entry)
        else:
            old = json.loads((previous / FINGERPRINT).read_text())
            logger.info("Preparing the data into %s; it differs from the last prepared (%s) in\n  %s", entry,
                        previous.name, "\n  ".join(fingerprint_differences(old, fingerprint)))
        for stale in entry.parent.glob(f".{entry.name}.tmp-*"):  # a killed preparation's (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        with atomic_directory(entry) as tmp:
            prepare_data(config, tokenizer, tmp)
            write_atomic(tmp / FINGERPRINT, json.dumps(fingerprint, indent=1, sort_keys=True))
    return entry


def shared_prepared_data(config: KTOConfig, tokenizer) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """The prepared (train, eval or None) splits, prepared by rank 0 if no earlier run did, then read
    by every rank from the cache (memory-mapped Arrow: the ranks of a node share one copy through the
    page cache)."""
    # Rank 0's fingerprint names the entry on every rank (another node's copy of a file may have another mtime).
    entry = on_main_process(lambda: _prepare_entry(config, tokenizer))  # bad data fails every rank
    if not (entry / FINGERPRINT).is_file():
        raise ConfigError(f"{entry} is missing on {socket.gethostname()}: rank 0 prepared the data there, but this "
                          "node does not see it. Set prepared_data_dir to storage every node sees.")
    evaluation = datasets.Dataset.from_file(str(entry / "eval.arrow")) if (entry / "eval.arrow").exists() else None
    return datasets.Dataset.from_file(str(entry / "train.arrow")), evaluation
