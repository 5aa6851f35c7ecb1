"""Interrupted runs: SIGKILL right after a checkpoint (a node going down) and SIGTERM between checkpoints
(preemption: every rank finishes the step, writes a checkpoint and exits for a requeue), then resumed:
the run is the uninterrupted one, on DeepSpeed ZeRO-3 and on FSDP2."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from runs import (
    DEEPSPEED,
    ROOT,
    clean_env,
    config_file,
    die_after_first,
    free_port,
    generations,
    metrics,
    run,
)
from safetensors.torch import load_file
from test_fsdp import FSDP, TORCHRUN
from test_scale import _adapter


def assert_resumed_equals_whole(whole: Path, resumed: Path, resumed_from: int, steps: int) -> None:
    """Every step logged once, those after the resume exactly as the uninterrupted run's, and the same
    adapter: the same ranks run the same kernels on the same shapes from the checkpoint's exact fp32
    state (weights, Adam's moments, RNG), so nothing rounds differently."""
    before, after = metrics(whole, "train"), metrics(resumed, "train")
    assert [m["step"] for m in after] == list(range(1, steps + 1))
    for a, b in zip(before[resumed_from:], after[resumed_from:], strict=True):
        for key in ("loss", "kl", "grad_norm"):
            assert b[key] == a[key], (a["step"], key)
    first, second = _adapter(whole), _adapter(resumed)
    assert first.keys() == second.keys() and all(torch.equal(first[key], second[key]) for key in first)


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
@pytest.mark.parametrize("engine", ["deepspeed", "fsdp"])
def test_sigkill_then_sigterm_then_resume_equals_the_uninterrupted_run(tmp_path, tiny_model, engine):
    """One run interrupted twice, compared with the uninterrupted run of its config: 2 ranks, 16 steps,
    checkpoints every 3, evaluations and generations every 8, LoRA dropout on (each rank's RNG state must
    be restored). The two interruptions are orthogonal (one is a death the run cannot see, the other a
    signal it handles), and each is checked where it happens:
    1. every rank SIGKILLs itself right after the first checkpoint (step 3), as if the node went down:
       `latest` names checkpoint-3 and no adapter is saved;
    2. resumed, the run gets SIGTERM on rank 1 only (a scheduler's signal reaching one node first) after
       step 5 of 16 (the run cannot end before the signal lands, however fast the machine): both ranks
       stop after the same step, with a checkpoint of it and one line saying so (exit 75 under
       DeepSpeed's launcher; torchrun turns any failed worker into exit 1, so kto.sbatch requeues on its
       own trap too), and no traceback from the run;
    3. resumed again, it logs every step once, those after the first resume exactly as the uninterrupted
       run's (the same ranks, kernels and shapes from the checkpoints' exact state), the same
       generations and the same adapter.
    On DeepSpeed, the export command then gathers a ZeRO-3 checkpoint's LoRA shards into the adapter it saved."""
    options = dict(gradient_accumulation_steps=1, max_steps=16, save_steps=3, eval_steps=8, lora_dropout=0.1,
                   **(FSDP if engine == "fsdp" else {"deepspeed": str(ROOT / "ds_configs/zero3.json")}))
    launcher = [*TORCHRUN, "--nproc_per_node", "2"] if engine == "fsdp" else [*DEEPSPEED, "--num_gpus", "2"]

    def command(name: str, *args: str) -> list[str]:
        config = config_file(tmp_path, name, tiny_model, **options)
        return [*launcher, "--master_port", str(free_port()), "launch/train.py", "--config", str(config), *args]

    whole, out = tmp_path / "whole", tmp_path / "killed"
    run(command("whole"))
    die_after_first("kto_scale.trainer:save_checkpoint", command("killed"))
    assert (out / "latest").read_text() == "checkpoint-3" and not (out / "adapter").exists()

    code, stderr = _sigterm_rank_one(command("killed", "--resume_from_checkpoint", "latest"), out, after_step=5)
    stopped = int((out / "latest").read_text().split("-")[1])
    assert code != 0 and 5 <= stopped < 16 and not (out / "adapter").exists(), (code, stderr[-3000:])
    assert stderr.count(f"stopped by SIGTERM after step {stopped} of 16; checkpoint-{stopped} is written") == 1
    # torchrun reports a worker's non-zero exit with a traceback of its own; none may come from the run.
    assert not re.search(r'File ".*(kto_scale|launch/train\.py)', stderr), stderr[-3000:]

    run(command("killed", "--resume_from_checkpoint", "latest"))
    assert_resumed_equals_whole(whole, out, 3, steps=16)
    # generations.jsonl: the lines up to each checkpoint kept (no second step 0), the rest as uninterrupted.
    assert generations(out) == generations(whole)
    assert [line["step"] for line in generations(out)] == [0, 0, 8, 8, 16, 16]

    if engine == "deepspeed":  # a ZeRO-3 checkpoint's LoRA shards, gathered by the export command
        checkpoint = whole / "checkpoint-15"
        run([sys.executable, "launch/merge_lora.py", "--base", str(tiny_model), "--adapter", str(checkpoint),
             "--output", str(tmp_path / "exported"), "--adapter_only"])
        exported = load_file(tmp_path / "exported" / "adapter_model.safetensors")
        saved = load_file(checkpoint / "adapter_model.safetensors")
        assert exported.keys() == saved.keys() and all(torch.equal(exported[k], saved[k]) for k in saved)
