"""A full disk, a read-only file system, no permission: one line naming the path and the cause from
every launch script, no half-written file, no temporary left, the previous checkpoint kept."""

import errno
import subprocess
import sys
from pathlib import Path

import pytest
from runs import ROOT, clean_env, config_file

# Runs a launch script with every Python-level write into a path containing $FAIL_WRITES_IN failing as
# a full disk fails: open() succeeds, write() raises, naming no file.
_FAILING_WRITES = """
import builtins, errno, io, os, runpy, sys
where, code, real_open = os.environ["FAIL_WRITES_IN"], int(os.environ["FAIL_ERRNO"]), io.open

class Failing:
    def __init__(self, f): self.f = f
    def write(self, data): raise OSError(code, os.strerror(code))
    def __enter__(self): return self
    def __exit__(self, *exc): self.f.close()
    def __getattr__(self, name): return getattr(self.f, name)

def open_(file, mode="r", *args, **kwargs):
    f = real_open(file, mode, *args, **kwargs)
    writing = isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax+")
    return Failing(f) if writing and where in os.fspath(file) else f

builtins.open = io.open = open_
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _run_failing(script: str, args: list[str], where: str, code: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _FAILING_WRITES, script, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=clean_env(FAIL_WRITES_IN=where, FAIL_ERRNO=str(code)))


def _assert_one_line(result: subprocess.CompletedProcess, line: str) -> None:
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == line, result.stderr[-3000:]


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.rglob("*") if ".tmp" in p.name or p.name.endswith(".prepared"))


@pytest.mark.e2e
def test_a_failed_checkpoint_write_keeps_the_previous_checkpoint(tmp_path, tiny_model):
    config = config_file(tmp_path, "run", tiny_model, eval_fraction=0.0)
    out = tmp_path / "run"
    result = _run_failing("launch/train.py", ["--config", str(config)], ".checkpoint-4.tmp", errno.ENOSPC)
    _assert_one_line(result, f"error: {out / 'checkpoint-4'}: No space left on device")
    assert (out / "latest").read_text() == "checkpoint-2" and (out / "checkpoint-2" / "trainer_state.json").is_file()
    assert not (out / "checkpoint-4").exists() and _leftovers(out) == []


@pytest.mark.e2e
def test_precompute_evaluate_and_merge_name_the_path_and_the_cause(tmp_path, tiny_model, one_process_run):
    cache = tmp_path / "cache"
    config = config_file(tmp_path, "c", tiny_model, ref_cache=str(cache))
    result = _run_failing("launch/precompute_ref.py", ["--config", str(config)], "train-00000", errno.EROFS)
    _assert_one_line(result, f"error: {cache / 'train-00000.safetensors'}: Read-only file system")
    assert _leftovers(cache) == [] and not (cache / "train-00000.safetensors").exists()

    evaluation = tmp_path / "eval"
    result = _run_failing("launch/evaluate.py", ["--config", str(one_process_run / "kto_config.yaml"), "--adapter",
                                                 str(one_process_run / "adapter"), "--output", str(evaluation)],
                          ".eval.tmp", errno.EACCES)
    _assert_one_line(result, f"error: {evaluation}: Permission denied")
    assert not evaluation.exists() and _leftovers(tmp_path) == []

    merged = tmp_path / "merged"
    result = _run_failing("launch/merge_lora.py", ["--base", str(tiny_model), "--adapter",
                                                   str(one_process_run / "adapter"), "--output", str(merged)],
                          ".merged.tmp", errno.ENOSPC)
    _assert_one_line(result, f"error: {merged}: No space left on device")
    assert not merged.exists() and _leftovers(tmp_path) == []
