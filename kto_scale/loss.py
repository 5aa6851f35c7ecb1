"""The KTO loss (Ethayarajh et al., 2024, "KTO: Model Alignment as Prospect Theoretic Optimization").

Pure functions of tensors: no torch.distributed, no config objects, no host syncs. The training
loop reduces the KL baseline over all ranks and accumulation micro-batches (kto_scale.trainer)
and passes it in as `z_ref`.

For an example (x, y) with sequence log-probs summed over the completion tokens:

    r(x, y) = log pi_theta(y|x) - log pi_ref(y|x)
    z_ref   = max(0, E_{(x, y') mismatched} [log pi_theta(y'|x) - log pi_ref(y'|x)])   (no gradient)
    v(x, y) = lambda_D * sigmoid(beta * (r - z_ref))   if y is desirable
              lambda_U * sigmoid(beta * (z_ref - r))   if y is undesirable
    loss    = E[lambda_y - v(x, y)]

which per example is lambda_D (1 - sigmoid(beta (r - z_ref))) for desirable and
lambda_U (1 - sigmoid(beta (z_ref - r))) for undesirable examples.
"""

import torch
from torch import Tensor


def kl_baseline(kl_ratio_sum: Tensor, count: Tensor | int) -> Tensor:
    """The KL baseline z_ref = max(0, mean of log pi_theta(y'|x) - log pi_ref(y'|x)) over mismatched pairs.

    Args:
        kl_ratio_sum: [] sum of the log-ratios of the mismatched (prompt, other completion) pairs.
        count: [] or int, how many pairs the sum covers. A count of 0 gives z_ref = 0.

    Returns:
        [] float32, detached: the paper treats z_ref as a constant (no gradient flows through it).
    """
    count = torch.as_tensor(count, dtype=torch.float32, device=kl_ratio_sum.device)
    mean = torch.where(count > 0, kl_ratio_sum.float() / count.clamp(min=1.0), 0.0)
    return mean.clamp(min=0.0).detach()


def kto_losses(
    policy_logps: Tensor,
    reference_logps: Tensor,
    desirable: Tensor,
    z_ref: Tensor,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Per-example KTO losses, for callers that reduce over more than one micro-batch themselves.

    Args:
        policy_logps: [B] log pi_theta(y|x), summed over completion tokens.
        reference_logps: [B] log pi_ref(y|x), summed over completion tokens.
        desirable: [B] bool, True where y is a desirable completion.
        z_ref: [] the KL baseline (see `kl_baseline`); treated as a constant.
        beta: the KTO temperature.
        desirable_weight, undesirable_weight: lambda_D and lambda_U.

    Returns:
        losses: [B] float32, lambda_y * (1 - sigmoid(beta * (+-(r - z_ref)))).
        rewards: [B] float32, detached implicit rewards beta * r.
    """
    log_ratio = policy_logps.float() - reference_logps.float()
    z_ref = z_ref.detach().float()
    # Desirable examples gain value when r rises above z_ref, undesirable ones when r falls below it.
    sign = torch.where(desirable, 1.0, -1.0)
    weight = torch.where(desirable, desirable_weight, undesirable_weight)
    losses = weight * (1.0 - torch.sigmoid(beta * sign * (log_ratio - z_ref)))
    return losses, (beta * log_ratio).detach()


def balanced_weights(
    desirable_weight: float | str, undesirable_weight: float | str, n_desirable: int, n_undesirable: int
) -> tuple[float, float]:
    """Resolve "auto" class weights so that lambda_D n_D / (lambda_U n_U) = 1 (paper, section 4.2).

    One "auto" is solved from the other weight; both "auto" keep lambda_U = 1. A class with no
    examples leaves its weight at 1 (its term never appears in the loss).

    Returns (lambda_D, lambda_U) as floats.
    """
    if n_desirable == 0 or n_undesirable == 0:
        return (1.0 if desirable_weight == "auto" else float(desirable_weight),
                1.0 if undesirable_weight == "auto" else float(undesirable_weight))
    if desirable_weight == "auto":
        lambda_u = 1.0 if undesirable_weight == "auto" else float(undesirable_weight)
        return lambda_u * n_undesirable / n_desirable, lambda_u
    if undesirable_weight == "auto":
        return float(desirable_weight), float(desirable_weight) * n_desirable / n_undesirable
    return float(desirable_weight), float(undesirable_weight)
