"""Reference log-probs computed once, ahead of training, and read back by dataset row.

The reference is the frozen base model (adapters off; with sft_adapter, base + that adapter), so its
log-prob of every example and of every KL pair never changes during training. The precompute job
(kto_scale.precompute, launch/precompute_ref.py) computes them once; training with `ref_cache` set then
skips both reference forward passes of every micro-batch. This module holds the cache's format, its
fingerprint of the run, and the reader.

A cache directory holds:
- `<split>-<NNNNN>.safetensors` shards (split = train or eval), each the values of a set of dataset
  rows: "row" [n] int64, "key" [n] uint64 (a hash of the row's token ids and label), "reference" and
  "reference_kl" [n] float32. The header metadata holds the run's fingerprint id and a checksum of the
  arrays, so a shard can be verified without the manifest (which a killed precompute never wrote).
- `manifest.json`, written last: format version, the fingerprint of everything the numbers depend on
  (model, reference adapter, tokenizer, each split's token ids, lengths, data seed, dtype) and each shard's sha256.

Every file is written to a temporary name and renamed.
"""

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import torch
from safetensors import safe_open
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors
from torch import Tensor
from transformers.utils import cached_file

from kto_scale.atomic import write_atomic
from kto_scale.collate import TOKEN_COLUMNS, token_chunks
from kto_scale.config import ConfigError, KTOConfig
from kto_scale.model import train_dtype
from kto_scale.sft_adapter import sft_adapter_fingerprint

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SHARD_STEPS = 16  # forward batches per rank in a shard: the most work a kill can lose
QUANTIZATION = ("load_in_4bit", "load_in_8bit", "bnb_4bit_quant_type", "use_bnb_nested_quant")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
WEIGHT_SAMPLES, SAMPLE_BYTES = 16, 1 << 16  # bytes read per weight file: 1 MiB, whatever its size


class RefCacheError(ConfigError):
    """The reference cache is incomplete, corrupted, or was computed for another run."""


# --- what the numbers depend on -------------------------------------------------------------------


def dataset_hash(dataset: datasets.Dataset) -> str:
    """sha256 of a prepared split's token columns and labels, read CHUNK_ROWS rows at a time."""
    digest = hashlib.sha256()
    for columns, labels in token_chunks(dataset):
        for name, (offsets, ids) in zip(TOKEN_COLUMNS, columns, strict=True):
            digest.update(name.encode())
            digest.update(offsets.tobytes())
            digest.update(ids.tobytes())
        digest.update(labels.tobytes())
    return digest.hexdigest()


def example_keys(dataset: datasets.Dataset) -> np.ndarray:
    """[N] uint64: for each row a 64-bit hash of its prompt, completion and KL completion ids and label."""
    keys = []
    for columns, labels in token_chunks(dataset):
        # Lengths in front of the ids make the byte string unambiguous (no separators needed).
        header = np.stack([np.diff(offsets) for offsets, _ in columns] + [labels], axis=1).astype(np.int64)
        header_bytes, width = memoryview(np.ascontiguousarray(header)).cast("B"), header.shape[1] * 8
        ids_bytes = [(memoryview(ids).cast("B"), offsets * ids.itemsize) for offsets, ids in columns]
        chunk = np.empty(len(labels), dtype=np.uint64)
        for i in range(len(labels)):
            digest = hashlib.blake2b(header_bytes[i * width : (i + 1) * width], digest_size=8)
            for data, starts in ids_bytes:
                digest.update(data[starts[i] : starts[i + 1]])
            chunk[i] = int.from_bytes(digest.digest(), "little")
        keys.append(chunk)
    return np.concatenate(keys) if keys else np.empty(0, dtype=np.uint64)


def _weights_fingerprint(config: KTOConfig, model_dir: Path) -> str:
    """A hash of the weight files' names, sizes and 16 evenly spaced 64 KiB samples of their bytes.

    Sampling (the safetensors header included) tells retrained weights apart without reading
    multi-GB files, and unlike mtimes it survives copying the model to another disk.
    """
    if config.init_random_weights:  # seeded: the same weights on every engine, stage and rank count
        # Named after the draw: a cache of the earlier one (a plain from_config's) no longer matches.
        return f"random init (kto_scale.random_init), seed {config.seed}"
    files = sorted(p for p in model_dir.iterdir() if p.name.endswith(WEIGHT_SUFFIXES))
    if not files:
        raise RefCacheError(f"{model_dir} has no weight files ({', '.join(WEIGHT_SUFFIXES)}) to fingerprint.")
    digest = hashlib.sha256()
    for path in files:
        size = path.stat().st_size
        digest.update(f"{path.name}:{size};".encode())
        with path.open("rb") as f:
            for offset in np.linspace(0, max(size - SAMPLE_BYTES, 0), WEIGHT_SAMPLES, dtype=np.int64):
                f.seek(int(offset))
                digest.update(f.read(SAMPLE_BYTES))
    return digest.hexdigest()


def run_fingerprint(config: KTOConfig, tokenizer, splits: dict[str, datasets.Dataset | None]) -> dict:
    """Everything the cached numbers depend on, as JSON values; "dataset/<split>" for each split given.

    Call after the model is loaded: a hub model's files are then in the local cache.
    """
    model_dir = Path(cached_file(config.model_name_or_path, "config.json", revision=config.model_revision)).parent
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()))
    return {
        "model_name_or_path": config.model_name_or_path,
        "model_revision": config.model_revision,
        "model_config": json.loads((model_dir / "config.json").read_text()),
        "model_weights": _weights_fingerprint(config, model_dir),
        "adapter": sft_adapter_fingerprint(config),  # None: the reference is the bare base
        "quantization": {name: getattr(config, name) for name in QUANTIZATION}
        if config.load_in_4bit or config.load_in_8bit else None,
        "tokenizer": hashlib.sha256(vocab.encode()).hexdigest(),
        "dtype": str(train_dtype(config)).removeprefix("torch."),
        "max_length": config.max_length,
        "max_prompt_length": config.max_prompt_length,
        "max_completion_length": config.max_completion_length,
        "data_seed": config.data_seed,
        **{f"dataset/{split}": None if data is None else dataset_hash(data) for split, data in splits.items()},
    }


def fingerprint_differences(cache: dict, run: dict, prefix: str = "") -> list[str]:
    """One "field: cache X, run Y" line per differing field (nested dicts by dotted name)."""
    lines = []
    for key in sorted(cache.keys() | run.keys()):
        a, b = cache.get(key), run.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            lines += fingerprint_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            lines.append(f"{prefix}{key}: cache {a!r}, run {b!r}")
    return lines


# --- files ----------------------------------------------------------------------------------------


def _arrays_sha256(arrays: dict[str, np.ndarray]) -> str:
    """A checksum of a shard's arrays, kept in its header: verifiable before any manifest exists."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(arrays[name]).tobytes())
    return digest.hexdigest()


def write_shard(path: Path, rows: np.ndarray, keys: np.ndarray, values: Tensor, fingerprint_id: str) -> str:
    """Write one shard ([n] rows and keys, [n, 2] reference and KL reference logps); return its sha256."""
    if not torch.isfinite(values).all():
        bad = rows[~torch.isfinite(values).all(dim=1).numpy()]
        raise RefCacheError(f"The reference gave non-finite log-probs for rows {bad[:10].tolist()} of {path.name} "
                            "(fp16 overflow?); try bf16 or fp32.")
    columns = values.numpy().T.copy()  # contiguous: safetensors writes an array's memory as it lies
    arrays = {"row": rows.astype(np.int64), "key": keys, "reference": columns[0], "reference_kl": columns[1]}
    data = save_safetensors(arrays, metadata={"fingerprint": fingerprint_id, "arrays_sha256": _arrays_sha256(arrays)})
    write_atomic(path, data)
    return hashlib.sha256(data).hexdigest()


def finished_shard(path: Path, fingerprint_id: str, rows: np.ndarray) -> str | None:
    """The sha256 of a shard a previous precompute finished for this run and these rows, else None."""
    data = path.read_bytes()
    try:
        with safe_open(path, framework="np") as f:
            metadata = f.metadata() or {}
        arrays = load_safetensors(data)
    except Exception as e:  # unreadable: redo it
        logger.warning("Redoing %s: it does not read as a shard (%s).", path, e)
        return None
    if (metadata.get("fingerprint") == fingerprint_id and metadata.get("arrays_sha256") == _arrays_sha256(arrays)
            and np.array_equal(arrays["row"], rows)):
        return hashlib.sha256(data).hexdigest()
    logger.warning("Redoing %s: it holds other rows, another run's values, or is corrupted.", path)
    return None


# --- reading --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RefCache:
    """The reference log-probs of one split by dataset row, [N] float32 each (complete, keys checked at open)."""

    reference: Tensor
    reference_kl: Tensor

    def lookup(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        """[B] long dataset rows -> ([B] reference logps, [B] reference KL logps), float32 on CPU."""
        if len(rows) and (rows.min() < 0 or rows.max() >= len(self.reference)):
            raise RefCacheError(f"Rows {rows.tolist()} are not all in the cache's {len(self.reference)} examples.")
        return self.reference[rows], self.reference_kl[rows]


def _load_split(cache_dir: Path, shards: list[dict], keys: np.ndarray, split: str) -> np.ndarray:
    """[N, 2] reference and KL reference logps by row; every shard checksummed, every row present once."""
    values, seen = np.full((len(keys), 2), np.nan, dtype=np.float32), np.zeros(len(keys), dtype=bool)
    for shard in shards:
        path = cache_dir / shard["file"]
        if not path.is_file():
            raise RefCacheError(f"{path} is missing; rerun launch/precompute_ref.py with --ref_cache {cache_dir} "
                                "(finished shards are kept).")
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != shard["sha256"]:
            raise RefCacheError(f"{path} is corrupted: its sha256 is not the one in {MANIFEST}. Rerun "
                                f"launch/precompute_ref.py with --ref_cache {cache_dir}: it redoes that shard.")
        arrays = load_safetensors(data)  # the bytes whose sha256 was just checked
        rows = arrays["row"]
        if ((rows < 0) | (rows >= len(keys))).any() or seen[rows].any():
            raise RefCacheError(f"{path} holds rows outside the {split} split's {len(keys)}, or rows of another shard.")
        wrong = rows[arrays["key"] != keys[rows]]
        if len(wrong):
            raise RefCacheError(f"{path}: rows {wrong[:10].tolist()} of the {split} split hold other examples "
                                "than this run's; precompute the cache again for this data.")
        values[rows] = np.stack([arrays["reference"], arrays["reference_kl"]], axis=1)
        seen[rows] = True
    missing = np.flatnonzero(~seen)
    if len(missing):
        raise RefCacheError(f"{cache_dir}: {len(missing)} of the {len(keys)} {split} examples are not in the cache "
                            f"(rows {missing[:10].tolist()}); precompute it again.")
    return values


def open_ref_cache(cache_dir: str, config: KTOConfig, tokenizer, split: str, dataset: datasets.Dataset) -> RefCache:
    """Validate the cache against this run and load the split's values.

    Raises RefCacheError naming every field that differs ("max_length: cache 512, run 1024"), or the
    shard that is missing, corrupted or holds other examples.
    """
    path = Path(cache_dir) / MANIFEST
    if not path.is_file():
        raise RefCacheError(f"{path} does not exist: the precompute into {cache_dir} never ran or did not finish. "
                            f"Run (or rerun: it resumes) launch/precompute_ref.py with --ref_cache {cache_dir}.")
    manifest = json.loads(path.read_text())
    if manifest.get("format_version") != FORMAT_VERSION:
        raise RefCacheError(f"{path} has format version {manifest.get('format_version')}; this kto-scale reads "
                            f"version {FORMAT_VERSION}. Precompute the cache again.")
    run = run_fingerprint(config, tokenizer, {split: dataset})
    differences = fingerprint_differences({k: manifest["fingerprint"].get(k) for k in run}, run)
    if differences:
        raise RefCacheError(f"{cache_dir} was precomputed for another run ({split} split); it differs in\n  "
                            + "\n  ".join(differences) + "\nPrecompute a cache for this config or train without "
                            "ref_cache.")
    values = _load_split(Path(cache_dir), manifest["splits"][split], example_keys(dataset), split)
    bad = np.flatnonzero(~np.isfinite(values).all(axis=1))
    if len(bad):  # a NaN would make every step holding the example "bad"; name it instead
        prompt = tokenizer.decode(dataset[int(bad[0])]["prompt_ids"], skip_special_tokens=True)
        raise RefCacheError(f"{cache_dir}: the reference log-probs of {len(bad)} {split} examples are not finite (rows "
                            f"{bad[:10].tolist()}; row {bad[0]}'s prompt begins {prompt[:60]!r}). Precompute the "
                            "cache again into a new --ref_cache.")
    logger.info("Reference log-probs of %d %s examples read from %s.", len(values), split, cache_dir)
    return RefCache(torch.from_numpy(values[:, 0].copy()), torch.from_numpy(values[:, 1].copy()))
