"""launch/evaluate.py: per-example scores and a summary equal to what training logged, on 1 and 2 ranks."""

import json
import sys

import pytest
from runs import DEEPSPEED, free_port, generations, metrics, run

from kto_scale.config import ConfigError, KTOConfig
from kto_scale.evaluate import check_output, evaluate
from kto_scale.outdir import record_owned


def _evaluate(command: list[str], run_dir, output) -> tuple[list[dict], dict]:
    run([*command, "launch/evaluate.py", "--config", str(run_dir / "kto_config.yaml"),
         "--adapter", str(run_dir / "adapter"), "--output", str(output)])
    lines = [json.loads(line) for line in (output / "examples.jsonl").read_text().splitlines()]
    return lines, json.loads((output / "summary.json").read_text())


@pytest.mark.e2e
def test_evaluate_matches_the_runs_final_eval_on_any_number_of_ranks(tmp_path, one_process_run):
    lines, summary = _evaluate([sys.executable], one_process_run, tmp_path / "one")
    logged = metrics(one_process_run, "eval")[-1]
    assert summary["examples"] == len(lines) == 6
    for key in ("loss", "kl", "rewards/desirable", "rewards/undesirable", "reward_accuracy"):
        assert summary[key] == pytest.approx(logged[key], abs=1e-5), key
    for line in lines:
        assert line["reward"] == pytest.approx(0.1 * (line["policy_logp"] - line["reference_logp"]), abs=1e-6)
        assert line["prompt"].startswith("Question") and line["completion"].strip()
        # runs.write_data: the desirable completion of "a + b" states the right sum, the undesirable one not.
        a, b, total = (int(x) for x in line["completion"].strip(" .").replace("+", "=").split("="))
        assert line["label"] == (a + b == total), line
    for label in ("desirable", "undesirable"):  # each line's reward is the one behind the summary
        rewards = [line["reward"] for line in lines if line["label"] == (label == "desirable")]
        assert summary[f"rewards/{label}"] == pytest.approx(sum(rewards) / len(rewards), abs=1e-5)
    assert [line["row"] for line in lines] == sorted(line["row"] for line in lines)
    # Each line's KL pair log-probs are the ones behind the summary's z_ref (max(0, mean log-ratio)).
    kl_mean = sum(line["policy_kl_logp"] - line["reference_kl_logp"] for line in lines) / len(lines)
    assert summary["kl"] == pytest.approx(max(0.0, kl_mean), abs=1e-5)
    assert all(line["policy_kl_logp"] != line["policy_logp"] for line in lines)  # the mismatched completion's
    # The final adapter completes the run's generation prompts as the run did at its last step.
    final = [{**line, "step": None} for line in generations(one_process_run)[-2:]]
    assert generations(tmp_path / "one") == final

    two_lines, two_summary = _evaluate([*DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port())],
                                       one_process_run, tmp_path / "two")
    assert two_summary == pytest.approx(summary, abs=1e-5)
    assert [line["row"] for line in two_lines] == [line["row"] for line in lines]
    kl_logps = [[line[key] for line in lines] for key in ("policy_kl_logp", "reference_kl_logp")]
    assert [[line[key] for line in two_lines] for key in ("policy_kl_logp", "reference_kl_logp")] == [
        pytest.approx(column, abs=1e-5) for column in kl_logps]
    assert generations(tmp_path / "two") == final


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
