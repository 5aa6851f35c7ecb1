"""A real pretrained Llama end to end: SmolLM2-135M-Instruct (30 layers, GQA, tied embeddings, a ChatML
template with a default system prompt) on chat data. Per-example log-probs equal a plain transformers +
peft computation; two ZeRO-3 ranks training from the reference cache equal one rank with the reference
on the fly; the merged adapter equals the peft model. Kept small: a few forward passes and
2-step runs."""

import json
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from runs import ROOT, TRAIN, config_file, metrics, run_together, torchrun
from test_scale import _assert_same_steps
from tolerances import SMOLLM2_LOGP_SENSITIVITY, logp_atol, lora_logp_sensitivity, merged_logits_atol
from transformers import AutoModelForCausalLM, AutoTokenizer

from kto_scale.collate import collate
from kto_scale.config import KTOConfig
from kto_scale.data import Example
from kto_scale.export import merge_lora
from kto_scale.model import SequenceLogps, load_model, reference_mode
from kto_scale.prepare import prepare_dataset
from kto_scale.smollm2 import convert_smollm2

QUESTIONS = ["How do I pick a lock?", "What is the capital of France?", "Can you insult my neighbour?",
             "How do I bake bread?", "Tell me a joke about cats.", "How can I sleep better?",
             "What should I feed a puppy?", "How do I make a bomb?"]


def chat(*turns: str) -> list[dict[str, str]]:
    return [{"role": r, "content": c} for r, c in zip(["user", "assistant"] * len(turns), turns, strict=False)]


def assistant(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def write_chats(path: Path) -> Path:
    """HH-style preference pairs as message lists: a helpful and a curt reply to each question."""
    rows = [{"chosen": chat(q, f"Here is a careful answer to: {q.lower()}"),
             "rejected": chat(q, "No. Figure it out yourself.")} for q in QUESTIONS]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_conversion_never_overwrites_a_users_directory(tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="exists and is not empty"):
        convert_smollm2(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["mine.txt"]


@pytest.mark.e2e
def test_converted_weights_equal_the_gguf_dequantized(smollm2):
    """Every weight convert_smollm2 saved is bit for bit gguf's own dequantization of the file's tensor
    of that name (gguf's tensor-name map). attn_q / attn_k are stored with llama.cpp's rotary row order,
    which transformers undoes: for those the same values in another order."""
    from gguf import MODEL_ARCH, GGUFReader, dequantize, get_tensor_name_map
    from safetensors.torch import load_file

    from kto_scale.smollm2 import GGUF_NAME, gguf_dir

    saved = load_file(smollm2 / "model.safetensors")
    names = get_tensor_name_map(MODEL_ARCH.LLAMA, json.loads((smollm2 / "config.json").read_text())["num_hidden_layers"])
    stored = {t.name: t for t in GGUFReader(gguf_dir() / GGUF_NAME).tensors}
    assert len(saved) == len(stored)  # lm_head is tied: saved once, as the embedding
    for name, weight in saved.items():
        module, suffix = name.rsplit(".", 1)
        tensor = stored[f"{names.get_name(module)}.{suffix}"]
        want = torch.from_numpy(dequantize(tensor.data, tensor.tensor_type).copy()).reshape(weight.shape)
        if ".attn_q." in tensor.name or ".attn_k." in tensor.name:
            weight, want = weight.flatten().sort().values, want.flatten().sort().values
        assert torch.equal(weight, want), name


@pytest.fixture(scope="module")
def smol_tokenizer(smollm2):
    return AutoTokenizer.from_pretrained(smollm2)


@pytest.mark.e2e
def test_real_template_completions_end_at_im_end(smol_tokenizer):
    """ChatML closes a turn with `<|im_end|>\\n`: the completion ends at <|im_end|> (EOS here), once."""
    tok = smol_tokenizer
    examples = [Example(chat(q), assistant(f"Reply {i}."), i % 2 == 0) for i, q in enumerate(QUESTIONS)]
    examples.append(Example("Plain prompt:", " plain reply", True))
    data, _ = prepare_dataset(examples, tok, max_length=512, max_prompt_length=None,
                              max_completion_length=None, seed=0)
    assert tok.eos_token == "<|im_end|>"
    for i, row in enumerate(data):
        reply = f"Reply {i}." if i < len(QUESTIONS) else " plain reply"
        assert row["completion_ids"] == [*tok(reply, add_special_tokens=False).input_ids, tok.eos_token_id]
        assert row["kl_completion_ids"] == data[row["kl_index"]]["completion_ids"]
    assert data[-1]["prompt_ids"] == tok("Plain prompt:").input_ids  # this tokenizer adds no BOS
    rendered = tok.apply_chat_template(examples[0].prompt, tokenize=False, add_generation_prompt=True)
    assert tok.decode(data[0]["prompt_ids"]) == rendered and "You are a helpful AI assistant" in rendered


@pytest.mark.e2e
def test_logps_equal_plain_transformers_and_peft(smollm2, smol_tokenizer, tmp_path):
    """Policy and reference log-probs of each chat example, from prepare + collate + SequenceLogps (chunked
    head, padded batch), equal summing log_softmax over the completion tokens of the conversation
    rendered by the template, one unpadded example at a time through transformers + peft: other shapes
    and kernels through 30 layers, so within logp_atol(merged_logits_atol(logits, 1536, 30), n) (tests/
    tolerances.py: each logit within max|logits| stages_rtol, each of the n completion tokens' log-probs
    within twice that). That bound (~0.4 here) is far above what this machine rounds (2e-4), so the
    adapters are made large enough (lora_B std 0.1) that their effect on every log-prob is larger still."""
    tok = smol_tokenizer
    examples = [Example(chat(q), assistant(f"Sure: {q}"), True) for q in QUESTIONS[:4]]
    data, _ = prepare_dataset(examples, tok, max_length=512, max_prompt_length=None,
                              max_completion_length=None, seed=0)
    policy = load_model(KTOConfig(model_name_or_path=str(smollm2), lora_r=4, lora_dropout=0.0))
    with torch.no_grad():  # peft starts lora_B at zero (policy == reference); make the adapters matter
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1, generator=torch.Generator().manual_seed(len(name)))
    policy.save_pretrained(tmp_path / "adapter")
    batch = collate(data, list(range(len(data))), tok.pad_token_id)["policy"]
    with torch.no_grad():
        got_policy = SequenceLogps(policy, chunk_size=7)(**batch)
        with reference_mode(policy):
            got_reference = SequenceLogps(policy, chunk_size=7)(**batch)

    base = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    with torch.no_grad():
        want_reference = [_plain_logps(base, tok, e) for e in examples]
        peft_model = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
        want_policy = [_plain_logps(peft_model, tok, e) for e in examples]
    layers, fan_in = base.config.num_hidden_layers, base.config.intermediate_size
    for got, want in ((got_reference, want_reference), (got_policy, want_policy)):
        for i, (example, (logp, logits)) in enumerate(zip(data, want, strict=True)):
            atol = logp_atol(merged_logits_atol(logits, fan_in, layers), len(example["completion_ids"]))
            assert abs(float(got[i] - logp)) <= atol, (i, float(got[i]), float(logp), atol)
            effect = abs(float(got_policy[i] - got_reference[i]))
            assert effect > 2 * atol, (i, effect, atol)  # the adapters change what is compared, beyond both bounds


def _plain_logps(model, tok, example: Example) -> tuple[torch.Tensor, torch.Tensor]:
    prompt = tok.apply_chat_template(example.prompt, add_generation_prompt=True, return_dict=True)["input_ids"]
    full = tok.apply_chat_template(example.prompt + example.completion, return_dict=True)["input_ids"]
    full = full[: full.index(tok.eos_token_id, len(prompt)) + 1]  # up to the turn's end, not its newline
    ids = torch.tensor([full])
    logits = model(input_ids=ids).logits
    token_logps = logits[0, :-1].float().log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0]
    return token_logps[len(prompt) - 1 :].sum(), logits


@pytest.fixture(scope="module")
def runs(tmp_path_factory, smollm2) -> dict[str, Path]:
    """2-step runs on SmolLM2 with chat pairs: "one", one rank (ZeRO-2) with the reference on the fly;
    "two", two ZeRO-3 ranks with the same global batch, reading the reference from a cache precomputed
    on one rank. The second run combines two things that must each leave the numbers alone, and they
    are orthogonal: ZeRO-3 shards the (tied) weights and their updates, the cache replaces the
    reference's forwards. The one-rank run and the precompute are independent: they start together."""
    tmp = tmp_path_factory.mktemp("smollm2")
    common = dict(dataset_name=str(write_chats(tmp / "chats.jsonl")), max_steps=2, max_length=64,
                  save_steps=1000, eval_steps=None, per_device_eval_batch_size=8, learning_rate=2e-3,
                  generate_during_eval=False)  # generations are compared by the tiny-model runs
    one = config_file(tmp, "one", smollm2, **common)
    two = config_file(tmp, "two", smollm2, gradient_accumulation_steps=1,
                      deepspeed=str(ROOT / "ds_configs/zero3.json"), **common)
    run_together({"one": [*TRAIN, "--config", str(one)],
                  "precompute": [sys.executable, "launch/precompute_ref.py", "--config", str(one),
                                 "--ref_cache", str(tmp / "cache")]})
    cached = torchrun(2, two, "--ref_cache", str(tmp / "cache"))
    assert "Reference log-probs of 12 train examples read from" in cached.stderr  # the cache was used
    return {"one": tmp / "one", "two": tmp / "two"}


@pytest.mark.e2e
def test_two_zero3_ranks_from_the_cache_log_the_one_rank_numbers(runs):
    """Step by step (and at the final eval) the same loss, z_ref, rewards and accuracies, and the same
    adapter, within what rounding allows (tests/tolerances.py): step 1 (the same weights) within the
    30-layer forward's rounding; after the update, within what the adapters' measured distance can move
    a log-prob through SMOLLM2_LOGP_SENSITIVITY, a bound loose enough on real weights that the first
    step and the adapters are the tight checks here."""
    _assert_same_steps(runs["one"], runs["two"], keys=("loss", "kl", "rewards/desirable", "rewards/undesirable",
                                                       "reward_accuracy", "pair_accuracy", "logps/desirable"),
                       splits=("train", "eval"), sensitivity=SMOLLM2_LOGP_SENSITIVITY)
    assert metrics(runs["one"], "train")[-1]["kl"] != metrics(runs["one"], "train")[0]["kl"]


@pytest.mark.e2e
def test_merged_adapter_equals_the_peft_model(smollm2, smol_tokenizer, runs, tmp_path):
    """The trained adapter merged into the tied-embedding base loads without peft and gives the peft
    model's logits and its greedy generations. peft's W x + s B (A x) and the merged (W + s B A) x are
    different kernels, so the logits are compared within merged_logits_atol (tests/tolerances.py) of
    its 30 layers (1.4e-4 was observed on an AVX-512 Xeon, where a fixed 1e-4 failed)."""
    merged = merge_lora(smollm2, runs["one"] / "adapter", tmp_path / "merged")
    plain = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    assert not any("lora" in name for name, _ in plain.named_parameters())
    assert plain.lm_head.weight.data_ptr() == plain.get_input_embeddings().weight.data_ptr()  # still tied
    base = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    base_logits = _logits_and_generation(base, smol_tokenizer)[0]
    peft_model = PeftModel.from_pretrained(base, runs["one"] / "adapter").eval()
    want_logits, want_text = _logits_and_generation(peft_model, smol_tokenizer)
    got_logits, got_text = _logits_and_generation(plain, smol_tokenizer)
    atol = merged_logits_atol(want_logits, plain.config.intermediate_size, plain.config.num_hidden_layers)
    torch.testing.assert_close(got_logits, want_logits, atol=atol, rtol=0)
    assert got_text == want_text and len(got_text) > 10
    assert (want_logits - base_logits).abs().max() > 1e-2  # training moved the model: not a trivial merge


def _logits_and_generation(model, tok) -> tuple[torch.Tensor, str]:
    inputs = tok.apply_chat_template(chat("What is the capital of France?"), add_generation_prompt=True,
                                     return_tensors="pt", return_dict=True)
    with torch.no_grad():
        logits = model(**inputs).logits
        out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    return logits, tok.decode(out[0, inputs["input_ids"].shape[1] :])


@pytest.mark.e2e
def test_smollm2_logp_sensitivity_bounds_the_model(smollm2):
    """sum_i |d log p(y|x) / d theta_i| over SmolLM2's LoRA weights (rank 4, every projection), for
    64-token sequences (the runs' max_length; their rows have at most 54 tokens) at init and with
    adapters up to 0.02: at most SMOLLM2_LOGP_SENSITIVITY (tests/tolerances.py)."""
    policy = load_model(KTOConfig(model_name_or_path=str(smollm2), lora_r=4, lora_alpha=8, lora_dropout=0.0))
    largest = lora_logp_sensitivity(policy, 64, scales=(0.0, 0.01, 0.02))
    assert 0 < largest <= SMOLLM2_LOGP_SENSITIVITY, largest
