"""kto_scale.generate in one process: prompt choice, equality with plain transformers/peft generate,
eval mode, the KV cache, seeded sampling that leaves the training RNG alone, and the resumable log."""

import json
import random
from types import SimpleNamespace

import datasets
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from kto_scale.config import KTOConfig
from kto_scale.generate import (
    GENERATIONS_FILE,
    GenerationLog,
    GenerationSettings,
    PromptGenerations,
    generate_texts,
    generation_prompts,
)
from kto_scale.metrics import MetricsLogger
from kto_scale.model import SequenceLogps


def test_prompts_are_distinct_seeded_and_capped():
    prompt_ids = [[1, 5], [1, 5], [1, 6], [1, 7, 8], [1, 7, 8], [1, 9]]  # pairs share their prompt
    split = _split(prompt_ids)
    chosen = generation_prompts(split, 3, seed=0)
    assert len(chosen) == 3 and len({tuple(p) for p in chosen}) == 3
    assert all(p in prompt_ids for p in chosen)
    assert chosen == generation_prompts(split, 3, seed=0)
    assert sorted(chosen, key=prompt_ids.index) == chosen  # dataset order
    assert {tuple(p) for s in range(10) for p in generation_prompts(split, 3, s)} == {(1, 5), (1, 6), (1, 7, 8), (1, 9)}
    assert generation_prompts(split, 10, seed=0) == [[1, 5], [1, 6], [1, 7, 8], [1, 9]]
    # The draw of the list-based version (distinct prompts by tuple, random.Random(seed).sample): the same prompts.
    distinct = list(dict.fromkeys(tuple(p) for p in prompt_ids))
    for seed in range(10):
        drawn = sorted(random.Random(seed).sample(range(len(distinct)), 3))
        assert generation_prompts(split, 3, seed) == [list(distinct[i]) for i in drawn]


def _split(prompt_ids: list[list[int]]) -> datasets.Dataset:
    """A split with only the prompt column, int32 as prepared splits store it."""
    return datasets.Dataset.from_dict({"prompt_ids": prompt_ids},
                                      features=datasets.Features({"prompt_ids": datasets.List(datasets.Value("int32"))}))


@pytest.fixture
def policy(tiny_model):
    """The tiny Llama with LoRA adapters whose B is not zero (so policy and reference differ), dropout 0.5,
    in training mode and without the KV cache, as the trainer leaves it."""
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    base.config.use_cache = False
    torch.manual_seed(0)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.5, target_modules="all-linear"))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.3)
    return model.train()


def _config(tiny_model, **overrides) -> KTOConfig:
    return KTOConfig(model_name_or_path=str(tiny_model), dataset_name="unused", max_new_tokens=12, **overrides)


def _settings(tiny_model, **overrides) -> GenerationSettings:
    return GenerationSettings.from_config(_config(tiny_model, **overrides))


CPU = torch.device("cpu")
PROMPTS = [[0, 40, 41, 42, 43, 44, 45], [0, 50, 51], [0, 60, 61, 62, 63]]  # different lengths: left padding


@pytest.mark.e2e
def test_greedy_text_equals_plain_generate_of_each_prompt(tiny_model, tokenizer, policy):
    """Batched, left-padded, eval mode: the tokens of transformers' generate on each prompt alone, for the
    policy (adapters on, dropout off) and the reference (adapters off) alike."""
    config = _config(tiny_model)
    engine = SimpleNamespace(module=SequenceLogps(policy), shards_weights=False, world_size=1, device=CPU)
    generations = PromptGenerations(engine, _split(PROMPTS), tokenizer, GenerationSettings.from_config(config))
    rows = generations.rows(step=3)
    assert policy.training  # put back in training mode
    policy.eval()

    def plain(prompt: list[int]) -> str:
        ids = policy.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, use_cache=True,
                              pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)[0, len(prompt):]
        ids = ids.tolist()
        ids = ids[: ids.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in ids else ids
        return tokenizer.decode(ids, skip_special_tokens=True)

    with torch.no_grad():
        expected_policy = [plain(p) for p in PROMPTS]
        with policy.disable_adapter():
            expected_reference = [plain(p) for p in PROMPTS]
    assert [r["policy"] for r in rows] == expected_policy
    assert [r["reference"] for r in rows] == expected_reference
    assert expected_policy != expected_reference  # the adapters matter, so the toggle is tested
    assert [r["prompt"] for r in rows] == tokenizer.batch_decode(PROMPTS, skip_special_tokens=True)
    assert {r["step"] for r in rows} == {3}
    assert all(r["policy"] for r in rows)


@pytest.mark.e2e
def test_generation_uses_the_kv_cache_and_leaves_the_model_config(tiny_model, tokenizer, policy):
    policy.generation_config.use_cache = False  # as a checkpoint saved with use_cache false may have it
    lengths = []
    hook = policy.get_base_model().get_input_embeddings().register_forward_hook(
        lambda module, args, output: lengths.append(args[0].shape[1]))
    generate_texts(SequenceLogps(policy), PROMPTS, tokenizer, _settings(tiny_model), synced_gpus=False, device=CPU)
    hook.remove()
    assert lengths[0] == 7 and set(lengths[1:]) == {1}  # the prompt once, then one new token per step
    assert policy.config.use_cache is False and policy.generation_config.use_cache is False


@pytest.mark.e2e
def test_sampling_is_seeded_and_leaves_the_training_rng_alone(tiny_model, tokenizer, policy):
    config = _config(tiny_model, generation_do_sample=True, generation_temperature=2.0, seed=7)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = generate_texts(SequenceLogps(policy), PROMPTS, tokenizer, GenerationSettings.from_config(config), synced_gpus=False, device=CPU)
    assert torch.equal(torch.get_rng_state(), state)
    assert generate_texts(SequenceLogps(policy), PROMPTS, tokenizer, GenerationSettings.from_config(config), synced_gpus=False, device=CPU) == first
    reseeded = [_config(tiny_model, generation_do_sample=True, generation_temperature=2.0, seed=s) for s in (8, 9)]
    others = [generate_texts(SequenceLogps(policy), PROMPTS, tokenizer, GenerationSettings.from_config(c), synced_gpus=False, device=CPU) for c in reseeded]
    assert first not in others  # the seed, not chance, fixes the draw
    greedy = generate_texts(SequenceLogps(policy), PROMPTS, tokenizer, _settings(tiny_model), synced_gpus=False, device=CPU)
    assert first != greedy


def test_log_appends_and_keeps_lines_up_to_the_resumed_step(tmp_path):
    def write(resume_step, steps):
        metrics = MetricsLogger(tmp_path, ["none"], {}, enabled=True, resume_step=resume_step)
        log = GenerationLog(tmp_path, metrics, resume_step)
        for step in steps:
            log.write([{"step": step, "prompt": "p", "reference": "r", "policy": f"text {step}"}], step=step)
        log.close()
        metrics.close()
        return [json.loads(line)["step"] for line in (tmp_path / GENERATIONS_FILE).read_text().splitlines()]

    assert write(None, [0, 2, 4]) == [0, 2, 4]
    assert write(2, [4, 6]) == [0, 2, 4, 6]  # the crashed run's step-4 line is dropped, then logged again
    assert write(None, [0]) == [0]  # a fresh run starts a fresh file
    metrics = MetricsLogger(tmp_path, ["none"], {}, enabled=False)
    GenerationLog(tmp_path, metrics, None).write([{"step": 9}], step=9)  # ranks > 0 write nothing
    assert write(0, []) == [0]
