"""Batch planning (every example once per epoch, same layout for any rank split) and padding."""

import datasets
import pytest
import torch

from kto_scale.collate import PAD_SLOT, BatchPlan, collate, shard_indices


def _epoch(plan: BatchPlan, epoch: int) -> list[int]:
    """All indices of an epoch in global order: step, then rank, then micro-batch."""
    return [i for step in range(plan.steps_per_epoch) for rank in range(plan.world_size)
            for micro in plan.micro_batches(step, epoch, seed=3, rank=rank) for i in micro]


@pytest.mark.parametrize("n, micro, accumulation, world", [(16, 2, 4, 1), (16, 2, 2, 2), (16, 8, 1, 1), (13, 2, 2, 2)])
def test_each_example_once_per_epoch(n, micro, accumulation, world):
    plan = BatchPlan(n, micro, accumulation, world)
    indices = _epoch(plan, epoch=0)
    assert sorted(i for i in indices if i != PAD_SLOT) == list(range(n))
    assert len(indices) == plan.steps_per_epoch * plan.global_batch_size


def test_same_global_batches_for_any_split():
    """1 rank x 4 accumulation x 2, 2 x 2 x 2 and 1 x 1 x 8 see the same examples in each step."""
    plans = [BatchPlan(24, 2, 4, 1), BatchPlan(24, 2, 2, 2), BatchPlan(24, 8, 1, 1)]
    steps = [[sorted(_epoch(p, 1)[s * 8:(s + 1) * 8]) for s in range(3)] for p in plans]
    assert steps[0] == steps[1] == steps[2]


def test_epochs_are_shuffled_differently():
    plan = BatchPlan(32, 4, 1, 1)
    assert _epoch(plan, 0) != _epoch(plan, 1)
    assert sorted(_epoch(plan, 0)) == sorted(_epoch(plan, 1))


def test_shard_indices_cover_everything_evenly():
    shards = [shard_indices(7, 2, 2, r) for r in range(2)]
    assert len(shards[0]) == len(shards[1])
    flat = [i for s in shards for b in s for i in b if i != PAD_SLOT]
    assert sorted(flat) == list(range(7))


def test_collate_masks_and_filler_rows():
    ds = datasets.Dataset.from_dict({
        "prompt_ids": [[1, 5, 6], [1, 7]], "completion_ids": [[8, 2], [9, 9, 2]],
        "kl_completion_ids": [[9, 9, 2], [8, 2]], "label": [True, False], "pair_id": [-1, -1], "kl_index": [1, 0]})
    batch = collate(ds, [0, 1, PAD_SLOT], pad_id=0)
    policy = batch["policy"]
    assert policy["input_ids"].tolist() == [[1, 5, 6, 8, 2], [1, 7, 9, 9, 2], [1, 5, 6, 8, 2]]
    assert policy["completion_mask"].tolist()[1] == [False, False, True, True, True]
    assert policy["attention_mask"].tolist()[0] == [1, 1, 1, 1, 1]
    assert batch["kl"]["input_ids"].tolist()[0] == [1, 5, 6, 9, 9, 2]
    assert batch["kl"]["attention_mask"].tolist()[1] == [1, 1, 1, 1, 0, 0]
    assert batch["weight"].tolist() == [1.0, 1.0, 0.0]
    assert batch["desirable"].tolist() == [True, False, True]
    assert batch["index"].dtype == torch.long and batch["index"].tolist()[:2] == [0, 1]
    assert batch["tokens"].tolist() == [5, 5, 5] and batch["kl_tokens"].tolist() == [6, 4, 6]  # prompt + KL completion


def test_group_by_length_pads_less_and_still_covers_everything():
    """Length-grouped batches hold similar lengths (less padding than random batches), every example
    still comes once per epoch, and 1 x 4 x 2 and 2 x 2 x 2 still see the same global batches."""
    lengths = tuple(int(x) for x in torch.randint(5, 500, (400,), generator=torch.Generator().manual_seed(0)))
    grouped, plain = BatchPlan(400, 2, 4, 1, lengths), BatchPlan(400, 2, 4, 1)

    def padding(plan: BatchPlan) -> int:
        batches = [[lengths[i] for i in micro if i != PAD_SLOT]
                   for step in range(plan.steps_per_epoch) for micro in plan.micro_batches(step, 0, 3, 0)]
        return sum(max(b) * len(b) - sum(b) for b in batches)

    assert padding(grouped) < padding(plain) / 5
    assert sorted(_epoch(grouped, 0)) == list(range(400))
    two_ranks = BatchPlan(400, 2, 2, 2, lengths)
    assert [sorted(_epoch(grouped, 0)[s:s + 8]) for s in range(0, 400, 8)] == \
        [sorted(_epoch(two_ranks, 0)[s:s + 8]) for s in range(0, 400, 8)]


def test_desirable_count_reads_the_label_column():
    import datasets

    from kto_scale.collate import desirable_count
    data = datasets.Dataset.from_dict({"label": [True, False, True, True]})
    assert desirable_count(data) == 3 and desirable_count(data.select([1, 2])) == 1
