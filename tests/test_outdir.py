"""What a run owns: the ownership record decides, so a user's files that look like a run's are never
replaced, moved, rotated or deleted (issue 20's four reproductions, and the same for a reference
cache, an evaluation and a merge), and every set-aside run is accounted for."""

import json
import os
from pathlib import Path

import pytest

from kto_scale.checkpoint import CHANGES_FILE, check_resume
from kto_scale.config import ConfigError, KTOConfig
from kto_scale.config_io import save_config
from kto_scale.evaluate import check_output as check_eval_output
from kto_scale.export import ExportError
from kto_scale.export import check_output as check_export_output
from kto_scale.outdir import checkpoints, prepare_output_dir, record_owned, set_aside_previous_run


def _tree(directory: Path) -> dict[str, bytes]:
    """The files under `directory` and their bytes, less kto-scale's lock and ownership record."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*"))
            if p.is_file() and not p.name.startswith(".kto-scale")}


def _config(output: Path, **overrides) -> KTOConfig:
    return KTOConfig(model_name_or_path="m", dataset_name="d.jsonl", output_dir=str(output), **overrides)


def _finished_run(output: Path, **overrides) -> KTOConfig:
    """A run as the trainer makes one, without training: claimed, then its config, metrics and final
    adapter written, no checkpoint (save_steps larger than max_steps)."""
    config = _config(output, **overrides)
    prepare_output_dir(config)
    set_aside_previous_run(config)
    save_config(config, output)
    (output / "metrics.jsonl").write_text('{"step": 1}\n')
    (output / "adapter").mkdir()
    (output / "adapter" / "adapter_config.json").write_text("{}")
    return config


def test_an_sft_adapter_inside_the_output_dir_is_refused_whatever_the_options(tmp_path):
    """Reproduction 1: --sft_adapter T/s/adapter --output_dir T/s destroyed the SFT adapter."""
    (tmp_path / "s" / "adapter").mkdir(parents=True)
    (tmp_path / "s" / "adapter" / "adapter_config.json").write_text("{}")
    before = _tree(tmp_path / "s")
    for options in ({}, {"overwrite_output_dir": True}, {"resume_from_checkpoint": "latest"}):
        config = _config(tmp_path / "s", sft_adapter=str(tmp_path / "s" / "adapter"), **options)
        with pytest.raises(ConfigError, match=r"sft_adapter .*/s/adapter lies inside output_dir"):
            prepare_output_dir(config)
    assert _tree(tmp_path / "s") == before


def test_a_users_files_named_like_a_runs_are_never_touched(tmp_path):
    """Reproduction 2: a folder that never held a run, with the user's own adapter/ and metrics.jsonl."""
    out = tmp_path / "m"
    (out / "adapter").mkdir(parents=True)
    (out / "adapter" / "NOTES.txt").write_text("n")
    (out / "metrics.jsonl").write_text("x")
    before = _tree(out)
    for options in ({}, {"overwrite_output_dir": True}, {"resume_from_checkpoint": "latest"}):
        with pytest.raises(ConfigError, match=r"holds adapter, metrics.jsonl, which no kto-scale run recorded"):
            prepare_output_dir(_config(out, **options))
    assert _tree(out) == before


def test_a_finished_run_without_checkpoints_is_a_run(tmp_path):
    """Reproduction 3: `--resume_from_checkpoint latest` (what kto.sbatch passes) into a finished run
    with no checkpoint started over on top of it. It is refused, or with overwrite_output_dir set aside."""
    out = tmp_path / "r1"
    _finished_run(out)
    before = _tree(out)
    with pytest.raises(ConfigError, match="holds a finished run with no checkpoint to resume"):
        prepare_output_dir(_config(out, resume_from_checkpoint="latest", beta=0.5))
    assert _tree(out) == before
    config = _config(out, resume_from_checkpoint="latest", overwrite_output_dir=True)
    prepare_output_dir(config)
    set_aside_previous_run(config)
    (aside,) = out.glob(".previous-run-*")
    assert _tree(aside) == before


def test_rotation_and_resume_see_only_this_runs_checkpoints(tmp_path):
    """Reproduction 4's cause: a foreign checkpoint-500/ (the HF Trainer's layout) counted as the
    newest checkpoint, so rotation deleted every kto-scale one. Only recorded checkpoints count."""
    out = tmp_path / "q"
    config = _config(out)
    prepare_output_dir(config)
    set_aside_previous_run(config)
    for step in (2, 4):
        record_owned(out, [f"checkpoint-{step}"])
        (out / f"checkpoint-{step}").mkdir()
    (out / "checkpoint-500").mkdir()  # copied in by the user while the run goes on
    assert [p.name for p in checkpoints(out)] == ["checkpoint-2", "checkpoint-4"]


def test_an_evaluation_replaces_only_its_own_earlier_output(tmp_path):
    """A user's summary.json in --output has the name an evaluation writes, but not its record."""
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "summary.json").write_text(json.dumps({"mine": 1}))
    with pytest.raises(ConfigError, match="which no kto-scale run recorded"):
        check_eval_output(tmp_path / "eval", [])


def test_a_merge_replaces_only_its_own_earlier_output(tmp_path):
    """--overwrite into a user's own model dir (config.json + model.safetensors) replaced it."""
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    (tmp_path / "model" / "model.safetensors").write_bytes(b"weights")
    with pytest.raises(ExportError, match="which no kto-scale run recorded"):
        check_export_output(tmp_path / "model", True, [])


def test_resuming_with_settings_that_change_the_optimization_is_explicit(tmp_path):
    """The checkpoint's saved settings are compared with the new ones: beta and learning_rate changed
    are refused with both listed; resume_with_changes continues, logs and records every change, and
    the checkpoint's own kto_config.yaml is left as written. A longer run (max_steps) is no refusal."""
    saved = _config(tmp_path / "run", max_steps=4)
    checkpoint = tmp_path / "run" / "checkpoint-2"
    (checkpoint / "deepspeed").mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text(json.dumps({"step": 2, "world_size": 1, "global_batch_size": 4}))
    save_config(saved, checkpoint)
    written = (checkpoint / "kto_config.yaml").read_bytes()

    changed = _config(tmp_path / "run", max_steps=4, beta=0.5, learning_rate=1e-4)
    with pytest.raises(ConfigError, match=r"beta 0.1 -> 0.5; learning_rate 5e-05 -> 0.0001\. .*--resume_with_changes"):
        check_resume(checkpoint, changed, world_size=1)
    assert not (tmp_path / "run" / CHANGES_FILE).exists()

    check_resume(checkpoint, _config(tmp_path / "run", max_steps=8), world_size=1)
    changed.resume_with_changes = True
    check_resume(checkpoint, changed, world_size=1)
    lines = [json.loads(line) for line in (tmp_path / "run" / CHANGES_FILE).read_text().splitlines()]
    assert [line["changes"] for line in lines] == [{"max_steps": [4, 8]},
                                                  {"beta": [0.1, 0.5], "learning_rate": [5e-05, 1e-4]}]
    assert (checkpoint / "kto_config.yaml").read_bytes() == written


def test_set_aside_runs_are_counted_and_only_our_oldest_removed(tmp_path, caplog):
    """Each set-aside logs its size, how many there are, their total and how to remove one; with
    keep_previous_runs only kto-scale's own oldest set-aside folders go, each named in the log."""
    out = tmp_path / "run"
    _finished_run(out)
    (out / ".previous-run-00000000-000000").mkdir()  # the user's, named like ours: never removed
    asides = []
    for _ in range(3):
        config = _config(out, overwrite_output_dir=True, keep_previous_runs=1)
        prepare_output_dir(config)
        with caplog.at_level("WARNING", logger="kto_scale.outdir"):
            set_aside_previous_run(config)
        (aside,) = set(out.glob(".previous-run-*")) - set(asides) - {out / ".previous-run-00000000-000000"}
        asides.append(aside)
        assert f"was moved to {aside}; 1 set-aside run(s) there hold" in caplog.text
        assert f"`rm -r {aside}`" in caplog.text
        save_config(config, out)
        (out / "adapter").mkdir()
    assert sorted(out.glob(".previous-run-*")) == [out / ".previous-run-00000000-000000", asides[-1]]
    assert f"keep_previous_runs=1: deleting {asides[0]}" in caplog.text
    assert f"keep_previous_runs=1: deleting {asides[1]}" in caplog.text


@pytest.mark.e2e
def test_a_runs_files_are_as_readable_as_the_umask_allows(one_process_run):
    """A team shares run directories: nothing a run writes is made private behind the user's umask
    (files 0666 and directories 0777, less the umask; with the usual 022, group- and world-readable)."""
    umask = os.umask(0)
    os.umask(umask)
    modes = {str(p.relative_to(one_process_run)): (p.stat().st_mode & 0o777, p.is_dir())
             for p in one_process_run.rglob("*")}
    wrong = {name: oct(mode) for name, (mode, is_dir) in modes.items()  # (DeepSpeed copies its scripts 0744)
             if mode & ~0o111 != (0o777 if is_dir else 0o666) & ~umask & ~0o111}
    assert modes and not wrong, wrong
