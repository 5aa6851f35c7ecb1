"""FlexAttention's BlockMask (kto_scale.attention) against the dense masks, for every layout of
test_shared_prompt.py (padded and packed, the policy/KL inputs and the shared-prompt x + y + y' rows,
all KL pairs or some): the mask it applies is exactly the dense one, and the forward through
transformers' flex_attention backend gives the dense (sdpa) forward's log-probs. Also what packed rows
hand flash_attention_2's variable-length kernel."""

import pytest
import torch
import transformers.integrations.flex_attention as transformers_flex
from test_shared_prompt import _dataset
from tolerances import FP32_EPS, logp_rtol
from torch.nn.attention.flex_attention import BlockMask, flex_attention
from transformers import AutoConfig
from transformers.masking_utils import create_causal_mask
from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

from kto_scale.assets import TINY_LLAMA_DIR
from kto_scale.attention import attention_rule, block_mask, dense_mask
from kto_scale.collate import ReferenceLayout, collate, to_device
from kto_scale.config import ConfigError, KTOConfig
from kto_scale.model import SequenceLogps, load_base_model, load_model, reference_mode

LAYOUTS = [(packed, kl) for packed in (False, True) for kl in (None, [False, True, True, False])]
CPU = torch.device("cpu")


def _batch(packed: bool, kl: list[bool] | None, rows: int = 4) -> dict:
    """The batch of test_shared_prompt.py's layouts (rows=4); more rows make a packed row span several blocks."""
    data = _dataset((4, 9, 1, 6) * (rows // 4), (6, 1, 8, 3) * (rows // 4), (2, 7, 1, 8) * (rows // 4))
    return collate(data, list(range(rows)), pad_id=2, packed=packed, reference=ReferenceLayout.SHARED, kl=kl)


def _sequence_ids(inputs: dict) -> torch.Tensor | None:
    """[1, N] the sequence of each token of a packed row, as SequenceLogps computes it."""
    if "sequence_lengths" not in inputs:
        return None
    lengths = inputs["sequence_lengths"]
    return torch.repeat_interleave(torch.arange(len(lengths)), lengths).unsqueeze(0)


def _dense_reference(inputs: dict) -> torch.Tensor:
    """[B, 1, T, T] bool: the mask the sdpa path attends with. Shared-prompt rows: kto_scale's dense mask
    (checked by hand in test_shared_prompt.py); other rows: the one transformers builds from the 2D
    padding mask or, packed, from the restarting position ids."""
    batch, length = inputs["input_ids"].shape
    if "segments" in inputs:
        rule = attention_rule(None, inputs["segments"], _sequence_ids(inputs))
        return dense_mask(rule, batch, length, CPU, None)
    model_config = AutoConfig.from_pretrained(TINY_LLAMA_DIR, attn_implementation="sdpa")
    position_ids = None
    if "sequence_lengths" in inputs:
        lengths = inputs["sequence_lengths"]
        position_ids = (torch.arange(length) - (torch.cumsum(lengths, 0) - lengths)[_sequence_ids(inputs)[0]])[None]
    return create_causal_mask(model_config, torch.zeros(batch, length, 1), inputs.get("attention_mask"), None,
                              position_ids=position_ids, allow_is_causal_skip=False)


def _applied(mask: BlockMask, rule, batch: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """([B, 1, T, T] bool, [B, 1, Qb, Kb] bool): where flex_attention attends with `mask` (a full block
    everywhere, a partial block where the rule allows, any other block nowhere: skipped), and which
    blocks it computes at all."""
    def listed(num: torch.Tensor | None, indices: torch.Tensor | None) -> torch.Tensor:
        if num is None:
            return torch.zeros(mask.kv_indices.shape, dtype=torch.bool)
        used = (torch.arange(indices.shape[-1]) < num[..., None]).long()
        return torch.zeros(indices.shape, dtype=torch.long).scatter_add(-1, indices.long(), used) > 0

    partial, full = listed(mask.kv_num_blocks, mask.kv_indices), listed(mask.full_kv_num_blocks, mask.full_kv_indices)
    assert not (partial & full).any()
    q_block, kv_block = mask.BLOCK_SIZE

    def tokens(blocks: torch.Tensor) -> torch.Tensor:
        return blocks.repeat_interleave(q_block, -2).repeat_interleave(kv_block, -1)[..., :length, :length]

    applied = tokens(full) | (tokens(partial) & dense_mask(rule, batch, length, CPU, None))
    return applied, partial | full


@pytest.mark.parametrize("packed,kl", LAYOUTS)
@pytest.mark.parametrize("inputs", ["policy", "kl", "reference"])
def test_block_mask_applies_exactly_the_dense_mask(packed, kl, inputs):
    """Exact: the BlockMask is the same boolean function as the dense mask, block by block."""
    batch = _batch(packed, kl)[inputs]
    rows, length = batch["input_ids"].shape
    rule = attention_rule(batch.get("attention_mask"), batch.get("segments"), _sequence_ids(batch))
    applied, _ = _applied(block_mask(rule, rows, length, CPU), rule, rows, length)
    assert torch.equal(applied, _dense_reference(batch).expand(rows, 1, length, length))


@pytest.mark.parametrize("inputs", ["policy", "reference"])
def test_block_mask_skips_the_blocks_no_token_attends(inputs):
    """A packed row of 128 sequences (1,000+ tokens, 8+ blocks of 128): still exactly the dense mask,
    and the blocks between sequences, where nothing attends, are not computed."""
    batch = _batch(True, None, rows=128)[inputs]
    length = batch["input_ids"].shape[1]
    rule = attention_rule(None, batch.get("segments"), _sequence_ids(batch))
    applied, computed = _applied(block_mask(rule, 1, length, CPU), rule, 1, length)
    assert length > 8 * 128
    assert torch.equal(applied, _dense_reference(batch))
    blocks = computed.shape[-1]
    assert computed.sum() < blocks * (blocks + 1) / 2  # fewer than the causal triangle's blocks


def _flex_kernel(query, key, value, training=False, **kwargs):
    """torch's unfused FlexAttention (the dense math of its reference implementation, called directly)
    in place of transformers' torch.compile'd kernel, whose first CPU compile takes about a minute on 2
    cores, and each new shape seconds more: the BlockMask and its way through transformers stay the same."""
    return flex_attention(query, key, value, **kwargs)


@pytest.mark.parametrize("packed,kl", LAYOUTS)
def test_flex_forward_equals_dense_forward(monkeypatch, packed, kl):
    """Every input of the layout (policy and KL rows, the reference's x + y + y' rows), through the same
    model with sdpa (dense mask) and flex_attention (BlockMask): the same per-sequence log-probs. Other
    kernels round differently: fp32 scores and softmax summed in another order, one rounding of each
    attention output per layer, so the tolerance of tolerances.logp_rtol (sums of n token log-probs,
    2 rounded blocks per layer) holds, relative to each sum. A wrong mask moves them by O(1)."""
    monkeypatch.setattr(transformers_flex, "compile_friendly_flex_attention", _flex_kernel)
    monkeypatch.setattr(torch.nn.attention.flex_attention, "_FLEX_ATTENTION_DISABLE_COMPILE_DEBUG", True)
    policy = load_model(KTOConfig(model_name_or_path=str(TINY_LLAMA_DIR), init_random_weights=True, lora_r=4))
    module = SequenceLogps(policy, chunk_size=5)
    batch = _batch(packed, kl)
    base = policy.get_base_model()
    with reference_mode(policy):
        dense = {name: module(**batch[name]) for name in ("policy", "kl", "reference")}
        base.set_attn_implementation("flex_attention")
        flex = {name: module(**batch[name]) for name in ("policy", "kl", "reference")}
    for name in dense:
        torch.testing.assert_close(flex[name], dense[name], atol=0, rtol=logp_rtol(2), msg=name)


def test_packed_rows_carry_flash_attentions_varlen_offsets():
    """flash_attention_2 runs packed rows through its variable-length kernel when the decoder gets no
    attention_mask and position ids that restart at each sequence: transformers derives the kernel's
    cumulative sequence offsets from them, which must be those of the packed sequences."""
    policy = load_model(KTOConfig(model_name_or_path=str(TINY_LLAMA_DIR), init_random_weights=True, lora_r=4))
    seen = {}
    decoder = policy.get_base_model().get_decoder()
    decoder.register_forward_pre_hook(lambda module, args, kwargs: seen.update(kwargs), with_kwargs=True)
    batch = _batch(True, None)["policy"]
    SequenceLogps(policy)(**batch)
    assert seen["attention_mask"] is None
    (offsets, _), (longest, _) = prepare_fa_kwargs_from_position_ids(seen["position_ids"])
    lengths = batch["sequence_lengths"]
    assert offsets.tolist() == [0, *torch.cumsum(lengths, 0).tolist()]
    assert longest == lengths.max().item()


def test_flex_attention_refused_on_cpu():
    """Training needs FlexAttention's backward, which torch has on CUDA only: refused before loading."""
    if torch.cuda.is_available():
        pytest.skip("a CUDA machine runs flex_attention")
    config = KTOConfig(model_name_or_path=str(TINY_LLAMA_DIR), init_random_weights=True,
                       attn_implementation="flex_attention")
    with pytest.raises(ConfigError, match="^attn_implementation flex_attention needs a CUDA GPU"):
        load_base_model(config)


@pytest.mark.e2e
@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention's backward and Triton kernel: CUDA only")
@pytest.mark.parametrize("packed", [False, True])
def test_flex_equals_dense_forward_and_backward_on_cuda(packed):
    """On a GPU, the real path: the compiled FlexAttention kernel with the BlockMask against sdpa with the
    dense mask, fp32, for the policy rows (forward and backward: log-probs and LoRA gradients) and the
    shared-prompt reference rows (forward). Bounds as in test_kernels.py's compiled-vs-eager test: other
    kernels, logp_rtol per log-prob sum; a LoRA gradient 16 num_layers sqrt(fan_in) 2^-24 of its largest
    element (TF32 stays off: torch's default for fp32 matmuls). In the e2e tier: the first FlexAttention
    calls compile Triton kernels (tens of seconds)."""
    policy = load_model(KTOConfig(model_name_or_path=str(TINY_LLAMA_DIR), init_random_weights=True, lora_r=4,
                                  lora_dropout=0.0)).cuda()
    with torch.no_grad():  # nonzero adapters, so that the gradients reach every LoRA matrix
        for name, parameter in policy.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.1)
    module = SequenceLogps(policy, chunk_size=5)
    batch = to_device(_batch(packed, [False, True, True, False]), torch.device("cuda"))
    results = []
    for attention in ("sdpa", "flex_attention"):
        policy.get_base_model().set_attn_implementation(attention)
        policy.zero_grad()
        logps = module(**batch["policy"])
        logps.sum().backward()
        with reference_mode(policy):
            reference = module(**batch["reference"])
        results.append((logps.detach(), reference, {n: p.grad.clone() for n, p in policy.named_parameters()
                                                     if p.requires_grad}))
    (logps, reference, grads), (logps_f, reference_f, grads_f) = results
    layers, fan_in = policy.config.num_hidden_layers, policy.config.intermediate_size
    torch.testing.assert_close(logps_f, logps, atol=0, rtol=logp_rtol(layers))
    torch.testing.assert_close(reference_f, reference, atol=0, rtol=logp_rtol(layers))
    for name, grad in grads.items():
        bound = 16 * layers * fan_in ** 0.5 * FP32_EPS * float(grad.abs().max())
        assert float((grads_f[name] - grad).abs().max()) <= bound, name
