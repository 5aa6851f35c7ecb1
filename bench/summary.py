"""The numbers of the report, from the children's results: per-run throughput, ratios against TRL, the
same-tokens checks, the precompute against the bare loop, and padding.

Every join is strict: a run the parent ran is looked up by name, and steps are matched by number after
checking that both runs hold exactly steps 1..N. A run or step that went missing is an error, not a row
left out.
"""

import math
import statistics

from measure import BATCH_KEYS

TARGETS = {  # what the project wants to meet (reported, not enforced)
    "on_the_fly_vs_trl": 1.3,
    "cache_vs_trl_on_the_fly": 2.0,
    "cache_vs_trl_precompute": 1.3,
    "precompute_vs_bare_loop": 0.9,
}
# (ratio name, kto-scale run, TRL run, what is compared): each also against the *_compact TRL run
RATIOS = (
    ("on_the_fly_vs_trl", "kto", "trl", "examples_per_s"),
    ("cache_vs_trl_on_the_fly", "kto_cache", "trl", "examples_per_s"),
    ("cache_vs_trl_precompute", "kto_cache", "trl_pre", "examples_per_s"),
    ("cpu_time/on_the_fly_vs_trl", "kto", "trl", "examples_per_cpu_s"),
    ("cpu_time/cache_vs_trl_on_the_fly", "kto_cache", "trl", "examples_per_cpu_s"),
    ("cpu_time/cache_vs_trl_precompute", "kto_cache", "trl_pre", "examples_per_cpu_s"),
    ("peak_rss/on_the_fly", "kto", "trl", "peak_rss_mib"),
    ("peak_rss/cache_vs_precompute", "kto_cache", "trl_pre", "peak_rss_mib"),
)
PAIRED = (("kto", "trl"), ("kto", "trl_compact"), ("kto_cache", "trl"), ("kto_cache", "trl_compact"),
          ("kto_cache", "trl_pre"), ("kto_cache", "trl_pre_compact"), ("kto", "kto_separate"))


def steps_by_number(name: str, result: dict, total: int) -> dict[int, dict]:
    """A run's step records by step number; it must hold exactly steps 1..total."""
    steps = {s["step"]: s for s in result["steps"]}
    if sorted(steps) != list(range(1, total + 1)) or len(steps) != len(result["steps"]):
        raise RuntimeError(f"run {name} recorded steps {[s['step'] for s in result['steps']]}, "
                           f"not 1..{total}: a step record went missing or was counted twice")
    return steps


def summarize_run(name: str, result: dict, warmup: int, steps: int) -> dict:
    """Throughput, CPU time and memory of one training run over its timed steps (after the warm-up)."""
    by_number = steps_by_number(name, result, warmup + steps)
    timed = [by_number[k] for k in range(warmup + 1, warmup + steps + 1)]
    t, cpu = sum(s["time_s"] for s in timed), sum(s["cpu_s"] for s in timed)
    examples = sum(s["examples"] for s in timed)
    tokens, kl_tokens = sum(s["policy_tokens"] for s in timed), sum(s["kl_tokens"] for s in timed)
    step_times = [s["time_s"] for s in timed]
    median, p95 = statistics.median(step_times), percentile(step_times, 95)
    out = {
        "timed_steps": len(timed), "timed_s": t, "examples_per_s": examples / t, "tokens_per_s": tokens / t,
        "all_tokens_per_s": (tokens + kl_tokens) / t, "step_s_median": median, "step_s_p95": p95,
        "p95_over_median": p95 / median,
        "step_s_min": min(step_times), "step_s_max": max(step_times),
        "cpu_s_per_step": cpu / len(timed), "examples_per_cpu_s": examples / cpu,
        "policy_pad_frac": 1 - tokens / sum(s["policy_padded"] for s in timed),
        "kl_pad_frac": 1 - kl_tokens / sum(s["kl_padded"] for s in timed),
        "peak_rss_mib": result["peak_rss_mib"], "wall_s": result["wall_s"],
        "other_load_cores": result["other_load_cores"],
        "rss_after_setup_mib": result["rss"]["after_setup_mib"],
        "peak_rss_after_setup_mib": result["rss"]["peak_after_setup_mib"],
        "rss_during_training_max_mib": max(s["rss_mib"] for s in result["steps"]),
        "step_times": {k: round(by_number[k]["time_s"], 3) for k in range(warmup + 1, warmup + steps + 1)},
    }
    if result.get("precompute_s") is not None:
        out["precompute_s"] = result["precompute_s"]
    return out


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile, linear between the sorted values (numpy's default): over 8 steps, p95 lies
    between the two slowest; over one step, it is that step."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def compute_ratios(runs: dict) -> dict:
    """kto-scale / TRL for each of RATIOS (peak RSS: lower is better), None where a run was not asked for."""
    out = {}
    for suffix in ("", "_compact"):
        for key, ours, theirs, value in RATIOS:
            theirs += suffix
            out[key + suffix] = runs[ours][value] / runs[theirs][value] if ours in runs and theirs in runs else None
    return out


def paired_step_ratios(runs: dict) -> dict:
    """Median over timed steps of (`theirs` step time / `ours`; theirs: TRL, or kto-scale with two reference
    passes): both ran the same batches, so this pairs step k with step k and is less sensitive to bursts
    of other load than the ratio of totals."""
    out = {}
    for ours, theirs in PAIRED:
        if ours in runs and theirs in runs:
            a, b = runs[ours]["step_times"], runs[theirs]["step_times"]
            if a.keys() != b.keys():
                raise RuntimeError(f"runs {ours} and {theirs} timed different steps: {list(a)} and {list(b)}")
            out[f"{ours}_vs_{theirs}"] = statistics.median(b[k] / a[k] for k in a)
    return out


def tokenization_check(spec: dict, trl: dict) -> dict:
    """Did TRL tokenize each row to kto-scale's ids (after the max_length cut)?"""
    order, max_len = spec["order"], spec["max_length"]
    pairs = list(zip(order, trl["trl_prompt_ids"], trl["trl_completion_ids"], strict=True))
    same_prompt = same_completion = 0
    differences = []
    for row, trl_prompt, trl_completion in pairs:
        prompt, completion = spec["prompt_ids"][row], spec["completion_ids"][row]
        # kto-scale cuts the completion to fit max_length; TRL's collator cuts the joined sequence
        cut = trl_completion[: max_len - len(trl_prompt)]
        same_prompt += prompt == trl_prompt
        same_completion += completion == cut
        if prompt != trl_prompt or completion != cut:
            differences.append({"row": row, "kto_lens": [len(prompt), len(completion)],
                                "trl_lens": [len(trl_prompt), len(trl_completion)]})
    return {
        "rows": len(order), "identical_prompt_ids": same_prompt, "identical_completion_ids": same_completion,
        "first_differences": differences[:5],
        "total_text_tokens_kto": sum(len(spec["prompt_ids"][r]) + len(spec["completion_ids"][r]) for r in order),
        "total_text_tokens_trl": sum(min(len(p) + len(c), max_len) for _, p, c in pairs),
    }


UNIT_ROUNDOFF = {"fp32": 2.0 ** -24, "bf16": 2.0 ** -8}


def first_step_loss_tolerance(spec: dict, step: dict) -> float:
    """How far two trainers' losses of step 1 may differ by rounding alone: both start it from the same
    weights and batch, so nothing but the order and shapes of their float operations differs (later
    steps start from weights one update apart, which Adam can make differ by lr in any component).

    loss = mean_i (1 - sigmoid(beta s_i (r_i - z_ref))) moves by at most beta / 4 per unit of r_i or
    z_ref. r_i is a difference of two sequence log-probs, each a sum of n_i token log-probs near
    -ln(vocab) (random weights), each of which rounds once per residual block (2 per layer), in the
    lm_head and in the log-softmax: |dr_i| <= 2 n_i ln(vocab) eps (2 layers + 2), eps the unit roundoff
    of the compute dtype. The mean over the B examples puts the step's completion tokens / B in place
    of n_i, and z_ref (a mean over the KL pairs) adds the same with the KL completion tokens."""
    per_token = math.log(spec["vocab"]) * UNIT_ROUNDOFF[spec["dtype"]] * (2 * spec["layers"] + 2)
    tokens = (step["completion_tokens"] + step["kl_completion_tokens"]) / step["examples"]
    return spec["beta"] / 4 * 2 * tokens * per_token


def step_check(name: str, spec: dict, reference: dict, run: dict, total: int) -> dict:
    """Per token count: at how many steps `run` processed what kto ran; the largest loss difference; and
    step 1's loss difference with what rounding allows it (first_step_loss_tolerance)."""
    ours, theirs = steps_by_number("kto", reference, total), steps_by_number(name, run, total)
    out = {key: {"equal_steps": sum(ours[k][key] == theirs[k][key] for k in ours), "steps": total,
                 "total_kto": sum(s[key] for s in ours.values()),
                 f"total_{name}": sum(s[key] for s in theirs.values())}
           for key in BATCH_KEYS}
    out["loss_max_abs_diff"] = max(abs(ours[k]["loss"] - theirs[k]["loss"]) for k in ours)
    out["losses"] = [[ours[k]["loss"], theirs[k]["loss"]] for k in range(1, total + 1)]  # steps 1..total
    out["first_loss_abs_diff"] = abs(ours[1]["loss"] - theirs[1]["loss"])
    out["first_loss_tolerance"] = first_step_loss_tolerance(spec, ours[1])
    return out


def weights_check(results: dict) -> dict:
    """Did every run build the same weights? Each child's checksum of the base model it built
    (bench/model_init.py), with the device it built them on and how long that took."""
    weights = {name: result["weights"] for name, result in results.items() if result.get("weights")}
    return {"same": len({w["checksum"] for w in weights.values()}) == 1, "runs": weights}


def check_tokens(spec: dict, results: dict, train_runs: list[str]) -> dict:
    """Tokenization of every TRL run against kto-scale's, and the steps of every training run with kto's
    batches (`train_runs`: those runs) against kto's."""
    total = spec["warmup"] + spec["steps"]
    out = {"weights": weights_check(results),
           "tokenization": {name: tokenization_check(spec, results[name])
                            for name in train_runs if name.startswith("trl")}}
    if "kto" in train_runs:
        out["steps"] = {name: step_check(name, spec, results["kto"], results[name], total)
                        for name in train_runs if name != "kto"}
    return out


def token_check_passed(check: dict) -> bool:
    """Every run built the same weights, every TRL row tokenized alike, every compared run processed kto's
    tokens at every step (padded sizes may differ: --padding-free packs kto-scale's batches, never TRL's), and
    step 1's losses agree within what rounding allows."""
    rows = all(t["identical_prompt_ids"] == t["rows"] == t["identical_completion_ids"]
               for t in check["tokenization"].values())
    steps = all(run[key]["equal_steps"] == run[key]["steps"] for run in check.get("steps", {}).values()
                for key in BATCH_KEYS if "padded" not in key)
    losses = all(run["first_loss_abs_diff"] <= run["first_loss_tolerance"] for run in check.get("steps", {}).values())
    return check["weights"]["same"] and rows and steps and losses


def padding_report(spec: dict) -> dict:
    """Pad share of this data's micro-batches: the random batches both trainers ran, and kto-scale's
    group_by_length batches (epoch 0), for the example and the KL sequences."""
    from kto_scale.collate import PAD_SLOT, BatchPlan

    n, max_len, prompts = spec["n_examples"], spec["max_length"], spec["prompt_ids"]
    example = [len(prompts[i]) + len(spec["completion_ids"][i]) for i in range(n)]
    kl = [min(len(prompts[i]) + len(spec["kl_completion_ids"][i]), max_len) for i in range(n)]
    out = {}
    for name, lengths in (("random", None), ("group_by_length", tuple(example))):
        plan = BatchPlan(n, spec["batch_size"], 1, 1, lengths)
        batches = [[i for i in plan.micro_batches(step, 0, spec["seed"], 0)[0] if i != PAD_SLOT]
                   for step in range(plan.steps_per_epoch)]
        for seq, lens in (("example", example), ("kl", kl)):
            real = sum(lens[i] for b in batches for i in b)
            padded = sum(len(b) * max(lens[i] for i in b) for b in batches)
            out[f"{name}/{seq}_pad_pct"] = round(100 * (1 - real / padded), 1)
    return out


def precompute_summary(spec: dict, results: dict) -> dict:
    """Tokens/s of kto-scale's precompute loop, of the bare loop, and of TRL's precompute (same rows)."""
    out = {}
    if "bare" in results:
        bare = results["bare"]
        out.update(bare_loop_tokens_per_s=bare["tokens"] / bare["loop_s"], bare_loop_s=bare["loop_s"],
                   bare_batching=bare["batching"], bare_loop_tokens=bare["tokens"], bare_loop_padded=bare["padded"])
    for name in ("kto_precompute", "kto_precompute_separate"):
        if name in results:
            kp = results[name]
            out.update({f"{name}_process_s": kp["total_s"], f"{name}_peak_rss_mib": round(kp["peak_rss_mib"]),
                        f"{name}_tokens": kp["tokens"], f"{name}_loop_s": kp["loop_s"],
                        f"{name}_tokens_per_s": kp["tokens"] / kp["loop_s"]})
    max_len = spec["max_length"]
    tokens = sum(min(len(spec["prompt_ids"][r]) + len(c), max_len) for r in spec["order"]
                 for c in (spec["completion_ids"][r], spec["kl_completion_ids"][r]))
    for name in ("trl_pre", "trl_pre_compact"):
        if name in results:
            out[name + "_s"] = results[name]["precompute_s"]
            out[name + "_tokens_per_s"] = tokens / results[name]["precompute_s"]
    return out


def kto_variant_ratios(runs: dict, precompute: dict) -> dict:
    """kto-scale against itself: the shared-prompt reference pass (the default) over two passes, on the fly
    (examples/s) and in precompute (tokens/s of the same rows); a quarter of the KL pairs over all of them."""
    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b is not None else None

    def per_s(name: str) -> float | None:
        return runs[name]["examples_per_s"] if name in runs else None

    return {"shared_vs_separate/on_the_fly": ratio(per_s("kto"), per_s("kto_separate")),
            "shared_vs_separate/precompute": ratio(precompute.get("kto_precompute_tokens_per_s"),
                                                   precompute.get("kto_precompute_separate_tokens_per_s")),
            "kl_quarter_vs_all/on_the_fly": ratio(per_s("kto_kl_quarter"), per_s("kto"))}


def precompute_vs_bare(precompute: dict) -> float | None:
    if "kto_precompute_tokens_per_s" in precompute and "bare_loop_tokens_per_s" in precompute:
        return precompute["kto_precompute_tokens_per_s"] / precompute["bare_loop_tokens_per_s"]
    return None
