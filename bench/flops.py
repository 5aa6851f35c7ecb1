"""Model FLOPs of a KTO step, and MFU: achieved model FLOPs/s over the GPU's peak dense bf16 FLOPs/s.

The standard dense estimate, per sequence of T tokens of which C are completion tokens (the positions
whose log-probs the loss reads), for a Llama with L layers, hidden d, vocab V:

    P        = L * (2 d^2 + 2 d d_kv + 3 d I)       matmul weights of the decoder layers (d_kv: the K/V width)
    forward  = 2 P T + 2 L T^2 d + 2 d V C          linears + causal attention (half of 4 L T^2 d) + LM head
    backward = 2 P T + 4 L T^2 d + 2 d V C          input gradients only: the base is frozen (LoRA)

Backward counts 1x forward for the linears and the LM head (no weight gradients for frozen weights) and 2x
forward for the attention core, which has no weights (dQ, dK, dV and the probabilities' gradient).
Left out: the input embedding (a lookup), norms, activations, softmax, and the LoRA adapters (r 16 on
q,k,v,o: under 1% of the linears). The LM head is counted on the completion positions only: that is the
work the loss needs, whichever trainer does more.

The passes one KTO step runs per example: the policy forward + backward on the example's sequence, the
policy forward (no grad) on its KL sequence, and, with the reference on the fly, the reference forward on
both sequences ("separate") or one forward over x + y + y' ("shared": the prompt x of P tokens once; y' attends
to x and itself, so its attention is that of x + y' less x's own, 2 L d (T^2 + T_kl^2 - P^2) in all). A run
with the reference from a cache or TRL's precompute has no reference passes in its steps.
"""

from dataclasses import dataclass

# Peak dense bf16 FLOPs/s by torch.cuda.get_device_name; the first name contained in it wins.
PEAK_BF16_FLOPS = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12))


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int

    @property
    def layer_params(self) -> int:
        """P: the matmul weights of all decoder layers (q, k, v, o, gate, up, down)."""
        d, d_kv = self.hidden, self.kv_heads * self.hidden // self.heads
        return self.layers * (2 * d * d + 2 * d * d_kv + 3 * d * self.intermediate)


def forward_flops(shape: Shape, tokens: int, completion: int) -> float:
    """One forward pass over a sequence of `tokens` tokens, `completion` of them scored by the LM head."""
    attention = 2 * shape.layers * tokens**2 * shape.hidden
    return 2 * shape.layer_params * tokens + attention + 2 * shape.hidden * shape.vocab * completion


def backward_flops(shape: Shape, tokens: int, completion: int) -> float:
    """One backward pass with a frozen base: input gradients of the linears, twice the attention core."""
    attention = 4 * shape.layers * tokens**2 * shape.hidden
    return 2 * shape.layer_params * tokens + attention + 2 * shape.hidden * shape.vocab * completion


def shared_reference_flops(shape: Shape, example: tuple[int, int], kl: tuple[int, int]) -> float:
    """The reference's one forward over x + y + y' (both sequences share the prompt x)."""
    (tokens, completion), (kl_tokens, kl_completion) = example, kl
    prompt = tokens - completion
    attention = 2 * shape.layers * (tokens**2 + kl_tokens**2 - prompt**2) * shape.hidden
    return (2 * shape.layer_params * (tokens + kl_completion) + attention
            + 2 * shape.hidden * shape.vocab * (completion + kl_completion))


def example_flops(shape: Shape, example: tuple[int, int], kl: tuple[int, int], reference: str | None) -> float:
    """All passes of one KTO step over one example; `example` and `kl` are (tokens, completion tokens);
    `reference`: "separate", "shared" or None (see the module docstring)."""
    flops = forward_flops(shape, *example) + backward_flops(shape, *example) + forward_flops(shape, *kl)
    if reference == "separate":
        flops += forward_flops(shape, *example) + forward_flops(shape, *kl)
    elif reference == "shared":
        flops += shared_reference_flops(shape, example, kl)
    return flops


def peak_flops(device_name: str | None, override: float | None) -> float | None:
    """The GPU's peak dense bf16 FLOPs/s: --peak-flops, else the table; None on CPU or an unknown GPU."""
    if override:
        return override
    if device_name is None:
        return None
    return next((peak for name, peak in PEAK_BF16_FLOPS if name in device_name), None)


def step_sequences(spec: dict, step: int) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """(example, KL) as (tokens, completion tokens) for each row of kto-scale's step `step` (1-based)."""
    size, prompts = spec["batch_size"], spec["prompt_ids"]
    out = []
    for row in spec["order"][(step - 1) * size : step * size]:
        completion = len(spec["completion_ids"][row])
        kl_tokens = min(len(prompts[row]) + len(spec["kl_completion_ids"][row]), spec["max_length"])
        out.append(((len(prompts[row]) + completion, completion), (kl_tokens, kl_tokens - len(prompts[row]))))
    return out


def run_flops(spec: dict, shape: Shape, steps: list[dict], reference: str | None) -> float:
    """Model FLOPs of a run's steps (records with kto-scale's batches), checked against their token counts."""
    total = 0.0
    for record in steps:
        sequences = step_sequences(spec, record["step"])
        tokens = (sum(ex[0] for ex, _ in sequences), sum(kl[0] for _, kl in sequences))
        if tokens != (record["policy_tokens"], record["kl_tokens"]):
            raise RuntimeError(f"step {record['step']}: the spec's rows hold {tokens} (example, KL) tokens, the run "
                               f"recorded {record['policy_tokens'], record['kl_tokens']}: not kto-scale's batch")
        total += sum(example_flops(shape, ex, kl, reference) for ex, kl in sequences)
    return total
