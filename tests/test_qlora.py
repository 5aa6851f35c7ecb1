"""QLoRA: a bitsandbytes 4/8-bit base on CPU. The reference is the same quantized weights with the
adapters off; training runs on two ZeRO-2 ranks; ZeRO-3 is refused before anything loads."""

import math
from pathlib import Path

import pytest
import torch
from runs import ROOT, config_file, deepspeed_run, metrics
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from kto_scale.assets import TINY_LLAMA_DIR
from kto_scale.config import ConfigError, KTOConfig, load_config
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


@pytest.mark.e2e
def test_two_rank_zero2_trains_a_4bit_base(tmp_path, quantizable_model):
    config = config_file(tmp_path, "q", quantizable_model, gradient_accumulation_steps=1, load_in_4bit=True)
    deepspeed_run(2, config)
    train = metrics(tmp_path / "q", "train")
    assert [m["step"] for m in train] == [1, 2, 3, 4]
    assert all(math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"]) for m in train)
    assert (tmp_path / "q" / "adapter" / "adapter_model.safetensors").exists()


def test_zero3_with_a_quantized_base_is_refused():
    config = load_config(["--model_name_or_path", "m", "--dataset_name", "d", "--load_in_4bit", "true",
                          "--deepspeed", str(ROOT / "ds_configs/zero3.json")])
    with pytest.raises(ConfigError, match="use ds_configs/zero2.json"):
        resolve_deepspeed_config(config, world_size=1)


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
