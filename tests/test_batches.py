"""Micro-batches by token budget (BatchPlan with max_tokens) and the DataLoader that collates the steps
(kto_scale.batches): the budget is kept, every example comes once per epoch, a step holds the same
examples for any rank count, every rank runs as many micro-batches, and a resumed run's batches are
the suffix of an uninterrupted run's."""

import datasets
import numpy as np
import pytest
import torch

from kto_scale.batches import StepBatches, train_loader
from kto_scale.collate import PAD_SLOT, BatchPlan, ReferenceLayout
from kto_scale.config import KTOConfig

N, BUDGET = 37, 300  # 37: the epoch's last global batch is short (37 = 4 x 8 + 5)
TOKENS = np.random.default_rng(0).integers(20, 200, N)
TOKENS[[3, 17]] = 450  # longer than the budget: each must be a micro-batch alone


def _plan(world: int, accumulation: int, max_tokens: int | None = BUDGET) -> BatchPlan:
    """Global batch 8 (micro-batch 2 rows) on any rank count."""
    return BatchPlan(N, 2, accumulation, world, None, max_tokens, TOKENS)


def _step(plan: BatchPlan, step: int, epoch: int = 0) -> list[list[list[int]]]:
    """[rank][micro-batch] example indices of one step (0-based within the epoch)."""
    return [plan.micro_batches(step, epoch, 7, rank) for rank in range(plan.world_size)]


@pytest.mark.parametrize("world, accumulation", [(1, 4), (2, 2), (4, 1)])
def test_budget_kept_every_example_once_and_ranks_in_step(world, accumulation):
    plan, seen = _plan(world, accumulation), []
    for step in range(plan.steps_per_epoch):
        ranks = _step(plan, step)
        assert len({len(micro_batches) for micro_batches in ranks}) == 1  # the same count on every rank
        fillers = [sum(m == [PAD_SLOT] for m in micro_batches) for micro_batches in ranks]
        assert min(fillers) == 0  # as many as the rank with the most needs, no more
        for micro_batches, filler in zip(ranks, fillers, strict=True):
            assert all(m == [PAD_SLOT] for m in micro_batches[len(micro_batches) - filler:])  # fillers last
            for micro in micro_batches[: len(micro_batches) - filler]:
                assert PAD_SLOT not in micro
                assert TOKENS[micro].sum() <= BUDGET or len(micro) == 1
                seen += micro
    assert sorted(seen) == list(range(N))


def test_budget_fills_micro_batches_greedily_in_order():
    """1 rank: each micro-batch is cut exactly where the next example would exceed the budget."""
    plan = _plan(1, 4)
    for step in range(plan.steps_per_epoch):
        micro_batches = plan.micro_batches(step, 0, 7, 0)
        flat = [i for m in micro_batches for i in m]
        assert flat == plan.epoch_order(0, 7)[step * 8 : step * 8 + 8].tolist()
        for first, second in zip(micro_batches, micro_batches[1:], strict=False):
            assert TOKENS[first].sum() + TOKENS[second[0]] > BUDGET


def test_a_step_holds_the_same_examples_for_any_rank_count_and_budget():
    """Step membership is the row plan's: 1 x 4, 2 x 2 and 4 x 1 ranks x accumulation, with or
    without a token budget; the KL pairs drawn for the step are the same examples too."""
    plans = [_plan(1, 4), _plan(2, 2), _plan(4, 1), _plan(2, 2, max_tokens=None)]
    for step in range(plans[0].steps_per_epoch):
        members = [sorted(i for r in _step(p, step) for m in r for i in m if i != PAD_SLOT) for p in plans]
        assert members[0] == members[1] == members[2] == members[3]
        kl = []
        for p in plans:
            pairs = [(i, chosen) for rank in range(p.world_size)
                     for m, c in zip(p.micro_batches(step, 0, 7, rank), p.kl_selection(step + 1, 7, rank, 3),
                                     strict=True)
                     for i, chosen in zip(m, c, strict=True) if i != PAD_SLOT]
            kl.append(sorted(i for i, chosen in pairs if chosen))
        assert kl[0] == kl[1] == kl[2] == kl[3] and len(kl[0]) <= 3


def test_without_a_budget_the_plan_is_unchanged():
    """max_tokens None: micro_batch_size rows, filler slots at the end of the epoch (the old layout)."""
    plan = BatchPlan(13, 2, 2, 2)
    order = plan.epoch_order(0, 7).tolist() + [PAD_SLOT] * 3
    assert [plan.micro_batches(1, 0, 7, r) for r in range(2)] == [[order[8:10], order[10:12]],
                                                                   [order[12:14], order[14:16]]]


@pytest.fixture(scope="module")
def rows() -> datasets.Dataset:
    lengths = np.random.default_rng(1).integers(2, 9, (N, 3))
    return datasets.Dataset.from_dict({
        "prompt_ids": [list(range(1, 1 + p)) for p, _, _ in lengths],
        "completion_ids": [list(range(10, 10 + c)) for _, c, _ in lengths],
        "kl_completion_ids": [list(range(20, 20 + k)) for _, _, k in lengths],
        "label": [bool(i % 2) for i in range(N)], "pair_id": [-1] * N})


def test_resumed_loader_gives_the_suffix_of_the_uninterrupted_one(rows):
    """The loader of a run resumed after step 3 yields exactly the uninterrupted run's batches of steps
    4.., with a budget and 2 ranks (each rank's own batches). Collated in this process: through a worker
    the batches are the same objects sent by torch's IPC (tests/test_step_syncs.py runs one)."""
    config = KTOConfig(padding_free=True, max_tokens_per_batch=20, dataloader_num_workers=0, seed=7,
                       kl_pairs_per_step=5)
    plan = BatchPlan(N, 2, 2, 2, None, 20, np.array([len(p) + max(len(c), len(k)) for p, c, k in
                                                     zip(rows["prompt_ids"], rows["completion_ids"],
                                                         rows["kl_completion_ids"], strict=True)]))
    for rank in range(2):
        batches = StepBatches(plan, rows, rank, config, 0, ReferenceLayout.SHARED)
        whole = list(train_loader(batches, range(1, 11), config, torch.device("cpu")))
        resumed = list(train_loader(batches, range(4, 11), config, torch.device("cpu")))
        assert len(whole) == 10 and len(resumed) == 7
        for a, b in zip(whole[3:], resumed, strict=True):
            assert len(a) == len(b)
            for x, y in zip(a, b, strict=True):
                assert x["index"].tolist() == y["index"].tolist()
                assert torch.equal(x["reference"]["input_ids"], y["reference"]["input_ids"])
                assert torch.equal(x["kl_rows"], y["kl_rows"]) and torch.equal(x["weight"], y["weight"])
        # The steps of the epoch's second pass (steps 6..10) reshuffle: epoch 1 is not epoch 0 again.
        assert [b["index"].tolist() for b in whole[5]] != [b["index"].tolist() for b in whole[0]]
