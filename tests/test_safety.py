"""A user's work is never lost and two jobs never write one directory: overwrite_output_dir moves the
old run aside only once the new run passed its checks, and output dirs and caches are locked."""

import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from runs import ROOT, TRAIN, clean_env, config_file, launch, launch_together, ranks, write_data

from kto_scale.config import ConfigError, KTOConfig
from kto_scale.config_io import DEMO_CONFIG, load_config
from kto_scale.export import DTYPES
from kto_scale.outdir import (
    LOCK_FILE,
    OWNED,
    DirectoryBusy,
    prepare_output_dir,
    record_owned,
    set_aside_previous_run,
)


def _files(directory: Path) -> dict[str, bytes]:
    """A run's files and their bytes, less the lock and the tokenized data every run rewrites."""
    files = {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}
    return {k: v for k, v in files.items() if k != LOCK_FILE and not k.startswith("prepared/")}


@pytest.mark.e2e
def test_failed_overwrite_keeps_the_previous_run_and_a_good_one_moves_it_aside(tmp_path, tiny_model, one_process_run):
    """A typo in dataset_name under overwrite_output_dir used to delete adapter/ and every checkpoint."""
    previous = shutil.copytree(one_process_run, tmp_path / "run")
    before = _files(previous)
    config = config_file(tmp_path, "run", tiny_model, overwrite_output_dir=True, max_steps=1, eval_fraction=0.0)
    failed = launch([*TRAIN, "--config", str(config), "--dataset_name", str(tmp_path / "typo.jsonl")])
    assert failed.returncode != 0 and "typo.jsonl: no such file" in failed.stderr
    assert _files(previous) == before

    done = launch([*TRAIN, "--config", str(config)])
    assert done.returncode == 0, done.stderr[-3000:]
    (aside,) = previous.glob(".previous-run-*")
    assert f"moved to {aside}" in done.stderr
    moved = _files(aside)
    for name in ("adapter/adapter_model.safetensors", "checkpoint-4/trainer_state.json", "metrics.jsonl", "latest"):
        assert moved[name] == before[name]
    assert not (previous / "checkpoint-4").exists() and (previous / "adapter").is_dir()


def test_setting_aside_moves_only_what_a_run_recorded(tmp_path):
    """The lock, older set-aside runs and the user's own files stay in place (`prepared/`, where older
    versions kept the tokenized data, is now anyone's unrecorded folder)."""
    for name in ("adapter", "checkpoint-4", "prepared", ".previous-run-20260101-000000", "my-data"):
        (tmp_path / name).mkdir()
    for name in ("metrics.jsonl", "latest", "kto_config.yaml", "my.yaml", LOCK_FILE):
        (tmp_path / name).write_text(name)
    record_owned(tmp_path, ["adapter", "checkpoint-4", "metrics.jsonl", "latest", "kto_config.yaml",
                            ".previous-run-20260101-000000"])
    config = KTOConfig(model_name_or_path="m", dataset_name="d", output_dir=str(tmp_path), overwrite_output_dir=True)
    prepare_output_dir(config)
    set_aside_previous_run(config)
    (aside,) = set(tmp_path.glob(".previous-run-*")) - {tmp_path / ".previous-run-20260101-000000"}
    assert sorted(p.name for p in aside.iterdir()) == [OWNED, "adapter", "checkpoint-4", "kto_config.yaml", "latest",
                                                      "metrics.jsonl"]
    assert sorted(p.name for p in tmp_path.iterdir() if p != aside) == sorted(
        [".previous-run-20260101-000000", LOCK_FILE, OWNED, "my-data", "my.yaml", "prepared"])


def test_overwrite_refuses_an_input_inside_the_output_dir(tmp_path):
    """sft_adapter = the previous run's adapter, output_dir = that run: moving the run aside would take
    the adapter away before it is read, so the run is refused before anything moves."""
    run_dir = tmp_path / "run"
    (run_dir / "adapter").mkdir(parents=True)
    (run_dir / "kto_config.yaml").write_text("{}")
    record_owned(run_dir, ["adapter", "kto_config.yaml"])
    config = KTOConfig(model_name_or_path="m", dataset_name="d.jsonl", output_dir=str(run_dir),
                       overwrite_output_dir=True, sft_adapter=str(run_dir / "adapter"))
    with pytest.raises(ConfigError, match=r"sft_adapter .*adapter lies inside output_dir"):
        prepare_output_dir(config)
    assert (run_dir / "adapter").is_dir() and (run_dir / "kto_config.yaml").is_file()
    config.sft_adapter = str(tmp_path / "elsewhere")
    prepare_output_dir(config)  # an input outside output_dir is fine


_HOLD = """
import sys, time
from kto_scale.outdir import lock_directory
lock_directory(sys.argv[1], "x")
print("locked", flush=True)
time.sleep(120)
"""


@pytest.fixture
def held_lock(tmp_path):
    """A second process holding the lock of tmp_path/run; yields its pid."""
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(tmp_path / "run" / LOCK_FILE)], stdout=subprocess.PIPE,
                              text=True, env=clean_env())
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield holder.pid
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.e2e
def test_a_second_writer_of_an_output_dir_is_refused(tmp_path, held_lock):
    config = KTOConfig(model_name_or_path="m", dataset_name="d", output_dir=str(tmp_path / "run"))
    with pytest.raises(DirectoryBusy, match=f"in use by host {socket.gethostname()} pid {held_lock}"):
        prepare_output_dir(config)


@pytest.mark.e2e
def test_a_second_precompute_into_a_cache_is_refused(tmp_path, tiny_model, held_lock):
    config = config_file(tmp_path, "c", tiny_model, ref_cache=str(tmp_path / "run"))
    result = launch([sys.executable, "launch/precompute_ref.py", "--config", str(config)], timeout=120)
    assert result.returncode != 0
    assert f"error: ref_cache {tmp_path / 'run'} is in use by host {socket.gethostname()} pid {held_lock}" in result.stderr


@pytest.mark.e2e
def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(tmp_path / "run" / LOCK_FILE)], stdout=subprocess.PIPE,
                              text=True, env=clean_env())
    assert holder.stdout.readline().strip() == "locked"
    holder.kill()
    holder.wait()
    prepare_output_dir(KTOConfig(model_name_or_path="m", dataset_name="d", output_dir=str(tmp_path / "run")))


@pytest.mark.e2e
def test_bad_data_fails_every_rank_at_once(tmp_path, tiny_model):
    """Rank 0 finds the data bad: every rank reports it, none waits at a barrier for rank 0."""
    data = write_data(tmp_path / "bad.jsonl")
    data.write_text(data.read_text() + '{"prompt": "p", "completion": "c", "label": "yes"}\n')
    config = config_file(tmp_path, "run", tiny_model, dataset_name=str(data), dist_timeout_s=600)
    result = launch([*ranks(2), "launch/train.py", "--config", str(config)], timeout=240)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert output.count("bad.jsonl, line 25: 'label' is \"yes\", not a boolean") == 2, output[-3000:]


@pytest.mark.e2e
def test_help_on_every_entry_point():
    """`--help` prints usage and every option with its type, default and meaning, for every script; it and
    a mistyped option answer before any heavy library loads (`-X importtime` lists every module the
    process imported: torch is in it whenever anything imported it), the typo as one line `error:`."""
    scripts = sorted((ROOT / "launch").glob("*.py"))
    assert {s.name for s in scripts} >= {"train.py", "precompute_ref.py", "evaluate.py", "merge_lora.py", "plot.py"}
    typo = ["--lerning_rate", "1"]
    mistakes = {"train.py": typo, "precompute_ref.py": ["--config", "configs/demo.yaml", *typo],
                "evaluate.py": ["--adapter", "a", "--output", "o", *typo], "plan.py": typo}
    done = launch_together({**{s.name: [sys.executable, "-X", "importtime", str(s), "--help"] for s in scripts},
                            **{f"{name} typo": [sys.executable, "-X", "importtime", str(ROOT / "launch" / name), *args]
                               for name, args in mistakes.items()}}, timeout=180)
    heavy = {"torch", "transformers", "deepspeed", "peft", "datasets", "pyarrow", "matplotlib"}
    helps = {}
    for name, result in done.items():
        imported = {line.rsplit("|", 1)[1].strip().split(".")[0] for line in result.stderr.splitlines()
                    if line.startswith("import time:")}
        assert "kto_scale" in imported and not imported & heavy, (name, sorted(imported & heavy))
        if name.endswith(" typo"):
            said = [line for line in result.stderr.splitlines() if not line.startswith("import time:")]
            assert result.returncode == 1 and said == ["error: command line: unknown option 'lerning_rate'. Did you "
                                                       "mean 'learning_rate'? (--help lists every option.)"], (name, said)
            continue
        assert result.returncode == 0 and "usage:" in result.stdout, (name, result.stderr[-2000:])
        helps[name] = result.stdout
    for name in ("train.py", "precompute_ref.py", "evaluate.py"):  # the config-driven ones list every option
        assert "--beta FLOAT (default: 0.1)" in helps[name] and "KTO temperature" in helps[name]
        assert "--lora_target_modules LIST (default: None)" in helps[name]
    assert "--adapter" in helps["evaluate.py"] and "--overwrite" in helps["merge_lora.py"]
    assert f"--dtype {{{','.join(sorted(DTYPES))}}}" in helps["merge_lora.py"]  # its own list, torch-free
    sbatch = subprocess.run(["bash", "launch/slurm/kto.sbatch", "--help"], cwd=ROOT, env=clean_env(), text=True,
                            capture_output=True, timeout=60)
    assert sbatch.returncode == 0 and "sbatch --nodes 4 launch/slurm/kto.sbatch" in sbatch.stdout, sbatch.stderr


@pytest.mark.e2e
def test_the_demo_only_without_arguments_and_from_any_directory(tmp_path, monkeypatch):
    """Any argument leaves the demo config out; the demo's paths resolve from its file, wherever one runs."""
    result = subprocess.run([sys.executable, str(ROOT / "launch/train.py"), "--max_steps", "1"], cwd=tmp_path,
                            env=clean_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "error: model_name_or_path is not set" in result.stderr
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="model_name_or_path is not set"):
        load_config(["--beta", "0.2"], default_config=DEMO_CONFIG)
    demo = load_config(["--local_rank=0"], default_config=DEMO_CONFIG)  # what the deepspeed launcher adds
    assert (Path(demo.model_name_or_path) / "config.json").is_file() and Path(demo.dataset_name).is_file()
    assert Path(demo.deepspeed).is_file()
    assert demo.output_dir == "outputs/demo"  # outputs go where the user runs it


def test_no_shipped_config_but_the_demo_overwrites():
    for path in (ROOT / "configs").glob("*.yaml"):
        assert yaml.safe_load(path.read_text()).get("overwrite_output_dir", False) == (path.name == "demo.yaml"), path
