"""Benchmark kto-scale against TRL's KTOTrainer on the same model, tokenizer, data, batches and settings.

    python bench/bench_trl.py --pairs 48 --steps 6 --warmup 2 --threads 1 --out bench/results

The parent builds the shared inputs once (bench/inputs.py), then runs each trainer in its own child
process, one after the other (bench/runner.py: the runs; runs_kto.py, runs_trl.py, runs_bare.py: the
children), so each run's peak RSS is its own. It then summarizes (summary.py), optionally profiles
(pyspy.py), and writes results.json and results.md to --out (report.py). bench/README.md explains
what is compared and how it is measured.
"""

import argparse
import datetime
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from flops import Shape, peak_flops, run_flops
from inputs import ALL_PROJECTIONS, LORA_TARGETS, REPO, TORCH_DTYPES, build_inputs, write_spec
from machine import machine_info
from max_batch import MAX_BATCH_RUNS, find_max_batch
from pyspy import classify_kto, classify_trl, summarize_profile
from report import write_report
from runner import DEFAULT_RUNS, RUNS, log, planned, run_child
from summary import (
    TARGETS,
    check_tokens,
    compute_ratios,
    kto_variant_ratios,
    padding_report,
    paired_step_ratios,
    precompute_summary,
    precompute_vs_bare,
    summarize_run,
    token_check_passed,
)
from torch_profile import write_text

SHARED = REPO.parent / "shared/data"
SETUP_KEYS = ("n_pairs", "n_examples", "pairs_skipped_too_long", "n_params", "vocab", "batch_size", "max_length",
              "lr", "beta", "seed", "warmup", "steps", "precompute_batch_size", "lora_r", "lora_alpha", "kl_pairs",
              "dtype", "attn_implementation", "padding_free", "hidden", "layers", "heads", "kv_heads", "intermediate",
              "tokenizer_vocab", "lora_targets", "kto_option")
PROFILED = ("kto", "kto_grouped", "trl", "trl_pre", "trl_compact", "trl_pre_compact")  # no input of another run
# --preset: one GPU, bf16, long sequences, kto-scale padding-free; more steps than on CPU (a GPU step is short);
# no *_compact runs (TRL takes that path itself on CUDA) and no py-spy profiles (they sample the CPU). Options
# given on the command line still win over these.
PRESETS = {
    # Llama-3.2-1B's shape with the tokenizer's vocabulary (the before/after of bench/results-gpu*).
    "1b": {"hidden": 2048, "layers": 16, "heads": 32, "kv_heads": 8, "intermediate": 8192, "max_length": 1024,
           "dtype": "bf16", "padding_free": True, "pairs": 128, "warmup": 4, "steps": 20,
           "only": "kto,kto_separate,kto_precompute_separate,kto_cache,trl,trl_pre,kto_kl_quarter,bare",
           "profile": ""},
    # Llama-3-8B's shape: its vocabulary of 128,256 (the embedding and LM head padded past the llama2
    # tokenizer's 32,000), LoRA on every projection. The runs in order of importance (bench/gpu_run.sh's
    # budget cuts the tail); 16 rows per micro-batch fit TRL's padded batches on an H200 (an 80 GB H100 may
    # need --batch-size 8: --find-max-batch says); 2 + 8 steps, the time budget in bench/gpu_run.sh.
    "8b": {"hidden": 4096, "layers": 32, "heads": 32, "kv_heads": 8, "intermediate": 14336, "vocab": 128256,
           "lora_targets": "all", "max_length": 1024, "dtype": "bf16", "padding_free": True, "batch_size": 16,
           "pairs": 96, "warmup": 2, "steps": 8, "only": "kto,trl,kto_cache,trl_pre,kto_separate,kto_kl_quarter",
           "profile": ""},
}


def best_attention() -> str:
    """flash-attention's varlen kernels where flash_attn is installed (packed rows without a mask), else sdpa."""
    return "flash_attention_2" if importlib.util.find_spec("flash_attn") else "sdpa"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=64, help="HH pairs (each gives 2 unpaired rows)")
    p.add_argument("--steps", type=int, default=8, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=2, help="steps run first and not timed")
    p.add_argument("--out", type=Path, default=REPO / "bench/results", help="where results.json/.md go")
    p.add_argument("--work-dir", type=Path, default=None, help="model/data/run dirs (default: a temp dir, removed)")
    p.add_argument("--only", default=",".join(DEFAULT_RUNS),
                   help=f"comma list of runs, of {', '.join(name for name in RUNS if name != 'kto_precompute')} "
                        "(kto_grouped: kto-scale with group_by_length, other batches: compare its tokens/s)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=int, default=32)
    p.add_argument("--precompute-batch-size", type=int, default=32,
                   help="kto-scale precompute_batch_size and TRL precompute_ref_batch_size")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--intermediate", type=int, default=1408)
    p.add_argument("--kv-heads", type=int, default=None, help="key/value heads (default: --heads)")
    p.add_argument("--vocab", type=int, default=None,
                   help="the model's vocabulary (default: the tokenizer's); larger pads the embedding and LM head")
    p.add_argument("--lora-targets", default=",".join(LORA_TARGETS),
                   help=f"comma list of the projections LoRA adapts, or 'all' ({','.join(ALL_PROJECTIONS)})")
    p.add_argument("--kto-option", action="append", default=[], metavar="KEY=VALUE",
                   help="a kto-scale config option (YAML value) for every kto-scale run, e.g. "
                        "--kto-option use_liger_kernel=true; repeat for more")
    p.add_argument("--dtype", choices=tuple(TORCH_DTYPES), default=None,
                   help="weights and compute of every run (default: bf16 with CUDA, fp32 without)")
    p.add_argument("--attn-implementation", default=None,
                   help="transformers attention backend of every run: sdpa, flash_attention_2, eager "
                        "(default: transformers chooses)")
    p.add_argument("--preset", choices=tuple(PRESETS),
                   help="one GPU: " + "; ".join(f"{name}: {', '.join(f'{k} {v!r}' for k, v in preset.items())}"
                                                for name, preset in PRESETS.items())
                        + "; attention flash_attention_2 if flash_attn is installed, else sdpa")
    p.add_argument("--gpu-preset", action="store_const", const="1b", dest="preset", help="--preset 1b")
    p.add_argument("--peak-flops", type=float, default=None,
                   help="the GPU's peak dense bf16 FLOPs/s for MFU (default: from a table of known GPUs)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--padding-free", action="store_true",
                   help="kto-scale runs (training and precompute) pack each batch into one row, without padding")
    p.add_argument("--threads", type=int, default=0, help="torch threads in each child (0: all cores)")
    p.add_argument("--kl-pairs", choices=("matched", "native"), default="matched",
                   help="matched: TRL uses kto-scale's KL completions (identical tokens); native: TRL's own rule")
    p.add_argument("--profile", default="kto,trl_compact",
                   help=f"runs to repeat under py-spy after the timed runs (warm-up + --profile-steps), of "
                        f"{', '.join(PROFILED)}; '' for none")
    p.add_argument("--profile-steps", type=int, default=3)
    p.add_argument("--torch-profile", default="",
                   help=f"runs (comma list, of {', '.join(PROFILED)}) to repeat for --profile-steps steps after the "
                        "warm-up under torch.profiler: profile-RUN.txt and .json in --out (bench/torch_profile.py)")
    p.add_argument("--find-max-batch", default="",
                   help="instead of the runs: the largest micro-batch that fits, for each of these runs (comma "
                        "list, e.g. kto,trl): from --max-batch-start down, halving on out-of-memory "
                        "(bench/max_batch.py); max-batch.json and .md in --out")
    p.add_argument("--max-batch-start", type=int, default=64, help="the first micro-batch --find-max-batch tries")
    p.add_argument("--max-batch-budget", type=float, default=300,
                   help="seconds --find-max-batch may take; no try starts after them")
    p.add_argument("--shared-data", type=Path, default=SHARED,
                   help="the folder --data and --tokenizer default into (a copy of ../shared/data where "
                        "../shared is not there, e.g. on a GPU machine that gets the repo alone)")
    p.add_argument("--data", type=Path, default=None,
                   help="HH pairs, text or chat messages (default: SHARED_DATA/hh-rlhf-harmless-test.jsonl.gz; "
                        "e.g. data/hh-harmless/train.jsonl.gz)")
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="a tokenizer dir that adds BOS on its own (default: SHARED_DATA/llama2-tokenizer; "
                        "e.g. kto_scale/assets/tiny-llama)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per child run")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds from the bench's start after which no further run starts (each one left is "
                        "named in the report's notes): a report still comes out on a time-limited machine")
    p.add_argument("--keep-going", action="store_true",
                   help="a run that fails (or times out) is left out and named in the report's notes, and the "
                        "bench exits 1 after writing it; without it the first failure ends the bench")
    preset = p.parse_known_args(argv)[0].preset
    if preset:
        p.set_defaults(**PRESETS[preset], attn_implementation=best_attention())
    args = p.parse_args(argv)
    args.kv_heads = args.kv_heads or args.heads
    args.lora_targets = ALL_PROJECTIONS if args.lora_targets == "all" else tuple(args.lora_targets.split(","))
    args.kto_option = dict(kto_option(p, option) for option in args.kto_option)
    args.data = args.data or args.shared_data / "hh-rlhf-harmless-test.jsonl.gz"
    args.tokenizer = args.tokenizer or args.shared_data / "llama2-tokenizer"
    if args.hidden % args.heads or args.heads % args.kv_heads:
        p.error(f"--hidden {args.hidden} must be a multiple of --heads {args.heads}, and --heads of --kv-heads "
                f"{args.kv_heads}")
    if args.dtype is None:
        import torch

        args.dtype = "bf16" if torch.cuda.is_available() else "fp32"
    for option in ("profile", "torch_profile", "find_max_batch"):
        names = [name for name in getattr(args, option).split(",") if name]
        allowed = PROFILED if option != "find_max_batch" else MAX_BATCH_RUNS
        unknown = [name for name in names if name not in allowed]
        if unknown:
            p.error(f"--{option.replace('_', '-')} {','.join(unknown)}: only {', '.join(allowed)} can be given")
        setattr(args, option, names)
    args.threads = args.threads or os.cpu_count()
    return args


def kto_option(parser: argparse.ArgumentParser, option: str) -> tuple[str, object]:
    """KEY=VALUE of --kto-option, the value read as YAML (true, 8, flex_attention, [a, b]), as a config file would."""
    import yaml

    key, sep, value = option.partition("=")
    if not sep or not key:
        parser.error(f"--kto-option {option!r}: give KEY=VALUE, e.g. --kto-option use_liger_kernel=true")
    return key.strip(), yaml.safe_load(value)


def check_library() -> None:
    """The parent must import the kto_scale it benchmarks (the children get this checkout's on their path)."""
    import kto_scale

    found = Path(kto_scale.__file__).resolve().parents[1]
    if found != REPO:
        raise SystemExit(f"kto_scale imports from {found}, not from this checkout {REPO}: run with "
                         f"PYTHONPATH={REPO} (or pip install -e {REPO}).")


def run_profiles(args: argparse.Namespace, spec: dict) -> dict:
    """The --profile runs again under py-spy, --profile-steps timed steps each, in work/profile."""
    if not args.profile:
        return {}
    work = Path(spec["work"]) / "profile"
    work.mkdir(exist_ok=True)
    profile_spec = dict(spec, steps=args.profile_steps, work=str(work))
    write_spec(profile_spec)
    profiles = {}
    for name in args.profile:
        raw = work / f"pyspy_{name}.txt"
        run_child(name, profile_spec, args.timeout, profile=raw)
        classify = classify_kto() if name.startswith("kto") else classify_trl()
        profiles[f"{name}: {RUNS[name].label}"] = summarize_profile(raw, classify)
    return profiles


def run_torch_profiles(args: argparse.Namespace, spec: dict) -> dict:
    """The --torch-profile runs again, warm-up + --profile-steps steps each, the latter under torch.profiler
    (bench/torch_profile.py): profile-RUN.json and profile-RUN.txt in --out; their summaries."""
    if not args.torch_profile:
        return {}
    work = Path(spec["work"]) / "torch_profile"
    work.mkdir(exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    summaries = {}
    for name in args.torch_profile:
        out = args.out / f"profile-{name}.json"
        profile_spec = dict(spec, steps=args.profile_steps, work=str(work),
                            torch_profile={"first": args.warmup + 1, "steps": args.profile_steps, "out": str(out)})
        write_spec(profile_spec)
        run_child(name, profile_spec, args.timeout)
        summaries[name] = json.loads(out.read_text())
        write_text(summaries[name], name, args.out / f"profile-{name}.txt")
    return summaries


def add_efficiency(args: argparse.Namespace, spec: dict, results: dict, runs: dict) -> None:
    """Per training run: its GPU's peak memory, model FLOPs/s over the timed steps (bench/flops.py) and MFU
    (None on CPU, on an unknown GPU without --peak-flops, and for runs with other batches than kto's)."""
    shape = Shape(args.hidden, args.layers, args.heads, args.kv_heads, args.intermediate, spec["vocab"])
    for name, run in runs.items():
        result = results[name]
        timed = [step for step in result["steps"] if step["step"] > args.warmup]
        reference = RUNS[name].reference
        attention = spec["kto_option"].get("attn_implementation", spec["attn_implementation"])
        if reference == "shared" and attention not in (None, "sdpa", "eager", "flex_attention"):
            reference = "separate"  # kto_scale.model.reference_layout falls back to two passes
        flops_per_s = (run_flops(spec, shape, timed, reference) / run["timed_s"]
                       if RUNS[name].same_batches else None)
        peak = peak_flops(result["gpu_name"], args.peak_flops)
        run.update(gpu_name=result["gpu_name"], gpu_peak_mib=result["gpu_peak_mib"], model_flops_per_s=flops_per_s,
                   peak_flops=peak, mfu=flops_per_s / peak if flops_per_s is not None and peak else None)


def summarize(args: argparse.Namespace, spec: dict, results: dict) -> dict:
    """Everything results.json holds, but the date, command, machine and total time."""
    train_runs = [name for name in results if RUNS[name].trains]
    runs = {name: summarize_run(name, results[name], args.warmup, args.steps) for name in train_runs}
    add_efficiency(args, spec, results, runs)
    ratios = compute_ratios(runs)
    ratios["median_paired_step"] = paired_step_ratios(runs)
    precompute = precompute_summary(spec, results)
    ratios["precompute_vs_bare_loop"] = precompute_vs_bare(precompute)
    ratios["kto_variants"] = kto_variant_ratios(runs, precompute)
    token_check = check_tokens(spec, results, [name for name in train_runs if RUNS[name].same_batches])
    token_check["passed"] = token_check_passed(token_check)
    return {
        "setup": {**{key: spec[key] for key in SETUP_KEYS}, "data": str(args.data)},
        "runs": runs, "ratios": ratios, "targets": TARGETS, "precompute": precompute, "token_check": token_check,
        "per_step": {name: results[name]["steps"] for name in train_runs},
        "padding": padding_report(spec),
    }


def main() -> None:
    args = parse_args()
    check_library()
    names = planned([name for name in args.only.split(",") if name])
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="kto_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(work / "ref_cache", ignore_errors=True)  # an earlier bench's cache would skip the precompute
    try:
        bench(args, names, work)
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)


def bench(args: argparse.Namespace, names: list[str], work: Path) -> None:
    """Inputs, the runs, the profiles, the report."""
    started = time.time()
    notes = {}
    if args.profile and shutil.which("py-spy") is None:  # the numbers do not need it: go on without profiles
        notes["profile"] = "skipped: py-spy is not installed (pip install py-spy==0.4.3)"
        log(f"--profile {','.join(args.profile)}: {notes['profile']}")
        args.profile = []
    log(f"work dir {work}")
    spec = build_inputs(args, work)
    log(f"inputs ready: {spec['n_examples']} rows, {spec['n_params'] / 1e6:.1f}M params")
    if args.find_max_batch:
        find_max_batch(args, spec, deadline=started + args.max_batch_budget)
        return
    results = run_all(args, names, spec, notes, deadline=started + args.budget if args.budget else None)
    summary = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
               "command": " ".join(["python", *sys.argv]), "machine": machine_info(args.threads, next((r["gpu_name"] for r in results.values() if r["gpu_name"]), None)),
               **summarize(args, spec, results), "profiles": run_profiles(args, spec),
               "torch_profiles": run_torch_profiles(args, spec), "notes": notes}
    if args.work_dir is not None:  # raw py-spy stacks (~1 MB each) stay with the work dir
        summary["notes"].update({f"py-spy raw ({name})": str(work / "profile" / f"pyspy_{name}.txt")
                                 for name in args.profile})
    summary["total_bench_s"] = round(time.time() - started, 1)
    write_report(args.out, summary)
    log(f"wrote results.json and results.md to {args.out} in {summary['total_bench_s'] / 60:.1f} min")
    print((args.out / "results.md").read_text())
    failed = [key.removeprefix("run ") for key in notes if key.startswith("run ")]
    if failed:
        raise SystemExit(f"{len(failed)} of {len(names)} runs did not finish ({', '.join(failed)}): see the notes "
                         f"in {args.out / 'results.md'} and the run logs in the work dir")


def run_all(args: argparse.Namespace, names: list[str], spec: dict, notes: dict, deadline: float | None) -> dict:
    """Each run's result, in order. With --keep-going a failed run, and a run whose input run failed, is
    noted and left out, so one broken run does not lose the others' numbers (e.g. on a short GPU lease);
    past the deadline (time.time(), from --budget) no run starts."""
    results = {}
    for name in names:
        before = RUNS[name].before
        if deadline is not None and time.time() > deadline:
            notes[f"run {name}"] = f"skipped: --budget {args.budget:.0f} s was spent before it started"
            continue
        if before and before not in results:
            notes[f"run {name}"] = f"skipped: the run it needs first, {before}, did not finish"
            continue
        try:
            results[name] = run_child(name, spec, args.timeout)
        except RuntimeError as e:
            if not args.keep_going:
                raise
            notes[f"run {name}"] = f"failed: {str(e).splitlines()[0].removesuffix('; log tail:')}"  # tail: logged
            log(f"{name}: FAILED, going on (--keep-going): {e}")
    return results


if __name__ == "__main__":
    main()
