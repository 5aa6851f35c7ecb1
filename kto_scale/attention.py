"""Which tokens attend to which, in packed rows and in the shared-prompt reference pass.

One rule (`attention_rule`): causal, never to padding, a packed row's sequences never see each other, and in an
x + y + y' row (kto_scale.collate's segments: 0 prompt, 1 completion, 2 KL completion, -1 padding) a
token sees the prompt and its own segment only, so y' never sees y. The rule is a FlexAttention
mask_mod, evaluated two ways:

- densely, into a [B, 1, T, T] mask (bool for sdpa, additive for eager): the CPU path;
- as a `BlockMask` (`create_block_mask`) for transformers' `flex_attention` backend, which takes a
  4D BlockMask as `attention_mask` as it is: no T x T tensor, and blocks the rule masks entirely are
  skipped (a packed row of n sequences computes about 1/n of the T x T scores).
"""

from collections.abc import Callable

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, create_block_mask

FLEX = "flex_attention"
# Attention implementations that take an arbitrary 4D mask, as the shared-prompt reference pass needs.
CUSTOM_MASK_ATTENTION = ("sdpa", "eager", FLEX)

MaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


def attention_rule(padding: Tensor | None, segments: Tensor | None, sequence_ids: Tensor | None) -> MaskMod:
    """The mask_mod (batch, head, query, key) -> True where the query may attend to the key.

    padding: [B, T] a padded batch's attention_mask (1 real token, 0 padding: never attended to), or
    None; segments: [B, T] x + y + y' segment ids, or None (every token one segment); sequence_ids:
    [B, T] the sequence of each token of packed rows, or None (one sequence per row). Padding queries
    (segment -1) see the prompt and padding, so no row is fully masked. Index tensors of any
    broadcastable shapes work, which is how `dense_mask` evaluates it."""
    def allowed(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        ok = kv <= q
        if padding is not None:
            ok = ok & (padding[b, kv] != 0)
        if segments is not None:
            ok = ok & ((segments[b, kv] == 0) | (segments[b, kv] == segments[b, q]))
        if sequence_ids is not None:
            ok = ok & (sequence_ids[b, q] == sequence_ids[b, kv])
        return ok

    return allowed


def dense_mask(rule: MaskMod, batch: int, length: int, device: torch.device, dtype: torch.dtype | None) -> Tensor:
    """[B, 1, T, T] the rule as a tensor: bool (True: attend) with dtype None, as sdpa takes it; else
    additive, 0 or the dtype's most negative value, as eager adds it to the scores."""
    b = torch.arange(batch, device=device)[:, None, None, None]
    q = torch.arange(length, device=device)[:, None]
    allowed = rule(b, torch.zeros((), dtype=torch.long, device=device), q, q.T).expand(batch, 1, length, length)
    if dtype is None:
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)


def block_mask(rule: MaskMod, batch: int, length: int, device: torch.device) -> BlockMask:
    """The rule as a FlexAttention BlockMask [B, 1 (every head), T, T]. On CUDA its construction is
    compiled (as transformers does), so it never materializes the T x T mask; on the CPU (tests) it
    is built plainly."""
    return create_block_mask(rule, B=batch, H=None, Q_LEN=length, KV_LEN=length, device=device,
                             _compile=device.type == "cuda")


def layout_mask(attention: str, input_ids: Tensor, attention_mask: Tensor | None, segments: Tensor | None,
                sequence_ids: Tensor | None, dtype: torch.dtype) -> Tensor | BlockMask | None:
    """The `attention_mask` the decoder gets for a batch of `input_ids` [B, T] under `attention` (a
    transformers attn_implementation): with flex_attention, a BlockMask of every layout; else a dense
    mask for shared-prompt rows (bool for sdpa, additive `dtype` for eager), and otherwise the
    batch's own `attention_mask` (padded: [B, T]; packed: None), from which transformers builds the
    mask (packed rows: from the position ids, which restart at each sequence; flash_attention_2
    turns them into its variable-length kernel's sequence offsets)."""
    rule = attention_rule(attention_mask, segments, sequence_ids)
    batch, length = input_ids.shape
    if attention == FLEX:
        return block_mask(rule, batch, length, input_ids.device)
    if segments is None:
        return attention_mask
    if attention not in CUSTOM_MASK_ATTENTION:
        raise ValueError(f"Shared-prompt rows need attention that takes a 4D mask {CUSTOM_MASK_ATTENTION}, "
                         f"not {attention} (kto_scale.model.reference_layout decides).")
    return dense_mask(rule, batch, length, input_ids.device, None if attention == "sdpa" else dtype)
