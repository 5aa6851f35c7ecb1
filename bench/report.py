"""results.json (everything) and results.md (the tables) from the bench's summary."""

import json
from pathlib import Path

from measure import BATCH_KEYS
from runner import RUNS
from summary import TARGETS

RATIO_ROWS = (  # (ratio key, label, target, lower is better)
    ("on_the_fly_vs_trl", "on the fly vs TRL on the fly, examples/s", TARGETS["on_the_fly_vs_trl"], False),
    ("cache_vs_trl_on_the_fly", "cache vs TRL on the fly, examples/s", TARGETS["cache_vs_trl_on_the_fly"], False),
    ("cache_vs_trl_precompute", "cache vs TRL precompute, examples/s", TARGETS["cache_vs_trl_precompute"], False),
    ("cpu_time/on_the_fly_vs_trl", "same, per CPU second: on the fly", TARGETS["on_the_fly_vs_trl"], False),
    ("cpu_time/cache_vs_trl_on_the_fly", "same, per CPU second: cache vs on the fly",
     TARGETS["cache_vs_trl_on_the_fly"], False),
    ("cpu_time/cache_vs_trl_precompute", "same, per CPU second: cache vs precompute",
     TARGETS["cache_vs_trl_precompute"], False),
    ("peak_rss/on_the_fly", "peak RSS, on the fly", 1.0, True),
    ("peak_rss/cache_vs_precompute", "peak RSS, cache vs TRL precompute", 1.0, True),
)


def fmt_ratio(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}x"


def met(value: float | None, target: float, at_most: bool = False) -> str:
    if value is None:
        return "n/a"
    return "yes" if (value <= target if at_most else value >= target) else "**no**"


def header(summary: dict) -> list[str]:
    m, st, kto = summary["machine"], summary["setup"], summary["machine"]["kto_scale"]
    modified = kto["modified_library_files"]
    return [
        "# kto-scale vs TRL KTOTrainer", "",
        f"Date: {summary['date']}  ",
        f"Machine: {m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads per run), {m['memory_gib']} GiB, "
        f"{m['device']}; torch {m['torch']}, transformers {m['transformers']}, trl {m['trl']}, peft {m['peft']}, "
        f"deepspeed {m['deepspeed']}  ",
        f"Command: `{summary['command']}` ({summary['total_bench_s'] / 60:.1f} min)  ",
        f"kto-scale: commit {kto['commit']}" + (f" with uncommitted changes to {', '.join(modified)}" if modified else ""),
        "",
        f"Model: Llama, hidden {st['hidden']}, {st['layers']} layers, {st['heads']} heads ({st['kv_heads']} KV), MLP "
        f"{st['intermediate']}, vocab {st['vocab']}{vocab_note(st)} ({st['n_params'] / 1e6:.1f}M params, {st['dtype']}, "
        f"random init, seed {st['seed']}, built by each run on its own device), attention "
        f"{st['attn_implementation'] or 'transformers default'}; LoRA r {st['lora_r']} alpha {st['lora_alpha']} on "
        f"{','.join(p.removesuffix('_proj') for p in st['lora_targets'])}, dropout 0; reference = adapters disabled "
        f"in both. {kto_options(st)}"
        f"Data: the first {st['n_pairs']} pairs of {st['data']} that fit = {st['n_examples']} unpaired rows "
        f"({st['pairs_skipped_too_long']} pairs skipped: prompt >= max_length). Micro-batch {st['batch_size']}, "
        f"max_length {st['max_length']} (no prompt cut in either), grad accumulation 1, lr {st['lr']}, "
        f"{st['warmup']} warm-up + {st['steps']} timed steps, precompute batch {st['precompute_batch_size']}, "
        f"KL pairs {st['kl_pairs']}. kto-scale on DeepSpeed ZeRO-2 (1 rank)"
        f"{', padding-free' if st['padding_free'] else ''}; TRL on its plain Trainer.",
    ]


def vocab_note(setup: dict) -> str:
    if setup["vocab"] == setup["tokenizer_vocab"]:
        return ""
    return (f" (embedding and LM head padded past the tokenizer's {setup['tokenizer_vocab']} tokens: rows no "
            "token reaches, but the LM head computes all of them)")


def kto_options(setup: dict) -> str:
    options = setup.get("kto_option")
    return f"kto-scale options from --kto-option: {options}. " if options else ""


def fmt(x: float | None, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def run_table(summary: dict) -> list[str]:
    lines = ["", "| run | examples/s | tokens/s | p50 step s | p95 step s | p95 / p50 | CPU s/step | peak RSS MiB "
             "| peak GPU MiB | model TFLOP/s | MFU % | pad % (example / KL seqs) | other load (cores) | precompute s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    precompute = summary["precompute"]
    for name, run in summary["runs"].items():
        pre = ""
        if name == "kto_cache":
            pre = f"{precompute['kto_precompute_loop_s']:.1f} (process {precompute['kto_precompute_process_s']:.0f})"
        elif "precompute_s" in run:
            pre = f"{run['precompute_s']:.1f}"
        lines.append(f"| {RUNS[name].label} | {run['examples_per_s']:.3f} | {run['tokens_per_s']:.1f} "
                     f"| {run['step_s_median']:.3f} | {run['step_s_p95']:.3f} | {run['p95_over_median']:.2f} "
                     f"| {run['cpu_s_per_step']:.2f} | {run['peak_rss_mib']:.0f} "
                     f"| {fmt(run['gpu_peak_mib'], '.0f')} "
                     f"| {fmt(run['model_flops_per_s'] and run['model_flops_per_s'] / 1e12, '.3f')} "
                     f"| {fmt(run['mfu'] and 100 * run['mfu'], '.1f')} "
                     f"| {100 * run['policy_pad_frac']:.1f} / {100 * run['kl_pad_frac']:.1f} "
                     f"| {run['other_load_cores']:.2f} | {pre} |")
    return lines + [
        "",
        "examples/s and tokens/s: over all timed steps (their examples or tokens / their summed time); p50 and p95: "
        "percentiles of the timed steps' times (linear between sorted values). Times: wall time of the timed steps (data path included, logging excluded); tokens = non-pad "
        "tokens of the examples' own sequences (the KL sequences add about as many again). CPU s/step: the trainer "
        "process's CPU time per timed step (all threads), less sensitive to other load on the machine. Peak RSS: "
        "the whole child process (os.wait4 ru_maxrss; the kto-scale cache row excludes the precompute process, "
        "reported below). Other load: CPU used by other processes during the run, in cores. Peak GPU: "
        "torch.cuda.max_memory_allocated of the whole child process. Model FLOPs (bench/flops.py), per sequence of T "
        "tokens with C completion tokens, P = the decoder layers' matmul weights, L layers, hidden d, vocab V: "
        "forward 2PT + 2LT^2d + 2dVC, backward 2PT + 4LT^2d + 2dVC (input gradients only: frozen base, LoRA "
        "left out); per example, policy forward + backward, policy forward on the KL sequence, and, on the fly, "
        "the reference forward on both (two passes) or once over prompt + both completions (shared prompt); the "
        "padding of a padded batch is not counted (it is no model work). MFU = model FLOPs/s / the GPU's peak "
        f"dense bf16 FLOPs/s ({fmt(peak_of(summary), '.3g')}); n/a on CPU.",
    ]


def peak_of(summary: dict) -> float | None:
    return next((run["peak_flops"] for run in summary["runs"].values() if run["peak_flops"]), None)


def ratio_table(summary: dict) -> list[str]:
    r = summary["ratios"]
    lines = ["", "| ratio (kto-scale / TRL) | target | vs TRL as it runs here (LM head on all positions) | met "
             "| vs TRL completion-only head (its CUDA path) | met |", "|---|---:|---:|---|---:|---|"]
    for key, label, target, at_most in RATIO_ROWS:
        a, b = r[key], r[key + "_compact"]
        lines.append(f"| {label} | {'<=' if at_most else '>='} {target} | {fmt_ratio(a)} | {met(a, target, at_most)} "
                     f"| {fmt_ratio(b)} | {met(b, target, at_most)} |")
    pad = summary["padding"]
    lines += ["", "Padding over the whole epoch (% of B x T that is padding): random batches, example / KL "
              f"sequences {pad['random/example_pad_pct']} / {pad['random/kl_pad_pct']}; kto-scale group_by_length "
              f"batches {pad['group_by_length/example_pad_pct']} / {pad['group_by_length/kl_pad_pct']}."]
    if r["median_paired_step"]:
        lines += ["", "Median over the timed steps of the per-step ratio (the second run's step time / the first's; "
                  "same batch at each step): " + ", ".join(f"{k.replace('_vs_', ' vs ')} {v:.2f}x"
                                                          for k, v in r["median_paired_step"].items())]
    return lines


def precompute_table(summary: dict) -> list[str]:
    p = summary["precompute"]
    if not p:
        return []
    lines = ["", "| precompute (all rows: example + KL sequences) | tokens/s | s |", "|---|---:|---:|"]
    for name in ("kto_precompute", "kto_precompute_separate"):
        if f"{name}_tokens_per_s" in p:
            lines.append(f"| {RUNS[name].label} (loop; process {p[name + '_process_s']:.0f} s, peak RSS "
                         f"{p[name + '_peak_rss_mib']} MiB) | {p[name + '_tokens_per_s']:.0f} | {p[name + '_loop_s']:.1f} |")
    if "bare_loop_tokens_per_s" in p:
        lines.append(f"| bare torch.inference_mode() loop, same batches ({p['bare_batching']}) "
                     f"| {p['bare_loop_tokens_per_s']:.0f} | {p['bare_loop_s']:.1f} |")
    for name in ("trl_pre", "trl_pre_compact"):
        if f"{name}_tokens_per_s" in p:
            lines.append(f"| {RUNS[name].label} | {p[name + '_tokens_per_s']:.0f} | {p[name + '_s']:.1f} |")
    v, target = summary["ratios"]["precompute_vs_bare_loop"], TARGETS["precompute_vs_bare_loop"]
    return lines + ["", f"kto-scale precompute / bare loop, tokens/s: {fmt_ratio(v)} (target >= {target}: "
                        f"{met(v, target)}; the bare loop scores the two sequences of a row separately)"]


def variant_lines(summary: dict) -> list[str]:
    """kto-scale against itself (summary.kto_variant_ratios), where both runs of a ratio ran."""
    labels = {"shared_vs_separate/on_the_fly": "shared-prompt reference pass / two passes, on the fly, examples/s",
              "shared_vs_separate/precompute": "shared-prompt reference pass / two passes, precompute, tokens/s",
              "kl_quarter_vs_all/on_the_fly": "a quarter of the KL pairs / all, on the fly, examples/s"}
    ratios = {k: v for k, v in summary["ratios"].get("kto_variants", {}).items() if v is not None}
    if not ratios:
        return []
    return ["", "| kto-scale against itself | ratio |", "|---|---:|"] + [
        f"| {labels[key]} | {fmt_ratio(value)} |" for key, value in ratios.items()]


def token_section(check: dict) -> list[str]:
    lines = ["", "## Same tokens?", "", f"All checks passed: {'yes' if check['passed'] else '**no**'}", ""]
    weights = check["weights"]
    runs = weights["runs"].values()
    lines.append(f"- Weights: {'the same' if weights['same'] else '**different**'} in all {len(runs)} runs "
                 f"(checksums {', '.join(sorted({w['checksum'] for w in runs}))}), built on "
                 f"{', '.join(sorted({w['built_on'] for w in runs}))} in {min(w['init_s'] for w in runs):.1f} to "
                 f"{max(w['init_s'] for w in runs):.1f} s.")
    for name, t in check["tokenization"].items():
        lines.append(f"- Tokenization, {name}: {t['identical_prompt_ids']}/{t['rows']} rows with identical prompt "
                     f"ids and {t['identical_completion_ids']}/{t['rows']} with identical completion ids (after the "
                     f"max_length cut); text tokens kto-scale {t['total_text_tokens_kto']}, "
                     f"TRL {t['total_text_tokens_trl']}.")
    for name, value in check.get("steps", {}).items():
        parts = [f"{k} {value[k]['equal_steps']}/{value[k]['steps']}" for k in BATCH_KEYS]
        lines.append(f"- Steps with equal counts, kto vs {name}: " + ", ".join(parts)
                     + f"; |loss difference| at step 1 {value['first_loss_abs_diff']:.2e} (rounding allows "
                     f"{value['first_loss_tolerance']:.2e}), max over all steps {value['loss_max_abs_diff']:.2e}")
    if "trl" in check.get("steps", {}):
        lines += ["", "| step | kto-scale loss | TRL loss | difference |", "|---:|---:|---:|---:|"]
        lines += [f"| {step} | {a:.6f} | {b:.6f} | {b - a:+.2e} |"
                  for step, (a, b) in enumerate(check["steps"]["trl"]["losses"], 1)]
    return lines


def torch_profile_section(profiles: dict) -> list[str]:
    """Each --torch-profile run's categories (profile-RUN.txt has the top ops too)."""
    if not profiles:
        return []
    lines = ["", "## Where the time goes (torch.profiler, profile-RUN.txt)", "",
             "| run | steps | wall ms | " + " | ".join(next(iter(profiles.values()))["categories_ms"])
             + " | host gaps | device |", "|---|---:|---:|" + "---:|" * (len(next(iter(profiles.values()))
                                                                          ["categories_ms"]) + 1) + "---|"]
    for name, p in profiles.items():
        shares = " | ".join(f"{100 * ms / p['wall_ms']:.1f}%" for ms in p["categories_ms"].values())
        lines.append(f"| {name} | {p['steps']} | {p['wall_ms']:.0f} | {shares} | "
                     f"{100 * p['host_gaps_ms'] / p['wall_ms']:.1f}% | {p['device']} |")
    return lines + ["", "Shares of the profiled window's wall time: kernel time by the op that launched it (self CPU "
                        "time on CPU); host gaps = wall minus the device's busy time (bench/torch_profile.py)."]


def profile_section(profiles: dict) -> list[str]:
    if not profiles:
        return []
    lines = ["", "## Where the time goes (py-spy samples of the training loop, separate short runs)", ""]
    for name, profile in profiles.items():
        lines += [f"**{name}** ({profile['samples']} samples)", "", "| phase / component | % |", "|---|---:|"]
        lines += [f"| {label} | {pct:.1f} |" for label, pct in profile["phases"] if pct >= 0.3]
        lines.append("")
    return lines


def write_report(out: Path, summary: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    lines = header(summary) + run_table(summary) + ratio_table(summary) + precompute_table(summary) + variant_lines(summary)
    lines += token_section(summary["token_check"])
    if summary["notes"]:
        lines += ["", "## Notes", ""] + [f"- {k}: {v}" for k, v in summary["notes"].items()]
    lines += profile_section(summary["profiles"]) + torch_profile_section(summary.get("torch_profiles", {}))
    (out / "results.md").write_text("\n".join(lines) + "\n")
