"""A fast check of a GPU machine before the bench (bench/gpu_run.sh runs it): which versions import and
from where, the GPU, a one-rank process group with a collective, and the imports every bench child needs.

    python bench/gpu_check.py          # exits 1 with the reason on the first thing that fails
    python bench/gpu_check.py --cpu    # on a machine without CUDA: the rest, with gloo

It takes seconds, so a broken install or a missing package shows before minutes of benchmarking.
"""

import argparse
import importlib
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("torch", "transformers", "peft", "deepspeed", "trl", "datasets", "accelerate", "huggingface_hub",
            "tokenizers", "safetensors", "pyarrow", "fsspec", "regex", "pydantic", "typing_extensions", "triton",
            "liger_kernel")  # liger_kernel: use_liger_kernel, optional (reported, not required)
# What the bench's children import: kto-scale's trainer and precompute, TRL's trainer, the ZeRO-2 optimizer.
CHILD_IMPORTS = ("kto_scale.trainer", "kto_scale.precompute", "trl.trainer.kto_trainer", "trl.trainer.utils",
                 "deepspeed.runtime.zero.stage_1_and_2",
                 "peft", "datasets", "sentencepiece")


def versions() -> None:
    """Version and location of each package: the carried wheels must win over the image's own."""
    for name in PACKAGES:
        try:
            module = importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 -- report every package, then fail below on the ones needed
            print(f"  {name:18} NOT IMPORTABLE: {type(e).__name__}: {e}")
            continue
        print(f"  {name:18} {getattr(module, '__version__', '?'):24} {module.__file__}")


def check_device(cpu: bool) -> None:
    """The GPU (unless --cpu), then a world of one process with one all-reduce, as kto-scale sets it up."""
    import torch
    import torch.distributed as dist

    if not cpu:
        if not torch.cuda.is_available():
            raise SystemExit(f"torch {torch.__version__} sees no CUDA device: the bench would run on CPU")
        props = torch.cuda.get_device_properties(0)
        print(f"  GPU: {props.name}, {props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs, "
              f"CUDA {torch.version.cuda}")
        a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
        (a @ a).float().sum().item()
    from kto_scale.distributed import init_distributed

    init_distributed(timeout_s=60)  # nccl with CUDA, else gloo
    x = torch.ones(8, device="cpu" if cpu else "cuda")
    dist.all_reduce(x)
    print(f"  {dist.get_backend()} world of 1: all_reduce ok ({x.sum().item():.0f})")
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="a machine without CUDA: check the rest, with gloo")
    args = parser.parse_args()
    start = time.perf_counter()
    print(f"python {sys.version.split()[0]} at {sys.executable}")
    versions()
    for name in CHILD_IMPORTS:
        importlib.import_module(name)  # an ImportError here names the missing package
    import kto_scale

    if Path(kto_scale.__file__).resolve().parents[1] != REPO:
        raise SystemExit(f"kto_scale imports from {kto_scale.__file__}, not from {REPO}: put {REPO} on PYTHONPATH")
    check_device(args.cpu)
    print(f"gpu_check: ok in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
