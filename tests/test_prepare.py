"""Tokenization layout, the truncation rule and KL pairing of `prepare_dataset`, on the packaged tiny tokenizer."""

import json
import logging

import numpy as np
import pyarrow as pa
import pytest
from transformers import AutoConfig, AutoTokenizer

from kto_scale.assets import DEMO_DATA, TINY_LLAMA_DIR
from kto_scale.config import ConfigError, KTOConfig
from kto_scale.data import DataError, Example, load_examples
from kto_scale.prepare import Lengths, kl_partners, prepare_data, prepare_dataset, truncate

BOS, EOS = 0, 1
DIGITS = "1234567890"  # the tiny tokenizer splits digits: one token each


def prepare(examples, tokenizer, max_length=512, max_prompt_length=None, max_completion_length=None, seed=0):
    return prepare_dataset(
        examples,
        tokenizer,
        max_length=max_length,
        max_prompt_length=max_prompt_length,
        max_completion_length=max_completion_length,
        seed=seed,
    )


def msgs(*pairs: str) -> list[dict[str, str]]:
    return [{"role": r, "content": c} for r, c in zip(pairs[::2], pairs[1::2], strict=True)]


def varied(n: int, prompts: int) -> list[Example]:
    """n examples over `prompts` distinct prompts, alternating labels."""
    return [
        Example(f"Question {i % prompts}?", f"Answer {i}.", i % 2 == 0, source=f"x:{i}") for i in range(n)
    ]


# --- the packaged tiny model ----------------------------------------------------------------------


def test_tiny_llama_assets_agree(tokenizer):
    config = AutoConfig.from_pretrained(TINY_LLAMA_DIR)
    assert config.vocab_size == len(tokenizer)
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
    )
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<s>", "</s>", "<pad>")
    text = "Grüße, 世界! ☃ \t 42"  # byte-level: any text round-trips, nothing is unknown
    ids = tokenizer(text).input_ids
    assert ids[0] == BOS and EOS not in ids
    assert tokenizer.decode(ids[1:]) == text


def test_tiny_llama_chat_template(tokenizer):
    chat = msgs("system", "S", "user", "U", "assistant", "A")
    assert (
        tokenizer.apply_chat_template(chat, tokenize=False)
        == "<s><|system|>\nS<|user|>\nU<|assistant|>\nA</s>"
    )
    rendered = tokenizer.apply_chat_template(chat[:2], tokenize=False, add_generation_prompt=True)
    assert rendered == "<s><|system|>\nS<|user|>\nU<|assistant|>\n"


# --- token layout ---------------------------------------------------------------------------------


def test_text_layout_is_bos_prompt_then_completion_eos(tokenizer):
    examples = [Example("What is 2 + 2?", " 4.", True), Example("Hi", "Bye", False)]
    data, stats = prepare(examples, tokenizer)
    for row, example in zip(data, examples, strict=True):
        assert row["prompt_ids"] == [BOS] + tokenizer(example.prompt, add_special_tokens=False).input_ids
        assert row["completion_ids"] == tokenizer(example.completion, add_special_tokens=False).input_ids + [
            EOS
        ]
        assert row["label"] == example.label and row["pair_id"] == -1
    assert stats.examples == 2 and (stats.desirable, stats.undesirable) == (1, 1)


def test_no_double_bos_or_eos_when_the_text_has_them(tokenizer):
    data, _ = prepare([Example("<s>Hi", "Bye</s>", True), Example("Yo", "Ok", False)], tokenizer)
    assert data[0]["prompt_ids"] == [BOS, *tokenizer("Hi", add_special_tokens=False).input_ids]
    assert data[0]["completion_ids"] == [*tokenizer("Bye", add_special_tokens=False).input_ids, EOS]


def test_chat_layout_has_one_bos_and_one_eos(tokenizer):
    prompt = msgs("system", "Be brief.", "user", "Hi")
    examples = [
        Example(prompt, msgs("assistant", "Hello."), True),
        Example(msgs("user", "Yo"), msgs("assistant", "Ok"), False),
    ]
    data, _ = prepare(examples, tokenizer)
    row = data[0]
    assert row["prompt_ids"].count(BOS) == 1 and row["prompt_ids"][0] == BOS
    assert tokenizer.decode(row["prompt_ids"]) == "<s><|system|>\nBe brief.<|user|>\nHi<|assistant|>\n"
    assert tokenizer.decode(row["completion_ids"]) == "Hello.</s>"
    assert row["completion_ids"].count(EOS) == 1 and row["completion_ids"][-1] == EOS


# Chat templates of the two common families, on the tiny tokenizer with their special tokens added.
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
CHATML_TEMPLATE = (  # Qwen's (and SmolLM2's) layout: a newline after every end of turn
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def templated(template: str, specials: list[str]):
    chat = AutoTokenizer.from_pretrained(TINY_LLAMA_DIR)
    chat.add_special_tokens({"additional_special_tokens": specials})
    chat.chat_template = template
    return chat


@pytest.mark.parametrize(
    "template, specials, end",
    [
        (LLAMA3_TEMPLATE, ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], "<|eot_id|>"),
        (CHATML_TEMPLATE, ["<|im_start|>", "<|im_end|>"], "<|im_end|>"),
    ],
    ids=["llama3", "chatml"],
)
def test_chat_completion_ends_with_the_templates_end_of_turn(template, specials, end):
    """Not `<|im_end|>\n</s>`: the completion (and every KL completion) stops at the end-of-turn token."""
    chat = templated(template, specials)
    examples = [Example(msgs("user", f"Q{i}"), msgs("assistant", f"Answer {i}."), i % 2 == 0) for i in range(4)]
    data, _ = prepare(examples, chat)
    end_id = chat.convert_tokens_to_ids(end)
    for i, row in enumerate(data):
        assert row["completion_ids"] == [*chat(f"Answer {i}.", add_special_tokens=False).input_ids, end_id]
        assert row["kl_completion_ids"] == data[row["kl_index"]]["completion_ids"]
        # The whole example is the rendered conversation up to its end-of-turn token (BOS aside: the
        # tiny tokenizer adds one where the template has none).
        full = chat.apply_chat_template(examples[i].prompt + examples[i].completion, tokenize=False)
        text = chat.decode(row["prompt_ids"] + row["completion_ids"])
        assert text.removeprefix("<s>") == full.removeprefix("<s>").rstrip() and text.endswith(end)


def test_chat_template_without_bos_still_gets_one(tokenizer):
    no_bos = AutoTokenizer.from_pretrained(TINY_LLAMA_DIR)
    no_bos.chat_template = tokenizer.chat_template.replace("{{ bos_token }}", "")
    data, _ = prepare([Example(msgs("user", "Hi"), msgs("assistant", "A"), True), *varied(2, 2)], no_bos)
    assert data[0]["prompt_ids"][:2] == [BOS, *no_bos("<|user|>", add_special_tokens=False).input_ids]
    assert data[0]["prompt_ids"].count(BOS) == 1


def test_chat_template_that_does_not_extend_the_prompt_is_an_error(tokenizer):
    odd = AutoTokenizer.from_pretrained(TINY_LLAMA_DIR)
    odd.chat_template = "{% for m in messages | reverse %}{{ m['content'] }}{% endfor %}"
    examples = [Example(msgs("user", "Hi"), msgs("assistant", "A"), True, source="f.jsonl:7"), *varied(2, 2)]
    with pytest.raises(DataError, match="f.jsonl:7: the chat template"):
        prepare(examples, odd)


# --- truncation -----------------------------------------------------------------------------------


def truncate_one(prompt, completion, bos, max_length, max_prompt_length, max_completion_length):
    """`truncate` on a one-row chunk: the (prompt, completion) kept, or None when the row is dropped."""
    rows, prompts, completions, _, _ = truncate(pa.array([prompt]), pa.array([completion]), bos, EOS,
                                                Lengths(max_length, max_prompt_length, max_completion_length))
    return (prompts[0].as_py(), completions[0].as_py()) if len(rows) else None


def test_truncate_steps_by_hand():
    truncate = truncate_one
    prompt, completion = [BOS, 10, 11, 12, 13, 14], [20, 21, 22, 23, EOS]
    # (1) the prompt keeps its last tokens, BOS stays and counts.
    assert truncate(prompt, completion, BOS, 100, 3, None) == ([BOS, 13, 14], completion)
    assert truncate(prompt[1:], completion, None, 100, 3, None) == ([12, 13, 14], completion)
    # (2) the completion keeps its first tokens.
    assert truncate(prompt, completion, BOS, 100, None, 2) == (prompt, [20, 21])
    # (3) the completion's tail is cut to fit max_length.
    assert truncate(prompt, completion, BOS, 8, None, None) == (prompt, [20, 21])
    assert truncate(prompt, completion, BOS, 6, 4, 3) == ([BOS, 12, 13, 14], [20, 21])
    # No room for one completion token: dropped.
    assert truncate(prompt, completion, BOS, 6, None, None) is None
    assert truncate(prompt, completion, BOS, 7, None, None) == (prompt, [20])


def test_truncation_in_prepare(tokenizer, caplog):
    # Prompt: BOS + 10 digit tokens = 11; completion: 5 digit tokens + EOS = 6.
    examples = [
        Example(DIGITS, DIGITS[:5], True),
        Example("Hi", DIGITS[:5], False),
        Example("Yo", "Ok", True),
    ]
    data, _ = prepare(examples, tokenizer, max_length=100, max_prompt_length=4)
    assert data[0]["prompt_ids"] == [BOS] + tokenizer(DIGITS[-3:], add_special_tokens=False).input_ids
    data, _ = prepare(examples, tokenizer, max_length=100, max_completion_length=2)
    assert data[0]["completion_ids"] == tokenizer(DIGITS[:2], add_special_tokens=False).input_ids
    data, _ = prepare(examples, tokenizer, max_length=14)
    assert len(data[0]["prompt_ids"]) == 11 and len(data[0]["completion_ids"]) == 3
    with caplog.at_level(logging.WARNING, logger="kto_scale.prepare"):
        data, stats = prepare(examples, tokenizer, max_length=11)
    assert (stats.examples, stats.dropped_too_long) == (2, 1) and len(data) == 2
    assert "Dropped 1 of 3 examples" in caplog.text


def test_nothing_left_is_an_error(tokenizer):
    with pytest.raises(DataError, match="No examples to prepare"):
        prepare([], tokenizer)
    with pytest.raises(ConfigError, match="max_length=5 with max_prompt_length=None leaves no room for a completion in any "
                                          "of the 2 examples"):
        prepare([Example(DIGITS, "A", True), Example(DIGITS[::-1], "B", False)], tokenizer, max_length=5)


# --- KL pairing -----------------------------------------------------------------------------------


def pairs_and_singles() -> list[Example]:
    """Paired halves share a prompt and must never be KL partners; plus prompts with many completions."""
    paired = [Example(f"Pair {i}?", f"{c} {i}", c == "good", i) for i in range(15) for c in ("good", "bad")]
    return paired + [Example(f"A longer question {i % 4}?", f"Answer {i}.", i % 2 == 0) for i in range(30)]


def test_kl_partners_have_other_prompts_and_fitting_completions(tokenizer):
    data, _ = prepare(pairs_and_singles(), tokenizer, max_length=12)
    kl = data["kl_index"]
    assert len(data) == 60
    for i, row in enumerate(data):
        j = kl[i]
        assert j != i and data[j]["prompt_ids"] != row["prompt_ids"]
        assert row["pair_id"] < 0 or data[j]["pair_id"] != row["pair_id"]
        assert row["kl_completion_ids"] == data[j]["completion_ids"][: 12 - len(row["prompt_ids"])]
        assert len(row["prompt_ids"]) + len(row["kl_completion_ids"]) <= 12
    assert any(
        len(r["kl_completion_ids"]) < len(data[j]["completion_ids"]) for r, j in zip(data, kl, strict=True)
    )


def test_kl_pairing_is_deterministic_in_seed(tokenizer):
    examples = pairs_and_singles()
    first = prepare(examples, tokenizer, seed=1)[0]["kl_index"]
    assert prepare(examples, tokenizer, seed=1)[0]["kl_index"] == first
    assert prepare(examples, tokenizer, seed=2)[0]["kl_index"] != first


def test_kl_partners_are_not_just_neighbours():
    prompts = [[i] for i in range(200)]  # all distinct: the ring shift is 1, but the ring is shuffled
    partners = kl_partners(np.array([p[0] for p in prompts], dtype=np.uint64), seed=0, source=str).tolist()
    assert sorted(partners) == list(range(200))  # every completion is used once
    assert sum(abs(j - i) == 1 for i, j in enumerate(partners)) < 20


def test_kl_pairing_with_a_dominant_prompt_is_an_error(tokenizer):
    same = [Example("Same?", f"A{i}", i % 2 == 0, source=f"d.jsonl:{i + 1}") for i in range(3)]
    other = [Example("Other?", "B", True), Example("Third?", "C", False)]
    with pytest.raises(
        DataError, match=r"KL pairing needs completions from other prompts.*d.jsonl:1 has 3 of the 4"
    ):
        prepare(same + other[:1], tokenizer)
    data, _ = prepare(same[:2] + other, tokenizer)  # exactly half is enough
    assert all(
        data[j]["prompt_ids"] != row["prompt_ids"] for row, j in zip(data, data["kl_index"], strict=True)
    )


def test_demo_data_prepares_with_the_demo_lengths(tokenizer):
    examples, _ = load_examples(str(DEMO_DATA))
    data, stats = prepare(examples, tokenizer, max_length=128, max_prompt_length=64)
    assert stats.dropped_too_long == 0 and len(data) == len(examples)
    assert json.dumps(data[0])  # plain python values only
    assert data.features["prompt_ids"].feature.dtype == "int32"  # half the bytes of Python's int64 default


def test_cut_completions_are_counted_and_most_cut_is_a_loud_warning(tokenizer, caplog):
    """max_length 4 with max_prompt_length 3 leaves one-token completions without EOS: counted, and warned."""
    examples = varied(8, 4)
    with caplog.at_level(logging.INFO, logger="kto_scale.prepare"):
        data, stats = prepare(examples, tokenizer, max_length=4, max_prompt_length=3)
    assert stats.dropped_too_long == 0 and (stats.completions_cut, stats.lost_eos) == (8, 8)
    assert all(len(c) == 1 and c != [tokenizer.eos_token_id] for c in data["completion_ids"])
    assert "TRUNCATION CUTS MOST OF THE DATA: 8 of 8 completions were cut and 8 lost their EOS" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="kto_scale.prepare"):
        _, stats = prepare(examples, tokenizer, max_length=512)
    assert (stats.completions_cut, stats.lost_eos) == (0, 0) and "cut" not in caplog.text


def test_an_eval_split_too_small_to_pair_says_so(tmp_path, tokenizer):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Q{i}?", "completion": f"A{i}.", "label": i % 2 == 0}) + "\n"
                            for i in range(3)))
    config = KTOConfig(model_name_or_path="m", dataset_name=str(data), eval_fraction=0.1)
    with pytest.raises(DataError, match=r"^The eval split \(the 1 examples eval_fraction=0.1 holds out of .*d.jsonl\) "
                                        r"cannot be used: KL pairing .* set eval_fraction 0"):
        prepare_data(config, tokenizer)
