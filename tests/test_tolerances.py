"""The one measured number the run tolerances rest on (tests/tolerances.py): how far a log-prob of the
tiny test model moves per unit of LoRA weight change, summed over the weights."""

import torch
from tolerances import LORA_LOGP_SENSITIVITY, lora_logp_sensitivity

from kto_scale.assets import TINY_LLAMA_DIR
from kto_scale.config import KTOConfig
from kto_scale.model import load_model


def test_lora_logp_sensitivity_bounds_the_tiny_model():
    """sum_i |d log p(y|x) / d theta_i| over the LoRA weights, for the longest sequence the test runs
    score (max_length 64, every token a completion token), at init (lora_B 0, where only lora_B's
    gradient is not 0) and with adapters as large as the test runs make them (Adam moves a weight by at
    most about lr per step: 16 steps of lr 5e-3 or 3 of 5e-2 stay under 0.2), for several seeds: at most
    LORA_LOGP_SENSITIVITY. (It grows with the adapter: ~600 at init, ~2,200 at 0.1.)"""
    config = KTOConfig(model_name_or_path=str(TINY_LLAMA_DIR), init_random_weights=True, lora_r=4, lora_alpha=8,
                       lora_dropout=0.0)
    torch.manual_seed(0)
    largest = lora_logp_sensitivity(load_model(config), 64, scales=(0.0, 0.05, 0.1, 0.2))
    assert 0 < largest <= LORA_LOGP_SENSITIVITY, largest
