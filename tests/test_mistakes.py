"""Every user mistake is one line `error: ...` from the command line, with exit code 1 and no traceback,
including the ones that reach peft, transformers and the attention backends."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from runs import TRAIN, config_file, launch_together
from transformers import LlamaConfig, LlamaForCausalLM

EVALUATE = [sys.executable, "launch/evaluate.py"]
PRECOMPUTE = [sys.executable, "launch/precompute_ref.py"]


def _other_base_adapter(path):
    """A LoRA adapter of a Llama with other sizes than the tiny model's."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, vocab_size=300))
    get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"])).save_pretrained(path)
    return path


CASES = {  # name: (command, extra arguments (from tmp_path), the line expected)
    "misspelled target module": (TRAIN, lambda t: ["--lora_target_modules", "[q_projj]"],
                                 "error: lora_target_modules ['q_projj']: Target modules {{'q_projj'}} not found"),
    "attention not installed": (TRAIN, lambda t: ["--attn_implementation", "flash_attention_2"],
                                "error: attn_implementation 'flash_attention_2' cannot be used here"),
    "output_dir is a file": (TRAIN, lambda t: ["--output_dir", str(t / "data.jsonl")],
                             "error: output_dir {t}/data.jsonl is a file: choose a directory path."),
    "length settings drop everything": (TRAIN, lambda t: ["--max_length", "4", "--max_prompt_length", "null"],
                                        "error: max_length=4 with max_prompt_length=None leaves no room"),
    "ref_cache is a file": (PRECOMPUTE, lambda t: ["--ref_cache", str(t / "data.jsonl")],
                            "error: ref_cache {t}/data.jsonl is a file: choose a directory path."),
    "adapter of another base": (EVALUATE, lambda t: ["--adapter", str(_other_base_adapter(t / "other")), "--output",
                                                     str(t / "eval")],
                                "error: --adapter {t}/other does not fit the model"),
}


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory, tiny_model) -> dict[str, tuple[Path, subprocess.CompletedProcess]]:
    """Every case from the command line, each in a directory of its own, all started at once (each stops
    within seconds of starting): {case: (its directory, how it ended)}."""
    dirs = {case: tmp_path_factory.mktemp("mistake") for case in CASES}
    commands = {case: [*command, "--config", str(config_file(dirs[case], "run", tiny_model)), *extra(dirs[case])]
                for case, (command, extra, _) in CASES.items()}
    results = launch_together(commands)
    return {case: (dirs[case], results[case]) for case in CASES}


@pytest.mark.e2e
@pytest.mark.parametrize("case", CASES)
def test_a_mistake_is_one_line(outcomes, case):
    tmp_path, result = outcomes[case]
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(CASES[case][2].format(t=tmp_path)), last
    if case == "length settings drop everything":  # the settings did it: the data (or eval data) is not blamed
        assert "data" not in last, last
