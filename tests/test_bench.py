"""bench/bench_trl.py at a tiny size: one warm-up and one timed step of kto-scale and of TRL's KTOTrainer
on the shipped HH slice and the tiny tokenizer (no ../shared, no network)."""

import importlib
import json
import sys
from pathlib import Path

import pytest
from runs import ROOT, run

from kto_scale.assets import TINY_LLAMA_DIR

RUNS = {"kto": "kto-scale, reference on the fly", "trl": "TRL, reference on the fly"}
ROWS, STEPS = 8, 2  # 4 pairs, batches of 4: the warm-up step and the timed step


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    """The bench's --out and --work-dir, side by side."""
    tmp_path = tmp_path_factory.mktemp("bench")
    run([sys.executable, "bench/bench_trl.py", "--data", "data/hh-harmless/train.jsonl.gz",
         "--tokenizer", str(TINY_LLAMA_DIR), "--hidden", "32", "--layers", "1", "--heads", "2", "--intermediate", "64",
         "--pairs", "4", "--batch-size", "4", "--max-length", "128", "--warmup", "1", "--steps", "1",
         "--lr", "1e-2",  # large enough that step 2's loss moves off the untrained 0.5 in both trainers
         "--threads", "1", "--profile", "", "--only", ",".join(RUNS),
         "--out", str(tmp_path / "out"), "--work-dir", str(tmp_path / "work")], timeout=300)
    return tmp_path


def test_both_trainers_ran_the_same_step(bench):
    results = json.loads((bench / "out/results.json").read_text())
    assert list(results["runs"]) == list(RUNS)
    for name in RUNS:
        steps = results["per_step"][name]
        assert [s["step"] for s in steps] == list(range(1, STEPS + 1))
        assert all(s["examples"] == ROWS // STEPS and s["policy_tokens"] > 0 for s in steps)
        assert results["runs"][name]["timed_steps"] == 1 and results["runs"][name]["examples_per_s"] > 0
    check = results["token_check"]
    assert check["passed"]
    rows = check["tokenization"]["trl"]
    assert rows["rows"] == rows["identical_prompt_ids"] == rows["identical_completion_ids"] == ROWS
    counts = check["steps"]["trl"]
    assert all(counts[key]["equal_steps"] == STEPS for key in counts if key != "loss_max_abs_diff")
    assert results["per_step"]["kto"][-1]["loss"] != 0.5  # trained: the losses compared are not both the init's
    assert counts["loss_max_abs_diff"] < 1e-4
    report = (bench / "out/results.md").read_text()
    assert "All checks passed: yes" in report
    for label in RUNS.values():
        assert f"| {label} | " in report


def test_a_missing_step_or_run_is_an_error(bench, monkeypatch):
    """The report's joins are strict: a dropped step or run fails the bench instead of shrinking a table."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    summary = importlib.import_module("summary")
    work = bench / "work"
    spec = json.loads((work / "spec.json").read_text())
    results = {name: json.loads((work / f"result_{name}.json").read_text()) for name in RUNS}
    assert summary.token_check_passed(summary.check_tokens(spec, results, list(RUNS)))
    results["trl"]["steps"].pop(0)
    with pytest.raises(RuntimeError, match="went missing"):
        summary.check_tokens(spec, results, list(RUNS))
    with pytest.raises(KeyError):
        summary.check_tokens(spec, {"kto": results["kto"]}, list(RUNS))
