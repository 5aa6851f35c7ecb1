"""Tolerances for comparing two fp32 computations that run different kernels or shapes (shared vs
separate reference passes, merged vs unmerged weights, a cache vs on the fly, 1 vs 2 ranks): they round
differently, so each test that compares them allows what fp32 rounding of the compared quantity gives,
derived here. Exact equality is asserted only where the same kernel computes both sides on the same shapes."""

import math

FP32_EPS = 2.0 ** -24  # float32 unit roundoff: one rounding moves a value x by at most |x| * 2^-24


def logp_rtol(num_layers: int) -> float:
    """How far, relative to its size, one sequence log-prob may differ between two fp32 computations that
    run other kernels or shapes. A sequence log-prob is a sum of n token log-probs near -L (|logp| ~ n L);
    each token's log-prob carries one rounding of order L * 2^-24 for each residual block it went through
    (attention and MLP: 2 per layer), one for the lm_head and one for the log-softmax; the n tokens'
    errors add in the sum, and both computations round: 2 * (2 * num_layers + 2) * 2^-24 * |logp|.
    A log-ratio of two such sums is allowed this times the larger of them; a mean over examples
    (rewards, z_ref) is bounded by the largest of its terms' bounds."""
    return 2 * (2 * num_layers + 2) * FP32_EPS


def stages_rtol(fan_in: int, num_layers: int) -> float:
    """How far, relative to its size, a model's output vector (its logits, or a backward pass's gradient)
    may be moved by two fp32 computations that run other kernels or shapes through num_layers layers.
    Each linear stage's product sums fan_in terms whose independent roundings add in quadrature, so a
    stage's output is off by ~sqrt(fan_in) * 2^-24 relative to its size. A layer has 4 stages in a row
    (q/k/v then o in attention, gate/up then down in the MLP; backward runs the same ones) and both
    sides round, so each layer adds up to 8 sqrt(fan_in) 2^-24 (fan_in: the widest, intermediate_size)."""
    return FP32_EPS * fan_in ** 0.5 * 8 * num_layers


def merged_logits_atol(logits, fan_in: int, num_layers: int) -> float:
    """How far a model's logits may be between two fp32 computations of other kernels or shapes: a merged
    model's ((W + s B A) x, one fp32 weight, rounded once per element) from the unmerged W x + s B (A x),
    or a padded batch from one unpadded example. The residual stream carries stages_rtol to the logits:
    max|logits| * stages_rtol(fan_in, num_layers)."""
    return float(logits.abs().max()) * stages_rtol(fan_in, num_layers)


def logp_atol(logits_atol: float, num_tokens: int) -> float:
    """How far a sum of num_tokens token log-probs may move when every logit may move by logits_atol:
    log p(y) = logit_y - logsumexp(logits), and logsumexp moves by at most the largest logit's move (its
    gradient, softmax, sums to 1), so each token moves by at most 2 logits_atol (the log-softmax's own
    few roundings of 2^-24 are far below it): 2 * num_tokens * logits_atol."""
    return 2 * num_tokens * logits_atol


def gradient_norm_atol(token_grads, model_config) -> float:
    """How far, in L2 norm, one parameter tensor's gradient of a sum of token log-probs may be between two
    fp32 computations of other kernels or shapes. The gradient is the sum over the scored tokens of each
    token's gradient g_t, a backward pass through the same stages as the forward: stages_rtol for the
    layers, and the lm_head's backward, which sums over the vocabulary (one stage of sqrt(vocab_size)
    2^-24 per side). The tokens' terms can cancel in the sum, which keeps their roundings, so the bound is
    relative to sum_t |g_t|, not to |sum_t g_t| (token_grads: the g_t, computed by the test):
    (stages_rtol(intermediate_size, num_hidden_layers) + 2 sqrt(vocab_size) 2^-24) * sum_t |g_t|."""
    rtol = (stages_rtol(model_config.intermediate_size, model_config.num_hidden_layers)
            + 2 * model_config.vocab_size ** 0.5 * FP32_EPS)
    return rtol * sum(float(g.norm()) for g in token_grads)


def log_softmax_atol(logits, num_tokens: int) -> float:
    """How far a sum of num_tokens fp32 token log-probs, log_softmax of rows of `logits` ([..., V]), may be
    from the exact sum of the same logits. Per row, log_softmax rounds x - max and exp once each, a sum
    of V terms at most 1 (V - 1 roundings relative to it, carried through the log as absolute error),
    the log and the last subtractions: at most (V + 3) 2^-24 times the size max|logits| + ln V; adding
    the num_tokens of them rounds each partial sum once more: num_tokens (V + 3 + num_tokens) 2^-24
    (max|logits| + ln V)."""
    vocab = logits.shape[-1]
    size = float(logits.abs().max()) + math.log(vocab)
    return num_tokens * (vocab + 3 + num_tokens) * FP32_EPS * size


def dot_atol(a, b) -> float:
    """How far an fp32 product a @ b.T (rows of a with rows of b, fan_in k terms each) may be from exact
    (or from the same product computed in other shapes, per side): each of the k additions rounds a
    partial sum, so k 2^-24 times the largest sum of |terms|, max(|a| @ |b|.T)."""
    return a.shape[-1] * FP32_EPS * float((a.detach().abs().double() @ b.detach().abs().double().T).max())


def linear_grads_atol(x, weight, out_grad, out_grad_rtol: float):
    """Elementwise bounds on how far the gradients of y = x @ weight.T ([N, k] x, [V, k] weight, [N, V]
    dy = out_grad) may be between two fp32 computations, where each dy element is off by at most
    out_grad_rtol of its size: d x = dy @ weight sums V terms, d weight = dy.T @ x sums N terms, each
    within (its sum's roundings + out_grad_rtol) times its sum of |terms|, and both sides round:
    (2 (V 2^-24 + out_grad_rtol) |dy| @ |weight|, 2 (N 2^-24 + out_grad_rtol) |dy|.T @ |x|)."""
    g, x, w = out_grad.abs().double(), x.abs().double(), weight.abs().double()
    vocab, n = w.shape[0], x.shape[0]
    return (2 * (vocab * FP32_EPS + out_grad_rtol) * (g @ w)).float(), (2 * (n * FP32_EPS + out_grad_rtol) * (g.T @ x)).float()


def kto_atol(size: float, batch_size: int = 1) -> float:
    """How far kl_baseline / kto_losses' float32 outputs (z_ref, per-example losses, their mean, rewards)
    may be from the same formula evaluated exactly, for log-probs of size at most `size`: each output is
    a chain of at most 10 float32 operations per example (the log-ratio's and z_ref's subtractions, the
    scaling by beta, sigmoid's exp, add and divide, 1 -, the weight) plus a sum over batch_size
    examples, each rounding once at the size of what it is given (at most `size`, the log-probs): a
    rounding's error passes on with a slope of at most 1 (sigmoid's is 1/4, beta and the weights are at
    most 2, a mean divides): (10 + batch_size) * 2 * 2^-24 * size."""
    return (10 + batch_size) * 2 * FP32_EPS * size


BF16_EPS = 2.0 ** -8  # bfloat16 unit roundoff (8 significand bits)

LORA_LOGP_SENSITIVITY = 5e3
"""A bound on sum_i |d log p(y|x) / d theta_i| over the LoRA weights of the tiny test model (rank 4 on
every projection, 9,344 weights) for one sequence of up to 64 tokens (the test runs' max_length): how far
a log-prob moves when every LoRA weight moves by 1. tests/test_tolerances.py checks it on the tiny model
with adapters as large as the test runs make them, so the run tolerances below rest on a checked number."""


SMOLLM2_LOGP_SENSITIVITY = 2e5
"""LORA_LOGP_SENSITIVITY's bound for SmolLM2-135M with rank-4 LoRA on every projection (1.2M weights), a
sequence of up to 64 tokens (the real-model runs' max_length), adapters up to 0.02 (2 steps of lr 2e-3
move a weight by at most ~4e-3): measured 5e4-9e4 at 96 tokens; tests/test_smollm2.py checks it. Large enough that
after an update only the first step's numbers are compared tightly there."""


def lora_logp_sensitivity(policy, length: int, scales: tuple[float, ...]) -> float:
    """The largest sum_i |d log p(y|x) / d theta_i| over `policy`'s LoRA weights, for random sequences
    of `length` tokens (every one scored), with lora_B drawn at each of `scales` (0: peft's init, where
    only lora_B's gradient is not 0). What LORA_LOGP_SENSITIVITY and SMOLLM2_LOGP_SENSITIVITY bound."""
    import torch

    from kto_scale.logprobs import completion_logps

    lora = [param for name, param in policy.named_parameters() if "lora_" in name]
    largest = 0.0
    for seed, scale in enumerate(scales):
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, param in policy.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * scale)
        ids = torch.randint(3, policy.config.vocab_size, (1, length), generator=generator)
        logp = completion_logps(policy(input_ids=ids).logits, ids, torch.ones_like(ids, dtype=torch.bool)).sum()
        grads = torch.autograd.grad(logp, lora, allow_unused=True)
        largest = max(largest, sum(float(g.abs().sum()) for g in grads if g is not None))
    return largest


def _largest(lines: list[dict], key: str) -> float:
    return max((abs(line[key]) for line in lines if key in line), default=0.0)


def _run(run_dir) -> tuple[dict, int, list[dict]]:
    """A run's kto_config.yaml, its model's layer count, and its metrics.jsonl lines."""
    import json
    from pathlib import Path

    import yaml

    config = yaml.safe_load((Path(run_dir) / "kto_config.yaml").read_text())
    layers = json.loads((Path(config["model_name_or_path"]) / "config.json").read_text())["num_hidden_layers"]
    return config, layers, [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def _rounding(config: dict, layers: int, lines: list[dict]) -> tuple[float, float]:
    """(delta0, rho): a log-ratio's forward rounding, logp_rtol(layers) * the run's largest logged |logp|
    (a policy or reference sum, or a KL pair's, of that size); and the gradient's relative rounding,
    logp_rtol(layers) (its own passes) + 2 beta delta0 (each example's weight is a sigmoid slope, moved by
    at most its argument's error 2 beta delta0, relative, as |sigma''| <= |sigma'|)."""
    rtol = logp_rtol(layers)
    delta0 = rtol * max(_largest(lines, "logps/desirable"), _largest(lines, "logps/undesirable"))
    return delta0, rtol + 2 * config.get("beta", 0.1) * delta0


def adapter_atol(run_dir, gradient_rtol: float | None = None) -> float:
    """How far the adapter of a run may be from that of another run of the same global batches in another
    layout: each step's gradient is off by rho * grad_norm (_rounding), and Adam's update
    m / (sqrt(v) + eps) moves by at most 1 / eps per unit of gradient (its slope is largest at g = 0), so
    each step adds lr * rho * grad_norm / eps (lr: the peak learning rate). With eps 1e-8 that is more
    than a full lr step, so nothing can be asserted (a near-zero component's sign is rounding):
    runs.config_file sets adam_epsilon 1e-3, where it is about 1e-5 per step. (The drift's own effect on
    later gradients is left out, as first order in rounding.) `gradient_rtol` replaces rho where the
    runs' gradients round otherwise (bf16)."""
    config, layers, lines = _run(run_dir)
    rho = gradient_rtol if gradient_rtol is not None else _rounding(config, layers, lines)[1]
    lr, eps = config.get("learning_rate", 5e-5), config.get("adam_epsilon", 1e-8)
    return sum(lr * rho * line["grad_norm"] / eps for line in lines if line["split"] == "train")


def run_tolerances(run_dir, weights_apart: float, sensitivity: float = LORA_LOGP_SENSITIVITY) -> list[dict[str, float]]:
    """How far each logged number of a run may be from another run of the same global batches in another
    layout (ranks, accumulation split, engine, a reference cache, a resume), whose adapter ended
    `weights_apart` from this one's (measured, and itself checked against adapter_atol): for each line of
    metrics.jsonl, an atol per key.

    A log-ratio is off by the forward's rounding delta0 (_rounding) and, once the weights have been
    updated, by what weights apart move a log-prob: at most `sensitivity` * weights_apart (the
    final adapters' distance bounds the earlier steps': each step adds to it). So delta = delta0 on the
    first step's line, delta0 + sensitivity * weights_apart after it (sensitivity: the model's bound on
    sum_i |d log p / d theta_i|, LORA_LOGP_SENSITIVITY for the tiny model, SMOLLM2_LOGP_SENSITIVITY). Then: logps and kl
    (log-ratio units) delta; rewards beta delta; margins 2 beta delta; loss max(weights) / 4 * 2 beta delta
    (1 - sigmoid's slope is at most 1/4, and r and z_ref both move); grad_norm rho * grad_norm; anything
    else (counts, learning rate, epoch, the accuracy of rewards, which changes only if a margin is
    within delta of 0) exactly."""
    config, layers, lines = _run(run_dir)
    delta0, rho = _rounding(config, layers, lines)
    beta = config.get("beta", 0.1)
    weight = max(config.get("desirable_weight", 1.0), config.get("undesirable_weight", 1.0))
    atols = []
    for line in lines:
        updated = line["step"] > 1 or line["split"] != "train"
        delta = delta0 + (sensitivity * weights_apart if updated else 0.0)
        atol = {"logps/desirable": delta, "logps/undesirable": delta, "kl": delta, "rewards/desirable": beta * delta,
                "rewards/undesirable": beta * delta, "margins": 2 * beta * delta,
                "loss": weight / 4 * 2 * beta * delta, "grad_norm": rho * line.get("grad_norm", 0.0)}
        atols.append({key: atol.get(key, 0.0) for key in line})
    return atols
