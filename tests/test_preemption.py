"""Interrupted runs: SIGKILL right after a checkpoint (a node going down) and SIGTERM between checkpoints
(preemption: every rank finishes the step, writes a checkpoint and exits for a requeue), then resumed:
the run is the uninterrupted one, on DeepSpeed ZeRO-3 and on FSDP2."""

import re
from pathlib import Path

import pytest
import torch
from runs import (
    DEEPSPEED,
    ROOT,
    TORCHRUN,
    config_file,
    die_after_first,
    free_port,
    generations,
    metrics,
    ranks,
    run,
    signal_after,
)
from safetensors.torch import load_file
from test_fsdp import FSDP
from test_scale import _adapter

from kto_scale.export import export_adapter
from kto_scale.preemption import REQUEUE_EXIT


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


@pytest.mark.e2e
@pytest.mark.parametrize("engine", ["deepspeed", "fsdp"])
def test_sigkill_then_sigterm_then_resume_equals_the_uninterrupted_run(tmp_path, tiny_model, engine):
    """One run interrupted twice, compared with the uninterrupted run of its config: 2 ranks, 8 steps,
    checkpoints every 3, evaluations and generations every 4, LoRA dropout on (each rank's RNG state must
    be restored). The two interruptions are orthogonal (one is a death the run cannot see, the other a
    signal it handles), and each is checked where it happens (tests/signal_after.py delivers both at a
    fixed point of the run, however fast the machine):
    1. every rank SIGKILLs itself right after the first checkpoint (step 3), as if the node went down:
       `latest` names checkpoint-3 and no adapter is saved;
    2. resumed, rank 1 alone gets SIGTERM as step 5 ends (a scheduler's signal reaching one node first):
       both ranks stop after step 5, with a checkpoint of it (not a save step) and one line saying so,
       and no traceback from the run. On DeepSpeed this run is started by DeepSpeed's launcher, which
       exits 75 for kto.sbatch to requeue; torchrun turns any failed worker into exit 1, so kto.sbatch
       requeues on its own trap too;
    3. resumed again, it logs every step once, those after the first resume exactly as the uninterrupted
       run's (the same ranks, kernels and shapes from the checkpoints' exact state), the same
       generations (those of step 4 kept from the second part, no second step 0) and the same adapter.
    On DeepSpeed, the export then gathers the ZeRO-3 checkpoint's LoRA shards of two ranks into the
    adapter the run saved."""
    options = dict(gradient_accumulation_steps=1, max_steps=8, save_steps=3, eval_steps=4, lora_dropout=0.1,
                   **(FSDP if engine == "fsdp" else {"deepspeed": str(ROOT / "ds_configs/zero3.json")}))

    def command(name: str, *args: str, launcher: list[str] | None = None) -> list[str]:
        config = config_file(tmp_path, name, tiny_model, **options)
        return [*(launcher or ranks(2)), "launch/train.py", "--config", str(config), *args]

    whole, out = tmp_path / "whole", tmp_path / "killed"
    run(command("whole"))
    die_after_first("kto_scale.trainer:save_checkpoint", command("killed"))
    assert (out / "latest").read_text() == "checkpoint-3" and not (out / "adapter").exists()

    # The signal reaches a run started by a real launcher: what it does with a worker's exit is the subject.
    port = str(free_port())
    launcher = ([*DEEPSPEED, "--num_gpus", "2", "--master_port", port] if engine == "deepspeed"
                else [*TORCHRUN, "--nproc_per_node", "2", "--master_port", port])
    stopped = signal_after("kto_scale.trainer:train_step", 2, "SIGTERM", "1",
                           command("killed", "--resume_from_checkpoint", "latest", launcher=launcher))
    assert stopped.returncode == (REQUEUE_EXIT if engine == "deepspeed" else 1), stopped.stderr[-3000:]
    assert (out / "latest").read_text() == "checkpoint-5" and not (out / "adapter").exists()
    assert stopped.stderr.count("stopped by SIGTERM after step 5 of 8; checkpoint-5 is written") == 1
    # torchrun reports a worker's non-zero exit with a traceback of its own; none may come from the run.
    assert not re.search(r'File ".*(kto_scale|launch/train\.py)', stopped.stderr), stopped.stderr[-3000:]

    run(command("killed", "--resume_from_checkpoint", "latest"))
    assert_resumed_equals_whole(whole, out, 3, steps=8)
    assert generations(out) == generations(whole)
    assert [line["step"] for line in generations(out)] == [0, 0, 4, 4, 8, 8]

    if engine == "deepspeed":  # a two-rank ZeRO-3 checkpoint's LoRA shards, gathered by the export
        exported = export_adapter(tiny_model, whole / "checkpoint-6", tmp_path / "exported")
        exported = load_file(exported / "adapter_model.safetensors")
        saved = load_file(whole / "checkpoint-6" / "adapter_model.safetensors")
        assert exported.keys() == saved.keys() and all(torch.equal(exported[k], saved[k]) for k in saved)
