"""The reference's log-probs of a batch's examples and KL pairs: one pass over x + y + y' (the
shared prompt, kto-scale's default) against two passes over x + y and x + y', on the bench's model and
rows, padded and padding-free, at several batch sizes. Host (collate) and device (forward) time apart.

    python bench/shared_prompt.py --spec WORK/spec.json --batch 8 32 --out bench/results-shared-prompt

WORK is a bench_trl.py work dir (its spec.json names the model, dtype, attention and the tokenized rows).
Rows in the training order of the spec, cut into batches; each timing is the median over the batches of
`--repeats` rounds after one warm-up round. The two layouts' log-probs are compared on every batch.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import datasets
import torch
from model_init import load_bench_model
from peft import LoraConfig, get_peft_model

from kto_scale.collate import ReferenceLayout, collate, to_device
from kto_scale.model import SequenceLogps, reference_mode


def forward_s(module: SequenceLogps, batch: dict, shared: bool, device: torch.device) -> tuple[float, torch.Tensor]:
    """Seconds of the reference passes over one batch (the device's queue drained), and their [2B] log-probs."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    with reference_mode(module.model):
        if shared:
            logps = module(**batch["reference"])
        else:
            logps = torch.cat([module(**batch["policy"]), module(**batch["kl"])])
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, logps


def measure(module: SequenceLogps, dataset: datasets.Dataset, order: list[int], size: int, packed: bool,
            repeats: int, device: torch.device) -> dict:
    """Median collate and forward seconds per batch, both layouts, and the largest log-prob difference."""
    out, logps = {}, {}
    for shared in (False, True):
        name = "shared" if shared else "separate"
        collate_s, forward = [], []
        for round_ in range(repeats + 1):  # round 0 warms up
            for i, start in enumerate(range(0, len(order) - size + 1, size)):
                clock = time.process_time()
                batch = collate(dataset, order[start : start + size], 0, packed,
                                reference=ReferenceLayout.SHARED if shared else ReferenceLayout.SEPARATE)
                host = time.process_time() - clock
                seconds, values = forward_s(module, to_device(batch, device), shared, device)
                if round_:
                    collate_s.append(host)
                    forward.append(seconds)
                logps[name, i] = values
        out[f"{name}/collate_ms"] = 1000 * statistics.median(collate_s)
        out[f"{name}/forward_ms"] = 1000 * statistics.median(forward)
    out["forward_speedup"] = out["separate/forward_ms"] / out["shared/forward_ms"]
    out["max_abs_logp_difference"] = max((logps["shared", i] - logps["separate", i]).abs().max().item()
                                         for _, i in logps if _ == "shared")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--spec", type=Path, required=True, help="a bench_trl.py work dir's spec.json")
    p.add_argument("--batch", type=int, nargs="+", default=[8, 32], help="examples per batch")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds over the batches (after one warm-up)")
    p.add_argument("--max-batches", type=int, default=8, help="batches per size (the first rows of the order)")
    p.add_argument("--out", type=Path, required=True, help="folder for results.json and results.md")
    args = p.parse_args()

    spec = json.loads(args.spec.read_text())
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_bench_model(spec, {})
    policy = get_peft_model(model, LoraConfig(r=spec["lora_r"], lora_alpha=spec["lora_alpha"], task_type="CAUSAL_LM",
                                              target_modules=list(spec["lora_targets"])))
    module = SequenceLogps(policy).eval()
    n = spec["n_examples"]
    dataset = datasets.Dataset.from_dict({
        "prompt_ids": spec["prompt_ids"], "completion_ids": spec["completion_ids"],
        "kl_completion_ids": spec["kl_completion_ids"], "label": [True] * n, "pair_id": [-1] * n})
    rows = []
    for size in args.batch:
        order = spec["order"][: size * args.max_batches]
        for packed in (False, True):
            result = measure(module, dataset, order, size, packed, args.repeats, device)
            rows.append({"batch": size, "layout": "padding-free" if packed else "padded", **result})
            print(json.dumps(rows[-1]), flush=True)

    tokens = [(len(spec["prompt_ids"][r]), len(spec["completion_ids"][r]), len(spec["kl_completion_ids"][r]))
              for r in spec["order"]]
    setup = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
             "dtype": spec["dtype"], "attention": spec["attn_implementation"], "hidden": spec["hidden"],
             "layers": spec["layers"], "rows": len(tokens), "command": " ".join(sys.argv),
             "mean_prompt_tokens": statistics.mean(t[0] for t in tokens),
             "mean_completion_tokens": statistics.mean(t[1] for t in tokens),
             "mean_kl_completion_tokens": statistics.mean(t[2] for t in tokens)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"setup": setup, "rows": rows}, indent=1))
    lines = [f"# Shared-prompt reference pass vs two passes ({setup['device']}, {spec['dtype']}, {setup['attention']})",
             "", f"`{setup['command']}`; hidden {spec['hidden']}, {spec['layers']} layers; rows: mean prompt "
             f"{setup['mean_prompt_tokens']:.0f}, completion {setup['mean_completion_tokens']:.0f}, KL completion "
             f"{setup['mean_kl_completion_tokens']:.0f} tokens. Medians per batch.", "",
             "| batch | layout | collate ms (two / shared) | forward ms (two / shared) | forward speed-up | max abs logp diff |",
             "|---:|---|---:|---:|---:|---:|"]
    lines += [f"| {r['batch']} | {r['layout']} | {r['separate/collate_ms']:.1f} / {r['shared/collate_ms']:.1f} | "
              f"{r['separate/forward_ms']:.1f} / {r['shared/forward_ms']:.1f} | {r['forward_speedup']:.2f}x | "
              f"{r['max_abs_logp_difference']:.2e} |" for r in rows]
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
