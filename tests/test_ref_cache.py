"""The precomputed reference cache, end to end on the tiny Llama: a killed precompute resumes; an
uneven two-rank precompute equals a one-rank one; training from the cache logs the numbers of
training with the reference computed on the fly (one rank, and two ZeRO-3 ranks); caches that are
incomplete, corrupted or of another run are refused."""

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from runs import (
    ROOT,
    TRAIN,
    config_file,
    die_after_first,
    launch,
    ranks,
    run,
    run_together,
    write_data,
)
from safetensors.numpy import load_file, save_file
from test_scale import _assert_same_steps
from tolerances import logp_rtol

from kto_scale.collate import collate
from kto_scale.config_io import load_config
from kto_scale.model import SequenceLogps, load_model, load_tokenizer, reference_mode
from kto_scale.prepare import prepare_data
from kto_scale.ref_cache import MANIFEST, RefCacheError, open_ref_cache

PRECOMPUTE = [sys.executable, "launch/precompute_ref.py"]
SPLITS = ("train", "eval")


def _data(config_path: Path, **overrides) -> tuple:
    """(config, tokenizer, {split: prepared dataset}) as a run of this config file sees them."""
    config = load_config(["--config", str(config_path), *[f"--{k}={v}" for k, v in overrides.items()]])
    tokenizer = load_tokenizer(config)
    return config, tokenizer, dict(zip(SPLITS, prepare_data(config, tokenizer), strict=True))


def _lookup_all(config_path: Path, cache_dir: Path, split: str, **overrides) -> tuple[torch.Tensor, torch.Tensor]:
    """Open the cache as training does and look up every row of the split."""
    config, tokenizer, splits = _data(config_path, **overrides)
    cache = open_ref_cache(str(cache_dir), config, tokenizer, split, splits[split])
    return cache.lookup(torch.arange(len(splits[split])))


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model) -> dict:
    """201 examples (151 train, 50 eval: uneven over 2 ranks x 4), configs for one rank (ZeRO-2, one
    example per precompute batch) and two ranks (ZeRO-3, four), and their caches. The one-rank cache
    comes from a precompute killed once its first shard was written, then run again."""
    tmp = tmp_path_factory.mktemp("ref_cache")
    data = write_data(tmp / "odd.jsonl", 200)
    with data.open("a") as f:
        f.write(json.dumps({"prompt": "Question 999: what is 2 + 2?", "completion": " 4.", "label": True}) + "\n")
    # One evaluation (at the end) in one batch per rank, no checkpoints: ZeRO-3 forwards are slow on CPU.
    common = dict(dataset_name=str(data), save_steps=1000, eval_steps=None, per_device_eval_batch_size=32)
    one = config_file(tmp, "one", tiny_model, precompute_batch_size=1, **common)
    two = config_file(tmp, "two", tiny_model, precompute_batch_size=4, gradient_accumulation_steps=1,
                      deepspeed=str(ROOT / "ds_configs/zero3.json"), **common)
    command = [*PRECOMPUTE, "--config", str(one), "--ref_cache", str(tmp / "cache1")]
    die_after_first("kto_scale.precompute:write_shard", command)  # killed once its first shard is on disk
    killed = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (tmp / "cache1").glob("*.safetensors")}
    resumed_log = run(command).stderr
    run([*ranks(2), "launch/precompute_ref.py", "--config", str(two), "--ref_cache", str(tmp / "cache2")])
    return {"tmp": tmp, "one": one, "two": two, "cache1": tmp / "cache1", "cache2": tmp / "cache2",
            "killed": killed, "resumed_log": resumed_log}


@pytest.mark.e2e
def test_killed_precompute_resumes_and_holds_the_reference(setup):
    """The rerun kept the shards finished before the kill, and every value is the row's reference."""
    assert setup["killed"]
    train_kept = sum(name.startswith("train") for name in setup["killed"])
    assert f"train: keeping {train_kept} of 10 shards" in setup["resumed_log"]
    for name, stat in setup["killed"].items():  # kept as they were, not rewritten
        assert ((setup["cache1"] / name).stat().st_ino, (setup["cache1"] / name).stat().st_mtime_ns) == stat

    config, tokenizer, splits = _data(setup["one"])
    model = load_model(config)
    for split, data in splits.items():
        batch = collate(data, list(range(len(data))), tokenizer.pad_token_id)
        with reference_mode(model):  # one plain batch, two separate passes, no DeepSpeed
            expected = SequenceLogps(model)(**batch["policy"]), SequenceLogps(model)(**batch["kl"])
        # The cache comes from the shared-prompt pass, batched otherwise: equal to rounding (logp_rtol).
        for got, want in zip(_lookup_all(setup["one"], setup["cache1"], split), expected, strict=True):
            torch.testing.assert_close(got, want, atol=0, rtol=logp_rtol(2))


@pytest.mark.e2e
def test_two_rank_uneven_precompute_equals_one_rank(setup):
    """Neither split fills the last 2 x 4 batches, so a rank scores filler rows; no hang, same values."""
    for split in SPLITS:
        one = _lookup_all(setup["one"], setup["cache1"], split)
        two = _lookup_all(setup["two"], setup["cache2"], split)
        assert len(one[0]) % 8
        for a, b in zip(one, two, strict=True):
            torch.testing.assert_close(a, b, atol=0, rtol=logp_rtol(2))  # other batches


@pytest.fixture(scope="module")
def one_rank(setup) -> dict[str, tuple[Path, subprocess.CompletedProcess]]:
    """The one-rank config trained with the reference computed in every step ("fly": what training from
    the cache must log, on one rank and on two) and from the one-rank cache ("cached-1"), side by side
    (one core each): {name: (run dir, how it ended)}."""
    dirs = {name: setup["tmp"] / name for name in ("fly", "cached-1")}
    command = [*TRAIN, "--config", str(setup["one"])]
    results = run_together({"fly": [*command, "--output_dir", str(dirs["fly"])],
                            "cached-1": [*command, "--output_dir", str(dirs["cached-1"]),
                                         "--ref_cache", str(setup["cache1"])]})
    return {name: (dirs[name], results[name]) for name in dirs}


@pytest.mark.e2e
@pytest.mark.parametrize("num_ranks", [1, 2])
def test_training_from_cache_matches_on_the_fly(setup, one_rank, num_ranks):
    """Per-step train metrics and the eval metrics are those of the one-rank run that computes the
    reference in every step. Two ZeRO-3 ranks x 1 accumulation are the same global batch in another
    layout, which changes the numbers by rounding only (tests/tolerances.py's run tolerances)."""
    if num_ranks == 1:
        cached_dir, cached = one_rank["cached-1"]
    else:
        cached_dir = setup["tmp"] / "cached-2"
        cached = run([*ranks(2), "launch/train.py", "--config", str(setup["two"]), "--output_dir", str(cached_dir),
                      "--ref_cache", str(setup["cache1"])])
    assert "Reference log-probs of 151 train examples read from" in cached.stderr  # the cache was used
    # Every number of both splits, within what rounding allows (tests/tolerances.py).
    _assert_same_steps(one_rank["fly"][0], cached_dir, keys=None, splits=SPLITS)


@pytest.mark.e2e
def test_refuses_a_cache_of_another_run(setup):
    """Each differing field is named; another data_seed pairs other KL completions: the data differs too."""
    with pytest.raises(RefCacheError) as error:
        _lookup_all(setup["one"], setup["cache1"], "train", max_length=128, data_seed=7)
    for line in ("max_length: cache 64, run 128", "data_seed: cache 42, run 7", "dataset/train: cache '"):
        assert line in str(error.value)


def _copy_cache(setup, name: str) -> tuple[Path, dict, Path]:
    """A copy of the one-rank cache, its manifest and its first train shard, to break."""
    cache = shutil.copytree(setup["cache1"], setup["tmp"] / name)
    manifest = json.loads((cache / MANIFEST).read_text())
    return cache, manifest, cache / manifest["splits"]["train"][0]["file"]


def _rewrite_shard(cache: Path, manifest: dict, shard: Path, arrays: dict) -> None:
    """Replace the first train shard and record its new checksum, as if the precompute had written it."""
    save_file(arrays, shard)
    manifest["splits"]["train"][0]["sha256"] = hashlib.sha256(shard.read_bytes()).hexdigest()
    (cache / MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.e2e
def test_unfinished_cache_is_an_error(setup):
    cache, _, _ = _copy_cache(setup, "unfinished")
    (cache / MANIFEST).unlink()  # what a killed precompute leaves: shards, no manifest
    with pytest.raises(RefCacheError, match="did not finish"):
        _lookup_all(setup["one"], cache, "train")


@pytest.mark.e2e
@pytest.mark.parametrize("where", [12, -3])  # in the JSON header, in a value
def test_corrupted_shard_is_an_error(setup, where):
    cache, _, shard = _copy_cache(setup, f"corrupted{where}")
    data = bytearray(shard.read_bytes())
    data[where] ^= 0x01  # one flipped bit
    shard.write_bytes(bytes(data))
    with pytest.raises(RefCacheError, match="is corrupted"):
        _lookup_all(setup["one"], cache, "train")


@pytest.mark.e2e
def test_missing_example_is_an_error(setup):
    cache, manifest, shard = _copy_cache(setup, "missing")
    arrays = load_file(shard)
    dropped = int(arrays["row"][0])
    _rewrite_shard(cache, manifest, shard, {k: v[1:] for k, v in arrays.items()})
    with pytest.raises(RefCacheError, match=rf"1 of the 151 train examples are not in the cache \(rows \[{dropped}\]\)"):
        _lookup_all(setup["one"], cache, "train")


@pytest.mark.e2e
def test_other_example_under_a_row_is_an_error(setup):
    cache, manifest, shard = _copy_cache(setup, "other_key")
    arrays = load_file(shard)
    arrays["key"][2] += np.uint64(1)
    _rewrite_shard(cache, manifest, shard, arrays)
    with pytest.raises(RefCacheError, match=rf"rows \[{arrays['row'][2]}\] of the train split hold other examples"):
        _lookup_all(setup["one"], cache, "train")


@pytest.mark.e2e
def test_non_finite_value_is_an_error_naming_the_example(setup):
    """A NaN whose checksums match is refused on load, naming the row and its prompt."""
    cache, manifest, shard = _copy_cache(setup, "non_finite")
    arrays = load_file(shard)
    arrays["reference_kl"][1] = np.nan
    _rewrite_shard(cache, manifest, shard, arrays)
    with pytest.raises(RefCacheError, match=rf"reference log-probs of 1 train examples are not finite \(rows "
                                            rf"\[{arrays['row'][1]}\]; row {arrays['row'][1]}'s prompt begins 'Question"):
        _lookup_all(setup["one"], cache, "train")


@pytest.mark.e2e
def test_two_rank_precompute_into_another_runs_cache_fails_on_every_rank(setup):
    """Rank 0 refuses the cache; the other rank reports the same instead of running on without it."""
    result = launch([*ranks(2), "launch/precompute_ref.py", "--config", str(setup["two"]),
                     "--ref_cache", str(setup["cache2"]), "--max_length", "60"], timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert output.count(f"error: {setup['cache2']} holds the finished cache of another run") == 2, output[-3000:]
