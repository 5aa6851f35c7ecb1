"""The training batches as a torch DataLoader: each optimizer step's micro-batches for this rank, collated
by worker processes while the GPU runs the step before, and pinned so their copy to the GPU does not
block the host.

The loader's sampler is the steps themselves (start_step + 1 .. total_steps) and its dataset maps a step
to this rank's micro-batches as kto_scale.collate.BatchPlan lays them out, so the order, the rank
sharding and a resumed run's position are the plan's: nothing is read or replayed for the steps
before a resume.
"""

import signal

import datasets
import torch
from torch.utils.data import DataLoader, Dataset

from kto_scale.collate import BatchPlan, ReferenceLayout, collate
from kto_scale.config import KTOConfig


class StepBatches(Dataset):
    """Optimizer step (1-based) -> this rank's collated micro-batches of that step (a list of dicts)."""

    def __init__(self, plan: BatchPlan, dataset: datasets.Dataset, rank: int, config: KTOConfig, pad_id: int,
                 reference: ReferenceLayout, cache=None) -> None:
        self.plan, self.rank, self.pad_id, self.reference, self.cache = plan, rank, pad_id, reference, cache
        self.dataset = dataset.with_format("arrow")  # what collate reads; formatted once, not per batch
        self.seed, self.kl_pairs, self.packed = config.seed, config.kl_pairs_per_step, config.padding_free

    def __getitem__(self, step: int) -> list[dict]:
        epoch, step_in_epoch = divmod(step - 1, self.plan.steps_per_epoch)
        micro_batches = self.plan.micro_batches(step_in_epoch, epoch, self.seed, self.rank)
        kl_rows = self.plan.kl_selection(step, self.seed, self.rank, self.kl_pairs)
        return [collate(self.dataset, indices, self.pad_id, self.packed, self.reference, kl, self.cache)
                for indices, kl in zip(micro_batches, kl_rows, strict=True)]


def _ignore_sigterm(worker_id: int) -> None:
    """Workers leave SIGTERM to the main process (kto_scale.preemption), which finishes its step and
    checkpoints; a worker that died first would fail that step. They exit when the main process does."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def train_loader(batches: StepBatches, steps: range, config: KTOConfig, device: torch.device) -> DataLoader:
    """The DataLoader that yields `batches[step]` for each step of `steps`, in order: collated in
    dataloader_num_workers processes (0: in this one, between steps; None: 2 on CUDA, none on CPU, where
    they would take cores from training), up to dataloader_prefetch_factor steps ahead per worker, in
    pinned memory on CUDA (dataloader_pin_memory)."""
    workers = config.dataloader_num_workers
    if workers is None:
        workers = 2 if device.type == "cuda" else 0
    # Its own generator: every iterator draws a seed for its workers, which from torch's global RNG would
    # shift LoRA dropout's stream in a resumed run (whose RNG state the checkpoint restores first).
    return DataLoader(batches, batch_size=None, sampler=steps, num_workers=workers,
                      generator=torch.Generator().manual_seed(config.seed),
                      pin_memory=config.dataloader_pin_memory and device.type == "cuda",
                      prefetch_factor=config.dataloader_prefetch_factor if workers else None,
                      worker_init_fn=_ignore_sigterm if workers else None)
