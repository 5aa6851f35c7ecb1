"""Tests for per-sequence completion log-probabilities.

    log pi(y|x) = sum over completion tokens t of log_softmax(logits[t - 1])[input_ids[t]]

(logits at position t score the token at t + 1; prompt and padding tokens are not summed).
"""

import math

import pytest
import torch
from tolerances import BF16_EPS, FP32_EPS, dot_atol, linear_grads_atol, log_softmax_atol, logp_atol
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from kto_scale.logprobs import chunked_completion_logps, completion_logps


def naive_completion_logps(logits, input_ids, completion_mask):
    """Per-token Python loop in float64: for each row, for each t with completion_mask[t],
    add log_softmax(logits[t - 1])[input_ids[t]]."""
    logits = logits.double().tolist()
    out = []
    for row_logits, row_ids, row_mask in zip(
        logits, input_ids.tolist(), completion_mask.tolist(), strict=True
    ):
        total = 0.0
        for t, (token, in_completion) in enumerate(zip(row_ids, row_mask, strict=True)):
            if not in_completion:
                continue
            assert t >= 1, "position 0 cannot be a completion token"
            scores = row_logits[t - 1]
            total += scores[token] - math.log(sum(math.exp(s) for s in scores))
        out.append(total)
    return torch.tensor(out, dtype=torch.float64)


def make_batch(seed=0, B=4, T=12, V=13, H=8, lengths=((3, 4), (5, 7), (2, 10), (0, 0)), pad_id=0):
    """Right-padded batch: row i has a prompt of lengths[i][0] tokens, then lengths[i][1] completion
    tokens, then padding (pad_id). A completion length of 0 gives a row with no completion tokens."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.bool)
    for i, (prompt, completion) in enumerate(lengths):
        n = max(prompt + completion, 1)
        input_ids[i, :n] = torch.randint(1, V, (n,), generator=g)
        mask[i, prompt : prompt + completion] = True
    hidden = torch.randn(B, T, H, generator=g)
    head = nn.Linear(H, V, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, H, generator=g))
    return hidden, head, input_ids, mask


# --------------------------------------------------------------------------------------------
# 1. completion_logps vs the per-token loop
# --------------------------------------------------------------------------------------------


def test_completion_logps_hand_computed():
    """Uniform logits over V = 4: each completion token contributes log(1/4).
    Row 0: tokens 2..4 in the completion -> 3 * -log 4 = -4.158883; row 1: one token -> -1.386294."""
    logits = torch.zeros(2, 6, 4)
    ids = torch.tensor([[1, 2, 3, 0, 1, 0], [3, 3, 1, 0, 0, 0]])
    mask = torch.tensor([[False, False, True, True, True, False], [False, False, True, False, False, False]])
    torch.testing.assert_close(completion_logps(logits, ids, mask), torch.tensor([-4.158883, -1.386294]))


@pytest.mark.parametrize("seed", range(3))
def test_completion_logps_matches_naive_loop(seed):
    """Right padding, prompts and completions of different lengths, a row without completion (-> 0); the
    float32 result within log_softmax_atol (tests/tolerances.py) of the float64 loop."""
    _, _, ids, mask = make_batch(seed)
    g = torch.Generator().manual_seed(100 + seed)
    logits = 4.0 * torch.randn(*ids.shape, 13, generator=g)
    got = completion_logps(logits, ids, mask)
    assert got.dtype == torch.float32 and got.shape == (ids.shape[0],)
    atol = log_softmax_atol(logits, int(mask.sum(1).max()))
    torch.testing.assert_close(got.double(), naive_completion_logps(logits, ids, mask), atol=atol, rtol=0)
    assert got[3].item() == 0.0
    # Padding and prompt logits do not matter: perturbing them leaves the result unchanged.
    scoring = torch.zeros_like(mask)
    scoring[:, :-1] = mask[:, 1:]
    noisy = torch.where(scoring.unsqueeze(-1), logits, logits + 50.0 * torch.randn(logits.shape, generator=g))
    torch.testing.assert_close(completion_logps(noisy, ids, mask), got)


def test_completion_logps_bf16_logits_give_float32():
    """bf16 logits: output is float32 and equals the loop over the same (bf16-rounded) logits."""
    _, _, ids, mask = make_batch(1)
    g = torch.Generator().manual_seed(7)
    logits = (4.0 * torch.randn(*ids.shape, 13, generator=g)).bfloat16()
    got = completion_logps(logits, ids, mask)
    assert got.dtype == torch.float32
    atol = log_softmax_atol(logits, int(mask.sum(1).max()))  # the loop sums the same bf16 values in float64
    torch.testing.assert_close(got.double(), naive_completion_logps(logits, ids, mask), atol=atol, rtol=0)


# --------------------------------------------------------------------------------------------
# 2. chunked_completion_logps == completion_logps(lm_head(hidden)), values and gradients
# --------------------------------------------------------------------------------------------


def _head_atols(hidden, head, ids, mask, upstream):
    """For chunked vs full log-probs of head(hidden) (tests/tolerances.py): the values' atol, and
    elementwise bounds on the hidden's and head weight's gradients of (logps * upstream).sum()."""
    scored = mask[:, 1:].nonzero(as_tuple=True)
    rows, targets = hidden[:, :-1][scored].detach(), ids[:, 1:][scored]
    weight = head.weight.detach()
    logits = (rows @ weight.T).double()
    n = int(mask.sum(1).max())
    logits_atol = dot_atol(rows, weight)
    value_atol = 2 * (logp_atol(logits_atol, n) + log_softmax_atol(logits, n))
    # d logp / d logits = onehot - softmax; its |terms| per element: onehot + softmax, times |upstream|.
    terms = upstream[scored[0], None].abs().double() * (torch.nn.functional.one_hot(targets, weight.shape[0])
                                                        + logits.softmax(-1))
    rtol = 2 * logits_atol + log_softmax_atol(logits, 1) + 2 * FP32_EPS
    row_atol, weight_atol = linear_grads_atol(rows, weight, terms, rtol)
    hidden_atol = torch.zeros_like(hidden)
    hidden_atol[:, :-1][scored] = row_atol
    return value_atol, hidden_atol, weight_atol


@pytest.mark.parametrize("chunk_size", [1, 3, 1000])
def test_chunked_matches_full_values_and_gradients(chunk_size):
    """Values, d/d hidden and d/d head.weight agree with the full-logits computation, for chunk sizes 1, 3
    and larger than the 21 scored tokens. Both are float32 with the head run on other shapes, so (tests/
    tolerances.py) the values within twice logp_atol(dot_atol) + log_softmax_atol, and the gradients
    elementwise within linear_grads_atol of d logits = upstream (onehot - softmax), whose elements are
    off by the exponent's error (2 dot_atol + one row's log_softmax_atol) relative to their |terms|."""
    hidden, head, ids, mask = make_batch(2)
    assert int(mask.sum()) == 21
    upstream = torch.tensor([0.7, -1.3, 0.4, 2.0])  # a non-uniform weighting of the rows

    h_full = hidden.clone().requires_grad_(True)
    full = completion_logps(head(h_full), ids, mask)
    (full * upstream).sum().backward()
    grad_h_full, grad_w_full = h_full.grad, head.weight.grad.clone()
    head.weight.grad = None

    h_chunk = hidden.clone().requires_grad_(True)
    chunked = chunked_completion_logps(h_chunk, head, ids, mask, chunk_size=chunk_size)
    (chunked * upstream).sum().backward()

    assert chunked.dtype == torch.float32
    value_atol, grad_h_atol, grad_w_atol = _head_atols(hidden, head, ids, mask, upstream)
    torch.testing.assert_close(chunked, full, atol=value_atol, rtol=0)
    torch.testing.assert_close(
        chunked.double(), naive_completion_logps(head(hidden), ids, mask), atol=value_atol, rtol=0
    )
    assert chunked[3].item() == 0.0
    assert ((h_chunk.grad - grad_h_full).abs() <= grad_h_atol).all()
    assert ((head.weight.grad - grad_w_full).abs() <= grad_w_atol).all()
    assert h_chunk.grad[3].abs().sum() == 0  # the row without completion gets no gradient
    assert grad_w_full.abs().sum() > 0 and grad_h_full.abs().sum() > 0


def test_chunked_no_grad_matches():
    """Under no_grad (no checkpointing path) the values are the same, within _head_atols's values' atol."""
    hidden, head, ids, mask = make_batch(3)
    with torch.no_grad():
        full = completion_logps(head(hidden), ids, mask)
        chunked = chunked_completion_logps(hidden, head, ids, mask, chunk_size=4)
    torch.testing.assert_close(chunked, full, atol=_head_atols(hidden, head, ids, mask, torch.ones(4))[0], rtol=0)


# --------------------------------------------------------------------------------------------
# 3. No full [B, T, V] logits
# --------------------------------------------------------------------------------------------


class RecordingHead(nn.Module):
    """Wraps an lm_head and records every input it is called on."""

    def __init__(self, head):
        super().__init__()
        self.head = head
        self.inputs = []

    def forward(self, h):
        self.inputs.append(h.detach().clone())
        return self.head(h)


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("chunk_size", [1, 3, 5, 1000])
def test_chunked_scores_each_completion_token_once_in_chunks(chunk_size, grad):
    """lm_head only sees [n, H] inputs with n <= chunk_size; in the forward pass the rows it sees are
    exactly hidden[b, t - 1] for each completion token (b, t), each once (21 rows in all, not B*T = 48).
    With gradients on, backward recomputes the same chunks (checkpointing), never more rows at once."""
    hidden, head, ids, mask = make_batch(4)
    # Make every hidden row identifiable: row (b, t) starts with the value 100 b + t.
    B, T, H = hidden.shape
    hidden[:, :, 0] = (100 * torch.arange(B).unsqueeze(1) + torch.arange(T)).float()
    n_tokens = int(mask.sum())
    assert n_tokens == 21 and not mask[:, 0].any()

    rec = RecordingHead(head)
    h = hidden.clone().requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        out = chunked_completion_logps(h, rec, ids, mask, chunk_size=chunk_size)
    forward_inputs = list(rec.inputs)
    assert all(x.dim() == 2 and x.shape[1] == H for x in forward_inputs)
    assert all(x.shape[0] <= chunk_size for x in forward_inputs)
    assert sum(x.shape[0] for x in forward_inputs) == n_tokens
    assert len(forward_inputs) == math.ceil(n_tokens / chunk_size)
    seen = sorted(torch.cat(forward_inputs)[:, 0].long().tolist())
    expected = sorted(100 * b + t - 1 for b, t in mask.nonzero().tolist())
    assert seen == expected

    if grad:
        out.sum().backward()
        backward_inputs = rec.inputs[len(forward_inputs) :]
        assert all(x.shape[0] <= chunk_size for x in backward_inputs)
        assert sum(x.shape[0] for x in backward_inputs) <= n_tokens


class MaxLogitsShape(TorchDispatchMode):
    """Records the largest numel of any tensor produced with a last dimension equal to V, other than
    the [H, V] transpose of the head's weight (or its gradient)."""

    def __init__(self, vocab, hidden_size):
        super().__init__()
        self.vocab = vocab
        self.weight_t_shape = (hidden_size, vocab)
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[-1] == self.vocab:
                if tuple(t.shape) == self.weight_t_shape:
                    continue
                self.largest = max(self.largest, t.numel())
        return out


def test_chunked_never_materializes_full_logits():
    """No tensor of vocabulary width larger than chunk_size * V is created, forward or backward
    (full logits would be B * T * V = 4 * 12 * 13 = 624 elements; a chunk is 3 * 13 = 39)."""
    hidden, head, ids, mask = make_batch(5)
    V, H, chunk_size = head.out_features, head.in_features, 3
    assert H != chunk_size
    h = hidden.clone().requires_grad_(True)
    mode = MaxLogitsShape(V, H)
    with mode:
        out = chunked_completion_logps(h, head, ids, mask, chunk_size=chunk_size)
        out.sum().backward()
    assert 0 < mode.largest <= chunk_size * V
    # The probe detects full logits: the reference implementation trips it.
    probe = MaxLogitsShape(V, H)
    with probe:
        completion_logps(head(hidden), ids, mask)
    assert probe.largest >= hidden.shape[0] * hidden.shape[1] * V


# --------------------------------------------------------------------------------------------
# 4. bf16
# --------------------------------------------------------------------------------------------


def test_chunked_bf16_hidden_and_head():
    """bf16 hidden and head: the result is float32, close to the float32 computation and to the full
    computation on the same bf16 inputs. Both within logp_atol (tests/tolerances.py) of a logit error:
    against float32, the bf16 rounding of the hidden states and weights (2 BF16_EPS per product, of the
    sum of |terms| max(|h| @ |W|)) and of the logit itself (BF16_EPS max|logit|); against the full
    bf16 computation, which runs the head on other shapes, each side's logit rounds once to bf16 from
    float32 accumulations within dot_atol: 2 (BF16_EPS max|logit| + dot_atol). Plus both sides'
    log_softmax_atol."""
    hidden, head, ids, mask = make_batch(6)
    fp32 = completion_logps(head(hidden), ids, mask).detach()
    head_bf16 = nn.Linear(head.in_features, head.out_features, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        head_bf16.weight.copy_(head.weight)
    hidden_bf16 = hidden.bfloat16().requires_grad_(True)
    out = chunked_completion_logps(hidden_bf16, head_bf16, ids, mask, chunk_size=3)
    assert out.dtype == torch.float32
    logits, n = head(hidden).detach(), int(mask.sum(1).max())
    size, sums = float(logits.abs().max()), float((hidden.abs() @ head.weight.detach().abs().T).max())
    softmax_atol = 2 * log_softmax_atol(logits, n)
    torch.testing.assert_close(out.detach(), fp32, atol=logp_atol(BF16_EPS * (2 * sums + size), n) + softmax_atol,
                               rtol=0)
    assert out[3].item() == 0.0
    same_logits = completion_logps(head_bf16(hidden_bf16), ids, mask)
    logits_atol = 2 * (BF16_EPS * size + dot_atol(hidden_bf16.float(), head_bf16.weight.float()))
    torch.testing.assert_close(out, same_logits, atol=logp_atol(logits_atol, n) + softmax_atol, rtol=0)
    out.sum().backward()
    assert hidden_bf16.grad.dtype == torch.bfloat16 and torch.isfinite(hidden_bf16.grad.float()).all()


def test_packed_sequences_equal_padded_rows():
    """Sequences packed back to back in one row (sequence_ids) give the same per-sequence values and
    gradients as the same sequences right-padded one per row; no position scores across a boundary
    (here every sequence starts with a completion-free prompt token, except the one that starts
    with a completion token, which must still not be scored by the previous sequence's last token).
    Exactly: both layouts gather the same scored rows in the same order, so the head runs on the same
    chunks and each sum adds the same values in the same order."""
    torch.manual_seed(0)
    H, V = 6, 13
    lengths, prompts = [5, 3, 7], [2, 0, 3]  # sequence 1 has an empty prompt: its first token is a completion token
    head = torch.nn.Linear(H, V)
    hidden = [torch.randn(n, H, requires_grad=True) for n in lengths]
    ids = [torch.randint(0, V, (n,)) for n in lengths]
    masks = [torch.arange(n) >= p for n, p in zip(lengths, prompts, strict=True)]

    T = max(lengths)
    padded_hidden = torch.stack([torch.cat([h, torch.zeros(T - len(h), H)]) for h in hidden])
    padded_ids = torch.stack([torch.cat([i, torch.zeros(T - len(i), dtype=torch.long)]) for i in ids])
    padded_mask = torch.stack([torch.cat([m, torch.zeros(T - len(m), dtype=torch.bool)]) for m in masks])
    expected = chunked_completion_logps(padded_hidden, head, padded_ids, padded_mask, chunk_size=4)

    sequence_ids = torch.repeat_interleave(torch.arange(3), torch.tensor(lengths)).unsqueeze(0)
    got = chunked_completion_logps(torch.cat(hidden)[None], head, torch.cat(ids)[None], torch.cat(masks)[None],
                                   chunk_size=4, sequence_ids=sequence_ids, num_sequences=3)
    assert torch.equal(got, expected)
    weights = torch.tensor([1.0, -2.0, 0.5])
    grads_expected = torch.autograd.grad((expected * weights).sum(), hidden)
    grads_got = torch.autograd.grad((got * weights).sum(), hidden)
    assert all(torch.equal(b, a) for a, b in zip(grads_expected, grads_got, strict=True))
