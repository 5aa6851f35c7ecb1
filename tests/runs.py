"""Helpers for the end-to-end tests: tiny data, run configs, launching runs like a user would."""

import contextlib
import io
import json
import os
import runpy
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from forked import Forked, Ranks, forkable

ROOT = Path(__file__).resolve().parents[1]
# The launchers, run by this interpreter (the venv's bin/ need not be on PATH). torchrun starts the ranks
# of either engine (DeepSpeed reads the same environment variables) about 7 s sooner than the `deepspeed`
# launcher, whose runner and launch.py each import torch and deepspeed before a rank starts; so the tests
# use torchrun's ranks (`ranks`, forked from tests/zygote.py as torchrun would start them; TORCHRUN where
# torchrun itself is the subject: test_preemption), and the `deepspeed` launcher where it is the subject:
# README's `deepspeed --num_gpus` (test_scale's two_zero2_ranks), its exit code on SIGTERM
# (test_preemption) and kto.sbatch's nodes.
DEEPSPEED = [sys.executable, "-m", "deepspeed.launcher.runner"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
TRAIN = [sys.executable, "launch/train.py"]

def write_data(path: Path, n: int = 24) -> Path:
    """n/2 arithmetic prompts, each with a right (desirable) and a wrong (undesirable) answer."""
    rows = []
    for i in range(n // 2):
        a, b = i % 7 + 1, i % 5 + 2
        prompt = f"Question {i}: what is {a} + {b}?"
        rows.append({"prompt": prompt, "completion": f" {a} + {b} = {a + b}.", "label": True})
        rows.append({"prompt": prompt, "completion": f" {a} + {b} = {a + b + 1}.", "label": False})
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def config_file(tmp_path: Path, name: str, model: Path, **overrides) -> Path:
    """A run config for the tiny model: 4 steps of 4 examples, logged every step, fp32, no dropout;
    greedy generations of 2 eval prompts at steps 0, 2 and 4 (when there is eval data). adam_epsilon is
    1e-3, not 1e-8: Adam's update then stays Lipschitz in the gradient (slope <= 1 / eps), so runs that
    round differently end with adapters a derivable distance apart (tests/tolerances.py adapter_atol);
    with 1e-8 a gradient component at float-noise level (lora_A's while lora_B is 0) gets a full step."""
    config = {
        "model_name_or_path": str(model),
        "dataset_name": str(write_data(tmp_path / "data.jsonl")), "eval_fraction": 0.25,
        "output_dir": str(tmp_path / name), "max_length": 64, "max_prompt_length": 32,
        "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2, "learning_rate": 5e-3, "adam_epsilon": 1e-3,
        "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "max_steps": 4, "logging_steps": 1,
        "eval_steps": 2, "save_steps": 2, "disable_tqdm": True, "deepspeed": str(ROOT / "ds_configs/zero2.json"),
        "num_generation_prompts": 2, "max_new_tokens": 8,
    }
    config.update(overrides)
    config.setdefault("generate_during_eval", config["eval_fraction"] > 0)  # generation needs held-out prompts
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Torch's extension builds for the runs, seeded with the lock file a process killed mid-build leaves
# behind: every run in the suite then proves that a start never waits on DeepSpeed's JIT builds (a
# stale lock made every DeepSpeed start on a machine hang forever), and no test touches ~/.cache.
TORCH_EXTENSIONS_DIR = Path(tempfile.mkdtemp(prefix="kto-scale-torch-extensions-"))
(TORCH_EXTENSIONS_DIR / "deepspeed_shm_comm").mkdir()
(TORCH_EXTENSIONS_DIR / "deepspeed_shm_comm" / "lock").touch()


# The environment pytest started with: what in-process code sets later (torch's inductor, a test's
# monkeypatch) is not the runs' business. Runs get what a test passes them.
_SESSION_ENV = dict(os.environ)


def clean_env(**extra: str) -> dict[str, str]:
    """pytest's starting environment without a parent's torch.distributed variables, offline (no test
    needs the network)."""
    env = {**_SESSION_ENV, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TORCH_EXTENSIONS_DIR": str(TORCH_EXTENSIONS_DIR)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return {**env, **extra}


def _start(command: list[str], env: dict[str, str] | None, fork: bool = True) -> subprocess.Popen | Forked | Ranks:
    """Start `command` from the repo root. `python script.py args`, `python -c code args` and
    `torchrun ... script.py args` (the `ranks` prefix) are forked from tests/zygote.py, which has
    imported what runs import: the same script, environment and exit, ~13 s of CPU sooner per process.
    Any other command, a run whose environment differs from the zygote's in a variable read at import,
    and every run with fork=False or KTO_SCALE_TEST_FORK=0, is a plain subprocess (the ranks:
    torchrun's own)."""
    env = clean_env(**(env or {}))
    if command[0] == "torchrun":  # ranks(n): torchrun --nproc_per_node N --master_port P script args
        if fork and forkable(env, zygotes=int(command[2])):
            return Ranks(int(command[2]), command[4], command[5:], env)
        command = [*TORCHRUN, *command[1:]]
    elif command[0] == sys.executable and (command[1].endswith(".py") or command[1] == "-c"):
        if fork and forkable(env):
            return Forked(command[1:], env)
    # Its own process group, so a timeout kills the launcher and every rank it started (subprocess.run
    # alone would kill only the launcher and leave the ranks running).
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _finish(process: subprocess.Popen | Forked | Ranks, command: list[str], timeout: int) -> subprocess.CompletedProcess:
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill(process)
        stdout, stderr = process.communicate()
        raise AssertionError(f"timed out after {timeout} s: {command}\n{stdout[-4000:]}{stderr[-6000:]}") from None
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def _kill(process: subprocess.Popen | Forked | Ranks) -> None:
    """SIGKILL a started command and every process it started."""
    if isinstance(process, subprocess.Popen):
        os.killpg(process.pid, signal.SIGKILL)
    else:
        process.kill()


def launch(command: list[str], timeout: int = 480, env: dict[str, str] | None = None,
           fork: bool = True) -> subprocess.CompletedProcess:
    """Run a command from the repo root and return how it ended (a timeout fails the test)."""
    return _finish(_start(command, env, fork), command, timeout)


def launch_together(commands: dict[str, list[str]], timeout: int = 300,
                    env: dict[str, str] | None = None) -> dict[str, subprocess.CompletedProcess]:
    """launch() every command at once and return how each ended. For commands that stop within seconds
    (refusals, one-line errors): their cost is the interpreter's start-up, which runs on every core at once."""
    started = {name: _start(command, env) for name, command in commands.items()}
    return {name: _finish(process, commands[name], timeout) for name, process in started.items()}


def run_here(script: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run a launch/ script in this process, from the repo root, as `python script args` would, and return
    how it ended (sys.exit's message goes to stderr, exit code 1, as the interpreter does it). For scripts
    that answer without starting ranks (the planner): this process has already imported what they need,
    a subprocess would spend ~10 s of CPU importing it again. Log records go to pytest, not to stderr."""
    out, err, code = io.StringIO(), io.StringIO(), 0
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(ROOT)
        patch.setattr(sys, "argv", [script, *args])
        for key, value in (env or {}).items():
            patch.setenv(key, value)
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                runpy.run_path(script, run_name="__main__")
        except SystemExit as exit:
            if isinstance(exit.code, str):
                err.write(exit.code + "\n")
            code = 1 if isinstance(exit.code, str) else exit.code or 0
    return subprocess.CompletedProcess([script, *args], code, out.getvalue(), err.getvalue())


def run(command: list[str], timeout: int = 480) -> subprocess.CompletedProcess:
    """launch() a command; fail the test with its output if it fails."""
    result = launch(command, timeout)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-6000:]
    return result


def run_together(commands: dict[str, list[str]], timeout: int = 480) -> dict[str, subprocess.CompletedProcess]:
    """launch_together() commands that must all succeed; fail the test with the output of one that does not.
    For independent one-process runs: each uses one core (OMP_NUM_THREADS=1), so on two cores a pair
    takes about the time of one."""
    results = launch_together(commands, timeout)
    for name, result in results.items():
        assert result.returncode == 0, f"{name}:\n{result.stdout[-4000:]}{result.stderr[-6000:]}"
    return results


def ranks(num_ranks: int) -> list[str]:
    """torchrun for num_ranks ranks on this machine, on a port of their own: forked by _start as torchrun
    starts them (forked.Ranks), or torchrun itself if they cannot be forked."""
    return ["torchrun", "--nproc_per_node", str(num_ranks), "--master_port", str(free_port())]


def torchrun(num_ranks: int, config: Path, *args: str, script: str = "launch/train.py") -> subprocess.CompletedProcess:
    """run() `script` on num_ranks ranks (the config's engine: DeepSpeed or FSDP2)."""
    return run([*ranks(num_ranks), script, "--config", str(config), *args])


def deepspeed_run(num_ranks: int, config: Path, *args: str) -> subprocess.CompletedProcess:
    """run() launch/train.py as README's `deepspeed --num_gpus N launch/train.py` does."""
    return run([*DEEPSPEED, "--num_gpus", str(num_ranks), "--master_port", str(free_port()),
                "launch/train.py", "--config", str(config), *args])


def metrics(run_dir: Path, split: str | None = None) -> list[dict]:
    """The lines of a run's metrics.jsonl (of one split, if given)."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [line for line in lines if split in (None, line["split"])]


def generations(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "generations.jsonl").read_text().splitlines()]


def wait_for(condition: Callable[[], bool], timeout: float) -> None:
    """Return once condition() holds; fail after `timeout` s, which bounds a hang and is not a measure
    of speed. It is checked every 0.1 s: that only sets how soon the wait notices, not what is asserted."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"still waiting after {timeout} s"
        time.sleep(0.1)


def signal_after(call: str, calls: int, signal_name: str, ranks: str, command: list[str]) -> subprocess.CompletedProcess:
    """launch() `command` with its launch/ script wrapped by tests/signal_after.py: the processes of
    `ranks` ("all", or one rank) send themselves `signal_name` once `call` ("module:function") returns
    for the `calls`-th time. Return how it ended."""
    script = next(arg for arg in command if arg.startswith("launch/"))
    wrapped = [("tests/signal_after.py" if arg == script else arg) for arg in command]
    return launch(wrapped, env={"SIGNAL_AFTER": f"{call} {calls} {signal_name} {ranks} {script}"})


def die_after_first(call: str, command: list[str]) -> subprocess.CompletedProcess:
    """Run `command` with every process SIGKILLed right after `call` first returns, as if the node went
    down there (signal_after); it must have failed."""
    result = signal_after(call, 1, "SIGKILL", "all", command)
    assert result.returncode != 0, "the run was not killed:\n" + result.stderr[-3000:]
    return result


def kl_ratios_of_step(run_dir: Path, checkpoint: str, step: int) -> tuple[list[list[float]], list[list[bool]]]:
    """A one-rank run's optimizer step `step` (1-based, first epoch), recomputed outside the run from the
    policy saved in `checkpoint` (two separate passes, every pair): per micro-batch, each example's KL
    log-ratio log pi(y'|x) - log pi_ref(y'|x), and which of them the run's kl_pairs_per_step drew."""
    import torch
    from peft import PeftModel

    from kto_scale.collate import BatchPlan, collate
    from kto_scale.config_io import CONFIG_FILE, load_config
    from kto_scale.model import SequenceLogps, load_base_model, load_tokenizer, reference_mode
    from kto_scale.prepare import prepare_data

    config = load_config(["--config", str(run_dir / CONFIG_FILE)])
    tokenizer = load_tokenizer(config)
    train_set, _ = prepare_data(config, tokenizer)
    plan = BatchPlan(len(train_set), config.per_device_train_batch_size, config.gradient_accumulation_steps, 1)
    policy = PeftModel.from_pretrained(load_base_model(config), run_dir / checkpoint)
    module = SequenceLogps(policy)
    ratios = []
    for indices in plan.micro_batches(step_in_epoch=step - 1, epoch=0, seed=config.seed, rank=0):
        batch = collate(train_set, indices, tokenizer.pad_token_id)
        with reference_mode(policy):
            reference_kl = module(**batch["kl"])
        with torch.no_grad():
            ratios.append((module(**batch["kl"]) - reference_kl).tolist())
    return ratios, plan.kl_selection(step, config.seed, 0, config.kl_pairs_per_step)
