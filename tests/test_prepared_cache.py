"""Prepared data is kept by fingerprint: reused when only training options change, prepared again (and
the differing field named) when the data, tokenizer or lengths change, and prepared once when two
processes ask for it at the same time."""

import logging
import os
import threading

import pytest

from kto_scale import prepared_cache
from kto_scale.assets import DEMO_DATA
from kto_scale.config import ConfigError, KTOConfig
from kto_scale.prepared_cache import DEFAULT_DIR, shared_prepared_data


def _config(tmp_path, **options) -> KTOConfig:
    data = tmp_path / "demo.jsonl"
    if not data.exists():
        data.write_bytes(DEMO_DATA.read_bytes())
    settings = {"eval_fraction": 0.1, "max_length": 128, "max_prompt_length": 64, **options}
    return KTOConfig(model_name_or_path="m", dataset_name=str(data), output_dir=str(tmp_path / "run"), **settings)


def _rows(split) -> list:
    return split.to_list()


def _entries(tmp_path) -> list:
    """The prepared entries in the default directory (not the lock files)."""
    return [p for p in (tmp_path / DEFAULT_DIR).iterdir() if not p.name.startswith(".")]


def test_reused_when_only_training_options_change(tmp_path, tokenizer, caplog, monkeypatch):
    with caplog.at_level(logging.INFO, logger="kto_scale.prepared_cache"):
        train, evaluation = shared_prepared_data(_config(tmp_path), tokenizer)
    assert "Preparing the data into" in caplog.text
    (entry,) = _entries(tmp_path)
    assert sorted(p.name for p in entry.iterdir()) == ["eval.arrow", "fingerprint.json", "train.arrow"]

    def fail(*args):
        raise AssertionError("prepared again")

    monkeypatch.setattr(prepared_cache, "prepare_data", fail)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="kto_scale.prepared_cache"):
        again = shared_prepared_data(_config(tmp_path, beta=0.5, learning_rate=1e-3, seed=7, max_steps=3), tokenizer)
    assert f"Reusing the prepared data in {entry}" in caplog.text
    assert _rows(again[0]) == _rows(train) and _rows(again[1]) == _rows(evaluation)


@pytest.mark.parametrize(("change", "field"), [
    (lambda tmp_path, tokenizer: (_config(tmp_path, max_length=100), tokenizer), "max_length: cache 128, run 100"),
    (lambda tmp_path, tokenizer: (_config(tmp_path, data_seed=1), tokenizer), "data_seed: cache 42, run 1"),
    (lambda tmp_path, tokenizer: (_append_row(tmp_path), tokenizer), "dataset_name.size: cache"),
    (lambda tmp_path, tokenizer: (_config(tmp_path), _other_template(tokenizer)), "chat_template: cache"),
])
def test_a_change_that_matters_prepares_again_and_names_the_field(tmp_path, tokenizer, caplog, change, field):
    first = shared_prepared_data(_config(tmp_path), tokenizer)[0]
    config, changed_tokenizer = change(tmp_path, tokenizer)
    with caplog.at_level(logging.INFO, logger="kto_scale.prepared_cache"):
        shared_prepared_data(config, changed_tokenizer)
    assert "Preparing the data into" in caplog.text and field in caplog.text
    assert len(_entries(tmp_path)) == 2
    assert len(first)  # the earlier entry is intact and still readable


def _append_row(tmp_path) -> KTOConfig:
    config = _config(tmp_path)
    with open(config.dataset_name, "a") as f:
        f.write('{"prompt": "One more?", "completion": "Yes.", "label": true}\n')
    return config


def _other_template(tokenizer):
    changed = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    changed.chat_template = tokenizer.chat_template + " "
    return changed


def test_two_processes_preparing_at_once_prepare_once(tmp_path, tokenizer, monkeypatch):
    """flock conflicts between separate opens of the lock file, threads included: the second waits,
    then reuses what the first wrote. The first preparation holds the lock until the second has said it
    waits (an event, not a sleep; the 120 s bound only ends a hang)."""
    calls, real, second_waits = [], prepared_cache.prepare_data, threading.Event()

    class WaitSeen(logging.Handler):
        def emit(self, record):
            if record.getMessage().startswith("Waiting for another process"):
                second_waits.set()

    def held_prepare(*args):
        calls.append(1)
        assert second_waits.wait(120), "the second preparation never waited on the lock"
        return real(*args)

    monkeypatch.setattr(prepared_cache, "prepare_data", held_prepare)
    handler = WaitSeen(level=logging.INFO)
    prepared_cache.logger.addHandler(handler)
    monkeypatch.setattr(prepared_cache.logger, "level", logging.INFO)
    results, config = [None, None], _config(tmp_path)  # the data file written before either thread reads it

    def run(i):
        results[i] = shared_prepared_data(config, tokenizer)[0]

    try:
        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        prepared_cache.logger.removeHandler(handler)
    assert len(calls) == 1 and _rows(results[0]) == _rows(results[1])


def test_the_tokenizer_fingerprint_ignores_its_truncation_state(tokenizer):
    """A fast tokenizer's serialized form carries the truncation/padding of its last call: not part of
    what turns text into ids, so using the tokenizer must not change the data's fingerprint."""
    before = prepared_cache._tokenizer_fingerprint(tokenizer)
    tokenizer(["a long text " * 20], truncation=True, max_length=5, padding="max_length")
    assert prepared_cache._tokenizer_fingerprint(tokenizer) == before


def test_a_killed_preparation_leaves_no_entry_and_is_redone(tmp_path, tokenizer, monkeypatch):
    def killed(config, tokenizer, directory):
        (directory / "train.arrow").write_text("half")
        raise KeyboardInterrupt

    monkeypatch.setattr(prepared_cache, "prepare_data", killed)
    with pytest.raises(KeyboardInterrupt):
        shared_prepared_data(_config(tmp_path), tokenizer)
    assert [p for p in (tmp_path / DEFAULT_DIR).iterdir() if not p.name.endswith(".lock")] == []  # no tmp left
    monkeypatch.undo()
    assert len(shared_prepared_data(_config(tmp_path), tokenizer)[0]) == 540


def test_a_node_that_does_not_see_the_cache_says_so(tmp_path, tokenizer, monkeypatch):
    """Another node's rank: rank 0 prepared on storage this node does not see."""
    monkeypatch.setattr(prepared_cache, "on_main_process", lambda work: tmp_path / "local" / "0123456789abcdef")
    with pytest.raises(ConfigError, match=r"is missing on .*Set prepared_data_dir to storage every node sees"):
        shared_prepared_data(_config(tmp_path, prepared_data_dir=str(tmp_path / "local")), tokenizer)
    assert not os.path.exists(tmp_path / "local")
