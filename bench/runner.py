"""The runs the bench knows, and running one as its own child process (peak RSS read with os.wait4).

A run is a child command over the shared spec. Another kto-scale variant (an engine, a setting) is one
more `Run` whose `options` are kto-scale command-line options, as kto_zero3 and kto_fsdp are.
"""

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from inputs import REPO


@dataclass(frozen=True)
class Run:
    label: str
    script: str  # in bench/
    args: tuple[str, ...] = ()  # the child's own arguments
    options: tuple[str, ...] = ()  # kto-scale options (after `--`); "{work}" is the spec's work dir
    trains: bool = True  # a training run: one record per optimizer step
    before: str | None = None  # a run that must finish first (its output is this one's input)
    same_batches: bool = True  # step k holds kto's step-k examples: its steps are checked against kto's
    # Its steps' reference forwards, for the model FLOPs: "shared" (one over x + y + y'; "separate" where the
    # attention cannot take that mask), "separate" (x + y and x + y'), None (read from a cache).
    reference: str | None = "shared"


RUNS = {
    "kto": Run("kto-scale, reference on the fly", "runs_kto.py", ("train", "kto")),
    "kto_precompute": Run("kto-scale, launch/precompute_ref.py", "runs_kto.py", ("precompute", "kto_precompute"),
                          ("--ref_cache", "{work}/ref_cache"), trains=False),
    "kto_cache": Run("kto-scale, reference from the disk cache", "runs_kto.py", ("train", "kto_cache"),
                     ("--ref_cache", "{work}/ref_cache"), before="kto_precompute", reference=None),
    "trl": Run("TRL, reference on the fly", "runs_trl.py", ("trl",), reference="separate"),
    "trl_pre": Run("TRL, precompute_ref_log_probs", "runs_trl.py", ("trl_pre", "--precompute"), reference=None),
    "trl_compact": Run("TRL, on the fly, completion-only LM head (its CUDA path)", "runs_trl.py",
                       ("trl_compact", "--compact"), reference="separate"),
    "trl_pre_compact": Run("TRL, precompute, completion-only LM head (its CUDA path)", "runs_trl.py",
                           ("trl_pre_compact", "--precompute", "--compact"), reference=None),
    # Before and after the shared-prompt reference pass (on by default): the same runs with two passes.
    "kto_separate": Run("kto-scale, on the fly, reference in two passes (shared_prompt_reference false)",
                        "runs_kto.py", ("train", "kto_separate"), ("--shared_prompt_reference", "false"),
                        reference="separate"),
    "kto_precompute_separate": Run("kto-scale, launch/precompute_ref.py, two passes (shared_prompt_reference false)",
                                   "runs_kto.py", ("precompute", "kto_precompute_separate"),
                                   ("--ref_cache", "{work}/ref_cache_separate", "--shared_prompt_reference", "false"),
                                   trains=False),
    # z_ref from a quarter of the KL pairs (kl_pairs_per_step): the other examples' KL passes are skipped.
    "kto_kl_quarter": Run("kto-scale, on the fly, kl_pairs_per_step = batch / 4", "runs_kto.py",
                          ("train", "kto_kl_quarter"), ("--kl_pairs_per_step", "{kl_quarter}"), same_batches=False),
    "bare": Run("bare torch.inference_mode() loop", "runs_bare.py", trains=False),
    "kto_grouped": Run("kto-scale, on the fly, group_by_length (other batches)", "runs_kto.py",
                       ("train", "kto_grouped"), ("--group_by_length", "true"), same_batches=False),
    # The engines side by side (the rows above are DeepSpeed ZeRO-2): same model, data and batches.
    "kto_zero3": Run("kto-scale, on the fly, DeepSpeed ZeRO-3", "runs_kto.py", ("train", "kto_zero3"),
                     ("--deepspeed", "ds_configs/zero3.json")),
    "kto_fsdp": Run("kto-scale, on the fly, FSDP2 full_shard", "runs_kto.py", ("train", "kto_fsdp"),
                    ("--fsdp", "full_shard", "--deepspeed", "null")),
}
DEFAULT_RUNS = ("kto", "kto_cache", "trl", "trl_pre", "trl_compact", "trl_pre_compact", "bare")
# The order runs go in, whatever order --only names them: the most important first, so that a time limit
# (--budget) cuts the least important: on the fly against TRL, then cache against TRL's precompute, then
# kto-scale's own variants.
ORDER = ("kto", "trl", "kto_precompute", "kto_cache", "trl_pre", "kto_separate", "kto_precompute_separate",
         "kto_kl_quarter", "trl_compact", "trl_pre_compact", "bare", "kto_grouped", "kto_zero3", "kto_fsdp")


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


def planned(only: list[str]) -> list[str]:
    """The runs to do for --only, in running order, with the runs they need first."""
    unknown = sorted(set(only) - set(RUNS))
    if unknown:
        raise SystemExit(f"--only: unknown runs {', '.join(unknown)}; known: {', '.join(RUNS)}")
    wanted = set(only) | {RUNS[name].before for name in only if RUNS[name].before}
    return [name for name in ORDER if name in wanted]


def busy_cpu_s() -> float:
    """CPU seconds all processes of the machine have used since boot (from /proc/stat)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, idle, iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def child_env() -> dict[str, str]:
    """This environment for a child: this checkout's kto_scale first on the path (whatever pip installed),
    quiet progress bars, no torch.distributed variables of a parent launcher."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false",
           "WANDB_MODE": "disabled", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "TQDM_DISABLE": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def run_child(name: str, spec: dict, timeout: float, profile: Path | None = None, rate: int = 50) -> dict:
    """Run `name` over the spec; return its result JSON plus wall time, CPU time, peak RSS and other load."""
    run, work = RUNS[name], Path(spec["work"])
    result_path, log_path = work / f"result_{name}.json", work / f"log_{name}.txt"
    result_path.unlink(missing_ok=True)
    cmd = [sys.executable, str(REPO / "bench" / run.script), *run.args, "--spec", str(work / "spec.json"),
           "--result", str(result_path)]
    if run.options:
        cmd += ["--", *(option.format(work=work, kl_quarter=max(1, spec["batch_size"] // 4)) for option in run.options)]
    if profile is not None:
        cmd = ["py-spy", "record", "--format", "raw", "--rate", str(rate), "-o", str(profile), "--", *cmd]
    log(f"{name}: {' '.join(cmd[1:])}  (log: {log_path})")
    start, busy_start = time.perf_counter(), busy_cpu_s()
    with open(log_path, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=child_env())
        while not (waited := os.wait4(proc.pid, os.WNOHANG))[0]:
            if time.perf_counter() - start > timeout:
                proc.kill()
                waited = os.wait4(proc.pid, 0)
                break
            time.sleep(0.2)
    _, status, usage = waited
    proc.returncode = code = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
    wall = time.perf_counter() - start
    if code != 0 or not result_path.exists():
        raise RuntimeError(f"{name} failed (exit {code}) after {wall:.0f} s; log tail:\n"
                           f"{log_path.read_text()[-3000:]}")
    result = json.loads(result_path.read_text())
    child_cpu = usage.ru_utime + usage.ru_stime
    # ru_maxrss of the waited child (KiB): its own peak (py-spy's when profiling: not meaningful then)
    result.update(wall_s=wall, peak_rss_mib=usage.ru_maxrss / 1024, rss_source="os.wait4(child).ru_maxrss",
                  child_cpu_s=child_cpu, other_load_cores=max(busy_cpu_s() - busy_start - child_cpu, 0.0) / wall)
    log(f"{name}: done in {wall:.0f} s, peak RSS {result['peak_rss_mib']:.0f} MiB, "
        f"other processes used {result['other_load_cores']:.2f} cores meanwhile")
    return result
