"""Host (CPU) time of collating one training micro-batch, each reference layout, padded and packed.

    python bench/collate_time.py [--rows 32]

Synthetic rows with HH-like lengths (prompts 60-500 tokens, completions 20-400, max_length 1024,
Llama 3's vocabulary), collated as a DataLoader worker does (one torch thread). Prints the median CPU
time (time.process_time, so other load on the machine does not count) per micro-batch.
"""

import argparse
import time

import datasets
import numpy as np
import torch

from kto_scale.collate import ReferenceLayout, collate


def rows(n: int, seed: int = 0) -> datasets.Dataset:
    rng = np.random.default_rng(seed)
    completion = rng.integers(20, 400, n)
    kl_completion = np.roll(completion, 1)
    prompt = np.minimum(rng.integers(60, 500, n), 1024 - np.maximum(completion, kl_completion))
    tokens = lambda lengths: [rng.integers(3, 128_000, x).tolist() for x in lengths]  # noqa: E731
    return datasets.Dataset.from_dict({"prompt_ids": tokens(prompt), "completion_ids": tokens(completion),
                                       "kl_completion_ids": tokens(kl_completion), "label": (rng.random(n) < 0.5).tolist(),
                                       "pair_id": [-1] * n})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=32, help="rows per micro-batch")
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = rows(16 * args.rows).with_format("arrow")  # as kto_scale.batches.StepBatches holds it
    for packed in (False, True):
        for layout in (ReferenceLayout.SEPARATE, ReferenceLayout.SHARED):
            times = []
            for start in [s for _ in range(3) for s in range(0, len(data), args.rows)]:
                begin = time.process_time()
                collate(data, list(range(start, start + args.rows)), 0, packed, layout)
                times.append(time.process_time() - begin)
            print(f"{'packed' if packed else 'padded'} {layout.value:8s} {args.rows} rows: "
                  f"{np.median(times) * 1e3:.1f} ms CPU per micro-batch")


if __name__ == "__main__":
    main()
