"""The shared-prompt reference pass: one forward over x + y + y' gives the same log-probs as the two
separate passes over x + y and x + y', in the padded and the packed layout, with sdpa and eager
attention; the collated layout itself, by hand; and whole runs (1 and 2 ranks, ZeRO-2 and 3, padded and
padding-free) equal to runs with separate passes. (Precompute's shared pass is checked against plain
separate passes in test_ref_cache.py.)"""

import datasets
import pytest
import torch
from tolerances import logp_rtol

from kto_scale.assets import TINY_LLAMA_DIR
from kto_scale.attention import attention_rule, dense_mask
from kto_scale.collate import ReferenceLayout, collate
from kto_scale.config import KTOConfig
from kto_scale.model import SequenceLogps, load_model, reference_layout, reference_mode


def _dataset(prompt_lengths, completion_lengths, kl_completion_lengths) -> datasets.Dataset:
    torch.manual_seed(3)
    rows = {name: [torch.randint(3, 900, (n,)).tolist() for n in lengths]
            for name, lengths in (("prompt_ids", prompt_lengths), ("completion_ids", completion_lengths),
                                  ("kl_completion_ids", kl_completion_lengths))}
    n = len(prompt_lengths)
    return datasets.Dataset.from_dict({**rows, "label": [i % 2 == 0 for i in range(n)], "pair_id": [-1] * n})


def test_collated_layout_by_hand():
    """x = [11, 12], y = [21, 22, 23], y' = [31]: the row is 11 12 21 22 23 31, y' at position 2 (after x).
    Scored (row position -> target, sequence): 1 -> 21, 2 -> 22, 3 -> 23 for the example (sequence 0),
    and 1 -> 31 for its KL pair (sequence 1 = B + 0): the last prompt token scores both first tokens."""
    data = datasets.Dataset.from_dict({"prompt_ids": [[11, 12]], "completion_ids": [[21, 22, 23]],
                                       "kl_completion_ids": [[31]], "label": [True], "pair_id": [-1]})
    shared = collate(data, [0], pad_id=0, reference=ReferenceLayout.SHARED)["reference"]
    assert shared["input_ids"].tolist() == [[11, 12, 21, 22, 23, 31]]
    assert shared["segments"].tolist() == [[0, 0, 1, 1, 1, 2]]
    assert shared["position_ids"].tolist() == [[0, 1, 2, 3, 4, 2]]
    assert shared["score_positions"].tolist() == [1, 2, 3, 1]
    assert shared["score_targets"].tolist() == [21, 22, 23, 31]
    assert shared["score_sequences"].tolist() == [0, 0, 0, 1]
    rule = attention_rule(None, shared["segments"], None)
    mask = dense_mask(rule, 1, 6, torch.device("cpu"), None)[0, 0].int().tolist()
    assert mask[5] == [1, 1, 0, 0, 0, 1]  # y' sees x and itself, not y
    assert mask[4] == [1, 1, 1, 1, 1, 0]  # y sees x and y (causal), not y'


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("kl", [None, [False, True, True, False]])
def test_one_pass_equals_two_passes(attention, packed, kl):
    """Prompts of 1 to 9 tokens (a cut prompt is just a shorter prompt), completions and KL completions of
    1 to 8 tokens (a cut KL completion likewise), rows of different lengths (padding): the [2B] result is
    the reference log-probs of the B examples, then of their B KL pairs, as the separate passes give;
    with KL pairs drawn for some rows only (kl_pairs_per_step), those rows' pairs."""
    config = KTOConfig(model_name_or_path=str(TINY_LLAMA_DIR), init_random_weights=True, lora_r=4,
                       attn_implementation=attention)
    policy = load_model(config)
    assert reference_layout(config, policy, cached=False) is ReferenceLayout.SHARED
    module = SequenceLogps(policy, chunk_size=5)
    data = _dataset((4, 9, 1, 6), (6, 1, 8, 3), (2, 7, 1, 8))
    batch = collate(data, [0, 1, 2, 3], pad_id=2, packed=packed, reference=ReferenceLayout.SHARED, kl=kl)
    with reference_mode(policy):
        separate = torch.cat([module(**batch["policy"]), module(**batch["kl"])])
        shared = module(**batch["reference"])
    assert shared.shape == (8,)
    shared = torch.cat([shared[:4], shared[4:][batch["kl_rows"]]])
    torch.testing.assert_close(shared, separate, atol=0, rtol=logp_rtol(2))  # other shapes


def test_flash_attention_falls_back_to_two_passes(caplog):
    """An attention implementation that cannot take a 4D mask keeps the separate passes, and says so."""
    config = KTOConfig(model_name_or_path=str(TINY_LLAMA_DIR), init_random_weights=True, lora_r=4)
    policy = load_model(config)
    policy.config._attn_implementation = "flash_attention_2"  # only the name is read: no kernel runs
    with caplog.at_level("INFO"):
        assert reference_layout(config, policy, cached=False) is ReferenceLayout.SEPARATE
    assert "flash_attention_2 attention cannot take the x + y + y' mask" in caplog.text
    policy.config._attn_implementation = "sdpa"
    assert reference_layout(KTOConfig(**{**config.to_dict(), "shared_prompt_reference": False}), policy,
                            cached=False) is ReferenceLayout.SEPARATE
    assert reference_layout(config, policy, cached=True) is ReferenceLayout.CACHED
