"""Tolerances for comparing two fp32 computations that run different kernels or shapes (shared vs
separate reference passes, merged vs unmerged weights, a cache vs on the fly, 1 vs 2 ranks): they round
differently, so each test that compares them allows what fp32 rounding of the compared quantity gives,
derived here. Exact equality is asserted only where the same kernel computes both sides on the same shapes."""

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


def merged_logits_atol(logits, fan_in: int, num_layers: int) -> float:
    """How far a merged model's logits ((W + s B A) x, one fp32 weight) may be from the unmerged
    W x + s B (A x). Each side rounds differently in every linear stage: the merged weight once per
    element, and each product sums fan_in terms whose independent roundings add in quadrature, so a
    stage's output is off by ~sqrt(fan_in) * 2^-24 relative to its size. A layer has 4 stages in a row
    (q/k/v then o in attention, gate/up then down in the MLP) and both sides round, so each layer adds
    up to 8 sqrt(fan_in) 2^-24 relative error to the residual stream, which carries it to the logits:
    max|logits| * 2^-24 * sqrt(fan_in) * 8 * num_layers (fan_in: the widest, intermediate_size)."""
    return float(logits.abs().max()) * FP32_EPS * fan_in ** 0.5 * 8 * num_layers


BF16_EPS = 2.0 ** -8  # bfloat16 unit roundoff (8 significand bits)

LORA_LOGP_SENSITIVITY = 5e3
"""A bound on sum_i |d log p(y|x) / d theta_i| over the LoRA weights of the tiny test model (rank 4 on
every projection, 9,344 weights) for one sequence of up to 64 tokens (the test runs' max_length): how far
a log-prob moves when every LoRA weight moves by 1. tests/test_tolerances.py checks it on the tiny model
with adapters as large as the test runs make them, so the run tolerances below rest on a checked number."""


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


def run_tolerances(run_dir, weights_apart: float) -> list[dict[str, float]]:
    """How far each logged number of a run may be from another run of the same global batches in another
    layout (ranks, accumulation split, engine, a reference cache, a resume), whose adapter ended
    `weights_apart` from this one's (measured, and itself checked against adapter_atol): for each line of
    metrics.jsonl, an atol per key.

    A log-ratio is off by the forward's rounding delta0 (_rounding) and, once the weights have been
    updated, by what weights apart move a log-prob: at most LORA_LOGP_SENSITIVITY * weights_apart (the
    final adapters' distance bounds the earlier steps': each step adds to it). So delta = delta0 on the
    first step's line, delta0 + LORA_LOGP_SENSITIVITY * weights_apart after it. Then: logps and kl
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
        delta = delta0 + (LORA_LOGP_SENSITIVITY * weights_apart if updated else 0.0)
        atol = {"logps/desirable": delta, "logps/undesirable": delta, "kl": delta, "rewards/desirable": beta * delta,
                "rewards/undesirable": beta * delta, "margins": 2 * beta * delta,
                "loss": weight / 4 * 2 * beta * delta, "grad_norm": rho * line.get("grad_norm", 0.0)}
        atols.append({key: atol.get(key, 0.0) for key in line})
    return atols
