"""A torch.profiler summary of a few training steps of one run (bench_trl.py --torch-profile RUN).

The child profiles steps first .. first + count - 1 (after the warm-up) and writes profile-<run>.json; the
parent turns it into profile-<run>.txt. Time is split by what launched it:

- LM head: kto-scale's LM head chunks (forward; the `bench::lm_head` range of bench/model_init.py);
- attention: sdpa, flash, memory-efficient, cuDNN and flex attention ops;
- matmuls: aten::mm, addmm, bmm, baddbmm, matmul, linear (the LoRA adapters' too; backward matmuls as well);
- optimizer: everything under torch's `Optimizer.step` range;
- other device work: the rest (norms, activations, copies, reductions, the loss);
- host gaps: wall time of the window minus the device's busy time (the union of its kernels' intervals).

On a GPU the categories sum kernel time (the kernels of each CPU op, by the op that launched them); on
CPU, with CPU activities only, they sum the aten ops' self CPU time and "busy" is the union of the top-level
aten ops' intervals (Python ranges and c10d calls count as gaps): the same code, rehearsed where there is
no GPU.
"""

import json
import time
from pathlib import Path

import torch
from model_init import LM_HEAD_RANGE
from torch.profiler import ProfilerActivity, profile

MATMULS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear",
           "aten::_addmm_activation")
ATTENTION = ("scaled_dot_product", "flash", "efficient_attention", "cudnn_attention", "flex_attention")
OPTIMIZER = "Optimizer.step"
CATEGORIES = ("LM head", "attention", "matmuls", "optimizer", "other device work")


class StepProfiler:
    """Profiles steps [first, first + count) of a run: step_begins(k) and step_ends(k) around each step."""

    def __init__(self, settings: dict | None):
        self.settings = settings
        self.profiler = None
        self.start = 0.0

    def step_begins(self, step: int) -> None:
        if self.settings and step == self.settings["first"]:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            self.profiler = profile(activities=activities)
            self.profiler.start()
            self.start = time.perf_counter()

    def step_ends(self, step: int) -> None:
        if self.profiler is not None and step == self.settings["first"] + self.settings["steps"] - 1:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            wall_us = (time.perf_counter() - self.start) * 1e6
            self.profiler.stop()
            summary = summarize(self.profiler.events(), wall_us, self.settings["steps"])
            Path(self.settings["out"]).write_text(json.dumps(summary, indent=2))
            self.profiler = None


def category(event, ancestors: list[str]) -> str:
    if any(name == LM_HEAD_RANGE for name in ancestors):
        return "LM head"
    if any(name.startswith(OPTIMIZER) for name in ancestors):
        return "optimizer"
    if any(key in event.name for key in ATTENTION):
        return "attention"
    if event.name in MATMULS:
        return "matmuls"
    return "other device work"


def union_us(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def summarize(events, wall_us: float, steps: int) -> dict:
    """Time per category, device busy time and host gaps over the profiled window, plus the top ops."""
    on_gpu = any(e.device_type != torch.autograd.DeviceType.CPU for e in events)
    by_category = dict.fromkeys(CATEGORIES, 0.0)
    by_op: dict[str, float] = {}
    busy = []
    for event in events:
        if event.device_type != torch.autograd.DeviceType.CPU:  # a kernel: busy device time
            busy.append((event.time_range.start, event.time_range.end))
            continue
        if not on_gpu:  # CPU only: the aten ops are the work, the rest (Python ranges, c10d) counts as gaps
            if not event.name.startswith("aten::"):
                continue
            if not (event.cpu_parent and event.cpu_parent.name.startswith("aten::")):
                busy.append((event.time_range.start, event.time_range.end))
        spent = sum(k.duration for k in event.kernels) if on_gpu else event.self_cpu_time_total
        if spent <= 0:
            continue
        ancestors, parent = [], event.cpu_parent
        while parent is not None:
            ancestors.append(parent.name)
            parent = parent.cpu_parent
        key = category(event, [event.name, *ancestors])
        by_category[key] += spent
        by_op[event.name] = by_op.get(event.name, 0.0) + spent
    busy_us = min(union_us(busy), wall_us)
    top = sorted(by_op.items(), key=lambda item: -item[1])[:15]
    return {"device": "cuda" if on_gpu else "cpu", "steps": steps, "wall_ms": wall_us / 1e3,
            "busy_ms": busy_us / 1e3, "host_gaps_ms": (wall_us - busy_us) / 1e3,
            "categories_ms": {k: v / 1e3 for k, v in by_category.items()},
            "top_ops_ms": {k: v / 1e3 for k, v in top}}


def write_text(summary: dict, run: str, path: Path) -> None:
    """profile-<run>.txt: the category table, with shares of the window's wall time."""
    wall = summary["wall_ms"]
    busy = "device busy (union of kernel intervals)" if summary["device"] == "cuda" else \
        "busy (union of top-level aten op intervals, CPU only)"
    lines = [f"torch.profiler, run {run}: {summary['steps']} steps after the warm-up, {wall:.1f} ms wall "
             f"({summary['device']})", "", f"{'category':<44} {'ms':>10} {'% of wall':>10}"]
    rows = [*summary["categories_ms"].items(), (busy, summary["busy_ms"]),
            ("host gaps (wall - busy)", summary["host_gaps_ms"])]
    lines += [f"{name:<44} {ms:>10.1f} {100 * ms / wall:>10.1f}" for name, ms in rows]
    lines += ["", "top ops by time (kernel time on a GPU, self CPU time on CPU):"]
    lines += [f"  {name[:60]:<60} {ms:>10.1f}" for name, ms in summary["top_ops_ms"].items()]
    path.write_text("\n".join(lines) + "\n")
