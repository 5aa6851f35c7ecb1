"""Scoring: the no-grad log-probs of a batch (the reference's and the policy's on the KL pairs), the
log-probs of a whole dataset gathered from every rank, and the eval metrics computed from them. The
training loop, the precompute job and the evaluate command all score through here.
"""

import torch
from torch import Tensor

from kto_scale.collate import ReferenceLayout, collate, shard_indices, to_device
from kto_scale.distributed import all_gather
from kto_scale.engine import Engine
from kto_scale.loss import kl_baseline, kto_losses
from kto_scale.model import reference_mode
from kto_scale.ref_cache import RefCache


def reference_logps(engine: Engine, batch: dict) -> tuple[Tensor, Tensor]:
    """([B] reference logps, [K] reference KL logps of the batch's kl_rows), by the batch's reference layout:
    SHARED, one pass over x + y + y' (its "reference" inputs); SEPARATE, one over x + y and one over x + y'."""
    layout = batch["reference_layout"]
    if layout is ReferenceLayout.CACHED:
        raise RuntimeError("reference_logps: a CACHED batch has no reference passes (no_grad_logps looks it up).")
    with reference_mode(engine.module.model):
        if layout is ReferenceLayout.SHARED:
            reference, reference_kl = engine(**batch["reference"]).chunk(2)
            return reference, reference_kl[batch["kl_rows"]]
        return engine(**batch["policy"]), engine(**batch["kl"])


def no_grad_logps(engine: Engine, batch: dict) -> tuple[Tensor, Tensor, Tensor]:
    """([B] reference logps, [K] reference KL logps, [K] policy KL logps) of a batch, without gradients
    (the KL pairs of the batch's kl_rows).

    A CACHED batch skips the reference passes: collate looked its values up in the cache.
    """
    if batch["reference_layout"] is ReferenceLayout.CACHED:
        reference, reference_kl = batch["cached_reference"], batch["cached_reference_kl"]
    else:
        reference, reference_kl = reference_logps(engine, batch)
    with torch.no_grad():
        policy_kl = engine(**batch["kl"])
    return reference, reference_kl, policy_kl


def score_dataset(engine: Engine, dataset, batch_size: int, pad_id: int, cache: RefCache | None,
                  packed: bool = False, reference: ReferenceLayout = ReferenceLayout.SEPARATE) -> dict[str, Tensor]:
    """Policy and reference log-probs of every example and KL pair, gathered from all ranks (packed,
    reference: the layouts of kto_scale.collate.collate).

    Returns [N] tensors in dataset order (filler rows removed), identical on every rank:
    index, desirable, pair_id, policy, reference, policy_kl, reference_kl.
    """
    names = ("index", "desirable", "pair_id", "weight", "policy", "reference", "policy_kl", "reference_kl")
    columns = {k: [] for k in names}
    engine.eval()  # no LoRA dropout while scoring
    for indices in shard_indices(len(dataset), batch_size, engine.world_size, engine.global_rank):
        batch = to_device(collate(dataset, indices, pad_id, packed, reference, cache=cache), engine.device)
        reference, reference_kl, policy_kl = no_grad_logps(engine, batch)
        with torch.no_grad():
            policy = engine(**batch["policy"])
        values = dict(policy=policy, reference=reference, policy_kl=policy_kl, reference_kl=reference_kl)
        for name in names:
            columns[name].append(values[name] if name in values else batch[name])
    engine.train()
    gathered = {k: all_gather(torch.cat(v)) for k, v in columns.items()}
    real = gathered.pop("weight") > 0
    order = gathered["index"][real].argsort()
    return {k: v[real][order] for k, v in gathered.items()}


def evaluation_metrics(scores: dict[str, Tensor], beta: float, weights: tuple[float, float]) -> dict[str, float]:
    """Eval loss, z_ref, mean rewards per class, reward accuracy and (for paired data) pair accuracy."""
    kl = scores["policy_kl"] - scores["reference_kl"]
    z_ref = kl_baseline(kl.sum(), kl.numel())
    losses, rewards = kto_losses(scores["policy"], scores["reference"], scores["desirable"], z_ref, beta, *weights)
    desirable = scores["desirable"]
    # Desirable examples should sit above the baseline, undesirable ones below it.
    correct = torch.where(desirable, rewards > beta * z_ref, rewards < beta * z_ref)
    out = {"loss": losses.mean().item(), "kl": z_ref.item(), "reward_accuracy": correct.float().mean().item()}
    for label, mask in (("desirable", desirable), ("undesirable", ~desirable)):
        if mask.any():
            out[f"rewards/{label}"] = rewards[mask].mean().item()
    if "rewards/desirable" in out and "rewards/undesirable" in out:
        out["margins"] = out["rewards/desirable"] - out["rewards/undesirable"]
    # For data that came from pairs: a pair is won when its desirable reward beats its undesirable one.
    rows = list(zip(scores["pair_id"].tolist(), desirable.tolist(), rewards.tolist(), strict=True))
    undesirable_reward = {pair: r for pair, d, r in rows if pair >= 0 and not d}
    wins = [r > undesirable_reward[pair] for pair, d, r in rows if d and pair in undesirable_reward]
    if wins:
        out["pair_accuracy"] = sum(wins) / len(wins)
    return out
