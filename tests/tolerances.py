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
