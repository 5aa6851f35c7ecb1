"""kl_pairs_per_step: z_ref from a fixed number of KL pairs per optimizer step, drawn from the effective
batch. The draw (the same on any number of ranks and every step its own), the collated subset, and a
run whose logged z_ref is recomputed here from the drawn pairs alone, on 1 rank and on 2. And
kl_baseline micro_batch: a run whose logged z_ref is the mean of its micro-batches'."""

import subprocess
from pathlib import Path

import datasets
import pytest
import torch
from runs import TRAIN, config_file, kl_ratios_of_step, launch_together, metrics
from tolerances import run_tolerances

from kto_scale.collate import PAD_SLOT, BatchPlan, ReferenceLayout, collate
from kto_scale.config import ConfigError
from kto_scale.config_io import load_config
from kto_scale.loss import kl_baseline


def _global_selection(plan: BatchPlan, step: int, pairs: int) -> list[bool]:
    """The draw of every rank, in global-batch order (rank, then micro-batch, then row)."""
    return [chosen for rank in range(plan.world_size)
            for micro in plan.kl_selection(step, seed=5, rank=rank, pairs=pairs) for chosen in micro]


def test_the_draw_is_the_same_on_any_number_of_ranks_and_changes_per_step():
    """Global batch 16 as 1 x 4 x 4, 2 x 2 x 4 and 4 x 1 x 4: 5 slots chosen, the same ones; another
    step draws other slots; pairs 0 (or the whole batch) keeps every slot."""
    plans = [BatchPlan(64, 4, 4, 1), BatchPlan(64, 4, 2, 2), BatchPlan(64, 4, 1, 4)]
    draws = [_global_selection(plan, step=3, pairs=5) for plan in plans]
    assert sum(draws[0]) == 5 and draws[0] == draws[1] == draws[2]
    assert _global_selection(plans[0], step=4, pairs=5) != draws[0]
    assert all(_global_selection(plans[1], step=3, pairs=pairs) == [True] * 16 for pairs in (0, 16))


def test_collate_scores_only_the_drawn_pairs():
    """Rows 0 and 2 of 3 drawn: the KL inputs hold their pairs alone, with their weights; with none
    drawn, one weight-0 pair (row 0's) keeps the KL passes running on every rank."""
    ds = datasets.Dataset.from_dict({
        "prompt_ids": [[1, 5], [1, 6], [1, 7]], "completion_ids": [[8, 2], [9, 2], [4, 2]],
        "kl_completion_ids": [[9, 2], [4, 2], [8, 3, 2]], "label": [True, False, True], "pair_id": [-1, -1, -1]})
    batch = collate(ds, [0, 1, PAD_SLOT], pad_id=0, kl=[True, False, True], reference=ReferenceLayout.SHARED)
    assert batch["kl"]["input_ids"].tolist() == [[1, 5, 9, 2], [1, 5, 9, 2]]  # row 2 is a filler copy of row 0
    assert batch["kl_rows"].tolist() == [0, 2] and batch["kl_weight"].tolist() == [1.0, 0.0]
    assert batch["reference"]["input_ids"].tolist()[1] == [1, 6, 9, 2, 0, 0]  # row 1 without its y'
    assert batch["reference"]["score_sequences"].tolist() == [0, 0, 3, 3, 1, 1, 2, 2, 5, 5]
    none = collate(ds, [0, 1, 2], pad_id=0, kl=[False, False, False])
    assert none["kl_rows"].tolist() == [0] and none["kl_weight"].tolist() == [0.0]
    assert none["kl"]["input_ids"].tolist() == [[1, 5, 9, 2]]


def test_options_that_cannot_work_are_refused():
    base = ["--model_name_or_path", "m", "--dataset_name", "d"]
    with pytest.raises(ConfigError, match="kl_pairs_per_step must be >= 0"):
        load_config([*base, "--kl_pairs_per_step", "-1"])
    with pytest.raises(ConfigError, match="needs kl_baseline effective_batch"):
        load_config([*base, "--kl_pairs_per_step", "2", "--kl_baseline", "micro_batch"])


KL_RUN = dict(max_steps=3, save_steps=2, eval_fraction=0.0, learning_rate=5e-2)  # checkpoint-2, then step 3


@pytest.fixture(scope="module")
def one_rank_runs(tmp_path_factory, tiny_model) -> dict[str, tuple[Path, subprocess.CompletedProcess]]:
    """One-process runs of 1 rank x 2 accumulation x 2, started together (one core each): "pairs" with
    kl_pairs_per_step 1 and "micro" with kl_baseline micro_batch (3 steps, checkpointed after step 2),
    and "many" with kl_pairs_per_step 5, which must be refused. {name: (run dir, how it ended)}."""
    tmp = tmp_path_factory.mktemp("kl")
    configs = {"pairs": config_file(tmp, "pairs", tiny_model, kl_pairs_per_step=1, **KL_RUN),
               "micro": config_file(tmp, "micro", tiny_model, kl_baseline="micro_batch", **KL_RUN),
               "many": config_file(tmp, "many", tiny_model, kl_pairs_per_step=5)}
    results = launch_together({name: [*TRAIN, "--config", str(config)] for name, config in configs.items()})
    return {name: (tmp / name, results[name]) for name in configs}


@pytest.mark.e2e
def test_run_z_ref_is_the_mean_over_the_drawn_pairs(one_rank_runs):
    """1 rank x 2 accumulation x 2 with kl_pairs_per_step 1: step 3's logged kl is max(0, the one drawn
    pair's log-ratio), recomputed here from the policy checkpointed after step 2, and not the mean over all
    four. (The same draws on any split of the global batch over ranks and accumulation, in runs:
    test_scale's test_kl_baseline_is_the_same_for_any_split_of_the_effective_batch.)"""
    one, result = one_rank_runs["pairs"]
    assert result.returncode == 0, result.stderr[-3000:]
    ratios, drawn = kl_ratios_of_step(one, "checkpoint-2", step=3)
    ratios, drawn = [r for micro in ratios for r in micro], [d for micro in drawn for d in micro]
    assert sum(drawn) == 1
    one_pair = kl_baseline(torch.tensor(ratios)[torch.tensor(drawn)].sum(), 1).item()
    every_pair = kl_baseline(torch.tensor(ratios).sum(), 4).item()
    assert abs(one_pair - every_pair) > 1e-3, (one_pair, every_pair)  # else the test could not tell them apart
    logged = metrics(one, "train")
    # The same weights (checkpoint-2) in other shapes: the forward's rounding (tests/tolerances.py).
    assert logged[2]["kl"] == pytest.approx(one_pair, abs=run_tolerances(one, 0.0)[0]["kl"])


@pytest.mark.e2e
def test_more_pairs_than_the_global_batch_is_refused(one_rank_runs):
    _, result = one_rank_runs["many"]
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "kl_pairs_per_step (5) is more than the global batch (4 = 1 ranks x 2 accumulation x 2)" in result.stderr


@pytest.mark.e2e
def test_micro_batch_kl_baseline_logs_the_mean_of_the_micro_batch_z_refs(one_rank_runs):
    """kl_baseline: micro_batch, 1 rank x 2 accumulation x 2: step 3's logged kl is the mean of the z_refs
    of its two micro-batches, recomputed here from the step's batches and the policy checkpointed
    after step 2 (the old code logged the last micro-batch's z_ref alone)."""
    run_dir, result = one_rank_runs["micro"]
    assert result.returncode == 0, result.stderr[-3000:]
    ratios, _ = kl_ratios_of_step(run_dir, "checkpoint-2", step=3)
    z_refs = [kl_baseline(torch.tensor(micro).sum(), len(micro)).item() for micro in ratios]
    assert abs(z_refs[0] - z_refs[1]) > 1e-3, z_refs  # else the test could not tell the mean from the last
    logged = metrics(run_dir, "train")[2]
    # The same weights (checkpoint-2), the reference here from two passes: the forward's rounding.
    atol = run_tolerances(run_dir, 0.0)[0]["kl"]
    assert logged["step"] == 3 and logged["kl"] == pytest.approx(sum(z_refs) / 2, abs=atol)
