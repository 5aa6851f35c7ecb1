"""What every child process measures about itself, and how it reads its spec and writes its result."""

import argparse
import json
import resource
from pathlib import Path

# Token counts of one micro-batch, as every training child records them (and the report compares).
BATCH_KEYS = ("policy_tokens", "policy_padded", "completion_tokens",
              "kl_tokens", "kl_padded", "kl_completion_tokens")


def maxrss_mib() -> float:
    """Peak resident set size of this process so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def rss_mib() -> float:
    """Current resident set size of this process."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("/proc/self/status has no VmRSS line: the bench reads memory the Linux way")


def gpu_usage() -> dict:
    """This process's GPU and its peak allocated memory over the whole run (never reset); None on CPU."""
    import torch

    if not torch.cuda.is_available():
        return {"gpu_name": None, "gpu_peak_mib": None}
    return {"gpu_name": torch.cuda.get_device_name(), "gpu_peak_mib": torch.cuda.max_memory_allocated() / 2**20}


def padding_mask(sequences: dict):
    """The attention mask of padded inputs; all ones for packed (padding-free) ones."""
    import torch

    if "attention_mask" in sequences:
        return sequences["attention_mask"]
    return torch.ones_like(sequences["input_ids"])


def batch_stats(attention_mask, completion_mask, kl_attention_mask, kl_completion_mask, rows: int) -> dict:
    """Token counts of one micro-batch: non-pad and padded (B*T) for the example and KL sequences."""
    return {
        "rows": rows,
        "policy_tokens": int(attention_mask.sum()),
        "policy_padded": int(attention_mask.numel()),
        "completion_tokens": int(completion_mask.sum()),
        "kl_tokens": int(kl_attention_mask.sum()),
        "kl_padded": int(kl_attention_mask.numel()),
        "kl_completion_tokens": int(kl_completion_mask.sum()),
    }


def child_args(description: str, extra=None, argv: list[str] | None = None) -> tuple[argparse.Namespace, dict]:
    """The command line every child takes (--spec, --result, plus the options `extra` adds), and the spec;
    torch gets the spec's thread count."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--spec", type=Path, required=True, help="spec.json the parent wrote (bench/inputs.py)")
    parser.add_argument("--result", type=Path, required=True, help="where this child writes its result JSON")
    if extra is not None:
        extra(parser)
    args = parser.parse_args(argv)
    spec = json.loads(args.spec.read_text())
    import torch

    torch.set_num_threads(spec["threads"])
    return args, spec


def write_result(path: Path, result: dict) -> None:
    """The child's result, with its GPU usage (every child reports it, so the parent never touches CUDA)."""
    path.write_text(json.dumps({**result, **gpu_usage()}))
