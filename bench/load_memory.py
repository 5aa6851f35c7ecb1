"""Host memory of loading a model and building its engine, per rank and per node, on CPU.

    python bench/load_memory.py --make-model /tmp/llama-1b          # once: a ~1.1B Llama in bf16 (2.2 GB)
    python bench/load_memory.py --make-model /tmp/llama-8b --shape 8b   # Llama-3-8B's shape (16 GB)
    torchrun --nproc_per_node 2 bench/load_memory.py --model /tmp/llama-1b --fsdp full_shard
    deepspeed --num_gpus 2 bench/load_memory.py --model /tmp/llama-1b --deepspeed ds_configs/zero3.json

Each rank runs what launch/train.py runs before its first step (kto_scale.trainer.train): the engine's
setup, load_base_model (on FSDP2 empty on every rank, or on ranks other than 0 when the checkpoint cannot
be read in slices), add_lora and the training engine (sharding, and on FSDP2 each rank's read of its
slices or rank 0's broadcast), while a thread samples its /proc/self/status every
2 ms. Rank 0 prints one JSON line: each rank's peak VmRSS (everything resident, including pages of the
memory-mapped safetensors file, which are shared page cache) and peak RssAnon (the rank's own memory),
their sums over the node (an upper bound: ranks peak at different moments) and the model's size.
"""

import argparse
import json
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHAPES = {
    # Llama-3.2-1B's layers with a 32k vocabulary and an untied LM head: 1.1B parameters (2.06 GiB).
    "1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
           "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 32000, "tie_word_embeddings": False},
    # Llama-3-8B's shape: 8.03B parameters (14.96 GiB).
    "8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256, "tie_word_embeddings": False},
}


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


class PeakSampler(threading.Thread):
    """Peak VmRSS and RssAnon of this process, sampled every 2 ms until stopped."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = {"VmRSS": 0, "RssAnon": 0}
        self.running = True

    def run(self) -> None:
        while self.running:
            for field in self.peak:
                self.peak[field] = max(self.peak[field], status_kib(field))
            time.sleep(0.002)


def make_model(path: Path, shape: str) -> None:
    """A random Llama of `shape` saved in bf16 with the tiny tokenizer (built one layer at a time would not
    matter: this is a setup step, not measured)."""
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from kto_scale.assets import TINY_LLAMA_DIR

    config = AutoConfig.from_pretrained(TINY_LLAMA_DIR)
    for key, value in SHAPES[shape].items():
        setattr(config, key, value)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TINY_LLAMA_DIR / name, path / name)


def measure(argv: list[str]) -> None:
    import torch

    from kto_scale.config_io import load_config
    from kto_scale.distributed import all_gather, init_distributed
    from kto_scale.model import SequenceLogps, add_lora, load_base_model
    from kto_scale.startup import engine_setup

    sampler = PeakSampler()
    sampler.start()
    config = load_config(argv)
    rank, world_size, _ = init_distributed(config.dist_timeout_s)
    setup = engine_setup(config, world_size)
    start = {field: status_kib(field) for field in sampler.peak}  # Python, torch, transformers, DeepSpeed
    base = load_base_model(config, empty=not setup.loads_weights(rank))  # as kto_scale.trainer.train loads
    params = sum(p.numel() * p.element_size() for p in base.parameters())
    setup.training_engine(SequenceLogps(add_lora(base, config), config.logprob_chunk_size), total_steps=1)
    sampler.running = False
    sampler.join()
    mine = [sampler.peak["VmRSS"], sampler.peak["RssAnon"], start["VmRSS"], start["RssAnon"], params]
    every = all_gather(torch.tensor(mine, dtype=torch.int64)).view(world_size, -1).tolist()
    if rank == 0:
        gib = lambda kib: round(kib / 2**20, 3)  # noqa: E731
        model_gib = round(every[0][4] / 2**30, 3)  # rank 0 holds the real weights
        print(json.dumps({
            "engine": f"fsdp {config.fsdp}" if config.fsdp else Path(config.deepspeed).name, "ranks": world_size,
            "model_gib": model_gib, "peak_vmrss_gib": [gib(r[0]) for r in every],
            "peak_rss_anon_gib": [gib(r[1]) for r in every], "added_rss_anon_gib": [gib(r[1] - r[3]) for r in every],
            "before_load_vmrss_gib": [gib(r[2]) for r in every],
            "node_peak_vmrss_gib": gib(sum(r[0] for r in every)),
            "node_peak_rss_anon_gib": gib(sum(r[1] for r in every)),
            "node_added_rss_anon_gib": gib(sum(r[1] - r[3] for r in every)),
        }))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--make-model", type=Path, help="write a random bf16 model of --shape here and exit")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1b", help="--make-model's shape")
    parser.add_argument("--model", help="the model directory to load")
    args, rest = parser.parse_known_args()
    if args.make_model:
        make_model(args.make_model, args.shape)
    else:
        measure(["--model_name_or_path", args.model, "--dataset_name", "unused.jsonl", "--bf16", "true", *rest])
