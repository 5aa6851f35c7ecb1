"""sft_adapter: KTO starting from an SFT LoRA adapter. The reference is base + that adapter, frozen,
equal to a plain `PeftModel.from_pretrained(base, sft_adapter)` (1 rank and 2 ZeRO-3 ranks); the
policy starts as an exact copy (every reward 0 at step 0) and is what trains and is saved; the cache
fingerprints the adapter; adapters that cannot be continued are refused before the model loads."""

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from runs import (
    ROOT,
    TRAIN,
    config_file,
    generations,
    launch,
    metrics,
    ranks,
    run,
    run_together,
    torchrun,
)
from safetensors.torch import load_file
from test_scale import _assert_same_steps
from tolerances import logp_rtol, merged_logits_atol, run_tolerances
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from kto_scale.collate import collate
from kto_scale.config import ConfigError
from kto_scale.config_io import load_config
from kto_scale.export import merge_lora
from kto_scale.model import SequenceLogps, load_model, load_tokenizer, reference_mode
from kto_scale.prepare import prepare_data
from kto_scale.ref_cache import RefCacheError, open_ref_cache
from kto_scale.sft_adapter import check_sft_adapter

PRECOMPUTE = [sys.executable, "launch/precompute_ref.py"]
# Not the runs' lora_r=4/lora_alpha=8 (config_file): the adapter's own settings must win.
SFT_SETTINGS = dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], use_rslora=True)


def make_sft_adapter(base_dir: Path, path: Path, seed: int = 0, **settings) -> Path:
    """An "SFT" adapter on the model in base_dir: random non-zero lora_B, so it changes the model."""
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                           LoraConfig(task_type="CAUSAL_LM", **{**SFT_SETTINGS, **settings}))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.3)
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(path)  # as SFT trainers do
    return path


@pytest.fixture(scope="module")
def sft(tmp_path_factory, tiny_model) -> Path:
    return make_sft_adapter(tiny_model, tmp_path_factory.mktemp("sft") / "adapter")


def plain_logps(base_dir: Path, adapter: Path, config_path: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Every row's (completion, KL completion) log-probs under PeftModel.from_pretrained(base, adapter)."""
    config = load_config(["--config", str(config_path)])
    tokenizer = load_tokenizer(config)
    data = dict(zip(("train", "eval"), prepare_data(config, tokenizer), strict=True))[split]
    batch = collate(data, list(range(len(data))), tokenizer.pad_token_id)
    module = SequenceLogps(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter).eval())
    with torch.no_grad():
        return module(**batch["policy"]), module(**batch["kl"])


def test_reference_is_base_plus_sft_and_the_policy_its_copy(tmp_path, tiny_model, sft):
    """The reference (our "reference" adapter) equals PeftModel.from_pretrained(base, sft) exactly: the same
    peft LoRA kernels on the same fp32 weights and shapes, and the policy starts exactly there."""
    config = load_config(["--config", str(config_file(tmp_path, "r", tiny_model, sft_adapter=str(sft)))])
    policy = load_model(config)
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), sft).eval()
    raw = AutoModelForCausalLM.from_pretrained(tiny_model)
    ids = torch.randint(3, 900, (3, 12))
    with reference_mode(policy):
        reference = policy(input_ids=ids).logits
    with torch.no_grad():
        expected, step0, bare = plain(input_ids=ids).logits, policy(input_ids=ids).logits, raw(input_ids=ids).logits
    assert torch.equal(reference, expected)
    assert torch.equal(step0, reference)  # the policy starts exactly at the reference
    assert (reference - bare).abs().max() > 0.1  # the SFT adapter matters: not the raw base
    settings = policy.peft_config["default"]
    assert (settings.r, settings.lora_alpha, settings.use_rslora, set(settings.target_modules)) == (
        8, 16, True, set(SFT_SETTINGS["target_modules"]))
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    frozen_reference = {n for n, p in policy.named_parameters() if ".reference." in n}
    assert trainable and all(".default." in n for n in trainable)
    assert frozen_reference and not frozen_reference & trainable


def test_the_policy_trains_with_lora_dropout(tmp_path, tiny_model, sft):
    """Loading the frozen reference adapter must not leave the model in eval mode: the policy's LoRA
    dropout is on from the first step (peft's load_adapter switches the whole model to eval)."""
    config = load_config(["--config", str(config_file(tmp_path, "d", tiny_model, sft_adapter=str(sft), lora_dropout=0.3))])
    policy = load_model(config)
    dropouts = [m for name, m in policy.named_modules() if name.endswith("lora_dropout.default")]
    assert policy.training and dropouts and all(m.training and m.p == 0.3 for m in dropouts)


def _edited_copy(src: Path, dst: Path, **changes) -> Path:
    shutil.copytree(src, dst)
    settings = json.loads((dst / "adapter_config.json").read_text())
    (dst / "adapter_config.json").write_text(json.dumps({**settings, **changes}))
    return dst


@pytest.mark.e2e
def test_adapters_that_cannot_be_continued_are_refused(tmp_path, tiny_model, sft):
    """DoRA, modules_to_save, another base (other shapes) or vocabulary: a ConfigError naming it."""
    narrow = AutoConfig.from_pretrained(tiny_model)
    narrow.intermediate_size //= 2
    AutoModelForCausalLM.from_config(narrow).save_pretrained(tmp_path / "other_base")
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(tmp_path / "other_base")
    other_vocab = shutil.copytree(sft, tmp_path / "vocab")
    tokenizer = AutoTokenizer.from_pretrained(sft)
    tokenizer.add_tokens(["<|sft_only|>"])
    tokenizer.save_pretrained(other_vocab)
    cases = {
        "uses DoRA": _edited_copy(sft, tmp_path / "dora", use_dora=True),
        "uses modules_to_save": _edited_copy(sft, tmp_path / "mts", modules_to_save=["lm_head"]),
        "is not LoRA": _edited_copy(sft, tmp_path / "ia3", peft_type="IA3"),
        "the base weight is (64, 176), but lora_B @ lora_A is (64, 88)":
            make_sft_adapter(tmp_path / "other_base", tmp_path / "other"),
        "vocabulary differs": other_vocab,
    }
    for message, adapter in cases.items():
        config = load_config(["--config", str(config_file(tmp_path, "r", tiny_model, sft_adapter=str(adapter)))])
        with pytest.raises(ConfigError, match="sft_adapter") as error:
            check_sft_adapter(config, load_tokenizer(config))
        assert message in str(error.value), (message, str(error.value))

    # Before the model loads: this base has no weights at all, yet the adapter is what is refused.
    weightless = tmp_path / "weightless"
    weightless.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model / name, weightless)
    config = config_file(tmp_path, "early", weightless, sft_adapter=str(cases["uses DoRA"]))
    result = launch([*TRAIN, "--config", str(config)], timeout=300)
    assert result.returncode == 1 and "error: sft_adapter" in result.stderr and "uses DoRA" in result.stderr
    assert "Traceback" not in result.stderr, result.stderr[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model, sft) -> dict:
    """"one": one rank with the reference on the fly; "zero3": two ZeRO-3 ranks with parameters and
    optimizer offloaded to the CPU, padding-free, reading the reference from a cache precomputed (on one
    rank) with the SFT reference. The second run combines what must each leave the numbers alone, and
    they are orthogonal: ZeRO-3 shards the state, padding-free changes the forwards' shapes, the cache
    replaces the reference's forwards. The one-rank run and the precompute are independent: they start
    together."""
    tmp = tmp_path_factory.mktemp("sft_runs")
    one = config_file(tmp, "one", tiny_model, sft_adapter=str(sft))
    zero3 = config_file(tmp, "zero3", tiny_model, sft_adapter=str(sft), gradient_accumulation_steps=1,
                        deepspeed=str(ROOT / "ds_configs/zero3_offload.json"), ref_cache=str(tmp / "cache"),
                        padding_free=True)
    done = run_together({"one": [*TRAIN, "--config", str(one)],
                         "precompute": [*PRECOMPUTE, "--config", str(one), "--ref_cache", str(tmp / "cache")]})
    cached = torchrun(2, zero3)
    assert "Reference log-probs of 18 train examples read from" in cached.stderr  # the cache was used
    return {"tmp": tmp, "one": tmp / "one", "zero3": tmp / "zero3", "config": one, "cache": tmp / "cache",
            "logs": {"one": done["one"].stderr}}


@pytest.mark.e2e
def test_rewards_start_at_zero_and_the_policy_moves(runs, sft):
    """Step 1 is scored before its update: policy == reference, so every reward and z_ref is 0 up to the
    rounding of the two passes. They run different shapes (the reference scores x + y + y' in one shared
    pass, the policy x + y and x + y' apart; the cache's values come from other batches), so each
    log-ratio is allowed logp_rtol (tests/tolerances.py) of the 2-layer model times the largest logged
    sequence log-prob: rewards are beta times a log-ratio, z_ref a mean of log-ratios (1.9e-6 on kl and
    3.8e-7 on rewards/desirable were observed on an AVX-512 Xeon, where exact zeros were asserted).
    A reference that silently were the raw base or the moving policy fails here or below."""
    assert "the run's lora_r=4, lora_alpha=8" in runs["logs"]["one"]  # the adapter's settings won, and said so
    beta = load_config(["--config", str(runs["config"])]).beta
    for name in ("one", "zero3"):
        first = metrics(runs[name], "train")[0]
        assert first["step"] == 1
        log_ratio_atol = logp_rtol(2) * max(abs(first["logps/desirable"]), abs(first["logps/undesirable"]))
        for key, atol in (("rewards/desirable", beta * log_ratio_atol), ("rewards/undesirable", beta * log_ratio_atol),
                          ("kl", log_ratio_atol)):
            assert abs(first[key]) <= atol, (name, key, first[key], atol)
        assert abs(metrics(runs[name], "train")[-1]["margins"]) > 1e-3
    trained, start = load_file(runs["one"] / "adapter" / "adapter_model.safetensors"), load_file(
        sft / "adapter_model.safetensors")
    assert trained.keys() == start.keys()  # the policy only, named so that peft loads it as "default"
    assert not (runs["one"] / "adapter" / "reference").exists()  # where peft would save a second adapter
    assert any(not torch.equal(trained[k], start[k]) for k in start)


@pytest.mark.e2e
def test_cache_and_two_zero3_ranks_match_one_rank_on_the_fly(runs):
    """The combined run (two ZeRO-3 offload ranks, padding-free, the reference from the cache) logs the
    one-rank on-the-fly run's numbers at every step and evaluation, within what rounding allows
    (tests/tolerances.py run_tolerances), and its adapter within adapter_atol."""
    _assert_same_steps(runs["one"], runs["zero3"], keys=("loss", "kl", "rewards/desirable", "rewards/undesirable",
                                                         "logps/desirable"), splits=("train", "eval"))


@pytest.mark.e2e
def test_cache_holds_the_sft_reference_and_is_refused_for_another(runs, tiny_model, tmp_path, sft):
    config = load_config(["--config", str(runs["config"])])
    tokenizer = load_tokenizer(config)
    train = prepare_data(config, tokenizer)[0]
    cache = open_ref_cache(str(runs["cache"]), config, tokenizer, "train", train)
    for got, want in zip(cache.lookup(torch.arange(len(train))),
                         plain_logps(tiny_model, sft, runs["config"], "train"), strict=True):
        torch.testing.assert_close(got, want, atol=0, rtol=logp_rtol(2))  # other batches and passes
    other = make_sft_adapter(tiny_model, tmp_path / "other", seed=1)
    for sft_adapter, field in ((None, "adapter: cache {'config'"), (str(other), "adapter.weights: cache '")):
        config.sft_adapter = sft_adapter
        with pytest.raises(RefCacheError) as error:
            open_ref_cache(str(runs["cache"]), config, tokenizer, "train", train)
        assert field in str(error.value)


@pytest.mark.e2e
def test_evaluate_on_two_zero3_ranks_scores_against_the_sft_reference(runs, tiny_model, sft, tmp_path):
    """launch/evaluate.py on two ZeRO-3 ranks after training (one process: tests/test_evaluate.py). The
    reference log-probs are still base + SFT adapter (the reference never moved), the policy's base + the
    trained adapter, for each line's completion and its KL completion, lines in row order (logp_rtol:
    other batches and passes than the plain computation); the summary is the run's final evaluation (the
    same weights in other batch shapes: run_tolerances with the weights 0 apart; counts and accuracies
    exactly), and the generations are the run's at its last step."""
    run([*ranks(2), "launch/evaluate.py", "--config", str(runs["zero3"] / "kto_config.yaml"), "--adapter", str(runs["zero3"] / "adapter"),
         "--output", str(tmp_path / "eval")])
    lines = [json.loads(line) for line in (tmp_path / "eval" / "examples.jsonl").read_text().splitlines()]
    assert [line["row"] for line in lines] == sorted(line["row"] for line in lines)
    config = runs["zero3"] / "kto_config.yaml"
    reference = plain_logps(tiny_model, sft, config, "eval")
    policy = plain_logps(tiny_model, runs["zero3"] / "adapter", config, "eval")
    for key, want in (("reference_logp", reference[0]), ("reference_kl_logp", reference[1]),
                      ("policy_logp", policy[0]), ("policy_kl_logp", policy[1])):
        torch.testing.assert_close(torch.tensor([line[key] for line in lines]), want, atol=0, rtol=logp_rtol(2))
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    logged, atol = metrics(runs["zero3"])[-1], run_tolerances(runs["zero3"], 0.0)[-1]
    assert logged["split"] == "eval" and summary["examples"] == len(lines)
    shared = summary.keys() & logged.keys() - {"split", "step", "time", "examples_per_s", "tokens_per_s"}
    assert {"loss", "kl", "rewards/desirable", "rewards/undesirable", "reward_accuracy"} <= shared
    for key in shared:
        assert summary[key] == pytest.approx(logged[key], abs=atol[key]), key
    assert generations(tmp_path / "eval") == [{**line, "step": None} for line in generations(runs["zero3"])[-2:]]


@pytest.mark.e2e
def test_resume_merge_and_adapter_only_export(runs, tiny_model, tmp_path):
    """Checkpoints hold the policy only; a resume rebuilds the reference from sft_adapter and ends with
    the uninterrupted run's adapter exactly (one rank runs the same kernels on the same shapes from the
    checkpoint's exact fp32 state, as in test_scale.assert_resumed_equals_whole); merge_lora and
    --adapter_only export the trained policy."""
    resumed = tmp_path / "resumed"
    shutil.copytree(runs["one"], resumed)
    shutil.rmtree(resumed / "checkpoint-4")
    shutil.rmtree(resumed / "adapter")
    (resumed / "latest").write_text("checkpoint-2")
    run([*TRAIN, "--config", str(runs["config"]), "--output_dir", str(resumed), "--resume_from_checkpoint", "latest"])
    whole = load_file(runs["one"] / "adapter" / "adapter_model.safetensors")
    again = load_file(resumed / "adapter" / "adapter_model.safetensors")
    assert whole.keys() == again.keys() and all(torch.equal(again[key], whole[key]) for key in whole)

    run([sys.executable, "launch/merge_lora.py", "--base", str(tiny_model), "--adapter",
         str(runs["one"] / "checkpoint-4"), "--output", str(tmp_path / "clean"), "--adapter_only"])
    exported = load_file(tmp_path / "clean" / "adapter_model.safetensors")
    assert exported.keys() == whole.keys()
    merge_lora(tiny_model, runs["one"] / "adapter", tmp_path / "merged")
    ids = torch.randint(3, 900, (2, 9))
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), runs["one"] / "adapter")
    with torch.no_grad():  # merged vs unmerged: merged_logits_atol of the 2-layer model, fan-in 176
        want = peft(ids).logits
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(tmp_path / "merged")(ids).logits,
                                   want, atol=merged_logits_atol(want, 176, 2), rtol=0)
