"""Tests that pin the math of the KTO loss (Ethayarajh et al., 2024) as kto-scale defines it.

    r       = log pi_theta(y|x) - log pi_ref(y|x)         (each a SUM over completion tokens)
    z_ref   = max(0, mean over mismatched (x, y') of log pi_theta(y'|x) - log pi_ref(y'|x)), detached
    loss_D  = lambda_D (1 - sigmoid(beta (r - z_ref)))
    loss_U  = lambda_U (1 - sigmoid(beta (z_ref - r)))
    loss    = mean over examples; rewards = beta * r, detached.

References below are written with plain Python floats (math.exp, loops) so they share no code with
the library. The library side is what the training loop calls: kl_baseline for z_ref, then kto_losses
per example (batch_loss below composes them as the loop does for one micro-batch).
"""

import math
import random

import pytest
import torch
from tolerances import kto_atol, log_softmax_atol

from kto_scale.logprobs import chunked_completion_logps, completion_logps
from kto_scale.loss import kl_baseline, kto_losses


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def reference_kto(policy, reference, policy_kl, reference_kl, desirable, beta, lam_d, lam_u, z=None):
    """The paper's formula in plain Python floats. Returns (loss, z_ref, per-example losses, rewards)."""
    if z is None:
        kl = [p - q for p, q in zip(policy_kl, reference_kl, strict=True)]
        z = max(0.0, sum(kl) / len(kl))
    losses, rewards = [], []
    for p, q, d in zip(policy, reference, desirable, strict=True):
        r = p - q
        if d:
            losses.append(lam_d * (1.0 - sigmoid(beta * (r - z))))
        else:
            losses.append(lam_u * (1.0 - sigmoid(beta * (z - r))))
        rewards.append(beta * r)
    return sum(losses) / len(losses), z, losses, rewards


def batch_loss(policy, reference, policy_kl, reference_kl, desirable, beta=0.1, desirable_weight=1.0,
               undesirable_weight=1.0, z_ref=None):
    """One micro-batch as the training loop scores it: z_ref = kl_baseline of the batch's KL log-ratios
    (unless given), kto_losses per example, their mean. Returns (loss, z_ref, rewards)."""
    if z_ref is None:
        kl_ratios = policy_kl.float() - reference_kl.float()
        z_ref = kl_baseline(kl_ratios.sum(), kl_ratios.numel())
    losses, rewards = kto_losses(policy, reference, desirable, z_ref, beta, desirable_weight, undesirable_weight)
    return losses.mean(), z_ref, rewards


def naive_completion_logps(logits, input_ids, completion_mask, shift=True):
    """Per-token Python loop: sum of log_softmax(logits[t - 1])[input_ids[t]] over completion tokens t.

    With shift=False it reproduces the notebook's bug: log_softmax(logits[t])[input_ids[t]].
    """
    logits = logits.double().tolist()
    ids = input_ids.tolist()
    mask = completion_mask.tolist()
    out = []
    for row_logits, row_ids, row_mask in zip(logits, ids, mask, strict=True):
        total = 0.0
        for t in range(len(row_ids)):
            if not row_mask[t]:
                continue
            pos = t - 1 if shift else t
            assert pos >= 0, "position 0 cannot be a completion token"
            scores = row_logits[pos]
            log_z = math.log(sum(math.exp(s) for s in scores))
            total += scores[row_ids[t]] - log_z
        out.append(total)
    return out


def identity_head(h: torch.Tensor) -> torch.Tensor:
    """An lm_head for chunked_completion_logps that treats the hidden states as the logits."""
    return h


# --------------------------------------------------------------------------------------------
# 1. Hand-computed example
# --------------------------------------------------------------------------------------------


def test_hand_computed_example():
    """beta = 0.5, lambda_D = 2.0, lambda_U = 0.5, three examples (D, U, D).

    r_0 = -4.0 - (-5.0) =  1.0   (desirable)
    r_1 = -6.0 - (-5.5) = -0.5   (undesirable)
    r_2 = -3.0 - (-2.0) = -1.0   (desirable)
    KL ratios: -7.0 - (-7.5) = 0.5;  -8.0 - (-8.0) = 0.0;  -9.0 - (-8.8) = -0.2
    z_ref = max(0, (0.5 + 0.0 - 0.2) / 3) = 0.1
    loss_0 = 2.0 (1 - sigmoid(0.5 (1.0 - 0.1)))  = 2.0 (1 - sigmoid(0.45))  = 2.0 * 0.389360766 = 0.778721532
    loss_1 = 0.5 (1 - sigmoid(0.5 (0.1 + 0.5)))  = 0.5 (1 - sigmoid(0.3))   = 0.5 * 0.425557483 = 0.212778742
    loss_2 = 2.0 (1 - sigmoid(0.5 (-1.0 - 0.1))) = 2.0 (1 - sigmoid(-0.55)) = 2.0 * 0.634135591 = 1.268271182
    loss   = (0.778721532 + 0.212778742 + 1.268271182) / 3 = 0.753257152
    rewards = 0.5 * (1.0, -0.5, -1.0) = (0.5, -0.25, -0.5)
    """
    policy = torch.tensor([-4.0, -6.0, -3.0])
    reference = torch.tensor([-5.0, -5.5, -2.0])
    policy_kl = torch.tensor([-7.0, -8.0, -9.0])
    reference_kl = torch.tensor([-7.5, -8.0, -8.8])
    desirable = torch.tensor([True, False, True])

    loss, z_ref, rewards = batch_loss(
        policy, reference, policy_kl, reference_kl, desirable,
        beta=0.5, desirable_weight=2.0, undesirable_weight=0.5,
    )  # fmt: skip
    atol = kto_atol(9.0, 3)  # log-probs up to 9 (the 9-digit constants are within 5e-10 of exact)
    assert z_ref.item() == pytest.approx(0.1, abs=atol)
    assert loss.item() == pytest.approx(0.753257152, abs=atol)
    torch.testing.assert_close(rewards, torch.tensor([0.5, -0.25, -0.5]), atol=atol, rtol=0)

    losses, _ = kto_losses(policy, reference, desirable, z_ref, 0.5, 2.0, 0.5)
    torch.testing.assert_close(
        losses, torch.tensor([0.778721532, 0.212778742, 1.268271182]), atol=atol, rtol=0
    )


# --------------------------------------------------------------------------------------------
# 2. Plain-Python reference on random inputs
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("labels", ["mixed", "all_desirable", "all_undesirable"])
@pytest.mark.parametrize("batch_size", [1, 2, 7, 32])
@pytest.mark.parametrize("seed", range(4))
def test_matches_python_reference(seed, batch_size, labels):
    """kl_baseline and kto_losses equal the formula evaluated with math.exp and loops, for every output,
    within kto_atol (tests/tolerances.py) of the inputs' size and the batch."""
    rng = random.Random(1000 * seed + batch_size)
    # float32-representable inputs, so the library's float32 cast loses nothing.
    policy = torch.tensor([rng.uniform(-60.0, -1.0) for _ in range(batch_size)])
    reference = policy + torch.tensor([rng.uniform(-8.0, 8.0) for _ in range(batch_size)])
    policy_kl = torch.tensor([rng.uniform(-90.0, -10.0) for _ in range(batch_size)])
    # Half the seeds give a positive KL mean, half a negative one (z_ref clamped to 0).
    shift = 1.5 if seed % 2 == 0 else -1.5
    reference_kl = policy_kl - shift + torch.tensor([rng.uniform(-2.0, 2.0) for _ in range(batch_size)])
    if labels == "mixed":
        desirable = [rng.random() < 0.5 for _ in range(batch_size)]
    else:
        desirable = [labels == "all_desirable"] * batch_size
    beta = rng.uniform(0.01, 1.0)
    lam_d, lam_u = rng.uniform(0.5, 2.0), rng.uniform(0.5, 2.0)

    loss, z_ref, rewards = batch_loss(
        policy, reference, policy_kl, reference_kl, torch.tensor(desirable),
        beta=beta, desirable_weight=lam_d, undesirable_weight=lam_u,
    )  # fmt: skip
    ref_loss, ref_z, _, ref_rewards = reference_kto(
        policy.tolist(), reference.tolist(), policy_kl.tolist(), reference_kl.tolist(),
        desirable, beta, lam_d, lam_u,
    )  # fmt: skip
    assert loss.dtype == torch.float32 and loss.shape == ()
    atol = kto_atol(float(torch.cat([policy, reference, policy_kl, reference_kl]).abs().max()), batch_size)
    assert z_ref.item() == pytest.approx(ref_z, abs=atol)
    assert loss.item() == pytest.approx(ref_loss, abs=atol)
    torch.testing.assert_close(rewards, torch.tensor(ref_rewards), atol=atol, rtol=0)


# --------------------------------------------------------------------------------------------
# 3. One test per bug of the notebook this project grew from
# --------------------------------------------------------------------------------------------


def test_bug_unshifted_labels_hand_computed():
    """Logits at position t score token t + 1, not token t.

    V = 3, input_ids = [0, 1, 2], completion_mask = [F, T, T]
    logits[0] = [0, 2, 0], logits[1] = [0, 0, 2], logits[2] = [0, 0, 0]
    shifted (correct):  log_softmax(logits[0])[1] + log_softmax(logits[1])[2]
                        = 2 * (2 - log(2 + e^2)) = 2 * (2 - 2.239545) = -0.479090
    unshifted (buggy):  log_softmax(logits[1])[1] + log_softmax(logits[2])[2]
                        = (0 - log(2 + e^2)) + (0 - log 3) = -2.239545 - 1.098612 = -3.338157
    """
    logits = torch.tensor([[[0.0, 2.0, 0.0], [0.0, 0.0, 2.0], [0.0, 0.0, 0.0]]])
    ids = torch.tensor([[0, 1, 2]])
    mask = torch.tensor([[False, True, True]])
    correct = 2.0 * (2.0 - math.log(2.0 + math.e**2))
    buggy = -math.log(2.0 + math.e**2) - math.log(3.0)
    assert naive_completion_logps(logits, ids, mask) == pytest.approx([correct], abs=1e-12)
    assert naive_completion_logps(logits, ids, mask, shift=False) == pytest.approx([buggy], abs=1e-12)

    atol = log_softmax_atol(logits, 2)
    assert completion_logps(logits, ids, mask).item() == pytest.approx(correct, abs=atol)
    assert chunked_completion_logps(logits, identity_head, ids, mask, chunk_size=1).item() == pytest.approx(
        correct, abs=atol
    )


def test_bug_unshifted_labels_random():
    """completion_logps and chunked_completion_logps equal the shifted per-token loop on random logits,
    and the unshifted loop (the notebook's version) gives clearly different numbers on the same input."""
    g = torch.Generator().manual_seed(0)
    B, T, V = 3, 9, 11
    logits = 3.0 * torch.randn(B, T, V, generator=g)
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[0, 3:9] = True
    mask[1, 2:5] = True
    mask[2, 6:8] = True

    shifted = torch.tensor(naive_completion_logps(logits, ids, mask))
    unshifted = torch.tensor(naive_completion_logps(logits, ids, mask, shift=False))
    assert (shifted - unshifted).abs().min() > 0.1  # the check below discriminates

    atol = log_softmax_atol(logits, int(mask.sum(1).max()))  # tests/tolerances.py
    torch.testing.assert_close(completion_logps(logits, ids, mask), shifted.float(), atol=atol, rtol=0)
    for chunk in (1, 4, 100):
        got = chunked_completion_logps(logits, identity_head, ids, mask, chunk_size=chunk)
        torch.testing.assert_close(got, shifted.float(), atol=atol, rtol=0)


def test_bug_ratio_is_per_sequence_sum_not_batch_token_normalized():
    """r is a per-sequence SUM of token log-ratios, not divided by the batch's completion-token count.

    Three sequences with 1, 4 and 7 completion tokens (12 in the batch). The notebook's version used
    r_i = sum_t ratio_{i,t} / 12, which shrinks every r by 12x and so changes every loss; the
    test computes both with the per-token loop and requires the loss to match the sum and not the
    normalized one.
    """
    g = torch.Generator().manual_seed(1)
    B, T, V = 3, 10, 7
    ref_logits = torch.randn(B, T, V, generator=g)
    pol_logits = ref_logits + 1.5 * torch.randn(B, T, V, generator=g)
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[0, 2:3] = True  # 1 completion token, then padding
    mask[1, 5:9] = True  # 4
    mask[2, 3:10] = True  # 7
    n_tokens = int(mask.sum())
    assert n_tokens == 12
    desirable = [True, False, True]
    beta, lam_d, lam_u = 1.0, 1.0, 1.33
    # A fixed external z_ref keeps the KL term out of this test.
    z = 0.2

    policy = chunked_completion_logps(pol_logits, identity_head, ids, mask, chunk_size=5)
    reference = chunked_completion_logps(ref_logits, identity_head, ids, mask, chunk_size=5)
    loss, _, rewards = batch_loss(
        policy, reference, policy, reference, torch.tensor(desirable),
        beta=beta, desirable_weight=lam_d, undesirable_weight=lam_u, z_ref=torch.tensor(z),
    )  # fmt: skip

    pol_sums = naive_completion_logps(pol_logits, ids, mask)
    ref_sums = naive_completion_logps(ref_logits, ids, mask)
    sum_loss, _, _, sum_rewards = reference_kto(
        pol_sums, ref_sums, None, None, desirable, beta, lam_d, lam_u, z=z
    )
    norm_loss, *_ = reference_kto(
        [p / n_tokens for p in pol_sums], [q / n_tokens for q in ref_sums], None, None,
        desirable, beta, lam_d, lam_u, z=z,
    )  # fmt: skip
    assert abs(sum_loss - norm_loss) > 1e-2  # the check below discriminates
    # The log-probs are within log_softmax_atol of the loop's; r moves by both, the loss and rewards by at
    # most beta times that (sigmoid's slope 1/4, weights <= 1.33), plus kto_atol's own roundings.
    logp_atol = 2 * max(log_softmax_atol(logits, 7) for logits in (pol_logits, ref_logits))
    atol = beta * logp_atol + kto_atol(float(torch.cat([policy, reference]).abs().max()), B)
    assert loss.item() == pytest.approx(sum_loss, abs=atol)
    torch.testing.assert_close(rewards, torch.tensor(sum_rewards, dtype=torch.float32), atol=atol, rtol=0)

    # A row's log-prob does not depend on the other rows of the batch (their token count included): other
    # shapes, so each side within log_softmax_atol of exact.
    alone = chunked_completion_logps(pol_logits[:1], identity_head, ids[:1], mask[:1], chunk_size=5)
    assert alone.item() == pytest.approx(policy[0].item(), abs=logp_atol)
    alone = completion_logps(pol_logits[1:2], ids[1:2], mask[1:2])
    assert alone.item() == pytest.approx(completion_logps(pol_logits, ids, mask)[1].item(), abs=logp_atol)


def test_bug_undesirable_sign():
    """Undesirable loss is lambda_U (1 - sigmoid(beta (z - r))), not lambda_U (1 - sigmoid(beta (r - z))).

    beta = 1, lambda_U = 2, z = 0 (KL ratios 0), one undesirable example with r = -1 - (-3) = 2:
        correct: 2 (1 - sigmoid(0 - 2)) = 2 (1 - 0.119203) = 1.761594
        buggy:   2 (1 - sigmoid(2 - 0)) = 2 (1 - 0.880797) = 0.238406
    d loss / d logp for an example: -lambda * beta * s * sigmoid(u) (1 - sigmoid(u)) / B with
    u = beta s (r - z), s = +1 (desirable) / -1 (undesirable): negative for desirable, positive for
    undesirable. The buggy version has s = +1 for both, so both gradients are negative and raising r of
    an undesirable example lowers its loss.
    """
    zeros = torch.zeros(1)
    loss, _, _ = batch_loss(
        torch.tensor([-1.0]), torch.tensor([-3.0]), zeros, zeros, torch.tensor([False]),
        beta=1.0, undesirable_weight=2.0,
    )  # fmt: skip
    assert loss.item() == pytest.approx(2.0 * (1.0 - sigmoid(-2.0)), abs=kto_atol(3.0))
    assert loss.item() == pytest.approx(1.761594, abs=kto_atol(3.0) + 5e-7)  # a 7-digit constant: +- 5e-7
    assert abs(loss.item() - 2.0 * (1.0 - sigmoid(2.0))) > 1.0

    # Raising r of the undesirable example raises its loss (and of the desirable one lowers it).
    desirable = torch.tensor([True, False])
    reference = torch.tensor([-5.0, -5.0])
    kl = torch.tensor([-4.0, -4.5]), torch.tensor([-4.2, -4.5])
    base, z0, _ = batch_loss(torch.tensor([-5.0, -5.0]), reference, *kl, desirable, beta=0.5)
    up_u, z1, _ = batch_loss(torch.tensor([-5.0, -4.0]), reference, *kl, desirable, beta=0.5)
    up_d, _, _ = batch_loss(torch.tensor([-4.0, -5.0]), reference, *kl, desirable, beta=0.5)
    assert z0.item() == pytest.approx(0.1, abs=kto_atol(4.5, 2)) and z1.item() == z0.item()
    assert up_u.item() > base.item() + 1e-3
    assert up_d.item() < base.item() - 1e-3

    # Gradient signs, and values from the closed form.
    policy = torch.tensor([-4.0, -4.0, -6.0, -6.0], requires_grad=True)
    reference = torch.tensor([-5.0, -5.0, -5.5, -5.5])
    desirable_l = [True, False, True, False]
    beta, lam_d, lam_u = 0.7, 1.0, 1.5
    z = 0.3
    loss, _, _ = batch_loss(
        policy, reference, policy, reference, torch.tensor(desirable_l),
        beta=beta, desirable_weight=lam_d, undesirable_weight=lam_u, z_ref=torch.tensor(z),
    )  # fmt: skip
    loss.backward()
    grad = policy.grad
    assert grad[0] < 0 and grad[2] < 0, grad
    assert grad[1] > 0 and grad[3] > 0, grad
    expected = []
    for p, q, d in zip(policy.tolist(), reference.tolist(), desirable_l, strict=True):
        s, lam = (1.0, lam_d) if d else (-1.0, lam_u)
        u = beta * s * (p - q - z)
        expected.append(-lam * beta * s * sigmoid(u) * (1.0 - sigmoid(u)) / 4)
    torch.testing.assert_close(grad, torch.tensor(expected), atol=kto_atol(6.0, 4), rtol=0)  # log-probs up to 6


def test_bug_kl_from_mismatched_pairs_clamped_and_detached():
    """z_ref comes from the KL (mismatched) log-probs, is clamped at 0, and carries no gradient.

    Matched ratios r = (-4 - -5, -6 - -7) = (1, 1), mean 1.0.
    KL ratios (-8 - -8.2, -9 - -9.2) = (0.2, 0.2), mean 0.2 -> z_ref = 0.2 (the buggy version: 1.0).
    loss = mean(1 - sigmoid(0.5 (1 - 0.2)), 1 - sigmoid(0.5 (0.2 - 1)))
         = mean(1 - sigmoid(0.4), 1 - sigmoid(-0.4)) = mean(0.401312, 0.598688) = 0.5
    (with z_ref = 1.0 it would also be 0.5, so z_ref and the per-example losses are checked).
    Negative KL mean: ratios (-0.5, -0.3), mean -0.4 -> z_ref = max(0, -0.4) = 0 (unclamped: -0.4).
    With lambda_D = 2, lambda_U = 1:
        z = 0:    mean(2 (1 - sigmoid(0.5)), 1 - sigmoid(-0.5)) = mean(0.755081, 0.622459) = 0.688770
        z = -0.4: mean(2 (1 - sigmoid(0.7)), 1 - sigmoid(-0.7)) = mean(0.663624, 0.668188) = 0.665906
    """
    policy = torch.tensor([-4.0, -6.0])
    reference = torch.tensor([-5.0, -7.0])
    desirable = torch.tensor([True, False])
    policy_kl = torch.tensor([-8.0, -9.0], requires_grad=True)
    reference_kl = torch.tensor([-8.2, -9.2], requires_grad=True)

    loss, z_ref, _ = batch_loss(policy, reference, policy_kl, reference_kl, desirable, beta=0.5)
    assert z_ref.item() == pytest.approx(0.2, abs=kto_atol(9.2, 2))
    assert abs(z_ref.item() - 1.0) > 0.5
    losses, _ = kto_losses(policy, reference, desirable, z_ref, 0.5)
    torch.testing.assert_close(losses, torch.tensor([1 - sigmoid(0.4), 1 - sigmoid(-0.4)]), atol=kto_atol(9.2, 2),
                               rtol=0)

    # No gradient through z_ref. The KL mean is positive here, so clamp would pass a gradient
    # if z_ref were not detached.
    assert not z_ref.requires_grad
    policy_logps = policy.clone().requires_grad_(True)
    loss, z_ref, _ = batch_loss(policy_logps, reference, policy_kl, reference_kl, desirable, beta=0.5)
    loss.backward()
    assert policy_logps.grad is not None
    assert policy_kl.grad is None and reference_kl.grad is None
    assert not kl_baseline(policy_kl.sum() - reference_kl.sum(), 2).requires_grad

    # Clamped at 0.
    loss, z_ref, _ = batch_loss(
        policy, reference, torch.tensor([-8.0, -9.0]), torch.tensor([-7.5, -8.7]), desirable,
        beta=0.5, desirable_weight=2.0,
    )  # fmt: skip
    assert z_ref.item() == 0.0
    assert loss.item() == pytest.approx(0.688770, abs=kto_atol(9.0, 2) + 5e-7)  # a 6-digit constant: +- 5e-7
    expected, *_ = reference_kto(
        policy.tolist(), reference.tolist(), None, None, [True, False], 0.5, 2, 1, z=0.0
    )
    unclamped, *_ = reference_kto(
        policy.tolist(), reference.tolist(), None, None, [True, False], 0.5, 2, 1, z=-0.4
    )
    assert loss.item() == pytest.approx(expected, abs=kto_atol(9.0, 2))
    assert abs(loss.item() - unclamped) > 1e-2


# --------------------------------------------------------------------------------------------
# 4. kl_baseline and the external z_ref path
# --------------------------------------------------------------------------------------------


def test_kl_baseline_sum_count():
    """kl_baseline(sum, count) = max(0, sum / count): 1.5 / 3 = 0.5 exactly (a division is correctly rounded
    and 0.5 is a float32); -1.5 / 3 -> 0; 0 / 0 -> 0."""
    assert kl_baseline(torch.tensor(1.5), 3).item() == 0.5
    assert kl_baseline(torch.tensor(1.5), torch.tensor(3)).item() == 0.5
    assert kl_baseline(torch.tensor(1.5, dtype=torch.float64), torch.tensor(3.0)).item() == pytest.approx(0.5)
    assert kl_baseline(torch.tensor(-1.5), 3).item() == 0.0
    zero = kl_baseline(torch.tensor(0.0), 0)
    assert zero.item() == 0.0 and not torch.isnan(zero)
    zero = kl_baseline(torch.tensor(0.0), torch.tensor(0))
    assert zero.item() == 0.0
    assert kl_baseline(torch.tensor(1.5, dtype=torch.float64), 3).dtype == torch.float32
    assert kl_baseline(torch.tensor(1.5), 3).shape == ()


def test_kl_baseline_from_accumulated_pairs_is_the_mean_over_all_pairs():
    """The trainer accumulates (sum, count) over micro-batches (and ranks) and calls kl_baseline once:
    that is the mean over all pairs (plain Python), which is not the mean of the micro-batch means when
    micro-batches have different sizes."""
    g = torch.Generator().manual_seed(3)
    sizes = [1, 3, 6]
    pol = [torch.randn(n, generator=g) * 5 - 30 for n in sizes]
    ref = [p - 0.5 + torch.randn(n, generator=g) for p, n in zip(pol, sizes, strict=True)]
    total_sum = sum((p - q).sum() for p, q in zip(pol, ref, strict=True))
    z_trainer = kl_baseline(total_sum, torch.tensor(sum(sizes)))

    ratios = [a - b for p, q in zip(pol, ref, strict=True) for a, b in zip(p.tolist(), q.tolist(), strict=True)]
    mean_over_pairs = sum(ratios) / len(ratios)
    assert mean_over_pairs > 0.1
    size = float(torch.cat([*pol, *ref]).abs().max())  # tests/tolerances.py: 10 pairs of log-probs this large
    assert z_trainer.item() == pytest.approx(mean_over_pairs, abs=kto_atol(size, sum(sizes)))
    mean_of_means = sum((p - q).mean().item() for p, q in zip(pol, ref, strict=True)) / len(sizes)
    assert abs(mean_of_means - mean_over_pairs) > 1e-2


@pytest.mark.parametrize("z", [0.0, 0.37, 2.5])
def test_kto_losses_with_external_z_ref(z):
    """kto_losses uses the z_ref it is given (the loop's, reduced over ranks and micro-batches) and
    equals the Python formula with that z; a z_ref that carries a graph is still a constant."""
    g = torch.Generator().manual_seed(4)
    policy = torch.randn(6, generator=g) * 3 - 20
    reference = policy + torch.randn(6, generator=g)
    desirable = torch.tensor([True, False, False, True, True, False])

    losses, _ = kto_losses(policy, reference, desirable, torch.tensor(z), 0.3, 1.2, 0.8)
    _, _, ref_losses, _ = reference_kto(
        policy.tolist(), reference.tolist(), None, None, desirable.tolist(), 0.3, 1.2, 0.8, z=z
    )
    atol = kto_atol(float(torch.cat([policy, reference]).abs().max()), 6)  # tests/tolerances.py
    torch.testing.assert_close(losses, torch.tensor(ref_losses, dtype=torch.float32), atol=atol, rtol=0)

    # An external z_ref that carries a graph (e.g. an all-reduced sum of policy KL log-probs) is
    # still treated as a constant.
    z_graph = torch.tensor(z, requires_grad=True)
    policy_logps = policy.clone().requires_grad_(True)
    losses, _ = kto_losses(policy_logps, reference, desirable, z_graph * 1.0, 0.3)
    losses.mean().backward()
    assert z_graph.grad is None
    assert policy_logps.grad is not None


# --------------------------------------------------------------------------------------------
# 5. Rewards and gradients
# --------------------------------------------------------------------------------------------


def test_rewards_are_beta_times_ratio_and_detached():
    """rewards = beta * (policy - reference): 0.25 * (-10 - -12, -7 - -6) = (0.5, -0.25), exactly (every
    value is a float32 and every operation exact); no grad."""
    policy = torch.tensor([-10.0, -7.0], requires_grad=True)
    reference = torch.tensor([-12.0, -6.0], requires_grad=True)
    kl = torch.tensor([-1.0, -1.0])
    _, _, rewards = batch_loss(policy, reference, kl, kl, torch.tensor([True, False]), beta=0.25)
    assert rewards.tolist() == [0.5, -0.25]
    assert not rewards.requires_grad and rewards.grad_fn is None
    _, rewards = kto_losses(policy, reference, torch.tensor([True, False]), torch.tensor(0.0), 0.25)
    assert not rewards.requires_grad


def test_gradient_matches_finite_differences():
    """d loss / d policy_logps and d loss / d reference_logps (= -d loss / d policy_logps) match
    central finite differences and the closed form
    -lambda_y * beta * s * sigmoid(u) (1 - sigmoid(u)) / B, u = beta s (r - z), s = +-1.

    kto_losses computes in float32, so its loss is within kto_atol (tests/tolerances.py) of exact, and a
    central difference of step h is off by that twice over 2 h, plus its truncation h^2 / 6 |f^(3)|
    (|sigmoid^(3)| <= 1/8: |f^(3)| <= max(lambda) beta^3 / (8 B)); the analytic float32 gradient is
    within kto_atol of the closed form."""
    g = torch.Generator().manual_seed(5)
    B = 5
    policy = (torch.rand(B, generator=g, dtype=torch.float64) * 2 - 1).requires_grad_(True)
    reference = (torch.rand(B, generator=g, dtype=torch.float64) * 2 - 1).requires_grad_(True)
    policy_kl = torch.tensor([-1.0, -0.5, -0.75, -1.25, -0.25], dtype=torch.float64)
    reference_kl = policy_kl - 0.4
    desirable = torch.tensor([True, False, True, False, False])
    beta, lam_d, lam_u = 0.8, 1.3, 0.7

    def f(p, q):
        return batch_loss(p, q, policy_kl, reference_kl, desirable, beta, lam_d, lam_u)[0]

    # A step larger than gradcheck's default: the float32 rounding divided by h stays small.
    h, loss_atol = 5e-2, kto_atol(2.0, B)  # log-probs and KL log-probs within 2 in size
    fd_atol = loss_atol / h + h**2 / 6 * max(lam_d, lam_u) * beta**3 / (8 * B)
    assert torch.autograd.gradcheck(f, (policy, reference), eps=h, atol=fd_atol + loss_atol, rtol=0)

    loss = f(policy, reference)
    gp, gq = torch.autograd.grad(loss, (policy, reference))
    torch.testing.assert_close(gq, -gp)
    z = 0.4
    expected = []
    for p, q, d in zip(policy.tolist(), reference.tolist(), desirable.tolist(), strict=True):
        s, lam = (1.0, lam_d) if d else (-1.0, lam_u)
        u = beta * s * (p - q - z)
        expected.append(-lam * beta * s * sigmoid(u) * (1.0 - sigmoid(u)) / B)
    torch.testing.assert_close(gp, torch.tensor(expected, dtype=torch.float64), atol=loss_atol, rtol=0)
    assert (gp.abs() > 1e-3).all()


def test_balanced_weights_auto():
    """'auto' solves lambda_D n_D / (lambda_U n_U) = 1 for the weight it stands for:
    n_D = 30, n_U = 10 -> desirable auto with lambda_U = 1: lambda_D = 1 * 10 / 30 = 1/3;
    undesirable auto with lambda_D = 2: lambda_U = 2 * 30 / 10 = 6; both auto keep lambda_U = 1;
    numbers pass through; a missing class leaves an 'auto' weight at 1."""
    from kto_scale.loss import balanced_weights

    assert balanced_weights("auto", 1.0, 30, 10) == pytest.approx((1 / 3, 1.0))
    assert balanced_weights(2.0, "auto", 30, 10) == pytest.approx((2.0, 6.0))
    assert balanced_weights("auto", "auto", 30, 10) == pytest.approx((1 / 3, 1.0))
    assert balanced_weights(1.33, 1.0, 30, 10) == (1.33, 1.0)
    assert balanced_weights("auto", 1.0, 0, 10) == (1.0, 1.0)
    for d, u in (balanced_weights("auto", 1.0, 7, 3), balanced_weights(1.5, "auto", 7, 3)):
        assert d * 7 / (u * 3) == pytest.approx(1.0)
