"""Model: the reference (adapters off) is exactly the base model, and the policy module's
chunked log-probs equal the plain computation from the model's own logits."""

import torch

from kto_scale.assets import TINY_LLAMA_DIR
from kto_scale.config import KTOConfig
from kto_scale.logprobs import completion_logps
from kto_scale.model import SequenceLogps, load_base_model, load_model, reference_mode


def _config(**overrides) -> KTOConfig:
    return KTOConfig(model_name_or_path=str(TINY_LLAMA_DIR), init_random_weights=True, lora_r=4,
                     lora_dropout=0.0, **overrides)


def _policy_with_nonzero_adapters(config: KTOConfig):
    policy = load_model(config)
    with torch.no_grad():  # peft starts lora_B at zero (policy == base); make the adapters matter
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    return policy


def _batch(vocab: int):
    torch.manual_seed(1)
    ids = torch.randint(3, vocab, (3, 12))
    attention = torch.ones_like(ids)
    attention[2, 9:] = 0
    completion = torch.zeros_like(ids, dtype=torch.bool)
    completion[:, 6:] = True
    completion[2, 9:] = False
    return ids, attention, completion


def test_reference_equals_base_exactly():
    config = _config()
    policy = _policy_with_nonzero_adapters(config)
    plain = load_base_model(config)  # same seed: the same base weights, no LoRA layers
    ids, attention, _ = _batch(policy.config.vocab_size)
    with reference_mode(policy):
        reference_logits = policy(input_ids=ids, attention_mask=attention).logits
        assert not torch.is_grad_enabled()
    with torch.no_grad():
        policy_logits = policy(input_ids=ids, attention_mask=attention).logits
        base_logits = plain(input_ids=ids, attention_mask=attention).logits
    assert torch.equal(reference_logits, base_logits)
    assert not torch.allclose(policy_logits, base_logits)  # the adapters do change the policy


def test_only_lora_parameters_train():
    policy = load_model(_config())
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    adapted = {n.split(".")[-4] for n in trainable}  # ...q_proj.lora_A.default.weight
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_sequence_logps_match_model_logits():
    policy = _policy_with_nonzero_adapters(_config())
    module = SequenceLogps(policy, chunk_size=5)
    ids, attention, completion = _batch(policy.config.vocab_size)
    logits = policy(input_ids=ids, attention_mask=attention).logits
    expected = completion_logps(logits, ids, completion)
    got = module(ids, attention, completion)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    lora_b = next(p for n, p in policy.named_parameters() if "lora_B" in n)
    (g_expected,) = torch.autograd.grad(expected.sum(), lora_b)
    (g_got,) = torch.autograd.grad(got.sum(), lora_b)
    torch.testing.assert_close(g_got, g_expected, atol=1e-5, rtol=1e-4)
