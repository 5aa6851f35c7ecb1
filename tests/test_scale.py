"""Scale-out: ZeRO configs, simulated multi-node, the effective-batch KL baseline, resume on another rank
count, and failures that stop a run instead of hanging (exact resume after SIGKILL and SIGTERM:
tests/test_preemption.py). Every run is a real subprocess on CPU."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from runs import (
    ROOT,
    TRAIN,
    clean_env,
    config_file,
    deepspeed_run,
    free_port,
    generations,
    launch_together,
    metrics,
    run,
    run_together,
    torchrun,
    wait_for,
    write_data,
)
from safetensors.torch import load_file
from tolerances import LORA_LOGP_SENSITIVITY, adapter_atol, run_tolerances

from kto_scale.assets import TINY_LLAMA_DIR
from kto_scale.config import ConfigError
from kto_scale.config_io import load_config
from kto_scale.engine import resolve_deepspeed_config


def _adapter(run_dir: Path) -> dict:
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def _assert_same_adapter(a: Path, b: Path) -> float:
    """The adapters of two runs of the same global batches in another layout, within adapter_atol of
    `a` (tests/tolerances.py: Adam's rounding per step); returns how far apart they are."""
    first, second = _adapter(a), _adapter(b)
    assert first.keys() == second.keys()
    apart = max(float((first[key] - second[key]).abs().max()) for key in first)
    assert apart <= adapter_atol(a), (apart, adapter_atol(a))
    return apart


def _assert_same_steps(a: Path, b: Path, keys=("loss", "kl", "rewards/desirable", "grad_norm"),
                       splits=("train",), sensitivity: float = LORA_LOGP_SENSITIVITY) -> None:
    """Every logged step's `keys` (those of them a line has; all its numbers, if None) within
    run_tolerances of `a` (tests/tolerances.py: each forward's rounding, and what the weights' measured
    distance moves, through the model's log-prob `sensitivity`)."""
    atols = run_tolerances(a, _assert_same_adapter(a, b), sensitivity)
    ours = [(line, atol) for line, atol in zip(metrics(a), atols, strict=True) if line["split"] in splits]
    theirs = [line for line in metrics(b) if line["split"] in splits]
    assert [(m["split"], m["step"]) for m, _ in ours] == [(m["split"], m["step"]) for m in theirs] and ours
    for (x, atol), y in zip(ours, theirs, strict=True):
        assert x.keys() == y.keys(), (x["split"], x["step"])
        for key in x.keys() & set(keys) if keys else x.keys() - {"split", "time", "examples_per_s", "tokens_per_s"}:
            assert y[key] == pytest.approx(x[key], abs=atol[key]), (x["split"], x["step"], key, atol[key])


_SCONTROL = "#!/bin/bash\nprintf '127.0.0.1\\nnode-b\\n'\n"  # `scontrol show hostnames`: two nodes
_SRUN = """#!/bin/bash
# srun [options] COMMAND...: run COMMAND once per node, as SLURM would on each, and fail if any fails.
while [[ $1 == --* ]]; do shift; done
SLURM_NODEID=0 "$@" & first=$!
SLURM_NODEID=1 "$@" & second=$!
wait $first && wait $second
"""


def run_slurm_script(tmp_path: Path, config: Path) -> subprocess.CompletedProcess:
    """launch/slurm/kto.sbatch for `config` on two simulated nodes of one rank each: stand-ins for
    scontrol and srun start the script's per-node command twice (node 0 and 1) on this machine."""
    shims = tmp_path / "bin"
    shims.mkdir()
    for name, text in (("scontrol", _SCONTROL), ("srun", _SRUN)):
        (shims / name).write_text(text)
        (shims / name).chmod(0o755)
    env = clean_env(PATH=f"{shims}:{Path(sys.executable).parent}:{os.environ['PATH']}", CONFIG=str(config),
                    GPUS_PER_NODE="1", MASTER_PORT=str(free_port()), HOSTFILE=str(tmp_path / "hostfile"),
                    SLURM_JOB_ID="1", SLURM_JOB_NODELIST="node-[a-b]", SLURM_JOB_NUM_NODES="2")
    result = subprocess.run(["bash", "launch/slurm/kto.sbatch"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=480)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


SHARED_PASS = "one forward over prompt + completion + KL completion"  # logged when the reference shares the prompt


def assert_same_run(one: Path, other: Path) -> None:
    """Every logged number (train and eval, every step), the greedy generations and the adapter of `other`
    are those of `one`, within what rounding allows runs that sum the same global batches in another
    order and shape (tests/tolerances.py: adapter_atol, run_tolerances)."""
    _assert_same_steps(one, other, keys=None, splits=("train", "eval"))
    assert generations(other) == generations(one)  # greedy, synced across ranks


@pytest.mark.e2e
def test_two_simulated_nodes_zero3_offload_padding_free_match_one_process(tmp_path, tiny_model, one_process_run):
    """One run that combines what must each leave the numbers alone: launch/slurm/kto.sbatch on two
    simulated nodes (two `deepspeed --hostfile H --no_ssh --node_rank 0|1` launchers, one rank each, as
    on a cluster), ZeRO-3 with parameters and optimizer offloaded to the CPU (LoRA weights gathered from
    every rank to save), padding-free rows, the shared-prompt reference pass, micro-batches by a token
    budget, and the base built by init_random_weights under ZeRO-3, which builds models partitioned. They
    are orthogonal: the launcher places ranks, the engine shards state, padding-free, the shared pass and
    the budget change only how the forwards are cut and shaped (the examples are 25 or 26 tokens, so at
    51 a rank's two examples are one micro-batch or two, the other rank adding a filler micro-batch), and
    the init happens before any of them. It logs and saves what the suite's one-process run (1 rank x 2
    accumulation, ZeRO-2, padded, the tiny_model fixture's weights) does, and its saved base_model/ is
    bit for bit the weights one process initializes (tiny_model)."""
    config = config_file(tmp_path, "nodes", TINY_LLAMA_DIR, init_random_weights=True, gradient_accumulation_steps=1,
                         padding_free=True, max_tokens_per_batch=51, deepspeed=str(ROOT / "ds_configs/zero3_offload.json"))
    result = run_slurm_script(tmp_path, config)
    assert (tmp_path / "hostfile").read_text() == "127.0.0.1 slots=1\nnode-b slots=1\n"
    assert SHARED_PASS in result.stdout + result.stderr
    assert_same_run(one_process_run, tmp_path / "nodes")
    saved, initialized = load_file(tmp_path / "nodes" / "base_model" / "model.safetensors"), load_file(
        tiny_model / "model.safetensors")
    assert saved.keys() == initialized.keys()
    assert [k for k in saved if not torch.equal(saved[k], initialized[k])] == []


@pytest.fixture(scope="module")
def two_zero2_ranks(tmp_path_factory, tiny_model) -> Path:
    """The one-process run's global batch on two ZeRO-2 ranks of one micro-batch each, with the
    reference's two separate passes (x + y, then x + y'); checkpoints at steps 2 and 4."""
    tmp_path = tmp_path_factory.mktemp("two_zero2")
    config = config_file(tmp_path, "two", tiny_model, gradient_accumulation_steps=1, shared_prompt_reference=False)
    assert SHARED_PASS not in deepspeed_run(2, config).stderr
    return tmp_path / "two"


@pytest.mark.e2e
def test_two_zero2_ranks_with_separate_reference_passes_match_one_process(one_process_run, two_zero2_ranks):
    """Two ZeRO-2 ranks with separate reference passes: the one-process run's numbers, which came from
    one shared pass over x + y + y'."""
    assert_same_run(one_process_run, two_zero2_ranks)


@pytest.mark.e2e
def test_slurm_script_refuses_a_short_hostfile(tmp_path):
    shims = tmp_path / "bin"
    shims.mkdir()
    (shims / "scontrol").write_text(_SCONTROL)
    (shims / "scontrol").chmod(0o755)
    env = clean_env(PATH=f"{shims}:{os.environ['PATH']}", CONFIG="configs/demo.yaml", HOSTFILE=str(tmp_path / "h"),
                    SLURM_JOB_ID="1", SLURM_JOB_NODELIST="x", SLURM_JOB_NUM_NODES="3")
    result = subprocess.run(["bash", "launch/slurm/kto.sbatch"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode != 0 and "lists 2 nodes, the allocation has 3" in result.stderr


@pytest.mark.e2e
def test_kl_baseline_is_the_same_for_any_split_of_the_effective_batch(tmp_path, tiny_model):
    """An effective batch of 8 as 1 rank x 4 accumulation x 2, 2 ranks x 2 x 2 and 1 x 1 x 8, with z_ref
    from 3 mismatched pairs drawn per step (kl_pairs_per_step; every pair is the default, which every
    other two-rank run here checks): the same draws, z_ref, loss and gradient norm at every step, and the
    same adapter at the end (fp32). 28 examples: the epoch's last step is short (4 examples and 4
    weight-0 fillers, all on rank 0 under 2x2x2)."""
    common = dict(max_steps=4, eval_fraction=0.0, save_steps=100, learning_rate=1e-2, kl_pairs_per_step=3,
                  dataset_name=str(write_data(tmp_path / "odd.jsonl", 28)))
    layouts = {"1x4x2": (1, 4, 2), "2x2x2": (2, 2, 2), "1x1x8": (1, 1, 8)}
    configs = {name: config_file(tmp_path, name, tiny_model, gradient_accumulation_steps=accumulation,
                                 per_device_train_batch_size=micro, **common)
               for name, (_, accumulation, micro) in layouts.items()}
    run_together({name: [*TRAIN, "--config", str(configs[name])] for name in ("1x4x2", "1x1x8")})  # one rank each
    torchrun(2, configs["2x2x2"])
    for name in ("2x2x2", "1x1x8"):
        _assert_same_steps(tmp_path / "1x4x2", tmp_path / name)


@pytest.mark.e2e
def test_a_dead_rank_stops_the_others_within_the_timeout(tmp_path, tiny_model):
    """Two ranks started without a launcher (as srun or torchrun would); SIGKILL one once the run is
    under way: the other must fail with an error, not hang. Its collectives time out after
    dist_timeout_s=30; the wait's bound (ten times that) only catches a hang, never a slow machine."""
    config = config_file(tmp_path, "dying", tiny_model, gradient_accumulation_steps=1, max_steps=100000,
                         eval_fraction=0.0, save_steps=100000, dist_timeout_s=30)
    port = str(free_port())
    logs = [open(tmp_path / f"rank{r}.log", "w") for r in (0, 1)]  # files: a full pipe would block a rank
    ranks = [subprocess.Popen([*TRAIN, "--config", str(config)], cwd=ROOT, stdout=logs[r], stderr=subprocess.STDOUT,
                              env=clean_env(RANK=str(r), LOCAL_RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                                            MASTER_PORT=port))
             for r in (0, 1)]
    try:
        # Three steps logged: both ranks are inside the training loop, of 100000 steps, so rank 0 is
        # still running when rank 1 dies.
        metrics_file = tmp_path / "dying" / "metrics.jsonl"
        wait_for(lambda: ranks[0].poll() is not None or metrics_file.exists() and metrics_file.read_text().count("\n") >= 3,
                 timeout=300)
        assert ranks[0].poll() is None, "rank 0 stopped before the test killed rank 1"
        ranks[1].kill()
        ranks[0].wait(timeout=300)
    finally:
        for rank in ranks:
            rank.kill()
        for log in logs:
            log.close()
    output = (tmp_path / "rank0.log").read_text()
    assert ranks[0].returncode != 0, output[-3000:]
    # One line saying what failed (the launch script's `error:`), not a traceback.
    assert any(line.startswith("error: ") for line in output.splitlines()), output[-3000:]
    assert "Traceback" not in output, output[-3000:]


def test_contradicting_deepspeed_json_fails_before_loading_anything(tmp_path):
    """A DeepSpeed JSON whose explicit values contradict the training config is refused at once."""
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 3, "gradient_accumulation_steps": "auto",
                                "zero_optimization": {"stage": 2}}))
    config = load_config(["--model_name_or_path", "m", "--dataset_name", "d", "--deepspeed", str(path),
                          "--per_device_train_batch_size", "2"])
    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu=3"):
        resolve_deepspeed_config(config, world_size=1)


_NAN_RUN = """
import sys
from kto_scale import trainer
from kto_scale.config_io import load_config
from kto_scale.usage import run_command

nan_steps, calls, kto_losses = {nan_steps}, [], trainer.kto_losses

def losses_with_nans(*args, **kwargs):  # one micro-batch per step here: the call count is the step
    losses, rewards = kto_losses(*args, **kwargs)
    calls.append(1)
    return (losses * float("nan"), rewards) if len(calls) in nan_steps else (losses, rewards)

trainer.kto_losses = losses_with_nans
run_command(lambda: trainer.train(load_config(sys.argv[1:])))  # as launch/train.py runs it
"""


@pytest.fixture(scope="module")
def nan_runs(tmp_path_factory, tiny_model) -> dict[str, tuple[Path, subprocess.CompletedProcess]]:
    """Two one-process runs whose loss is NaN at optimizer steps 2 and 3 (patched in the child), the second
    with max_bad_steps 2, started at once (6 steps each): {name: (its run dir, how it ended)}."""
    dirs = {name: tmp_path_factory.mktemp(name) for name in ("skipped", "stopped")}
    configs = {name: config_file(tmp, "nan", tiny_model, gradient_accumulation_steps=1, max_steps=6,
                                 eval_fraction=0.0, save_steps=100) for name, tmp in dirs.items()}
    command = [sys.executable, "-c", _NAN_RUN.format(nan_steps={2, 3})]
    results = launch_together({"skipped": [*command, "--config", str(configs["skipped"])],
                               "stopped": [*command, "--config", str(configs["stopped"]), "--max_bad_steps", "2"]})
    return {name: (dirs[name] / "nan", results[name]) for name in dirs}


@pytest.mark.e2e
def test_non_finite_steps_are_skipped_and_counted(nan_runs):
    run_dir, result = nan_runs["skipped"]
    assert result.returncode == 0, result.stderr[-3000:]
    adapter = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    assert all(t.isfinite().all() for t in adapter.values())
    assert metrics(run_dir, "train")[-1]["skipped_steps"] == 2


@pytest.mark.e2e
def test_too_many_bad_steps_in_a_row_stop_the_run(nan_runs):
    _, result = nan_runs["stopped"]
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1].startswith(
        "error: 2 optimizer steps in a row had non-finite gradients (max_bad_steps=2)")


def _cut_after_step_two(whole: Path, resumed: Path) -> Path:
    """A copy of run `whole` as if it had died right after step 2's checkpoint."""
    shutil.copytree(whole, resumed)
    shutil.rmtree(resumed / "checkpoint-4")
    shutil.rmtree(resumed / "adapter")
    (resumed / "latest").write_text("checkpoint-2")
    return resumed


@pytest.mark.e2e
def test_resume_on_fewer_ranks_continues_the_run(tmp_path, tiny_model, two_zero2_ranks):
    """A node lost (2 -> 1 ranks, ZeRO-2): the checkpoint is converted to DeepSpeed's universal layout and
    the run goes on as if uninterrupted, the same global batch of 4 split another way (within
    tests/tolerances.py's run tolerances, and the adapter within adapter_atol). No dropout: random streams are per rank and cannot carry over to another
    rank count."""
    resumed = _cut_after_step_two(two_zero2_ranks, tmp_path / "resumed")
    config = config_file(tmp_path, "resumed", tiny_model, gradient_accumulation_steps=2, shared_prompt_reference=False)
    # The same data file as the run (a resume refuses another dataset_name: issue 20's explicit changes).
    data = load_config(["--config", str(resumed / "kto_config.yaml")]).dataset_name
    run([*TRAIN, "--config", str(config), "--resume_from_checkpoint", "latest", "--dataset_name", data])
    assert (resumed / "checkpoint-2" / "universal").is_dir()
    _assert_same_steps(two_zero2_ranks, resumed)


@pytest.mark.e2e
def test_resume_on_more_ranks_continues_the_run(tmp_path, tiny_model):
    """A node added (1 -> 2 ranks, ZeRO-3): as above, through the universal checkpoint."""
    def config(name: str, ranks: int) -> Path:
        return config_file(tmp_path, name, tiny_model, deepspeed=str(ROOT / "ds_configs/zero3.json"),
                           gradient_accumulation_steps=2 // ranks, max_steps=4, eval_fraction=0.0)

    run([*TRAIN, "--config", str(config("whole", 1))])
    resumed = _cut_after_step_two(tmp_path / "whole", tmp_path / "resumed")
    torchrun(2, config("resumed", 2), "--resume_from_checkpoint", "latest")
    assert (resumed / "checkpoint-2" / "universal").is_dir()
    _assert_same_steps(tmp_path / "whole", resumed)




@pytest.mark.e2e
def test_zero3_gathers_no_weight_outside_the_running_layer(tmp_path, tiny_model):
    """ZeRO-3 gathers a weight whole when a module reads it by attribute inside forward and holds it for
    the rest of the pass (DeepSpeed's "external parameter"): SequenceLogps once read the embedding's
    .weight.dtype, which kept a V x H copy (1 GiB at Llama-3-8B) on every rank through forward and
    backward. And the LM head, which a checkpointed chunk recomputes in backward, stayed gathered until the
    root's backward ended, through the whole decoder's. With DeepSpeed's caches off (no reuse, no
    prefetch), nothing but the running layer's own weights and the always-resident small ones (ds_persist)
    may be gathered when a decoder layer starts, forward or backward."""
    ds = json.loads((ROOT / "ds_configs/zero3.json").read_text())
    ds["zero_optimization"].update(stage3_max_live_parameters=0, stage3_max_reuse_distance=0,
                                   stage3_prefetch_bucket_size=0)
    (tmp_path / "zero3.json").write_text(json.dumps(ds))
    config = config_file(tmp_path, "run", tiny_model, deepspeed=str(tmp_path / "zero3.json"), eval_fraction=0.0)
    out = tmp_path / "gathered.json"
    run([sys.executable, "tests/zero3_gathers.py", str(out), "--config", str(config)])
    gathered = json.loads(out.read_text())
    assert sorted(gathered) == ["backward layer 0", "backward layer 1", "no-grad layer 0", "no-grad layer 1",
                                "training layer 0", "training layer 1"]
    assert gathered == {when: [] for when in gathered}
