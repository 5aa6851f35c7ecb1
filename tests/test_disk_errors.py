"""A full disk, a read-only file system, no permission: one line naming the path and the cause from
every launch script, no half-written file, no temporary left, the previous checkpoint kept."""

import errno
import subprocess
import sys
from pathlib import Path

import pytest
from runs import config_file, launch_together

# `python -c _FAILING_WRITES WHERE ERRNO script.py ARGS...` runs a launch script with every Python-level
# write into a path containing WHERE failing as a full disk fails: open() succeeds, write() raises
# OSError(ERRNO), naming no file.
_FAILING_WRITES = """
import builtins, errno, io, os, runpy, sys
where, code, real_open = sys.argv[1], int(sys.argv[2]), io.open

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
sys.argv = sys.argv[3:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _failing(script: str, args: list[str], where: str, code: int) -> list[str]:
    """The command that runs `script` with writes into `where` failing with errno `code`."""
    return [sys.executable, "-c", _FAILING_WRITES, where, str(code), script, *args]


def _assert_one_line(result: subprocess.CompletedProcess, line: str) -> None:
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == line, result.stderr[-3000:]


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.rglob("*") if ".tmp" in p.name or p.name.endswith(".prepared"))


@pytest.fixture(scope="module")
def failed(tmp_path_factory, tiny_model, one_process_run) -> tuple[Path, dict[str, subprocess.CompletedProcess]]:
    """Each launch script with one of its writes failing, all started at once (independent runs of a few
    seconds each): a 4-step run whose checkpoint-4 hits a full disk, a precompute on a read-only file
    system, an evaluation and a merge without the permission or the space to write their output.
    Returns their common directory and how each ended."""
    tmp = tmp_path_factory.mktemp("disk")
    (tmp / "precompute").mkdir()  # its own data file: nothing shared with the training run
    train = config_file(tmp, "run", tiny_model, eval_fraction=0.0)
    precompute = config_file(tmp / "precompute", "c", tiny_model, ref_cache=str(tmp / "cache"))
    return tmp, launch_together({
        "train": _failing("launch/train.py", ["--config", str(train)], ".checkpoint-4.tmp", errno.ENOSPC),
        "precompute": _failing("launch/precompute_ref.py", ["--config", str(precompute)], "train-00000", errno.EROFS),
        "evaluate": _failing("launch/evaluate.py", ["--config", str(one_process_run / "kto_config.yaml"), "--adapter",
                                                    str(one_process_run / "adapter"), "--output", str(tmp / "eval")],
                             ".eval.tmp", errno.EACCES),
        "merge": _failing("launch/merge_lora.py", ["--base", str(tiny_model), "--adapter", str(one_process_run / "adapter"),
                                                   "--output", str(tmp / "merged")], ".merged.tmp", errno.ENOSPC),
    })


@pytest.mark.e2e
def test_a_failed_checkpoint_write_keeps_the_previous_checkpoint(failed):
    tmp, results = failed
    out = tmp / "run"
    _assert_one_line(results["train"], f"error: {out / 'checkpoint-4'}: No space left on device")
    assert (out / "latest").read_text() == "checkpoint-2" and (out / "checkpoint-2" / "trainer_state.json").is_file()
    assert not (out / "checkpoint-4").exists() and _leftovers(out) == []


@pytest.mark.e2e
def test_precompute_evaluate_and_merge_name_the_path_and_the_cause(failed):
    tmp, results = failed
    cache, evaluation, merged = tmp / "cache", tmp / "eval", tmp / "merged"
    _assert_one_line(results["precompute"], f"error: {cache / 'train-00000.safetensors'}: Read-only file system")
    assert _leftovers(cache) == [] and not (cache / "train-00000.safetensors").exists()
    _assert_one_line(results["evaluate"], f"error: {evaluation}: Permission denied")
    _assert_one_line(results["merge"], f"error: {merged}: No space left on device")
    assert not evaluation.exists() and not merged.exists() and _leftovers(tmp) == []
