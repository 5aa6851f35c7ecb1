"""QLoRA: a bitsandbytes 4/8-bit base on CPU. The reference is the same quantized weights with the
adapters off; training on two ZeRO-3 ranks (the 4-bit base partitioned) is training on one ZeRO-2 rank;
what ZeRO-3 cannot partition is refused before anything loads; a merge rebuilds the 4-bit weights the
adapter was trained against."""

import dataclasses
import math
from pathlib import Path

import pytest
import torch
from runs import ROOT
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from kto_scale.assets import TINY_LLAMA_DIR
from kto_scale.config import ConfigError, KTOConfig
from kto_scale.config_checks import validate_config
from kto_scale.config_io import load_config
from kto_scale.engine import resolve_deepspeed_config
from kto_scale.model import load_base_model, load_model, reference_mode


@pytest.fixture(scope="module")
def quantizable_model(tmp_path_factory) -> Path:
    """The tiny Llama with an MLP width divisible by 32, as bitsandbytes' CPU 4-bit kernels need
    (every real Llama width is)."""
    path = tmp_path_factory.mktemp("q")
    config = AutoConfig.from_pretrained(TINY_LLAMA_DIR)
    config.intermediate_size = 192
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(TINY_LLAMA_DIR).save_pretrained(path)
    return path


@pytest.mark.parametrize("bits", ["load_in_4bit", "load_in_8bit"])
def test_reference_is_the_quantized_base(quantizable_model, bits):
    config = KTOConfig(model_name_or_path=str(quantizable_model), lora_r=4, lora_dropout=0.0, **{bits: True})
    policy = load_model(config)
    assert any("Linear4bit" in type(m).__name__ or "Linear8bitLt" in type(m).__name__ for m in policy.modules())
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    plain = load_base_model(config)  # quantized the same way, no adapters
    ids = torch.randint(3, 500, (2, 10))
    with reference_mode(policy):
        reference = policy(input_ids=ids).logits
    with torch.no_grad():
        base, adapted = plain(input_ids=ids).logits, policy(input_ids=ids).logits
    assert torch.equal(reference, base)
    assert not torch.allclose(adapted, base)


def test_4bit_layers_keep_one_kernel_so_lora_trains_after_an_eval_pass(quantizable_model, monkeypatch):
    """bitsandbytes repacks a 4-bit weight in place for its AVX-512-BF16 CPU kernel at the first eval-mode
    pass without gradients (the step-0 generations, a reference pass); on such a CPU the LoRA layers over
    a repacked weight then got no gradient in training (q/v lora .grad None: DeepSpeed's ZeRO-2 hook
    failed on it). load_base_model turns the repack off. The CPU's support is faked (bitsandbytes asks
    when it builds each layer), so the test is the same on every machine: without the switch the repack
    itself runs here."""
    import bitsandbytes.nn.modules

    monkeypatch.setattr(bitsandbytes.nn.modules, "has_avx512bf16", lambda: True)
    config = KTOConfig(model_name_or_path=str(quantizable_model), lora_r=4, lora_dropout=0.0, load_in_4bit=True)
    policy = load_model(config)
    layers = [m for m in policy.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
    assert layers and not any(m.support_avx512bf16_for_cpu for m in layers)
    ids = torch.randint(3, 500, (2, 10))
    policy.eval()
    with torch.no_grad():
        policy(input_ids=ids)
    policy.train()
    policy(input_ids=ids).logits.sum().backward()
    assert not [name for name, p in policy.named_parameters() if p.requires_grad and p.grad is None]


@pytest.mark.e2e
def test_zero3_qlora_with_an_sft_adapter_is_zero2_qlora_and_precomputes_evaluates_resumes_and_merges(tmp_path, quantizable_model):
    """One 4-bit base, one ZeRO-2 rank against two ZeRO-3 ranks (each holds half of the packed 4-bit
    weights, stored as float32 elements: bnb_4bit_quant_storage's default there), both continuing an SFT
    adapter (the reference = the 4-bit base + it, as test_sft_reference_on_a_4bit_base pins in one
    process): ZeRO-3 must load it into the partitioned model to the same numbers. The ZeRO-3 run is killed
    after its step-2 checkpoint and resumes on one rank (a node lost: its checkpoint goes through
    DeepSpeed's universal layout), with reference log-probs precomputed on two ZeRO-3 ranks as its
    ref_cache; it then must log, generate and save what the ZeRO-2 run (reference
    on the fly throughout) does within test_scale.assert_same_run's tolerances (tests/tolerances.py),
    whose derivation holds as is: both engines dequantize the same 4-bit bytes with the same kernel (the
    partition is a byte copy; test_the_merge_rebuilds_... shows the dequantization is a fixed function of
    them), so the passes see identical fp32 weights and differ only in the order fp32 sums are reduced
    (the cache's batches of 32 included, as in test_ref_cache's cached-vs-on-the-fly check).

    On the run's artifacts: launch/evaluate.py on two ZeRO-3 ranks (the reference on the fly) gives the
    run's final evaluation within the forward's rounding (the same weights: run_tolerances with the
    weights 0 apart, as test_evaluate) and its greedy completions, and the run's last DeepSpeed ZeRO-3
    checkpoint merges into the dequantized base."""
    from runs import TRAIN, config_file, die_after_first, generations, metrics, ranks, run, run_together
    from test_evaluate import _evaluate
    from test_scale import assert_same_run
    from test_sft_adapter import make_sft_adapter
    from tolerances import run_tolerances

    sft = make_sft_adapter(quantizable_model, tmp_path / "sft")
    runs = {stage: config_file(tmp_path, f"zero{stage}", quantizable_model, gradient_accumulation_steps=4 - stage,
                               load_in_4bit=True, sft_adapter=str(sft), deepspeed=str(ROOT / f"ds_configs/zero{stage}.json"))
            for stage in (2, 3)}  # the same global batch: 1 rank x 2 micro-batches, 2 ranks x 1
    zero3, cache = ["--config", str(runs[3])], str(tmp_path / "cache")
    # The ZeRO-2 run and the ZeRO-3 precompute need nothing from each other: they start together.
    run_together({"zero2": [*TRAIN, "--config", str(runs[2])],
                  "precompute": [*ranks(2), "launch/precompute_ref.py", *zero3, "--ref_cache", cache]})
    train = metrics(tmp_path / "zero2", "train")
    assert [m["step"] for m in train] == [1, 2, 3, 4] and all(math.isfinite(m["loss"]) for m in train)

    die_after_first("kto_scale.trainer:save_checkpoint", [*ranks(2), "launch/train.py", *zero3])
    assert (tmp_path / "zero3" / "latest").read_text() == "checkpoint-2"
    # Resumed on one rank (a node lost): the 2-rank ZeRO-3 checkpoint goes through DeepSpeed's universal
    # layout, the same global batch split as 1 rank x 2 micro-batches (the ZeRO-2 run's own split).
    resumed = run([*TRAIN, *zero3, "--resume_from_checkpoint", "latest", "--ref_cache", cache,
                   "--gradient_accumulation_steps", "2"])
    assert (tmp_path / "zero3" / "checkpoint-2" / "universal").is_dir()
    assert "Reference log-probs of 18 train examples read from" in resumed.stderr
    assert_same_run(tmp_path / "zero2", tmp_path / "zero3")

    _, summary = _evaluate(ranks(2), tmp_path / "zero3", tmp_path / "eval")
    final, atol = metrics(tmp_path / "zero3")[-1], run_tolerances(tmp_path / "zero3", 0.0)[-1]
    assert final["split"] == "eval"
    for key in ("loss", "kl", "rewards/desirable", "rewards/undesirable", "reward_accuracy"):
        assert summary[key] == pytest.approx(final[key], abs=atol[key]), key
    assert generations(tmp_path / "eval") == [{**line, "step": None} for line in generations(tmp_path / "zero3")[-2:]]

    assert_merge_is_peft_on_the_dequantized_base(quantizable_model, tmp_path / "zero3" / "checkpoint-4",
                                                 tmp_path / "zero3" / "adapter", tmp_path / "merged")


def test_quant_storage_changes_no_value(quantizable_model):
    """bnb_4bit_quant_storage only views the packed bytes as another dtype (ZeRO-3 uses the training
    dtype): the same kernels on the same bytes give bit-identical logits and LoRA gradients (bf16)."""
    ids = torch.randint(3, 500, (2, 10))
    results = []
    for storage in ("uint8", "bfloat16"):
        policy = load_model(KTOConfig(model_name_or_path=str(quantizable_model), load_in_4bit=True, bf16=True,
                                      bnb_4bit_quant_storage=storage, lora_dropout=0.0))
        weight = policy.get_base_model().model.layers[0].mlp.down_proj.base_layer.weight
        assert weight.dtype == getattr(torch, storage)
        logits = policy(input_ids=ids).logits
        logits.float().logsumexp(-1).sum().backward()
        results.append((logits.detach(), [p.grad for p in policy.parameters() if p.requires_grad]))
    (logits, grads), (viewed, viewed_grads) = results
    assert torch.equal(viewed, logits) and all(map(torch.equal, viewed_grads, grads))


@pytest.mark.parametrize("options, message", [
    (["--load_in_8bit", "true"], "cannot partition bitsandbytes' 8-bit weights .* use load_in_4bit on ZeRO-3"),
    (["--load_in_4bit", "true", "--bnb_4bit_quant_storage", "uint8"],
     "bnb_4bit_quant_storage uint8 on ZeRO-3 .* set it to float32 or leave it unset"),
])
def test_zero3_refuses_what_it_cannot_partition(options, message):
    config = load_config(["--model_name_or_path", "m", "--dataset_name", "d", *options,
                          "--deepspeed", str(ROOT / "ds_configs/zero3.json")])
    with pytest.raises(ConfigError, match=message):
        resolve_deepspeed_config(config, world_size=1)


def test_quant_storage_is_validated():
    with pytest.raises(ConfigError, match="bnb_4bit_quant_storage must be one of"):
        validate_config(KTOConfig(model_name_or_path="m", dataset_name="d", bnb_4bit_quant_storage="int4"))


def test_sft_reference_on_a_4bit_base(tmp_path, quantizable_model):
    """With sft_adapter, the reference is the quantized base + the SFT adapter (never merged into the
    4-bit weights), as peft loads it: exactly, as the same peft and bitsandbytes kernels run on the same
    weights and shapes; the policy starts exactly there."""
    from peft import PeftModel
    from test_sft_adapter import make_sft_adapter

    sft = make_sft_adapter(quantizable_model, tmp_path / "sft")
    config = KTOConfig(model_name_or_path=str(quantizable_model), sft_adapter=str(sft), lora_dropout=0.0,
                       load_in_4bit=True)
    policy = load_model(config)
    plain = PeftModel.from_pretrained(load_base_model(config), sft).eval()
    ids = torch.randint(3, 500, (2, 10))
    with reference_mode(policy):
        reference = policy(input_ids=ids).logits
    with torch.no_grad():
        expected, step0, base = plain(input_ids=ids).logits, policy(input_ids=ids).logits, plain.get_base_model()
        with plain.disable_adapter():
            bare = plain(input_ids=ids).logits
    assert any("Linear4bit" in type(m).__name__ for m in base.modules())
    assert torch.equal(reference, expected)
    assert torch.equal(step0, reference) and not torch.allclose(reference, bare)


@pytest.mark.parametrize("bf16", [False, True])
def test_the_merge_rebuilds_the_4bit_weights_the_run_loaded(quantizable_model, bf16):
    """kto_scale.quantized_base quantizes each weight with the same bitsandbytes call as the 4-bit load
    (same kernel, same shapes): its dequantized weights equal the loaded model's exactly."""
    import bitsandbytes.functional as bnb_functional
    from safetensors.torch import load_file

    from kto_scale.quantized_base import as_trained, quantized_weight_names

    config = KTOConfig(model_name_or_path=str(quantizable_model), load_in_4bit=True, bf16=bf16)
    model, saved = load_base_model(config), load_file(quantizable_model / "model.safetensors")
    loaded = {f"{name}.weight": m.weight for name, m in model.named_modules() if "Linear4bit" in type(m).__name__}
    assert quantized_weight_names(quantizable_model, config) == loaded.keys() and len(loaded) == 14
    for name, weight in loaded.items():
        assert torch.equal(as_trained(saved[name], config), bnb_functional.dequantize_4bit(weight, weight.quant_state).float())


def test_merging_a_4bit_adapter_is_peft_on_the_dequantized_base(quantizable_model, tmp_path):
    """A QLoRA adapter merges into the dequantized 4-bit weights it was trained against, written in 16
    (here 32) bits (assert_merge_is_peft_on_the_dequantized_base)."""
    from kto_scale.config_io import save_config

    config = KTOConfig(model_name_or_path=str(quantizable_model), dataset_name="d", load_in_4bit=True, lora_r=4,
                       lora_dropout=0.0)
    policy = load_model(config)
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    policy.save_pretrained(tmp_path / "adapter")
    save_config(config, tmp_path / "adapter")  # as every kto-scale adapter dir carries it
    assert_merge_is_peft_on_the_dequantized_base(quantizable_model, tmp_path / "adapter", tmp_path / "adapter",
                                                 tmp_path / "merged")


def assert_merge_is_peft_on_the_dequantized_base(base: Path, source: Path, adapter: Path, output: Path) -> None:
    """merge_lora(base, source) (a kto-scale adapter dir or DeepSpeed checkpoint of a 4-bit run) has peft's
    logits for `adapter` on the dequantized 4-bit base within merged_logits_atol (tests/tolerances.py:
    (W + s B A) x vs W x + s B (A x) in fp32, fan-in 192, 2 layers), and not those of the adapter on the
    original weights (the quantization error is far above that tolerance). It holds no quantization."""
    from peft import PeftModel
    from test_export import TOKENS, plain_logits
    from tolerances import merged_logits_atol

    from kto_scale.export import merge_lora
    from kto_scale.quantized_base import training_config

    merge_lora(base, source, output, dtype="fp32")
    with torch.no_grad():
        dequantized = load_base_model(dataclasses.replace(training_config(source), model_name_or_path=str(base))).dequantize()
        expected = PeftModel.from_pretrained(dequantized, adapter).eval()(TOKENS).logits
        original = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()(TOKENS).logits
    merged = plain_logits(output)
    atol = merged_logits_atol(expected, 192, 2)
    torch.testing.assert_close(merged, expected, atol=atol, rtol=0)
    assert (merged - original).abs().max() > 100 * atol
    assert "quantization_config" not in (output / "config.json").read_text()
