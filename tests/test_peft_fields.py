"""The peft layer fields kto-scale sets directly, checked on a freshly built LoRA model.

`model.adapters_disabled` sets each LoRA layer's `_disable_adapters` and `sft_adapter.reference_adapter_active`
its `_active_adapter` (peft's own `disable_adapter`/`set_adapter` would also flip requires_grad, which the
engines read). These are private to peft: pyproject.toml bounds peft above, and this test fails on a peft
where the fields no longer exist or no longer decide what the layer computes, before a run would quietly
train against the wrong reference.
"""

import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers import AutoModelForCausalLM, LlamaConfig

from kto_scale.model import adapters_disabled
from kto_scale.sft_adapter import REFERENCE_ADAPTER, reference_adapter_active


def _lora_model():
    """A 1-layer Llama with two LoRA adapters ("default", the policy, and the reference), B non-zero."""
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                                                        num_hidden_layers=1, num_attention_heads=2))
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    model.add_adapter(REFERENCE_ADAPTER, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_()
    return model.eval()


def test_the_private_fields_exist_and_drive_peft():
    model = _lora_model()
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    assert layers
    for layer in layers:
        assert hasattr(layer, "_disable_adapters") and hasattr(layer, "_active_adapter"), type(layer).__mro__
    ids = torch.arange(8)[None]
    policy = model(input_ids=ids).logits
    with adapters_disabled(model):
        assert all(layer.disable_adapters for layer in layers)  # peft's public view of the field
        with model.disable_adapter():
            base = model(input_ids=ids).logits  # peft's own switch: the reference kto-scale must equal
        assert torch.equal(model(input_ids=ids).logits, base)
    with reference_adapter_active(model):
        assert all(layer.active_adapters == [REFERENCE_ADAPTER] for layer in layers)
        reference = model(input_ids=ids).logits
    model.set_adapter(REFERENCE_ADAPTER)
    assert torch.equal(model(input_ids=ids).logits, reference)  # peft's own switch computes the same
    assert not torch.equal(reference, policy) and not torch.equal(base, policy)
