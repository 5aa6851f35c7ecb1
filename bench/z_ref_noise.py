"""Step-to-step noise of KTO's KL baseline z_ref, per estimator, from real per-example KL terms.

    python bench/z_ref_noise.py --examples eval-train/examples.jsonl --layout 4x4x2 8x2x1 --pairs 16 8 4 \
        --out bench/results-zref

Reads the KL pair log-probs that launch/evaluate.py writes per example (policy_kl_logp,
reference_kl_logp), so each example's KL term is kl = policy_kl_logp - reference_kl_logp, and replays
`--steps` optimizer steps of kto-scale's real batch layout (kto_scale.collate.BatchPlan: epoch
permutations, micro-batches, kl_selection) for each layout MICROxACCUMULATIONxRANKS. Per step it forms
  - "effective batch": the mean over every real slot of the global batch (kl_baseline "effective_batch");
  - "sampled K": the mean over the K slots BatchPlan.kl_selection draws (kl_pairs_per_step K);
  - "micro-batch (TRL)": one mean per accumulation micro-batch, over that micro-batch of every rank
    (kl_baseline "micro_batch", TRL's estimate); each micro-batch's value counts as one estimate.
For each it reports the std over steps and the RMSE against the whole data set's mean of the unclamped
mean, the same for z_ref = max(0, mean) (kto_scale.loss.kl_baseline), and beta * std(z_ref): the std
of the shift z_ref puts into every example's loss term sigmoid(beta * (r - z_ref)). The policy is
fixed (the adapter that was scored), so this is the sampling noise alone, not the drift of training.
"""

import argparse
import json
import math
import shlex
import sys
from pathlib import Path

import torch

from kto_scale.collate import PAD_SLOT, BatchPlan
from kto_scale.loss import kl_baseline

Estimate = tuple[float, int]  # (sum of the KL terms, how many pairs)


def load_kl_terms(path: Path) -> torch.Tensor:
    """[N] float64 KL terms in dataset order (row i = dataset index i, as BatchPlan indexes it)."""
    rows = sorted((json.loads(line) for line in path.read_text().splitlines() if line.strip()),
                  key=lambda row: row["row"])
    if not rows or "policy_kl_logp" not in rows[0]:
        sys.exit(f"error: {path} has no policy_kl_logp/reference_kl_logp fields: write it with launch/evaluate.py "
                 "from a kto-scale that records the KL pair log-probs.")
    if [row["row"] for row in rows] != list(range(len(rows))):
        sys.exit(f"error: {path} does not hold rows 0..{len(rows) - 1} of one split: score the whole split.")
    return torch.tensor([row["policy_kl_logp"] - row["reference_kl_logp"] for row in rows], dtype=torch.float64)


def parse_layout(text: str) -> tuple[int, int, int]:
    try:
        micro, accumulation, ranks = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--layout {text!r}: expected MICROxACCUMULATIONxRANKS, e.g. 4x4x2") from None
    return micro, accumulation, ranks


def step_estimates(kl: torch.Tensor, plan: BatchPlan, step: int, seed: int, pairs: list[int]) -> dict[str, list[Estimate]]:
    """Each estimator's estimates at optimizer step `step` (1-based), as the trainer lays the step out."""
    epoch, step_in_epoch = divmod(step - 1, plan.steps_per_epoch)
    ranks = [plan.micro_batches(step_in_epoch, epoch, seed, rank) for rank in range(plan.world_size)]

    def estimate(slots: list[int]) -> Estimate:
        real = [i for i in slots if i != PAD_SLOT]  # filler rows of a short last batch have weight 0
        return kl[real].sum().item(), len(real)

    out = {"effective batch": [estimate([i for micro in ranks for batch in micro for i in batch])]}
    for k in pairs:
        masks = [plan.kl_selection(step, seed, rank, k) for rank in range(plan.world_size)]
        out[f"sampled {k}"] = [estimate([i for micro, mask in zip(ranks, masks, strict=True)
                                         for batch, keep in zip(micro, mask, strict=True)
                                         for i, chosen in zip(batch, keep, strict=True) if chosen])]
    micro_batches = [estimate([i for micro in ranks for i in micro[a]]) for a in range(plan.accumulation_steps)]
    out["micro-batch (TRL)"] = [e for e in micro_batches if e[1] > 0]  # one with no real example is used by none
    return out


def summarize(per_step: list[list[Estimate]], kl: torch.Tensor, beta: float) -> dict:
    """Noise of one estimator over steps; std is the population std (ddof 0)."""
    flat = [e for step in per_step for e in step]
    means = torch.tensor([s / n for s, n in flat if n > 0], dtype=torch.float64)
    z_refs = torch.stack([kl_baseline(torch.tensor(s), n) for s, n in flat]).double()
    target = kl.mean()
    pairs = sum(n for _, n in flat) / len(flat)
    within = [torch.tensor([s / n for s, n in step]).std(correction=0) for step in per_step if len(step) > 1]
    return {
        "estimates": len(flat), "pairs": pairs,
        "mean": means.mean().item(), "std": means.std(correction=0).item(),
        "rmse": (means - target).square().mean().sqrt().item(),
        # a simple random sample of `pairs` of the N terms, without replacement: the textbook std
        "srs_std": (kl.std(correction=0) / math.sqrt(pairs) * math.sqrt((len(kl) - pairs) / (len(kl) - 1))).item(),
        "within_step_std": torch.stack(within).mean().item() if within else None,
        "z_ref_mean": z_refs.mean().item(), "z_ref_std": z_refs.std(correction=0).item(),
        "z_ref_rmse": (z_refs - target.clamp(min=0)).square().mean().sqrt().item(),
        "clamped_share": (z_refs == 0).double().mean().item(),
        "beta_z_ref_std": beta * z_refs.std(correction=0).item(),
    }


def measure(kl: torch.Tensor, layout: tuple[int, int, int], pairs: list[int], steps: int, seed: int,
            beta: float) -> dict:
    """All estimators of one layout over steps 1..steps (as many epochs as that takes)."""
    plan = BatchPlan(len(kl), *layout)
    sampled = sorted({k for k in pairs if 0 < k < plan.global_batch_size}, reverse=True)  # else: all pairs
    per_step = [step_estimates(kl, plan, step, seed, sampled) for step in range(1, steps + 1)]
    names = per_step[0].keys()
    return {"layout": "x".join(map(str, layout)), "global_batch": plan.global_batch_size, "steps": steps,
            "epochs": steps / plan.steps_per_epoch,
            "estimators": {name: summarize([s[name] for s in per_step], kl, beta) for name in names}}


def report(results: dict) -> str:
    data = results["data"]
    lines = [
        "# z_ref step-to-step noise", "",
        f"`{results['command']}`", "",
        *([f"Source of the examples: {data['source']}", ""] if data["source"] else []),
        f"Data: {data['examples']} ({data['n']} KL terms). KL term mean {data['mean']:.4f}, std {data['std']:.4f}, "
        f"{data['positive_share']:.0%} positive; z_ref of the whole set = {max(0.0, data['mean']):.4f}. "
        f"beta {results['beta']}, seed {results['seed']}, {results['steps']} steps per layout.", "",
        "Per estimator: pairs = KL pairs one estimate averages; std and RMSE (vs the whole set's mean) of the "
        "unclamped mean over steps; SRS = std of a simple random sample of that many terms; within-step = TRL's "
        "population std across the micro-batches of one step (mean over steps; low for few micro-batches); "
        "z_ref = max(0, mean), RMSE vs max(0, the whole set's mean); clamped = share of estimates where z_ref "
        "is 0; beta*std = std of the shift of beta * (r - z_ref). Pairs below the global batch: the short last "
        "batch of each epoch.", "",
        "| layout (global) | estimator | pairs | mean | std | SRS std | RMSE | within-step | z_ref mean "
        "| z_ref std | z_ref RMSE | clamped | beta*std(z_ref) |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for layout in results["layouts"]:
        for name, e in layout["estimators"].items():
            within = "–" if e["within_step_std"] is None else f"{e['within_step_std']:.3f}"
            lines.append(
                f"| {layout['layout']} ({layout['global_batch']}) | {name} | {e['pairs']:.1f} | {e['mean']:.3f} "
                f"| {e['std']:.3f} | {e['srs_std']:.3f} | {e['rmse']:.3f} | {within} | {e['z_ref_mean']:.3f} "
                f"| {e['z_ref_std']:.3f} | {e['z_ref_rmse']:.3f} | {e['clamped_share']:.0%} | {e['beta_z_ref_std']:.4f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=Path, required=True, help="examples.jsonl of launch/evaluate.py")
    parser.add_argument("--layout", type=parse_layout, nargs="+", default=[(4, 4, 2)],
                        help="MICROxACCUMULATIONxRANKS, one or more (default 4x4x2: global batch 32)")
    parser.add_argument("--pairs", type=int, nargs="*", default=[16, 8, 4],
                        help="kl_pairs_per_step values to sample (those >= the global batch mean all pairs)")
    parser.add_argument("--steps", type=int, default=1000, help="optimizer steps per layout")
    parser.add_argument("--seed", type=int, default=42, help="the run's seed (epoch order and KL draws)")
    parser.add_argument("--beta", type=float, default=0.1, help="KTO beta (configs/smollm2-hh.yaml: 0.1)")
    parser.add_argument("--out", type=Path, required=True, help="directory for results.json and results.md")
    parser.add_argument("--source", default="", help="how examples.jsonl was made (model, adapter, split, "
                        "evaluate command), written into the results")
    args = parser.parse_args(argv)
    kl = load_kl_terms(args.examples)
    results = {
        "command": shlex.join(["python", "bench/z_ref_noise.py", *(sys.argv[1:] if argv is None else argv)]),
        "data": {"examples": str(args.examples), "source": args.source, "n": len(kl), "mean": kl.mean().item(),
                 "std": kl.std(correction=0).item(), "positive_share": (kl > 0).double().mean().item()},
        "beta": args.beta, "seed": args.seed, "steps": args.steps,
        "layouts": [measure(kl, layout, args.pairs, args.steps, args.seed, args.beta) for layout in args.layout],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (args.out / "results.md").write_text(report(results))
    print(report(results))
    return results


if __name__ == "__main__":
    main()
