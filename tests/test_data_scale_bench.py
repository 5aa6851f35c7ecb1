"""bench/data_scale.py at a tiny N. Its data stages' numbers, each stage called in this process (the
unit tier); and the driver end to end on one stage in its own process, as every stage runs: the
stage's JSON line, wall time and peak RSS read back, the results file and the table (e2e). The train
and evaluate stages are launch/train.py and launch/evaluate.py, which the training tests cover."""

import importlib
import json
import sys

import pytest
from runs import ROOT, run

from kto_scale.config_io import load_config

HH = {"chosen": "\n\nHuman: Hi?\n\nAssistant: Hello, how can I help?",
      "rejected": "\n\nHuman: Hi?\n\nAssistant: Go away."}


@pytest.fixture
def hh(tmp_path):
    path = tmp_path / "hh.jsonl"
    path.write_text(json.dumps(HH) + "\n")
    return path


def test_data_stages(hh, tmp_path, monkeypatch):
    """prepare on a cold cache times its five parts; on the warm cache (reuse) it prepares nothing; floor
    reads and tokenizes; scan times every step it names. 20 pairs, one HH row cycled: distinct prompts
    thanks to the tags, so all 40 examples pair up."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    data_scale = importlib.import_module("data_scale")
    data = tmp_path / "pairs.jsonl"
    data_scale.make_data(hh, 40, data)
    path = data_scale.write_config(data, str(ROOT / "kto_scale/assets/tiny-llama"), tmp_path, "bench", True,
                                   dataset_num_proc=1)
    config = load_config(["--config", str(path)])
    from kto_scale import prepare

    tokenize = prepare.tokenize_dataset
    cold, warm = data_scale.stage_prepare(config), data_scale.stage_prepare(config)
    assert prepare.tokenize_dataset is tokenize  # the timing wrappers are gone again
    assert cold["examples"] == warm["examples"] == 40
    assert set(cold["stages_s"]) == {"read", "tokenize", "truncate", "pair", "write"}
    assert all(v is not None for v in cold["stages_s"].values())
    assert all(v is None for v in warm["stages_s"].values())  # reused: nothing prepared
    floor = data_scale.stage_floor(config)
    assert floor["seconds"] >= floor["read_s"] > 0
    scan = data_scale.stage_scan(config)
    assert {"data_fingerprint", "dataset_hash", "example_keys", "sequence_lengths", "batch_plan_shuffled",
            "batch_plan_group_by_length", "resume_batch_shuffled", "resume_batch_group_by_length",
            "generation_prompts"} == set(scan)


@pytest.mark.e2e
def test_data_scale_bench_runs_a_stage_in_its_own_process(hh, tmp_path):
    """One stage (prepare, cold) through the driver: one process of ~10 s of imports, where every stage
    costs that; the others' numbers are test_data_stages'."""
    run([sys.executable, str(ROOT / "bench/data_scale.py"), "--examples", "40", "--hh", str(hh), "--work",
         str(tmp_path / "work"), "--output", str(tmp_path / "out"), "--stages", "prepare", "--dataset-num-proc", "1"])
    (written,) = (tmp_path / "out").glob("40-*.json")  # one file per run: <examples>-<commit>.json
    cold = json.loads(written.read_text())["prepare_cold"]
    assert cold["examples"] == 40 and cold["stages_s"]["write"] is not None
    assert cold["wall_s"] >= cold["seconds"] > 0 and cold["peak_rss_gb"] > 0.05 and cold["process_cpu_s"] > 0
    assert "| 40 |" in (tmp_path / "out/results.md").read_text()
