"""bench/data_scale.py end to end at a tiny N: its data stages run and report their numbers (the train
stage is launch/train.py, which the training tests cover)."""

import json
import sys

import pytest
from runs import ROOT, run

HH = {"chosen": "\n\nHuman: Hi?\n\nAssistant: Hello, how can I help?",
      "rejected": "\n\nHuman: Hi?\n\nAssistant: Go away."}


@pytest.mark.e2e
def test_data_scale_bench_runs_its_data_stages(tmp_path):
    hh = tmp_path / "hh.jsonl"
    hh.write_text(json.dumps(HH) + "\n")
    run([sys.executable, str(ROOT / "bench/data_scale.py"), "--examples", "40", "--hh", str(hh), "--work",
         str(tmp_path / "work"), "--output", str(tmp_path / "out"), "--stages", "prepare,floor,reuse,scan"])
    (written,) = (tmp_path / "out").glob("40-*.json")  # one file per run: <examples>-<commit>.json
    results = json.loads(written.read_text())
    # 20 pairs, one HH row cycled: distinct prompts thanks to the tags, so all 40 examples pair up.
    assert results["prepare_cold"]["examples"] == results["prepare_warm"]["examples"] == 40
    assert set(results["prepare_cold"]["stages_s"]) == {"read", "tokenize", "truncate", "pair", "write"}
    assert all(v is not None for v in results["prepare_cold"]["stages_s"].values())
    assert all(v is None for v in results["prepare_warm"]["stages_s"].values())  # reused: nothing prepared
    assert {"dataset_hash", "example_keys", "batch_plan_group_by_length", "resume_batch_shuffled"} <= set(
        results["scan"])
    for stage in ("prepare_cold", "floor_load_dataset_map", "prepare_warm", "scan"):
        assert results[stage]["wall_s"] > 0 and results[stage]["peak_rss_gb"] > 0.05, stage
    assert "| 40 |" in (tmp_path / "out/results.md").read_text()
