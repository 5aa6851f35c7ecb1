"""launch/evaluate.py: per-example scores and a summary equal to what training logged, in one process (on
two ZeRO-3 ranks: tests/test_sft_adapter.py; on two FSDP2 ranks: tests/test_fsdp.py)."""

import json
import sys

import pytest
from runs import generations, metrics, run
from tolerances import FP32_EPS, run_tolerances

from kto_scale.config import ConfigError, KTOConfig
from kto_scale.evaluate import check_output, evaluate
from kto_scale.outdir import record_owned


def _evaluate(command: list[str], run_dir, output) -> tuple[list[dict], dict]:
    run([*command, "launch/evaluate.py", "--config", str(run_dir / "kto_config.yaml"),
         "--adapter", str(run_dir / "adapter"), "--output", str(output)])
    lines = [json.loads(line) for line in (output / "examples.jsonl").read_text().splitlines()]
    return lines, json.loads((output / "summary.json").read_text())


@pytest.mark.e2e
def test_evaluate_matches_the_runs_final_eval(tmp_path, one_process_run):
    """The summary is the run's final evaluation (the same weights in other batch shapes: within the
    forward's rounding, run_tolerances with the weights 0 apart); each line's numbers
    are the ones behind the summary. A line's reward is beta * (policy - reference) of its own logged
    log-probs, computed the same way in Python: exact. The summary's per-class mean reward and z_ref are
    fp32 reductions of those values: each term rounds up to 3 times (the difference, beta, the product),
    a sum of n terms adds at most (n - 1) roundings of the largest, the division one more, so they are
    within (n + 3) * 2^-24 * max|term| of the exact mean of the lines."""
    lines, summary = _evaluate([sys.executable], one_process_run, tmp_path / "one")
    logged, atol = metrics(one_process_run)[-1], run_tolerances(one_process_run, 0.0)[-1]
    assert logged["split"] == "eval" and summary["examples"] == len(lines) == 6
    for key in ("loss", "kl", "rewards/desirable", "rewards/undesirable", "reward_accuracy"):
        assert summary[key] == pytest.approx(logged[key], abs=atol[key]), key
    for line in lines:
        assert line["reward"] == 0.1 * (line["policy_logp"] - line["reference_logp"])
        assert line["prompt"].startswith("Question") and line["completion"].strip()
        # runs.write_data: the desirable completion of "a + b" states the right sum, the undesirable one not.
        a, b, total = (int(x) for x in line["completion"].strip(" .").replace("+", "=").split("="))
        assert line["label"] == (a + b == total), line
    for label in ("desirable", "undesirable"):  # each line's reward is the one behind the summary
        rewards = [line["reward"] for line in lines if line["label"] == (label == "desirable")]
        mean_atol = (len(rewards) + 3) * FP32_EPS * max(abs(r) for r in rewards)
        assert summary[f"rewards/{label}"] == pytest.approx(sum(rewards) / len(rewards), abs=mean_atol)
    assert [line["row"] for line in lines] == sorted(line["row"] for line in lines)
    # Each line's KL pair log-probs are the ones behind the summary's z_ref (max(0, mean log-ratio)).
    kl = [line["policy_kl_logp"] - line["reference_kl_logp"] for line in lines]
    kl_atol = (len(kl) + 3) * FP32_EPS * max(abs(k) for k in kl)
    assert summary["kl"] == pytest.approx(max(0.0, sum(kl) / len(kl)), abs=kl_atol)
    assert all(line["policy_kl_logp"] != line["policy_logp"] for line in lines)  # the mismatched completion's
    # The final adapter completes the run's generation prompts as the run did at its last step.
    final = [{**line, "step": None} for line in generations(one_process_run)[-2:]]
    assert generations(tmp_path / "one") == final


def test_output_that_holds_the_run_or_an_input_is_refused_before_anything_runs(tmp_path):
    """`--output outputs/run` (a slip for outputs/run/eval) would replace the whole training run,
    adapter included: refused, and nothing in the run is touched."""
    run_dir = tmp_path / "run"
    (run_dir / "adapter").mkdir(parents=True)
    (run_dir / "adapter" / "adapter_config.json").write_text("{}")
    (run_dir / "metrics.jsonl").write_text("{}\n")
    config = KTOConfig(model_name_or_path="org/hub-model", dataset_name=str(tmp_path / "d.jsonl"))
    with pytest.raises(ConfigError, match=r"contains or lies inside the input .*adapter"):
        evaluate(config, run_dir / "adapter", run_dir)
    with pytest.raises(ConfigError, match=r"contains or lies inside the input .*adapter"):
        evaluate(config, run_dir / "adapter", run_dir / "adapter" / "eval")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match=r"holds files an evaluation does not write \(notes.txt\)"):
        evaluate(config, run_dir / "adapter", tmp_path / "mine")
    assert sorted(p.name for p in run_dir.iterdir()) == ["adapter", "metrics.jsonl"]
    assert (tmp_path / "mine" / "notes.txt").read_text() == "mine"
    check_output(tmp_path / "earlier-eval", [run_dir / "adapter"])  # new, or holding only eval files: fine
    (tmp_path / "earlier-eval").mkdir()
    (tmp_path / "earlier-eval" / "summary.json").write_text("{}")
    record_owned(tmp_path / "earlier-eval", ["summary.json"])  # as an earlier evaluation leaves it
    check_output(tmp_path / "earlier-eval", [run_dir / "adapter"])
