"""The precompute job: the reference log-probs of a run's every example and KL pair, into a cache
directory in kto_scale.ref_cache's format (launch/precompute_ref.py).

Precompute sorts a split by length (longest first, so a batch holds sequences of similar length and
little padding) and cuts it into shards of SHARD_STEPS batches per rank; rank r scores every
world_size-th batch of a shard, the shard is gathered to rank 0 and rank 0 writes it. Run again after
a kill, it keeps the shards that verify and redoes the rest.
"""

import hashlib
import json
import logging
import re
import time
from pathlib import Path

import datasets
import torch
from torch import Tensor
from tqdm.auto import tqdm

from kto_scale.atomic import write_atomic
from kto_scale.collate import ReferenceLayout, collate, length_order, shard_indices, to_device
from kto_scale.config import ConfigError, KTOConfig
from kto_scale.distributed import all_gather, all_reduce_sum, on_main_process, shutdown
from kto_scale.engine import Engine
from kto_scale.model import load_model, reference_layout
from kto_scale.outdir import (
    LOCK_FILE,
    lock_directory,
    owned,
    record_owned,
    refuse_inputs_inside,
    refuse_unrecorded,
)
from kto_scale.ref_cache import (
    FORMAT_VERSION,
    MANIFEST,
    SHARD_STEPS,
    RefCacheError,
    example_keys,
    fingerprint_differences,
    finished_shard,
    run_fingerprint,
    write_shard,
)
from kto_scale.scoring import reference_logps
from kto_scale.startup import setup

logger = logging.getLogger(__name__)

_SHARD = re.compile(r"(train|eval)-\d+\.safetensors")


def _claim_cache_dir(config: KTOConfig, cache_dir: Path) -> None:
    """Lock the cache dir, and refuse it when it holds an input or someone's files named like a cache's."""
    if cache_dir.exists() and not cache_dir.is_dir():
        raise ConfigError(f"ref_cache {cache_dir} is a file: choose a directory path.")
    refuse_inputs_inside(config, cache_dir, "ref_cache")
    lock_directory(cache_dir / LOCK_FILE, f"ref_cache {cache_dir}")
    refuse_unrecorded(cache_dir, lambda name: name == MANIFEST or bool(_SHARD.fullmatch(name)),
                      "ref_cache")
    record_owned(cache_dir, [MANIFEST])


def _reference_logps(engine: Engine, subset: datasets.Dataset, batch_size: int, pad_id: int,
                     reference: ReferenceLayout) -> Tensor:
    """[n, 3] (reference logp, reference KL logp, tokens) of every row of `subset`, in its order, on CPU.

    Rank r scores every world_size-th batch; a rank short of examples scores weight-0 filler rows, so
    every rank runs the same forward passes (under ZeRO-3 and FSDP each one gathers parameters from all ranks).
    """
    rows, weights, values = [], [], []
    for indices in shard_indices(len(subset), batch_size, engine.world_size, engine.global_rank):
        # Padded even with padding_free: the rows are length-sorted, so batches pad little, while packing
        # precompute_batch_size sequences into one row makes sdpa's block mask quadratic in its length.
        batch = to_device(collate(subset, indices, pad_id, reference=reference), engine.device)
        logps = reference_logps(engine, batch)
        tokens = (batch["tokens"] + batch["kl_tokens"]).float()
        values.append(torch.stack([*logps, tokens], dim=1))
        rows.append(batch["index"])
        weights.append(batch["weight"])
    real = all_gather(torch.cat(weights)) > 0
    out = torch.full((len(subset), 3), float("nan"), device=engine.device)  # a row left out stays NaN
    out[all_gather(torch.cat(rows))[real]] = all_gather(torch.cat(values))[real]
    return out.cpu()


def _precompute_split(engine: Engine, config: KTOConfig, dataset: datasets.Dataset, split: str, fingerprint_id: str,
                      pad_id: int, reference: ReferenceLayout) -> list[dict]:
    """Write the shards of one split that no earlier precompute finished; return the manifest entries.

    Rank 0 decides which shards are finished and tells the others, so all ranks run the same passes.
    """
    cache_dir, rank, batch_size = Path(config.ref_cache), engine.global_rank, config.precompute_batch_size
    keys, order = example_keys(dataset), length_order(dataset)
    size = batch_size * engine.world_size * SHARD_STEPS
    shards = [order[i : i + size] for i in range(0, len(order), size)]
    paths = [cache_dir / f"{split}-{s:05d}.safetensors" for s in range(len(shards))]
    shas = [finished_shard(p, fingerprint_id, r) if rank == 0 and p.exists() else None
            for p, r in zip(paths, shards, strict=True)]
    if rank == 0:  # shards of an earlier layout (another batch size or number of ranks)
        for stale in {cache_dir / name for name in owned(cache_dir) if _SHARD.fullmatch(name)} - set(paths):
            if stale.name.startswith(split):
                stale.unlink(missing_ok=True)
        record_owned(cache_dir, [p.name for p in paths])
    finished = all_reduce_sum(torch.tensor([sha is not None for sha in shas], device=engine.device).long())
    finished = [bool(done) for done in finished.tolist()]  # rank 0's verdict, on every rank
    if any(finished):
        logger.info("%s: keeping %d of %d shards from an earlier precompute.", split, sum(finished), len(shards))

    start, tokens = time.perf_counter(), 0.0
    progress = tqdm(total=len(dataset), disable=rank != 0 or config.disable_tqdm, desc=f"reference {split}")
    for s, (path, rows) in enumerate(zip(paths, shards, strict=True)):
        if not finished[s]:
            values = _reference_logps(engine, dataset.select(rows), batch_size, pad_id, reference)
            tokens += values[:, 2].sum().item()
            if rank == 0:
                shas[s] = write_shard(path, rows, keys[rows], values[:, :2], fingerprint_id)
        progress.update(len(rows))
    progress.close()
    seconds = time.perf_counter() - start
    logger.info("%s: %d examples, %d tokens scored in %.1f s (%.0f tokens/s).",
                split, len(dataset), tokens, seconds, tokens / max(seconds, 1e-9))
    return [{"file": p.name, "sha256": sha, "examples": len(r)} for p, sha, r in zip(paths, shas, shards, strict=True)]


def _prepare_cache_dir(cache_dir: Path, fingerprint: dict) -> None:
    """Refuse a finished cache of another run; otherwise drop the manifest (it is rewritten last) and
    the temporary files a kill left behind."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    manifest = cache_dir / MANIFEST
    if manifest.exists():
        old = json.loads(manifest.read_text()).get("fingerprint", {})
        differences = fingerprint_differences(old, fingerprint)
        if differences:
            raise RefCacheError(f"{cache_dir} holds the finished cache of another run; it differs in\n  "
                                + "\n  ".join(differences) + "\nChoose another --ref_cache or delete it.")
        manifest.unlink()
    for tmp in cache_dir.glob(".*.tmp-*"):
        tmp.unlink()


def precompute(config: KTOConfig) -> Path:
    """Compute the reference log-probs of every train and eval example and KL pair into config.ref_cache.

    Every rank calls this (`deepspeed launch/precompute_ref.py` or torchrun with fsdp); rank 0 writes
    the files. Training reads them on every rank: on several nodes, put the cache on storage that every
    node sees.
    """
    if not config.ref_cache:
        raise ConfigError("ref_cache is not set: pass --ref_cache DIR, the directory to write the cache to.")
    cache_dir = Path(config.ref_cache)
    start = setup(config, lambda: on_main_process(lambda: _claim_cache_dir(config, cache_dir)))
    splits = {"train": start.train_set, "eval": start.eval_set}
    model = load_model(config, empty=not start.engine.loads_weights(start.rank))
    reference = reference_layout(config, model, cached=False)  # it writes the cache
    engine = start.engine.inference_engine(model)
    fingerprint = run_fingerprint(config, start.tokenizer, splits)
    on_main_process(lambda: _prepare_cache_dir(cache_dir, fingerprint))  # a refusal stops every rank
    fingerprint_id = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()
    manifest = {"format_version": FORMAT_VERSION, "fingerprint": fingerprint, "splits": {}}
    for split, data in splits.items():
        if data is not None:
            manifest["splits"][split] = _precompute_split(engine, config, data, split, fingerprint_id,
                                                          start.tokenizer.pad_token_id, reference)
    if start.rank == 0:
        write_atomic(cache_dir / MANIFEST, json.dumps(manifest, indent=1).encode())
        logger.info("Reference cache written to %s.", cache_dir)
    shutdown()
    return cache_dir
