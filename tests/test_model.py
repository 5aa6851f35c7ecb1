"""Model: the reference (adapters off) is exactly the base model, and the policy module's
chunked log-probs equal the plain computation from the model's own logits. (init_random_weights building
the same base under ZeRO-3 on two ranks: tests/test_scale.py's two-simulated-nodes run.)"""

import pytest
import torch
from tolerances import gradient_norm_atol, logp_rtol

from kto_scale.assets import TINY_LLAMA_DIR
from kto_scale.config import ConfigError, KTOConfig
from kto_scale.logprobs import completion_logps
from kto_scale.model import SequenceLogps, load_base_model, load_model, reference_mode


def _config(**overrides) -> KTOConfig:
    settings = dict(model_name_or_path=str(TINY_LLAMA_DIR), init_random_weights=True, lora_r=4, lora_dropout=0.0)
    return KTOConfig(**{**settings, **overrides})


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


def test_init_device_cpu_draws_transformers_init_weights(tmp_path):
    """init_device null and cpu both give exactly the weights of transformers' own initialize_weights, seeded,
    on a model built without drawing (kto_scale.random_init walks the modules in its order itself, so that
    FSDP2 can draw them one at a time: the same kernels on the same shapes, equal to the bit); "cuda" builds
    on the GPU, or is refused in one line where there is none."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    for tied in (False, True):
        model_config = AutoConfig.from_pretrained(TINY_LLAMA_DIR, tie_word_embeddings=tied)
        model_config.save_pretrained(tmp_path / str(tied))
        with no_init_weights():
            plain = AutoModelForCausalLM.from_config(model_config, dtype=torch.float32)
        plain.tie_weights()
        torch.manual_seed(7)
        plain.initialize_weights()
        for device in (None, "cpu"):
            built = load_base_model(_config(seed=7, init_device=device, model_name_or_path=str(tmp_path / str(tied))))
            state = built.state_dict()
            assert state.keys() == plain.state_dict().keys()
            assert all(torch.equal(state[name], weight) for name, weight in plain.state_dict().items()), device
            assert (built.lm_head.weight is built.model.embed_tokens.weight) == tied
    assert not torch.equal(load_base_model(_config(seed=8)).lm_head.weight, plain.lm_head.weight)
    if torch.cuda.is_available():
        assert {p.device.type for p in load_base_model(_config(init_device="cuda")).parameters()} == {"cuda"}
    else:
        with pytest.raises(ConfigError, match="^init_device cuda: this machine has no CUDA GPU"):
            load_base_model(_config(init_device="cuda"))


def test_only_lora_parameters_train():
    policy = load_model(_config())
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    adapted = {n.split(".")[-4] for n in trainable}  # ...q_proj.lora_A.default.weight
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def _token_grads(policy, batch: dict, params: list) -> list[tuple]:
    """For each scored token t of a padded batch, d log p(token t) / d params (one tuple per token)."""
    logits = policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ids, scored = batch["input_ids"], batch["completion_mask"][:, 1:]
    token_logps = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
    return [torch.autograd.grad(token_logps[b, t], params, retain_graph=True) for b, t in scored.nonzero().tolist()]


def _assert_gradients_close(got, expected, token_grads, model_config) -> None:
    """Each LoRA tensor's gradient within gradient_norm_atol (tests/tolerances.py) in L2 norm."""
    for i, (a, b) in enumerate(zip(expected, got, strict=True)):
        atol = gradient_norm_atol([g[i] for g in token_grads], model_config)
        assert float((b - a).norm()) <= atol, (i, float((b - a).norm()), atol)


def test_sequence_logps_match_model_logits():
    """SequenceLogps (lm_head in chunks) equals completion_logps of the model's logits: the log-probs
    within logp_rtol(2), and the LoRA gradients within gradient_norm_atol (tests/tolerances.py), from
    the per-token gradients, as the tokens' terms can cancel."""
    policy = _policy_with_nonzero_adapters(_config())
    module = SequenceLogps(policy, chunk_size=5)
    ids, attention, completion = _batch(policy.config.vocab_size)
    logits = policy(input_ids=ids, attention_mask=attention).logits
    expected = completion_logps(logits, ids, completion)
    got = module(input_ids=ids, attention_mask=attention, completion_mask=completion)
    torch.testing.assert_close(got, expected, atol=0, rtol=logp_rtol(2))  # lm_head in chunks
    lora_b = [p for n, p in policy.named_parameters() if "lora_B" in n]
    token_grads = _token_grads(policy, {"input_ids": ids, "attention_mask": attention, "completion_mask": completion},
                               lora_b)
    _assert_gradients_close(torch.autograd.grad(got.sum(), lora_b), torch.autograd.grad(expected.sum(), lora_b),
                            token_grads, policy.config)


def test_packed_batch_equals_padded_batch():
    """SequenceLogps on the packed (padding-free) layout of collate equals the padded layout:
    the same log-probs (within logp_rtol(2)) and the same LoRA gradients (within gradient_norm_atol,
    tests/tolerances.py, from the per-token gradients of the padded layout)."""
    import datasets

    from kto_scale.collate import collate

    policy = _policy_with_nonzero_adapters(_config())
    module = SequenceLogps(policy, chunk_size=7)
    torch.manual_seed(2)
    rows = {"prompt_ids": [torch.randint(3, 900, (n,)).tolist() for n in (4, 9, 2)],
            "completion_ids": [torch.randint(3, 900, (n,)).tolist() for n in (6, 1, 8)],
            "label": [True, False, True], "pair_id": [-1, -1, -1], "kl_index": [1, 2, 0]}
    rows["kl_completion_ids"] = [rows["completion_ids"][j] for j in rows["kl_index"]]
    dataset = datasets.Dataset.from_dict(rows)
    padded = collate(dataset, [0, 1, 2], pad_id=2)["policy"]
    packed = collate(dataset, [0, 1, 2], pad_id=2, packed=True)["policy"]
    assert packed["input_ids"].shape == (1, 30) and "attention_mask" not in packed
    expected, got = module(**padded), module(**packed)
    torch.testing.assert_close(got, expected, atol=0, rtol=logp_rtol(2))  # other shapes
    lora_b = [p for n, p in policy.named_parameters() if "lora_B" in n]
    _assert_gradients_close(torch.autograd.grad(got.sum(), lora_b), torch.autograd.grad(expected.sum(), lora_b),
                            _token_grads(policy, padded, lora_b), policy.config)

