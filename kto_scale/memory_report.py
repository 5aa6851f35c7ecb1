"""The planner's estimate (kto_scale.plan) at the start of a run and the measured peak beside it at the end.

Logged on rank 0 for its own GPU: the estimate is per GPU, and every rank of a run holds about the
same. It never stops a run: an estimate can be wrong, so a GPU with less memory gets a warning that
names what to change, and the run goes on.
"""

import logging
import os
import resource

import torch

from kto_scale.config import ConfigError, KTOConfig
from kto_scale.distributed import all_gather
from kto_scale.model_shape import read_shape
from kto_scale.plan import GPU_OVERHEAD, Cluster, Estimate, GiB, estimate, largest_micro_batch
from kto_scale.plan_report import what_to_change

logger = logging.getLogger(__name__)


def log_estimate(config: KTOConfig, world_size: int) -> Estimate | None:
    """Log the per-GPU estimate for this run; warn when this GPU's memory is below it. None when the
    planner cannot read this model's shape (logged; training goes on)."""
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or world_size)  # torchrun, deepspeed
    gpu_memory = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory \
        if torch.cuda.is_available() else None
    cluster = Cluster(max(world_size // per_node, 1), per_node, gpu_memory or 0)
    # On CPU the "GPU" is host memory: the framework overhead is what this process holds already
    # (Python, torch, transformers, DeepSpeed, the data), measured, instead of the CUDA allowance.
    overhead = GPU_OVERHEAD if gpu_memory is not None else _rss()
    try:
        shape = read_shape(config)
        result = estimate(config, shape, cluster, overhead=overhead)
    except ConfigError as e:
        logger.info("No memory estimate for this run: %s", e)
        return None
    logger.info("Memory estimate per GPU (launch/plan.py): %.3f GiB (%s).", result.gpu_total / GiB,
                ", ".join(f"{name} {size / GiB:.2f}" for name, size in result.gpu.items()))
    # The peak, not the training total: a quantized base is loaded whole onto every GPU before ZeRO-3
    # partitions it, which can be the larger of the two.
    if gpu_memory is not None and result.gpu_peak > gpu_memory:
        largest = largest_micro_batch(config, shape, cluster)
        when = "while the quantized base loads" if result.gpu_load > result.gpu_total else "in training"
        logger.warning("This GPU has %.1f GiB and the estimate %s is %.1f GiB: the run may run out of memory. To "
                       "fit, change: %s.", gpu_memory / GiB, when, result.gpu_peak / GiB,
                       "; ".join(what_to_change(config, result, largest)))
    return result


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def comparable_estimate(result: Estimate, on_gpu: bool) -> int:
    """What the measured peak of a rank is compared with: on a GPU, torch.cuda.max_memory_allocated,
    which leaves out the CUDA context (the estimate less its allowance); on CPU, peak RSS, where the
    weights a rank holds while loading (host_load) and the training step share one memory."""
    if on_gpu:
        return result.gpu_total - GPU_OVERHEAD
    return max(result.gpu_total, result.host_load // result.ranks_per_node + result.gpu["framework overhead"])


def log_peak(result: Estimate | None, device: torch.device) -> None:
    """Every rank's measured peak beside the estimate (comparable_estimate says what is compared); all
    ranks call (one all-gather)."""
    on_gpu = device.type == "cuda"
    if on_gpu:
        peak, what = torch.cuda.max_memory_allocated(device), "max_memory_allocated"
    else:
        peak, what = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "peak RSS"
    peaks = all_gather(torch.tensor([peak], dtype=torch.int64, device=device)).tolist()
    expected = None if result is None else comparable_estimate(result, on_gpu)
    logger.info("Measured peak memory (%s) per rank: %s GiB%s.", what, ", ".join(f"{p / GiB:.3f}" for p in peaks),
                "" if expected is None else f"; the planner estimated {expected / GiB:.3f} GiB")
