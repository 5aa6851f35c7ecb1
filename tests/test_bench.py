"""bench/bench_trl.py at a tiny size: one warm-up and one timed step of kto-scale and of TRL's KTOTrainer
on the shipped HH slice and the tiny tokenizer (no ../shared, no network), and kto-scale's precompute.

kto-scale's variants (two reference passes, a quarter of the KL pairs, the precompute in two passes) are
the same child scripts with one more kto-scale option, whose effect the library's tests prove
(test_shared_prompt.py, test_ref_cache.py, test_kl_sampling.py): the bench's handling of them (which runs
are checked against kto's batches, their FLOPs, their ratios and report rows) is tested on synthetic child
results in test_kto_variants_in_the_report, without three more child processes (~20 s of imports each)."""

import importlib
import json
import sys
from pathlib import Path

import pytest
from runs import ROOT, run

from kto_scale.assets import TINY_LLAMA_DIR

RUNS = {"kto": "kto-scale, reference on the fly", "trl": "TRL, reference on the fly"}
PRECOMPUTES = ("kto_precompute",)
ROWS, STEPS = 8, 2  # 4 pairs, batches of 4: the warm-up step and the timed step


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    """The bench's --out and --work-dir, side by side."""
    tmp_path = tmp_path_factory.mktemp("bench")
    run([sys.executable, "bench/bench_trl.py", "--data", "data/hh-harmless/train.jsonl.gz",
         "--tokenizer", str(TINY_LLAMA_DIR), "--hidden", "32", "--layers", "1", "--heads", "2", "--intermediate", "64",
         "--pairs", "4", "--batch-size", "4", "--max-length", "128", "--warmup", "1", "--steps", "1",
         "--lr", "1e-2",  # large enough that step 2's loss moves off the untrained 0.5 in both trainers
         "--threads", "1", "--profile", "", "--only", ",".join([*RUNS, *PRECOMPUTES]),
         "--out", str(tmp_path / "out"), "--work-dir", str(tmp_path / "work")], timeout=300)
    return tmp_path


@pytest.mark.e2e
def test_both_trainers_ran_the_same_step(bench):
    results = json.loads((bench / "out/results.json").read_text())
    assert sorted(results["runs"]) == sorted(RUNS)
    for name in RUNS:
        steps = results["per_step"][name]
        assert [s["step"] for s in steps] == list(range(1, STEPS + 1))
        assert all(s["examples"] == ROWS // STEPS and s["policy_tokens"] > 0 for s in steps)
        assert results["runs"][name]["timed_steps"] == 1 and results["runs"][name]["examples_per_s"] > 0
    check = results["token_check"]
    assert check["passed"]
    rows = check["tokenization"]["trl"]
    assert rows["rows"] == rows["identical_prompt_ids"] == rows["identical_completion_ids"] == ROWS
    counts = check["steps"]["trl"]
    assert all(count["equal_steps"] == STEPS for count in counts.values() if isinstance(count, dict))
    assert results["per_step"]["kto"][-1]["loss"] != 0.5  # trained: step 2 moved off the untrained 0.5
    # Step 1 (same weights, same batch) within the derived first_step_loss_tolerance (bench/summary.py).
    # Later steps are not compared: with Adam's epsilon 1e-8, a gradient component that rounds to the
    # other sign moves a weight by 2 lr, so no rounding bound holds for the loss after an update.
    assert counts["first_loss_abs_diff"] <= counts["first_loss_tolerance"]
    weights = check["weights"]  # every child built kto-scale's seeded random model itself, the same one
    assert weights["same"] and sorted(weights["runs"]) == sorted([*RUNS, *PRECOMPUTES])
    assert all(w["built_on"] == "cpu" for w in weights["runs"].values())
    report = (bench / "out/results.md").read_text()
    assert "All checks passed: yes" in report and "| p50 step s | p95 step s | p95 / p50 |" in report
    for label in RUNS.values():
        assert f"| {label} | " in report


@pytest.mark.e2e
def test_precompute_in_the_report(bench):
    """The precompute child scored every row (its loop's log line read by bench/runs_kto.py) and has its row."""
    results = json.loads((bench / "out/results.json").read_text())
    assert results["precompute"]["kto_precompute_tokens"] > 0 and results["precompute"]["kto_precompute_loop_s"] > 0
    assert "| kto-scale, launch/precompute_ref.py (loop; process " in (bench / "out/results.md").read_text()


@pytest.mark.e2e
def test_gpu_columns_are_na_on_cpu(bench):
    """Every run reports peak GPU memory, model FLOPs/s and MFU; on CPU only the FLOPs/s have a value."""
    results = json.loads((bench / "out/results.json").read_text())
    for name in RUNS:
        run = results["runs"][name]
        assert run["gpu_peak_mib"] is None and run["mfu"] is None and run["peak_flops"] is None
        assert run["tokens_per_s"] > 0 and run["model_flops_per_s"] > 0
    # same batches, both with the reference on the fly: kto-scale's shared-prompt reference pass does less
    kto, trl = (results["runs"][name]["model_flops_per_s"] * results["runs"][name]["timed_s"] for name in ("kto", "trl"))
    assert 0.5 * trl < kto < trl
    assert results["setup"]["dtype"] == "fp32"
    report = (bench / "out/results.md").read_text()
    assert "| peak GPU MiB | model TFLOP/s | MFU % |" in report
    for label in RUNS.values():
        row = next(line for line in report.splitlines() if line.startswith(f"| {label} | "))
        cells = row.split(" | ")  # cells[8]: peak GPU MiB, cells[10]: MFU %
        assert cells[8] == cells[10] == "n/a"


def bench_module(name: str, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    return importlib.import_module(name)


def test_model_flops_by_hand(monkeypatch):
    """Shape hidden d=4, L=2 layers, 2 heads, 1 KV head (d_kv = 2), MLP I=8, vocab V=10:
    P = L (2d^2 + 2 d d_kv + 3 d I) = 2 (32 + 16 + 96) = 288.
    Sequence T=3, C=2: forward = 2PT + 2LT^2d + 2dVC = 1728 + 144 + 160 = 2032;
                       backward = 2PT + 4LT^2d + 2dVC = 1728 + 288 + 160 = 2176.
    KL sequence T=2, C=1: forward = 1152 + 64 + 80 = 1296.
    One example: policy 2032 + 2176 + 1296 = 5504; reference on the fly adds 2032 + 1296 = 3328: 8832.
    Shared-prompt reference (prompt P_x = 1): x + y + y' is 4 tokens: 2 * 288 * 4 = 2304, attention
    2 L d (3^2 + 2^2 - 1^2) = 16 * 12 = 192, LM head on 2 + 1 tokens 2 * 4 * 10 * 3 = 240: 2736, 8240 in all."""
    flops = bench_module("flops", monkeypatch)
    shape = flops.Shape(hidden=4, layers=2, heads=2, kv_heads=1, intermediate=8, vocab=10)
    assert shape.layer_params == 288
    assert flops.forward_flops(shape, 3, 2) == 2032 and flops.backward_flops(shape, 3, 2) == 2176
    assert flops.example_flops(shape, (3, 2), (2, 1), reference=None) == 5504
    assert flops.example_flops(shape, (3, 2), (2, 1), reference="separate") == 8832
    assert flops.example_flops(shape, (3, 2), (2, 1), reference="shared") == 8240
    # Llama-3.2-1B's decoder layers: 16 (2 * 2048^2 + 2 * 2048 * 512 + 3 * 2048 * 8192) = 973,078,528
    assert flops.Shape(2048, 16, 32, 8, 8192, 32000).layer_params == 973_078_528


def test_peak_flops_of_an_unknown_gpu(monkeypatch):
    """A GPU without a known peak (or none) leaves MFU n/a, unless --peak-tflops gives one."""
    flops = bench_module("flops", monkeypatch)
    assert flops.peak_flops("Tesla T4", None) is None and flops.peak_flops(None, None) is None
    assert flops.peak_flops("Tesla T4", 65e12) == 65e12


def test_gpu_preset_and_overrides(monkeypatch):
    """The preset sets the GPU shape (--gpu-preset is --preset 1b); an option given on the command line wins
    over it, wherever it stands; --preset 8b is Llama-3-8B's shape with LoRA on every projection."""
    bench_trl = bench_module("bench_trl", monkeypatch)
    args = bench_trl.parse_args(["--gpu-preset", "--layers", "2"])
    assert args.layers == 2 and args.hidden == bench_trl.PRESETS["1b"]["hidden"] and args.vocab is None
    assert args.attn_implementation in ("flash_attention_2", "sdpa")
    args = bench_trl.parse_args(["--hidden", "64", "--preset", "8b", "--kto-option", "logprob_chunk_size=512"])
    assert (args.hidden, args.layers, args.kv_heads, args.intermediate, args.vocab) == (64, 32, 8, 14336, 128256)
    assert args.lora_targets == ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert args.kto_option == {"logprob_chunk_size": 512} and args.only.split(",")[:2] == ["kto", "trl"]
    args = bench_trl.parse_args([])
    assert args.kv_heads == args.heads and args.attn_implementation is None and not args.padding_free
    assert args.lora_targets == ("q_proj", "k_proj", "v_proj", "o_proj") and args.kto_option == {}
    with pytest.raises(SystemExit):
        bench_trl.parse_args(["--kto-option", "use_liger_kernel"])  # no =VALUE


def test_shared_data_moves_the_data_and_tokenizer_defaults(monkeypatch, tmp_path):
    bench_trl = bench_module("bench_trl", monkeypatch)
    args = bench_trl.parse_args(["--shared-data", str(tmp_path)])
    assert (args.data, args.tokenizer) == (tmp_path / "hh-rlhf-harmless-test.jsonl.gz", tmp_path / "llama2-tokenizer")
    args = bench_trl.parse_args(["--shared-data", str(tmp_path), "--tokenizer", "tok"])
    assert args.tokenizer == Path("tok") and args.data.parent == tmp_path
    assert bench_trl.parse_args([]).data == bench_trl.SHARED / "hh-rlhf-harmless-test.jsonl.gz"


def test_keep_going_and_budget(monkeypatch):
    """--keep-going: a failed run, and the run that needs its output, are noted and left out; past the
    --budget deadline no run starts. Without --keep-going the failure ends the bench."""
    bench_trl = bench_module("bench_trl", monkeypatch)

    def run_child(name, spec, timeout):
        if name == "kto_precompute":
            raise RuntimeError("kto_precompute failed (exit 1) after 3 s; log tail:\n...")
        return {"name": name}

    monkeypatch.setattr(bench_trl, "run_child", run_child)
    names = bench_trl.planned(["kto", "kto_cache", "trl"])  # kto, kto_precompute, kto_cache, trl
    notes = {}
    args = bench_trl.parse_args(["--keep-going", "--budget", "60"])
    results = bench_trl.run_all(args, names, {}, notes, deadline=None)
    assert list(results) == ["kto", "trl"]
    assert notes["run kto_precompute"].startswith("failed: kto_precompute failed (exit 1)")
    assert notes["run kto_cache"].startswith("skipped: the run it needs first, kto_precompute")
    notes = {}
    assert bench_trl.run_all(args, names, {}, notes, deadline=0.0) == {}
    assert all(note.startswith("skipped: --budget 60 s") for note in notes.values()) and len(notes) == 4
    with pytest.raises(RuntimeError, match="kto_precompute failed"):
        bench_trl.run_all(bench_trl.parse_args([]), names, {}, {}, deadline=None)


def test_git_state_without_git(monkeypatch, tmp_path):
    """A copy of the files sent to a lent GPU machine (no .git, or a .git of another commit) still gets a
    report with the right commit: $KTO_SCALE_COMMIT wins over git; without either, None."""
    machine = bench_module("machine", monkeypatch)
    monkeypatch.setenv("KTO_SCALE_COMMIT", "abc1234")
    assert machine.git_state()["commit"] == "abc1234"  # this checkout's git says otherwise
    monkeypatch.setattr(machine, "REPO", tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path))  # no git at all
    monkeypatch.delenv("KTO_SCALE_COMMIT")
    state = machine.git_state()
    assert state["commit"] is None and state["modified_library_files"] is None


@pytest.mark.e2e
def test_a_missing_step_or_run_is_an_error(bench, monkeypatch):
    """The report's joins are strict: a dropped step or run fails the bench instead of shrinking a table."""
    summary = bench_module("summary", monkeypatch)
    work = bench / "work"
    spec = json.loads((work / "spec.json").read_text())
    same_batches = list(RUNS)
    results = {name: json.loads((work / f"result_{name}.json").read_text()) for name in same_batches}
    assert summary.token_check_passed(summary.check_tokens(spec, results, same_batches))
    results["trl"]["steps"].pop(0)
    with pytest.raises(RuntimeError, match="went missing"):
        summary.check_tokens(spec, results, same_batches)
    with pytest.raises(KeyError):
        summary.check_tokens(spec, {"kto": results["kto"]}, same_batches)


@pytest.mark.e2e
def test_losses_that_disagree_fail_the_verdict(bench, monkeypatch):
    """Step 1's losses (same weights, same batch) agree within first_step_loss_tolerance; one that is
    off by more fails "All checks passed", however equal the token counts."""
    summary = bench_module("summary", monkeypatch)
    work = bench / "work"
    spec = json.loads((work / "spec.json").read_text())
    same_batches = list(RUNS)
    results = {name: json.loads((work / f"result_{name}.json").read_text()) for name in same_batches}
    check = summary.check_tokens(spec, results, same_batches)
    assert summary.token_check_passed(check)
    tolerance = check["steps"]["trl"]["first_loss_tolerance"]
    assert check["steps"]["trl"]["first_loss_abs_diff"] <= tolerance < 1e-3  # fp32: a check that can fail
    results["trl"]["steps"][0]["loss"] += 2 * tolerance
    assert not summary.token_check_passed(summary.check_tokens(spec, results, same_batches))


def synthetic_child(step_s: float, loss: float = 0.5) -> dict:
    """A training child's result as bench/runner.py returns it: two steps of 4 examples of the
    test's 8 rows (prompt 3 tokens + completion 2, the same for the KL sequence), `step_s` each."""
    steps = [{"step": k, "time_s": step_s, "examples": 4, "cpu_s": step_s, "rss_mib": 500.0, "loss": loss,
              "policy_tokens": 20, "policy_padded": 20, "completion_tokens": 8, "kl_tokens": 20, "kl_padded": 20,
              "kl_completion_tokens": 8} for k in (1, 2)]
    return {"steps": steps, "rss": {"after_setup_mib": 400.0, "peak_after_setup_mib": 450.0}, "gpu_name": None,
            "gpu_peak_mib": None, "peak_rss_mib": 600.0, "wall_s": 20.0, "other_load_cores": 0.0,
            "weights": {"checksum": "1.5", "built_on": "cpu", "init_s": 0.1}}


def test_kto_variants_in_the_report(monkeypatch):
    """kto-scale against itself, on synthetic child results (the e2e bench runs kto, trl and kto_precompute
    only): kto at 1 s a step, with two reference passes 1.5 s, with a quarter of the KL pairs 0.8 s; the
    precompute 1000 tokens in 2 s, in two passes in 3 s. The ratios are 1.5, 1.5 and 1.25; the two-pass run
    is checked against kto's batches (and counts the two passes' FLOPs), the KL-quarter run is not (its KL
    batches differ: no FLOPs, no step check, and its other loss does not fail the verdict); each has its row in results.md."""
    bench_trl = bench_module("bench_trl", monkeypatch)
    report = bench_module("report", monkeypatch)
    args = bench_trl.parse_args(["--hidden", "32", "--layers", "1", "--heads", "2", "--intermediate", "64",
                                 "--warmup", "1", "--steps", "1", "--batch-size", "4"])
    spec = {**dict.fromkeys(bench_trl.SETUP_KEYS), "n_examples": 8, "vocab": 100, "dtype": "fp32", "beta": 0.1,
            "layers": 1, "warmup": 1, "steps": 1, "batch_size": 4, "max_length": 16, "seed": 0, "kto_option": {},
            "order": list(range(8)), "prompt_ids": [[5, 6, 7]] * 8, "completion_ids": [[8, 9]] * 8,
            "kl_completion_ids": [[9, 8]] * 8}
    results = {"kto": synthetic_child(1.0), "kto_separate": synthetic_child(1.5),
               "kto_kl_quarter": synthetic_child(0.8, loss=0.4)}
    for name, loop_s in (("kto_precompute", 2.0), ("kto_precompute_separate", 3.0)):
        results[name] = {"tokens": 1000, "loop_s": loop_s, "total_s": 10.0, "peak_rss_mib": 500.0,
                         "weights": results["kto"]["weights"]}
    summary = bench_trl.summarize(args, spec, results)
    assert summary["ratios"]["kto_variants"] == pytest.approx({"shared_vs_separate/on_the_fly": 1.5,
                                                               "shared_vs_separate/precompute": 1.5,
                                                               "kl_quarter_vs_all/on_the_fly": 1.25})
    assert summary["ratios"]["median_paired_step"] == pytest.approx({"kto_vs_kto_separate": 1.5})
    runs = summary["runs"]
    assert runs["kto_kl_quarter"]["model_flops_per_s"] is None
    kto, separate = (runs[name]["model_flops_per_s"] * runs[name]["timed_s"] for name in ("kto", "kto_separate"))
    assert kto < separate  # the same batches: two reference passes do more work than one shared one
    assert list(summary["token_check"]["steps"]) == ["kto_separate"] and summary["token_check"]["passed"]
    lines = report.run_table(summary) + report.precompute_table(summary) + report.variant_lines(summary)
    for label in ("kto-scale, on the fly, reference in two passes (shared_prompt_reference false) | 2.667 ",
                  "kto-scale, on the fly, kl_pairs_per_step = batch / 4 | 5.000 ",
                  "kto-scale, launch/precompute_ref.py, two passes (shared_prompt_reference false) (loop; process 10 s, "
                  "peak RSS 500 MiB) | 333 ",
                  "shared-prompt reference pass / two passes, on the fly, examples/s | 1.50x",
                  "shared-prompt reference pass / two passes, precompute, tokens/s | 1.50x",
                  "a quarter of the KL pairs / all, on the fly, examples/s | 1.25x"):
        assert sum(line.startswith(f"| {label}") for line in lines) == 1, label


def test_percentile_by_hand(monkeypatch):
    """Linear between sorted values: p95 of 1..9 lies 0.4 of the way from 8 to 9 (position 8 * 0.95 = 7.6)."""
    summary = bench_module("summary", monkeypatch)
    assert summary.percentile([9, 1, 2, 3, 4, 5, 6, 7, 8], 95) == pytest.approx(8.6, abs=1e-12)
    assert summary.percentile([2.0], 95) == 2.0 and summary.percentile([1, 3], 50) == 2.0


def test_max_batch_search_halves_then_bisects(monkeypatch):
    """From 64: 64 and 32 do not fit, 16 does; then one try at 24, which fits: 24. A failure that is not
    out-of-memory ends the search without an answer."""
    max_batch = bench_module("max_batch", monkeypatch)
    tried = []

    def try_batch(name, spec, batch, timeout):
        tried.append(batch)
        return {"batch": batch, "status": "fits" if batch <= 24 else "out of memory"}

    monkeypatch.setattr(max_batch, "try_batch", try_batch)
    found = max_batch.search("kto", {"n_examples": 192}, 64, 60, deadline=float("inf"))
    assert tried == [64, 32, 16, 24] and found["largest_that_fits"] == 24
    monkeypatch.setattr(max_batch, "try_batch", lambda name, spec, batch, timeout: {"batch": batch, "status": "failed"})
    assert max_batch.search("trl", {"n_examples": 192}, 64, 60, deadline=float("inf"))["largest_that_fits"] is None


def test_weights_checksum_and_device_build(monkeypatch):
    """kto-scale's seeded random model, built on the device the bench's config names (init_device: the GPU
    when there is one) and recorded by the bench's wrapper: the same seed gives the same checksum, another
    seed another one (the bench's verdict compares them across runs)."""
    model_init = bench_module("model_init", monkeypatch)
    from kto_scale.config import KTOConfig
    from kto_scale.model import load_base_model

    record = {}
    load = model_init.recorded(load_base_model, record)
    config = {"model_name_or_path": str(TINY_LLAMA_DIR), "dataset_name": "x", "init_random_weights": True,
              "init_device": model_init.device().type}
    first = load(KTOConfig(**config, seed=1))
    assert record["built_on"] == str(model_init.device()) and record["checksum"] == model_init.weights_checksum(first)
    load(KTOConfig(**config, seed=1))
    same = record["checksum"]
    load(KTOConfig(**config, seed=2))
    assert same == model_init.weights_checksum(first) != record["checksum"]


def test_torch_profile_categories(monkeypatch, tmp_path):
    """A step of a tiny model under StepProfiler (the CPU path): the LM head range, the matmuls and the
    optimizer each get time, every category is part of the window, and the busy time plus the host gaps
    make up its wall time."""
    import torch

    torch_profile = bench_module("torch_profile", monkeypatch)
    model_init = bench_module("model_init", monkeypatch)
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TINY_LLAMA_DIR))
    model_init.mark_lm_head(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    out = tmp_path / "profile.json"
    profiler = torch_profile.StepProfiler({"first": 2, "steps": 1, "out": str(out)})
    for step in range(1, 3):
        profiler.step_begins(step)
        model(input_ids=torch.randint(0, 100, (2, 16)), labels=torch.randint(0, 100, (2, 16))).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        profiler.step_ends(step)
    summary = json.loads(out.read_text())
    categories = summary["categories_ms"]
    assert summary["device"] == "cpu" and summary["steps"] == 1
    assert categories["LM head"] > 0 and categories["matmuls"] > 0 and categories["optimizer"] > 0
    assert sum(categories.values()) <= summary["busy_ms"] * (1 + 1e-6)  # self times of one thread within its ops
    assert summary["busy_ms"] + summary["host_gaps_ms"] == pytest.approx(summary["wall_ms"], rel=1e-9)
    assert torch_profile.union_us([(0, 2), (1, 3), (5, 6)]) == 4
    torch_profile.write_text(summary, "tiny", tmp_path / "profile.txt")
    assert "host gaps (wall - busy)" in (tmp_path / "profile.txt").read_text()
