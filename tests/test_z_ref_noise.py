"""bench/z_ref_noise.py against hand computations on tiny synthetic examples.jsonl files."""

import importlib
import json
from pathlib import Path

import pytest
from runs import ROOT


def z_ref_noise(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    return importlib.import_module("z_ref_noise")


def write_examples(path: Path, kl_terms: list[float]) -> Path:
    """An examples.jsonl whose row i has KL term kl_terms[i] (policy_kl_logp - reference_kl_logp)."""
    rows = [{"row": i, "policy_kl_logp": kl - 10.0, "reference_kl_logp": -10.0} for i, kl in enumerate(kl_terms)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def run(monkeypatch, tmp_path, kl_terms, layout, pairs, steps) -> dict:
    examples = write_examples(tmp_path / "examples.jsonl", kl_terms)
    results = z_ref_noise(monkeypatch).main(["--examples", str(examples), "--layout", layout, "--pairs", *pairs,
                                             "--steps", str(steps), "--out", str(tmp_path / "out")])
    assert json.loads((tmp_path / "out/results.json").read_text()) == results
    assert "| micro-batch (TRL) |" in (tmp_path / "out/results.md").read_text()
    return results["layouts"][0]["estimators"]


@pytest.mark.e2e
def test_a_constant_kl_term_has_no_noise_in_any_estimator(monkeypatch, tmp_path):
    # 16 examples, global batch 2 x 2 x 2 = 8: 6 steps are 3 epochs of 2 full batches
    estimators = run(monkeypatch, tmp_path, [0.5] * 16, "2x2x2", ["4", "2", "8"], 6)
    assert list(estimators) == ["effective batch", "sampled 4", "sampled 2", "micro-batch (TRL)"]
    assert [e["pairs"] for e in estimators.values()] == [8, 4, 2, 4]
    for e in estimators.values():
        assert e["mean"] == e["z_ref_mean"] == pytest.approx(0.5)
        for key in ("std", "rmse", "z_ref_std", "z_ref_rmse", "clamped_share", "beta_z_ref_std"):
            assert e[key] == pytest.approx(0.0, abs=1e-7), key


@pytest.mark.e2e
def test_two_terms_by_hand(monkeypatch, tmp_path):
    """KL terms -1 and 3 (mean 1, population std 2), global batch 1 x 2 x 1 = both examples every step.
    Effective batch: always 1. TRL: micro-batches -1 and 3 every step (std 2, RMSE 2, within-step 2),
    z_ref 0 and 3 (mean 1.5, std 1.5, RMSE vs 1 = sqrt((1 + 4) / 2)), half clamped. One sampled pair:
    -1 or 3, 2 away from the mean either way: RMSE 2, as the textbook std of one draw from two."""
    estimators = run(monkeypatch, tmp_path, [-1.0, 3.0], "1x2x1", ["1"], 4)
    full, sampled, trl = estimators["effective batch"], estimators["sampled 1"], estimators["micro-batch (TRL)"]
    assert (full["pairs"], full["mean"], full["std"], full["z_ref_std"], full["srs_std"]) == (2, 1, 0, 0, 0)
    assert trl["estimates"] == 8 and trl["pairs"] == 1
    assert trl["std"] == trl["rmse"] == trl["within_step_std"] == trl["srs_std"] == pytest.approx(2.0)
    assert trl["z_ref_mean"] == trl["z_ref_std"] == pytest.approx(1.5)
    assert trl["z_ref_rmse"] == pytest.approx(2.5**0.5)
    assert trl["clamped_share"] == 0.5 and trl["beta_z_ref_std"] == pytest.approx(0.15)
    assert sampled["pairs"] == 1 and sampled["rmse"] == sampled["srs_std"] == pytest.approx(2.0)


def test_examples_without_kl_fields_are_refused_with_the_fix(monkeypatch, tmp_path):
    path = tmp_path / "old.jsonl"
    path.write_text(json.dumps({"row": 0, "policy_logp": -1.0, "reference_logp": -1.0}) + "\n")
    with pytest.raises(SystemExit, match=r"old.jsonl has no policy_kl_logp.*launch/evaluate.py"):
        z_ref_noise(monkeypatch).main(["--examples", str(path), "--out", str(tmp_path / "out")])
