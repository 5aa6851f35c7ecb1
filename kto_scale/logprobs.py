"""Per-sequence log-probabilities of completion tokens.

KTO needs one number per sequence: log pi(y|x) = sum over completion tokens of log p(y_t | x, y_<t).
The logits at position t score the token at position t + 1, so the completion mask is shifted by one.

Pure functions of tensors. `completion_logps` is the plain reference: it materializes a float32
[batch, seq, vocab] log-softmax. `chunked_completion_logps` is what training uses: it applies the
LM head only at positions that score a completion token, a chunk of rows at a time, so neither the
prompt's logits nor a full [batch, seq, vocab] float32 tensor ever exist (the vocabulary is 128k for
Llama 3).
"""

from collections.abc import Callable

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint


def completion_logps(logits: Tensor, input_ids: Tensor, completion_mask: Tensor) -> Tensor:
    """Reference implementation from full logits.

    Args:
        logits: [B, T, V] model outputs (any float dtype).
        input_ids: [B, T] token ids.
        completion_mask: [B, T] bool, True at completion tokens (EOS included; prompt and padding False).

    Returns:
        [B] float32 sums of log p(token) over each row's completion tokens.
    """
    log_probs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    token_logps = log_probs.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    # where(), not a multiply: padding positions may hold -inf, and 0 * -inf is NaN.
    return torch.where(completion_mask[:, 1:], token_logps, 0.0).sum(dim=-1)


def _token_logps(hidden: Tensor, targets: Tensor, lm_head: Callable[[Tensor], Tensor]) -> Tensor:
    """[N, H] hidden states and [N] targets -> [N] float32 log p(target)."""
    logits = lm_head(hidden).float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def chunked_completion_logps(
    hidden: Tensor,
    lm_head: Callable[[Tensor], Tensor],
    input_ids: Tensor,
    completion_mask: Tensor,
    chunk_size: int = 1024,
    sequence_ids: Tensor | None = None,
    num_sequences: int | None = None,
) -> Tensor:
    """Completion log-probs from the final hidden states, without materializing full logits.

    Args:
        hidden: [B, T, H] final hidden states (after the last norm), any float dtype.
        lm_head: maps [N, H] hidden states to [N, V] logits (the model's output embedding).
        input_ids: [B, T] token ids.
        completion_mask: [B, T] bool, True at completion tokens.
        chunk_size: rows of logits computed at once; peak extra memory is about
            chunk_size * V * 4 bytes. When gradients are on, each chunk is checkpointed so backward
            recomputes its logits instead of keeping them all alive.
        sequence_ids: [B, T] long, for packed rows holding several sequences: the sequence each
            token belongs to (0 .. num_sequences - 1). A position scores the next token only within
            the same sequence. None: each row is one sequence.
        num_sequences: how many sequences `sequence_ids` numbers (required with it).

    Returns:
        [B] (or [num_sequences]) float32, equal to
        `completion_logps(lm_head(hidden), input_ids, completion_mask)` on the unpacked sequences.
    """
    # Position t scores token t + 1: keep the positions whose next token is a completion token.
    # nonzero() is a host-device sync (its output size depends on the data); one per forward.
    scored = completion_mask[:, 1:]
    if sequence_ids is not None:
        scored = scored & (sequence_ids[:, 1:] == sequence_ids[:, :-1])
    rows, cols = scored.nonzero(as_tuple=True)
    token_logps = scored_token_logps(hidden[rows, cols], input_ids[rows, cols + 1], lm_head, chunk_size)
    if sequence_ids is None:
        sums = torch.zeros(input_ids.shape[0], dtype=torch.float32, device=hidden.device)
        return sums.index_add(0, rows, token_logps)
    sums = torch.zeros(num_sequences, dtype=torch.float32, device=hidden.device)
    return sums.index_add(0, sequence_ids[rows, cols + 1], token_logps)


def scored_token_logps(
    scoring_hidden: Tensor, targets: Tensor, lm_head: Callable[[Tensor], Tensor], chunk_size: int = 1024
) -> Tensor:
    """[M, H] hidden states of the positions that score a token and the [M] tokens they score -> [M]
    float32 log p(target), the LM head applied chunk_size rows at a time (see chunked_completion_logps)."""
    recompute = torch.is_grad_enabled() and scoring_hidden.requires_grad
    chunks = []
    for start in range(0, targets.numel(), chunk_size):
        h, t = scoring_hidden[start : start + chunk_size], targets[start : start + chunk_size]
        if recompute:
            chunks.append(checkpoint(_token_logps, h, t, lm_head, use_reentrant=False))
        else:
            chunks.append(_token_logps(h, t, lm_head))
    # With no completion token at all, keep the result attached to the graph so backward still runs.
    return torch.cat(chunks) if chunks else scoring_hidden.float().sum(-1)
