"""The bench's model in every child: kto-scale's seeded random weights, built on the child's own device.

The parent writes the model's config.json only, and a kto-scale config with `init_random_weights` and
`init_device` (the GPU when there is one: `device()`). The kto-scale children build the weights through
that config (kto_scale.model.load_base_model: kto_scale.random_init's seeded draw on init_device);
the TRL and bare-loop children call the same loader on the same config. So an 8B model is initialized by
the GPU in seconds, not by the host in minutes, and nothing is written to disk or read back. Same
function, seed, shapes and device: the same weights in every run, which each child's checksum (in its
result, compared in the report) confirms.
"""

import time
from collections.abc import Callable

import torch

LM_HEAD_RANGE = "bench::lm_head"  # the torch.profiler range around each LM head call (bench/torch_profile.py)


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def weights_checksum(model: torch.nn.Module) -> str:
    """sum over parameters (by name) of (index + 1) * sum(p) + ||p||, in float64: equal weights give equal
    strings (the same reductions over the same shapes on the same device), a changed tensor or a swapped pair
    almost surely not."""
    total = torch.zeros((), dtype=torch.float64, device=next(model.parameters()).device)
    for index, (_, p) in enumerate(sorted(model.named_parameters(), key=lambda item: item[0])):
        total += (index + 1) * torch.sum(p.detach(), dtype=torch.float64)
        total += torch.linalg.vector_norm(p.detach(), dtype=torch.float64)
    return f"{total.item():.17g}"


def mark_lm_head(model: torch.nn.Module) -> None:
    """Put each call of the model's LM head in a profiler range named LM_HEAD_RANGE (forward only: its
    backward runs in autograd's thread, outside the range, and counts as matmuls)."""
    ranges = []

    def enter(module, args):
        ranges.append(torch.autograd.profiler.record_function(LM_HEAD_RANGE))
        ranges[-1].__enter__()

    def leave(module, args, output):
        ranges.pop().__exit__(None, None, None)

    head = model.get_output_embeddings()
    head.register_forward_pre_hook(enter)
    head.register_forward_hook(leave)


def recorded(load: Callable[..., torch.nn.Module], record: dict, profiled: bool = False) -> Callable[..., torch.nn.Module]:
    """kto-scale's `load_base_model`, which also puts in `record` how long it took, the device the weights
    are on and their checksum. `profiled`: mark the LM head's calls."""

    def load_and_record(*args, **kwargs) -> torch.nn.Module:
        start = time.perf_counter()
        model = load(*args, **kwargs)
        record.update(init_s=time.perf_counter() - start, built_on=str(next(model.parameters()).device),
                      checksum=weights_checksum(model))
        if profiled:
            mark_lm_head(model)
        return model

    return load_and_record


def load_bench_model(spec: dict, record: dict):
    """The base model of the kto-scale runs, for a child that does not run kto-scale (TRL, the bare loop):
    kto-scale's loader on the bench's kto-scale config (the same seed, dtype, attention and device)."""
    from kto_scale.config_io import load_config
    from kto_scale.model import load_base_model

    load = recorded(load_base_model, record, profiled="torch_profile" in spec)
    return load(load_config(["--config", spec["kto_config"]]))
