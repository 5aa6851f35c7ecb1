"""The machine and software a result was measured on."""

import os
import platform
import subprocess
from importlib.metadata import version
from pathlib import Path

from inputs import REPO


def git_state() -> dict:
    """The kto-scale commit benchmarked, and its library files that differ from it (work in progress).
    $KTO_SCALE_COMMIT, when set, wins: a copy of the files sent to a lent GPU machine may have no git, or a
    .git of another commit. Without either, None, rather than losing the report at its last line."""
    if os.environ.get("KTO_SCALE_COMMIT"):
        return {"commit": os.environ["KTO_SCALE_COMMIT"], "modified_library_files": None, "git": "from $KTO_SCALE_COMMIT"}

    def git(*cmd: str) -> str:
        return subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True, timeout=30,
                              check=True).stdout.strip()

    try:
        dirty = [line[3:] for line in git("status", "--porcelain").splitlines()
                 if line[3:].startswith(("kto_scale/", "launch/"))]
        return {"commit": git("rev-parse", "--short", "HEAD"), "modified_library_files": dirty}
    except (OSError, subprocess.SubprocessError) as e:
        return {"commit": None, "modified_library_files": None,
                "git": f"not read ({type(e).__name__}): not a git checkout, or no git"}


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def machine_info(threads: int, gpu_name: str | None) -> dict:
    """`gpu_name`: what the children saw (torch.cuda.get_device_name); the parent never initializes CUDA."""
    import torch

    return {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": threads,
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "device": gpu_name or ("CUDA" if torch.cuda.is_available() else "CPU only"), "torch": torch.__version__,
            **{name: version(name) for name in ("transformers", "trl", "peft", "deepspeed")},
            "python": platform.python_version(), "kto_scale": git_state()}
