"""The process group and its collectives: setup, the cross-rank reductions (sums and gathers; the math
on what they carry is the caller's), rank-0-only work whose failure reaches every rank, barrier,
shutdown and the launch scripts' exit. The FSDP2 engine's sharding and checkpoint calls
(torch.distributed.fsdp, torch.distributed.checkpoint) live with it, in kto_scale.fsdp.

One code path for 1 to N ranks: with a single process the reductions are identities. Reductions use
the tensor's own device, so they run on CPU with gloo as well as on GPU with nccl. Every rank must
call every function here the same number of times, in the same order.
"""

import logging
import os
import socket
import sys
from collections.abc import Callable
from datetime import timedelta
from typing import NoReturn, TypeVar

import deepspeed
import torch
import torch.distributed as dist
from torch import Tensor

logger = logging.getLogger(__name__)
T = TypeVar("T")
# Host-side decisions (any_rank) are reduced over gloo on the CPU: reducing them on the GPU would need a
# .item() every step, which makes the host wait until the GPU has run everything queued before it.
# None: the default group is gloo already (CPU runs).
_host_group = None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(timeout_s: int) -> tuple[int, int, int]:
    """Join (or, for a plain `python` run, create) the process group; return (rank, world size, local rank).

    A collective that waits longer than timeout_s for another rank (e.g. one that died) raises instead
    of hanging.
    """
    if "RANK" not in os.environ:  # plain `python launch/train.py`: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "gloo":
        # On CPU, DeepSpeed JIT-compiles a shared-memory all-reduce that only its inference path uses.
        # That build takes a minute on a fresh machine, and a process killed while holding torch's build
        # lock leaves the lock file behind, which hangs every later DeepSpeed start on the machine.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(seconds=timeout_s))
    global _host_group
    _host_group = None if backend == "gloo" else dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    return dist.get_rank(), dist.get_world_size(), local_rank


def is_main_process() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sum over ranks, returned as a new tensor (the input is left as it is)."""
    tensor = tensor.detach().clone()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is True on any: one decision all ranks act on together, taken on
    the host (gloo) without waiting for the GPU."""
    flags = torch.tensor([int(flag)])
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.SUM, group=_host_group)
    return bool(flags.numpy()[0])  # .numpy(): a host tensor by construction (on a device tensor it raises)


def all_gather(tensor: Tensor) -> Tensor:
    """Concatenate every rank's tensor along dim 0, rank order (all ranks must pass the same shape)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def on_main_process(work: Callable[[], T]) -> T | None:
    """Run `work` on rank 0 only and raise its failure on every rank, so that no rank waits at the
    next collective for a rank 0 that already gave up; return its result on every rank (broadcast as
    a pickle: keep it small).

    A ValueError (ConfigError, DataError: the user's input) is re-raised as it is everywhere, so every
    rank prints the same message; any other failure becomes a RuntimeError naming it on the others.
    """
    result, failure = None, None
    if is_main_process():
        try:
            result = work()
        except Exception as error:  # shared below, then raised on every rank
            failure = error
    if dist.is_initialized() and dist.get_world_size() > 1:
        shared = [failure if failure is None or isinstance(failure, ValueError)
                  else RuntimeError(f"rank 0 failed: {type(failure).__name__}: {failure}"), result]
        dist.broadcast_object_list(shared, src=0)
        failure, result = (failure, result) if is_main_process() else shared
    if failure is not None:
        raise failure
    return result


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    """Leave the process group cleanly (gloo aborts the process at exit if it is still alive)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def exit_without_teardown(code: int = 0) -> NoReturn:
    """End a launch script's process once its job has finished and left the process group (`shutdown`),
    skipping the interpreter's teardown.

    Two gloo ranks rarely abort in that teardown ("terminate called without an active exception", exit
    134), after every file of the run is written: a gloo worker thread still holds tensors whose
    destruction needs the interpreter that is being torn down (pytorch PR 179291). Nothing is left to do
    by then: files are written atomically and closed, metrics loggers closed; log handlers and the
    standard streams are flushed here.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
