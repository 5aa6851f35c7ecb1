"""Peak memory of the LM head's share of a training step at Llama 3's vocabulary: kto-scale's chunked
completion log-probs (kto_scale.logprobs.chunked_completion_logps) against full logits and a float32
log-softmax (kto_scale.logprobs.completion_logps, which is what TRL's and most trainers' forward does).

    python bench/lm_head_memory.py --batch 32 8 4 --out bench/results-lm-head

Each (method, batch) runs in its own child process: hidden states [B, T, H] that require grad (the
decoder's output), a frozen LM head [V, H], the second half of every row as the completion; forward to
one log-prob per sequence, sum, backward to the hidden states. Peak = the child's peak RSS (on CUDA:
max_memory_allocated) minus its memory after a tiny warm-up step with the head in place, so it counts
what the step allocates: its inputs (the hidden states, B x T x H) and what the head's forward and
backward add (on CPU, RSS adds some tens of MiB of noise). A child that runs out of memory is reported
as such, not retried.
Liger-Kernel publishes, for its fused linear KTO loss at B 32, T 512, H 4096, V 128256, bf16 on an
H100: 3.4 GB against 30.7 GB for the plain PyTorch loss; the report puts these numbers beside them.
"""

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

LIGER = {"fused linear KTO (Liger)": 3.4, "torch reference (Liger's figure)": 30.7}  # GB, B 32, bf16, H100


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def child(method: str, batch: int, seq: int, hidden_size: int, vocab: int, dtype: str, chunk: int) -> dict:
    """One method at one batch size, in this process; returns the step's peak MiB."""
    import torch

    from kto_scale.logprobs import chunked_completion_logps, completion_logps

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    dt = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    head = torch.nn.Linear(hidden_size, vocab, bias=False, dtype=dt, device=device).requires_grad_(False)

    def step(rows: int, length: int) -> None:
        hidden = torch.randn(rows, length, hidden_size, dtype=dt, device=device).requires_grad_()
        input_ids = torch.randint(vocab, (rows, length), device=device)
        completion_mask = torch.zeros(rows, length, dtype=torch.bool, device=device)
        completion_mask[:, length // 2:] = True
        if method == "chunked":
            logps = chunked_completion_logps(hidden, head, input_ids, completion_mask, chunk)
        else:
            logps = completion_logps(head(hidden), input_ids, completion_mask)
        logps.sum().backward()

    step(1, 8)  # loads the kernels and autograd machinery, so RSS growth below is the step's own memory
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
    else:
        before = rss_mib()
    step(batch, seq)
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"method": method, "batch": batch, "device": device, "peak_mib": round(peak - before, 1)}


def measure(method: str, batch: int, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--child", method, "--batch", str(batch), "--seq", str(args.seq),
               "--hidden", str(args.hidden), "--vocab", str(args.vocab), "--dtype", args.dtype,
               "--chunk", str(args.chunk)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:  # killed for memory (-9) or a MemoryError: a result, not a crash of the bench
        return {"method": method, "batch": batch, "failed": f"exit {done.returncode}: {done.stderr[-300:].strip()}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(rows: list[dict], args: argparse.Namespace) -> str:
    lines = [f"# LM head memory: B x T {args.seq} x H {args.hidden}, V {args.vocab}, {args.dtype}, "
             f"forward + backward to the hidden states\n",
             "| method | batch | step peak, MiB |", "|---|---:|---:|"]
    for row in rows:
        value = row.get("peak_mib", f"failed ({row.get('failed', '')[:60]})")
        lines.append(f"| {row['method']} | {row['batch']} | {value} |")
    lines += ["", "Liger-Kernel's published figures at B 32, T 512, H 4096, V 128256, bf16, H100 (GB): "
              + ", ".join(f"{name} {gb}" for name, gb in LIGER.items()) + "."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[32])
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--chunk", type=int, default=1024, help="kto-scale's logprob_chunk_size")
    parser.add_argument("--methods", default="chunked,full")
    parser.add_argument("--out", type=Path, default=None, help="directory for results.json and results.md")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.batch[0], args.seq, args.hidden, args.vocab, args.dtype, args.chunk)))
        return
    rows = [measure(method, batch, args) for method in args.methods.split(",") for batch in args.batch]
    text = report(rows, args)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps({"settings": vars(args) | {"out": str(args.out)},
                                                           "rows": rows, "liger_gb": LIGER}, indent=1))
        (args.out / "results.md").write_text(text)


if __name__ == "__main__":
    main()
