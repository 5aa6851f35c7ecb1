"""The largest micro-batch that fits, per run (bench_trl.py --find-max-batch RUNS).

Each try is the run as the bench runs it, at micro-batch B for TRY_STEPS steps (no warm-up: forward and
backward at B's shapes are what may not fit), in its own child process and work dir. From
--max-batch-start it halves B on out-of-memory until one fits, then tries once between that and the
smallest that did not. A failure other than out-of-memory ends the run's search. --max-batch-budget caps
the whole search: no try starts after it. Only the steps' own batches are tried: TRL pads each batch to its
longest row, so a later batch with longer rows may need more memory than these.
"""

import json
import time
from pathlib import Path

from inputs import batch_order, write_spec
from runner import RUNS, log, run_child

MAX_BATCH_RUNS = ("kto", "kto_separate", "trl", "trl_pre")  # training runs that need no other run's output
TRY_STEPS = 3
OUT_OF_MEMORY = ("OutOfMemoryError", "CUDA out of memory")  # torch's exception and its message


def try_batch(name: str, spec: dict, batch: int, timeout: float) -> dict:
    """One try of run `name` at micro-batch `batch`: fits (with its peak GPU memory), out of memory, or failed."""
    work = Path(spec["work"]) / "max_batch" / f"{name}_{batch}"
    work.mkdir(parents=True, exist_ok=True)
    try_spec = dict(spec, work=str(work), batch_size=batch, warmup=0, steps=TRY_STEPS,
                    order=batch_order(spec["n_examples"], batch, spec["seed"]))
    write_spec(try_spec)
    try:
        result = run_child(name, try_spec, timeout)
    except RuntimeError as error:
        log_text = (work / f"log_{name}.txt").read_text()
        status = "out of memory" if any(key in log_text for key in OUT_OF_MEMORY) else "failed"
        return {"batch": batch, "status": status, "error": str(error).splitlines()[0]}
    return {"batch": batch, "status": "fits", "gpu_peak_mib": result["gpu_peak_mib"],
            "step_s": [round(step["time_s"], 3) for step in result["steps"]]}


def search(name: str, spec: dict, start: int, timeout: float, deadline: float) -> dict:
    """Halve from `start` until a batch fits, then one try halfway up to the smallest that did not."""
    tries, fits, too_big = [], None, None
    batch = start
    while batch >= 1 and fits is None and time.time() < deadline:
        if spec["n_examples"] // batch < TRY_STEPS:
            tries.append({"batch": batch, "status": f"skipped: {spec['n_examples']} rows give fewer than "
                                                     f"{TRY_STEPS} batches (raise --pairs)"})
            batch //= 2
            continue
        tries.append(try_batch(name, spec, batch, timeout))
        status = tries[-1]["status"]
        if status == "fits":
            fits = batch
        elif status == "out of memory":
            too_big, batch = batch, batch // 2
        else:
            break
    if fits is not None and too_big is not None and too_big - fits > 1 and time.time() < deadline:
        tries.append(try_batch(name, spec, (fits + too_big) // 2, timeout))
        if tries[-1]["status"] == "fits":
            fits = tries[-1]["batch"]
    return {"largest_that_fits": fits, "tries": tries}


def find_max_batch(args, spec: dict, deadline: float) -> dict:
    """The search for each of --find-max-batch's runs; writes max-batch.json and max-batch.md to --out."""
    found = {}
    for name in args.find_max_batch:
        found[name] = search(name, spec, args.max_batch_start, args.timeout, deadline)
        log(f"{name}: largest micro-batch that fits: {found[name]['largest_that_fits']}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "max-batch.json").write_text(json.dumps({"setup": {k: spec[k] for k in (
        "hidden", "layers", "heads", "kv_heads", "intermediate", "vocab", "max_length", "dtype", "padding_free",
        "lora_targets")}, "try_steps": TRY_STEPS, "runs": found}, indent=2))
    lines = ["# Largest micro-batch that fits", "",
             f"Each try: {TRY_STEPS} steps of the run at that micro-batch, in its own process "
             "(bench/max_batch.py); halving from the first on out-of-memory, then one try halfway back up.", "",
             "| run | largest that fits | tries (batch: result, peak GPU MiB) |", "|---|---:|---|"]
    for name, value in found.items():
        tries = "; ".join(f"{t['batch']}: {t['status']}" + (f", {t['gpu_peak_mib']:.0f}" if t.get("gpu_peak_mib")
                                                             else "") for t in value["tries"])
        lines.append(f"| {RUNS[name].label} | {value['largest_that_fits'] or 'none'} | {tries} |")
    (args.out / "max-batch.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return found
