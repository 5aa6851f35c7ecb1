"""The yardstick for kto-scale's precompute: a bare torch.inference_mode() loop over the same batches.

    python bench/runs_bare.py --spec SPEC --result RESULT

The plain HF model (no peft, no DeepSpeed; on the GPU when there is one): decoder + LM head on the
completion positions (kto_scale.logprobs), over the precompute's batches: rows in kto_scale.collate.length_order (longest
first), precompute_batch_size per batch, the example and the KL sequences of each batch.
"""

import time

from measure import child_args, maxrss_mib, write_result
from model_init import device, load_bench_model


def run(spec: dict) -> dict:
    import datasets
    import torch

    from kto_scale.collate import collate, length_order, to_device
    from kto_scale.logprobs import chunked_completion_logps

    weights: dict = {}
    model = load_bench_model(spec, weights).eval()
    n = spec["n_examples"]
    dataset = datasets.Dataset.from_dict({
        "prompt_ids": spec["prompt_ids"], "completion_ids": spec["completion_ids"],
        "kl_completion_ids": spec["kl_completion_ids"], "label": [True] * n, "pair_id": [-1] * n,
    })
    order, size = [int(i) for i in length_order(dataset)], spec["precompute_batch_size"]
    batches = [to_device(collate(dataset, order[i : i + size], 0), device()) for i in range(0, n, size)]
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    masks = [batch[seq]["attention_mask"] for batch in batches for seq in ("policy", "kl")]
    tokens, padded = sum(int(m.sum()) for m in masks), sum(m.numel() for m in masks)  # counted outside the clock
    with torch.inference_mode():
        start = time.perf_counter()
        for batch in batches:
            for sequences in (batch["policy"], batch["kl"]):
                hidden = decoder(input_ids=sequences["input_ids"],
                                 attention_mask=sequences["attention_mask"]).last_hidden_state
                chunked_completion_logps(hidden, head, sequences["input_ids"], sequences["completion_mask"], 1024)
        if torch.cuda.is_available():  # the GPU's queue must drain before the clock stops
            torch.cuda.synchronize()
        loop = time.perf_counter() - start
    return {"loop_s": loop, "tokens": tokens, "padded": padded, "batches": len(batches),
            "batching": "collate.length_order (longest first)", "maxrss_self_mib": maxrss_mib(),
            "weights": weights}


if __name__ == "__main__":
    args, spec = child_args(__doc__)
    write_result(args.result, run(spec))
