"""Preemption: SIGTERM makes every rank finish the step, write a checkpoint and exit for a requeue;
the resumed run is the uninterrupted one."""

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from runs import DEEPSPEED, ROOT, clean_env, config_file, deepspeed_run, free_port
from test_fsdp import FSDP, TORCHRUN
from test_scale import _assert_same_steps, assert_resumed_equals_whole


def _logged_steps(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return sum(1 for line in path.read_text().splitlines() if json.loads(line)["split"] == "train") if path.exists() else 0


def _sigterm_rank_one(command: list[str], run_dir: Path, after_step: int) -> tuple[int, str]:
    """Start a 2-rank run, SIGTERM only its rank 1 once `after_step` is logged (a scheduler's signal
    reaching one node first); return its exit code and stderr."""
    with open(run_dir.with_suffix(".err"), "w") as err:
        job = subprocess.Popen(command, cwd=ROOT, env=clean_env(), start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=err)
        try:
            deadline = time.monotonic() + 300  # bounds a hang only
            while _logged_steps(run_dir) < after_step and job.poll() is None and time.monotonic() < deadline:
                time.sleep(0.1)
            ranks = [p for p in psutil.Process(job.pid).children(recursive=True)
                     if p.environ().get("RANK") == "1" and "launch/train.py" in " ".join(p.cmdline())]
            # Its DataLoader workers share its environment and command line: the rank is their parent.
            (rank_one,) = [p for p in ranks if p.ppid() not in {q.pid for q in ranks}]
            rank_one.send_signal(signal.SIGTERM)
            code = job.wait(timeout=300)
        finally:
            if job.poll() is None:
                os.killpg(job.pid, signal.SIGKILL)
    return code, run_dir.with_suffix(".err").read_text()


@pytest.mark.e2e
def test_sigterm_between_checkpoints_then_resume_equals_the_uninterrupted_run(tmp_path, tiny_model):
    """DeepSpeed (under its launcher) and FSDP2 (under torchrun), 2 ranks, checkpoints every 3 steps:
    SIGTERM to rank 1 after step 4 (of 16: the run cannot end before the signal lands, however fast the
    machine) stops both ranks after the same step, with a checkpoint of it and one
    line saying so (exit 75 under DeepSpeed's launcher; torchrun turns any failed worker into exit 1, so
    kto.sbatch requeues on its own trap too); resumed, the run logs every step once, as the uninterrupted one (DeepSpeed: exactly, the
    same kernels; FSDP2 against DeepSpeed: within tests/tolerances.py's run tolerances)."""
    options = dict(gradient_accumulation_steps=1, max_steps=16, save_steps=3, eval_fraction=0.0)
    deepspeed_run(2, config_file(tmp_path, "whole", tiny_model, **options))
    launchers = {"ds": ([*DEEPSPEED, "--num_gpus", "2"], {}), "fsdp": ([*TORCHRUN, "--nproc_per_node", "2"], FSDP)}
    for name, (launcher, engine) in launchers.items():
        config = config_file(tmp_path, name, tiny_model, **options, **engine)
        command = [*launcher, "--master_port", str(free_port()), "launch/train.py", "--config", str(config)]
        code, stderr = _sigterm_rank_one(command, tmp_path / name, after_step=4)
        out = tmp_path / name
        stopped = int((out / "latest").read_text().split("-")[1])
        assert code != 0 and 4 <= stopped < 16 and not (out / "adapter").exists(), (code, stderr[-3000:])
        assert stderr.count(f"stopped by SIGTERM after step {stopped} of 16; checkpoint-{stopped} is written") == 1
        # torchrun reports a worker's non-zero exit with a traceback of its own; none may come from the run.
        assert not re.search(r'File ".*(kto_scale|launch/train\.py)', stderr), stderr[-3000:]
        resumed = subprocess.run([*command[:-2], "--config", str(config), "--resume_from_checkpoint", "latest"],
                                 cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=480)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        if name == "ds":
            assert_resumed_equals_whole(tmp_path / "whole", out, stopped, steps=16)
        else:
            _assert_same_steps(tmp_path / "whole", out)

