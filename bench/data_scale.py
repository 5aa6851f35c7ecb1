"""The data path at scale: N synthetic KTO examples from the HH pairs, each stage's wall time and the
peak RSS of its whole process tree.

The N examples are N/2 {chosen, rejected} pairs cycled from an Anthropic HH file, each made distinct
by a tag "[k]" at the start of its first human turn (so prompts do not repeat and KL pairing has real
work); lengths are HH's own. Every stage runs as its own process (its memory is its own), watched by
this driver, which sums the RSS of the process and all its children every 50 ms (memory-mapped Arrow
pages the process touched count, as RSS counts them):

- prepare: kto-scale's preparation on a cold cache (shared_prepared_data), split into read, tokenize,
  truncate, pair and write by timing the kto_scale.prepare functions it calls;
- floor: `datasets.load_dataset("json") + map` tokenizing the chosen and rejected texts, nothing else,
  in the same number of processes (the floor for this work);
- reuse: the same call again on the warm cache (what a second run with other training options pays);
- scan: on the prepared train split, the prepared data's fingerprint (prepared_cache.data_fingerprint),
  the reference cache's dataset hash and example keys, sequence lengths, BatchPlan's epoch order
  (shuffled, and group_by_length), the batch at the epoch's last step (where a resumed run starts:
  nothing before it is read) and the choice of the generation prompts (generate.generation_prompts);
- train: launch/train.py, one optimizer step of the tiny model, on a cold then a warm cache (time to
  the first step, whole process);
- evaluate: launch/evaluate.py with the warm train stage's adapter on a split of --eval-examples
  examples (the first ones of the same data, prepared first by the prepare stage), whole process.

Every stage also reports its CPU seconds (its process and children, user + system) and the load
average before and after it: on a shared machine the wall time depends on the other jobs, the CPU
seconds much less.

Usage: python bench/data_scale.py --examples 100000 --hh ../shared/data/hh-rlhf-harmless-test.jsonl.gz [--eval-examples 50000]
       [--code /path/to/other/checkout: its train stage only, for "before" numbers]
Writes bench/results-data-scale/<examples>-<commit>.json (and prints a table of them all: results.md).
"""

import argparse
import contextlib
import gzip
import itertools
import json
import os
import platform
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
HUMAN = "\n\nHuman: "


def make_data(hh: Path, examples: int, path: Path) -> None:
    """examples/2 distinct pairs cycled from the HH text file, tagged apart."""
    with gzip.open(hh, "rt") if hh.name.endswith(".gz") else open(hh) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if not all(isinstance(row.get("chosen"), str) and HUMAN in row["chosen"] for row in rows):
        raise SystemExit(f"--hh {hh}: not Anthropic HH text rows ({{chosen, rejected}} with {HUMAN!r} turns).")
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as out:
        for k in range(examples // 2):
            row = rows[k % len(rows)]
            out.write(json.dumps({side: row[side].replace(HUMAN, f"{HUMAN}[{k}] ", 1) for side in ("chosen", "rejected")})
                      + "\n")
    tmp.rename(path)


def watch(command: list[str], env: dict | None = None) -> dict:
    """Run `command`; its wall time, the peak summed RSS and anonymous RSS of its process tree, and its last
    stdout line (JSON). RSS counts the pages of memory-mapped files (the Arrow data) a process has touched,
    once per process that maps them: page cache the kernel can drop. RssAnon is each process's own memory
    (heap, Python objects, buffers): what running out of memory is made of."""
    start, load, cpu = time.perf_counter(), os.getloadavg()[0], cpu_seconds()
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak, peak_anon, done = 0, 0, threading.Event()

    def rss_anon(pid: int) -> int:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
        return 0

    def sample() -> None:
        nonlocal peak, peak_anon
        root = psutil.Process(process.pid)
        while not done.is_set():
            try:
                tree = [p for p in [root, *root.children(recursive=True)] if p.is_running()]
                peak = max(peak, sum(p.memory_info().rss for p in tree))
                peak_anon = max(peak_anon, sum(rss_anon(p.pid) for p in tree))
            except (psutil.Error, OSError):
                pass
            time.sleep(0.05)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    stdout, stderr = process.communicate()
    done.set()
    thread.join()
    if process.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{stderr[-3000:]}")
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    return {"wall_s": round(time.perf_counter() - start, 2), "process_cpu_s": round(cpu_seconds() - cpu, 2),
            "peak_rss_gb": round(peak / 2**30, 3), "peak_rss_anon_gb": round(peak_anon / 2**30, 3),
            "load_before_after": [round(load, 2), round(os.getloadavg()[0], 2)], **(json.loads(lines[-1]) if lines else {})}


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and its finished children."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return round(own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime, 2)


# --- stages (each run in its own process: python bench/data_scale.py --stage NAME CONFIG) ---------------


@contextlib.contextmanager
def _timed(module, names: tuple[str, ...], times: dict) -> Iterator[None]:
    """module's functions `names`, wrapped while inside so that their calls add their wall time to
    times[name]; put back after (a stage may run in a test's process: tests/test_data_scale_bench.py)."""
    functions = {name: getattr(module, name) for name in names}

    def timed(name: str, function):
        def call(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                times[name] = round(times.get(name, 0.0) + time.perf_counter() - start, 2)

        return call

    try:
        for name, function in functions.items():
            setattr(module, name, timed(name, function))
        yield
    finally:
        for name, function in functions.items():
            setattr(module, name, function)


def stage_prepare(config) -> dict:
    from kto_scale import prepare
    from kto_scale.model import load_tokenizer
    from kto_scale.prepared_cache import shared_prepared_data

    times: dict[str, float] = {}
    tokenizer = load_tokenizer(config)
    start, cpu = time.perf_counter(), cpu_seconds()
    with _timed(prepare, ("load_examples", "tokenize_dataset", "_truncate_all", "kl_partners", "_write_prepared"),
                times):
        train, evaluation = shared_prepared_data(config, tokenizer)
    return {"seconds": round(time.perf_counter() - start, 2), "cpu_s": round(cpu_seconds() - cpu, 2),
            "examples": len(train), "stages_s": {
        "read": times.get("load_examples"), "tokenize": times.get("tokenize_dataset"),
        "truncate": times.get("_truncate_all"), "pair": times.get("kl_partners"), "write": times.get("_write_prepared")}}


def stage_floor(config) -> dict:
    import datasets

    from kto_scale.model import load_tokenizer
    from kto_scale.prepare import dataset_num_proc

    tokenizer = load_tokenizer(config)
    start, cpu = time.perf_counter(), cpu_seconds()
    rows = datasets.load_dataset("json", data_files=config.dataset_name, split="train",
                                 cache_dir=str(Path(config.output_dir).parent / "hf-cache"))
    read = time.perf_counter() - start

    def tokenize(batch):
        return {side: tokenizer(batch[side], add_special_tokens=False).input_ids for side in ("chosen", "rejected")}

    rows.map(tokenize, batched=True, num_proc=dataset_num_proc(config), remove_columns=["chosen", "rejected"])
    return {"seconds": round(time.perf_counter() - start, 2), "cpu_s": round(cpu_seconds() - cpu, 2),
            "read_s": round(read, 2)}


def stage_scan(config) -> dict:
    from kto_scale.collate import BatchPlan, collate, sequence_lengths
    from kto_scale.generate import generation_prompts
    from kto_scale.model import load_tokenizer
    from kto_scale.prepared_cache import data_fingerprint, shared_prepared_data
    from kto_scale.ref_cache import dataset_hash, example_keys

    tokenizer = load_tokenizer(config)
    train, _ = shared_prepared_data(config, tokenizer)
    out = {}

    def time_it(name, work):
        start = time.perf_counter()
        result = work()
        out[name] = round(time.perf_counter() - start, 3)
        return result

    time_it("data_fingerprint", lambda: data_fingerprint(config, tokenizer))
    time_it("dataset_hash", lambda: dataset_hash(train))
    time_it("example_keys", lambda: example_keys(train))
    lengths = time_it("sequence_lengths", lambda: sequence_lengths(train))
    for name, plan in (("shuffled", BatchPlan(len(train), 8, 4, 8)), ("group_by_length", BatchPlan(len(train), 8, 4, 8,
                                                                                                     lengths))):
        time_it(f"batch_plan_{name}", lambda plan=plan: plan.epoch_order(0, 42))
        last = plan.steps_per_epoch - 1  # a resumed run's first batch: a slice of the epoch order
        time_it(f"resume_batch_{name}", lambda plan=plan, last=last: [collate(train, b, 0) for b in
                                                                     plan.micro_batches(last, 0, 42, rank=0)])
    time_it("generation_prompts", lambda: generation_prompts(train, 8, 42))
    return out


def stage_main(argv: list[str]) -> None:
    """A stage's process: run it on the config file and print its numbers as the last stdout line."""
    from kto_scale.config_io import load_config

    stage, config_path = argv
    config = load_config(["--config", config_path])
    print(json.dumps({"prepare": stage_prepare, "floor": stage_floor, "scan": stage_scan}[stage](config)))


# --- driver ------------------------------------------------------------------------------------------


def write_config(data: Path, model: str, work: Path, name: str, new_options: bool, **extra) -> Path:
    import yaml

    config = {"model_name_or_path": model, "init_random_weights": True, "dataset_name": str(data),
              "output_dir": str(work / name), "max_length": 512, "max_prompt_length": 256, "data_seed": 42, "skip_bad_rows": True,
              "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1, "lora_r": 8, "lora_alpha": 16,
              "max_steps": 1, "save_steps": 1000, "logging_steps": 1, "disable_tqdm": True,
              "overwrite_output_dir": True, "deepspeed": str(REPO / "ds_configs/zero2.json"), **extra}
    if new_options:
        config["prepared_data_dir"] = str(work / "prepared")
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def report(output: Path) -> str:
    """A markdown table of every result in `output` (written to output/results.md)."""
    rows = ["| examples given | code | prepare cold s (read / tokenize / truncate / pair / write) | CPU s | peak RSS GB (anon) "
            "| load_dataset+map floor s (CPU s, peak GB) | prepare / floor | load avg (prepare, floor) "
            "| warm reuse s (process wall) | fingerprint / hash / keys / BatchPlan shuffled / grouped / resume batch s "
            "| scan peak RSS GB (anon) | train 1 step cold / warm wall s (peak GB) | evaluate examples: wall s (peak GB) |",
            "|" + "---|" * 13]
    for path in sorted(output.glob("*.json"), key=lambda p: (json.loads(p.read_text())["examples_given"], p.name)):
        r, dash = json.loads(path.read_text()), "-"
        cold, floor, warm, scan, evaluation = (r.get(k, {}) for k in ("prepare_cold", "floor_load_dataset_map",
                                                                      "prepare_warm", "scan", "evaluate"))
        stages = " / ".join(str(v) for v in cold.get("stages_s", {}).values())
        train = [r.get(k, {}) for k in ("train_1_step_cold", "train_1_step_warm")]
        loads = ", ".join("-".join(map(str, x.get("load_before_after", []))) or dash for x in (cold, floor))
        scanned = ("data_fingerprint", "dataset_hash", "example_keys", "batch_plan_shuffled",
                   "batch_plan_group_by_length", "resume_batch_group_by_length")
        rows.append(
            f"| {r['examples_given']:,} | {r['commit']} | {cold.get('seconds', dash)} ({stages or dash}) "
            f"| {cold.get('cpu_s', dash)} | {cold.get('peak_rss_gb', dash)} ({cold.get('peak_rss_anon_gb', dash)}) "
            f"| {floor.get('seconds', dash)} ({floor.get('cpu_s', dash)}, {floor.get('peak_rss_gb', dash)}) "
            f"| {r.get('prepare_over_floor', dash)} | {loads} | {warm.get('seconds', dash)} ({warm.get('wall_s', dash)}) "
            f"| {' / '.join(str(scan.get(k, dash)) for k in scanned)} "
            f"| {scan.get('peak_rss_gb', dash)} ({scan.get('peak_rss_anon_gb', dash)}) "
            f"| {' / '.join(str(t.get('wall_s', dash)) for t in train)} "
            f"({' / '.join(str(t.get('peak_rss_gb', dash)) for t in train)}) "
            f"| {evaluation.get('examples', dash)}: {evaluation.get('wall_s', dash)} ({evaluation.get('peak_rss_gb', dash)}) |")
    table = "\n".join(rows) + "\n"
    (output / "results.md").write_text(table)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=100_000)
    parser.add_argument("--hh", type=Path, default=REPO.parent / "shared/data/hh-rlhf-harmless-test.jsonl.gz")
    parser.add_argument("--work", type=Path, default=Path("/tmp/kto-data-scale"))
    parser.add_argument("--model", default=str(REPO / "kto_scale/assets/tiny-llama"))
    parser.add_argument("--stages", default="prepare,floor,reuse,scan,train,evaluate")
    parser.add_argument("--eval-examples", type=int, default=50_000, help="the evaluate stage's split")
    parser.add_argument("--code", type=Path, default=None, help="another checkout: run its train stage only")
    parser.add_argument("--output", type=Path, default=REPO / "bench/results-data-scale")
    parser.add_argument("--dataset-num-proc", type=int, default=None,
                        help="dataset_num_proc of every stage: the tokenizing processes (default: the cores this "
                             "process may use)")
    args = parser.parse_args()
    if not args.hh.is_file():
        raise SystemExit(f"--hh {args.hh} does not exist; give an Anthropic HH .jsonl(.gz) file.")
    git = ["git", "-C", str(args.code or REPO)]
    commit = subprocess.run([*git, "describe", "--always", "--dirty"], capture_output=True, text=True).stdout.strip()
    work = args.work / str(args.examples)
    work.mkdir(parents=True, exist_ok=True)
    data = work / "pairs.jsonl"
    if not data.exists():
        make_data(args.hh, args.examples, data)
    env = dict(os.environ, PYTHONPATH=str(args.code or REPO), HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    stage = [sys.executable, str(Path(__file__).resolve()), "--stage"]
    results: dict = {"examples_given": args.examples, "data_mb": round(data.stat().st_size / 2**20, 1)}
    stages = args.stages.split(",") if args.code is None else ["train"]
    num_proc = {"dataset_num_proc": args.dataset_num_proc} if args.dataset_num_proc else {}
    config = write_config(data, args.model, work, "bench", args.code is None, **num_proc)
    if "prepare" in stages:
        subprocess.run(["rm", "-rf", str(work / "prepared")], check=True)
        results["prepare_cold"] = watch([*stage, "prepare", str(config)], env)
    if "floor" in stages:
        results["floor_load_dataset_map"] = watch([*stage, "floor", str(config)], env)
        if "prepare_cold" in results:
            results["prepare_over_floor"] = round(results["prepare_cold"]["seconds"]
                                                  / results["floor_load_dataset_map"]["seconds"], 2)
    if "reuse" in stages:
        results["prepare_warm"] = watch([*stage, "prepare", str(config)], env)
    if "scan" in stages:
        results["scan"] = watch([*stage, "scan", str(config)], env)
    if "train" in stages:
        subprocess.run(["rm", "-rf", str(work / "prepared")], check=True)
        train = [sys.executable, str((args.code or REPO) / "launch/train.py"), "--config"]
        cold = write_config(data, args.model, work, "train-cold", args.code is None, **num_proc)
        results["train_1_step_cold"] = watch([*train, str(cold)], env)
        if args.code is None:
            warm = write_config(data, args.model, work, "train-warm", True, beta=0.5, learning_rate=1e-3, **num_proc)
            results["train_1_step_warm"] = watch([*train, str(warm)], env)
    if "evaluate" in stages and args.code is None:
        eval_data = work / f"eval-{args.eval_examples}.jsonl"
        with open(data) as rows, open(eval_data, "w") as out:
            out.writelines(itertools.islice(rows, args.eval_examples // 2))
        subprocess.run(["rm", "-rf", str(work / "eval-out")], check=True)
        eval_config = write_config(eval_data, args.model, work, "evaluate", True, **num_proc)
        results["evaluate_prepare"] = watch([*stage, "prepare", str(eval_config)], env)
        results["evaluate"] = watch([sys.executable, str(REPO / "launch/evaluate.py"), "--config", str(eval_config),
                                     "--adapter", str(work / "train-warm/adapter"), "--output", str(work / "eval-out"),
                                     "--split", "train"], env)
        results["evaluate"]["examples"] = results["evaluate_prepare"]["examples"]
    results.update(commit=commit, command=" ".join(sys.argv), cores=len(os.sched_getaffinity(0)),
                   machine=f"{platform.processor() or platform.machine()}, {psutil.virtual_memory().total / 2**30:.0f} GB")
    args.output.mkdir(parents=True, exist_ok=True)
    name = f"{args.examples}{'-' + args.code.name if args.code else ''}-{commit}.json"  # one file per run
    (args.output / name).write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results, indent=1))
    print(report(args.output))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--stage"]:
        stage_main(sys.argv[2:])
    else:
        main()
