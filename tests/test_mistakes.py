"""Every user mistake is one line `error: ...` from the command line, with exit code 1 and no traceback,
including the ones that reach peft, transformers and the attention backends."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from runs import ROOT, TRAIN, config_file, launch_together
from transformers import LlamaConfig, LlamaForCausalLM

from kto_scale.config_io import load_config

EVALUATE = [sys.executable, "launch/evaluate.py"]
PRECOMPUTE = [sys.executable, "launch/precompute_ref.py"]


def _other_base_adapter(path):
    """A LoRA adapter of a Llama with other sizes than the tiny model's."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, vocab_size=300))
    get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"])).save_pretrained(path)
    return path


def _users_cache(t: Path, run: Path) -> list[str]:
    """A reference cache dir holding a user's `train-00003.safetensors` (a name precompute writes)."""
    (t / "cache").mkdir()
    (t / "cache" / "train-00003.safetensors").write_bytes(b"mine")
    return ["--ref_cache", str(t / "cache")]


def _foreign_checkpoint(t: Path, run: Path) -> list[str]:
    """An output dir holding a user's checkpoint-500, resumed with save_total_limit 1 (reproduction 4:
    rotating checkpoints deleted it, and `latest` then named a deleted checkpoint)."""
    (t / "q" / "checkpoint-500").mkdir(parents=True)
    (t / "q" / "checkpoint-500" / "adapter_model.safetensors").write_bytes(b"user's weights")
    return ["--output_dir", str(t / "q"), "--save_steps", "2", "--save_total_limit", "1", "--eval_fraction", "0",
            "--generate_during_eval", "false", "--max_steps", "6", "--resume_from_checkpoint", "latest"]


def _other_global_batch(t: Path, run: Path) -> list[str]:
    """A copy of the one-process run resumed with per-device batches of 1 instead of 2 (its data, as a
    resume must): the batches of a step are a function of the global batch, so it cannot resume exactly."""
    copy = shutil.copytree(run, t / "run-copy")
    data = load_config(["--config", str(run / "kto_config.yaml")]).dataset_name
    return ["--output_dir", str(copy), "--dataset_name", data, "--resume_from_checkpoint", "latest",
            "--per_device_train_batch_size", "1"]


CASES = {  # name: (command, its arguments (from its directory and the suite's one-process run), the line expected)
    "misspelled target module": (TRAIN, lambda t, run: ["--lora_target_modules", "[q_projj]"],
                                 "error: lora_target_modules ['q_projj']: Target modules {{'q_projj'}} not found"),
    "attention not installed": (TRAIN, lambda t, run: ["--attn_implementation", "flash_attention_2"],
                                "error: attn_implementation 'flash_attention_2' cannot be used here"),
    "output_dir is a file": (TRAIN, lambda t, run: ["--output_dir", str(t / "data.jsonl")],
                             "error: output_dir {t}/data.jsonl is a file: choose a directory path."),
    "length settings drop everything": (TRAIN, lambda t, run: ["--max_length", "4", "--max_prompt_length", "null"],
                                        "error: max_length=4 with max_prompt_length=None leaves no room"),
    "ref_cache is a file": (PRECOMPUTE, lambda t, run: ["--ref_cache", str(t / "data.jsonl")],
                            "error: ref_cache {t}/data.jsonl is a file: choose a directory path."),
    "adapter of another base": (EVALUATE, lambda t, run: ["--adapter", str(_other_base_adapter(t / "other")),
                                                          "--output", str(t / "eval")],
                                "error: --adapter {t}/other does not fit the model"),
    "model path typo": (TRAIN, lambda t, run: ["--model_name_or_path", "models/typo"],  # no such dir, no hub
                        "error: model_name_or_path 'models/typo': there is no {root}/models/typo"),
    "a user's file in ref_cache": (PRECOMPUTE, _users_cache, "error: ref_cache {t}/cache holds train-00003.safetensors, "
                                                             "which no kto-scale run recorded"),
    "a user's checkpoint in output_dir": (TRAIN, _foreign_checkpoint, "error: "),
    "output_dir holds another run": (TRAIN, lambda t, run: ["--output_dir", str(run)],  # the suite's run
                                     "error: {run} already holds a run"),
    "resume with another global batch": (TRAIN, _other_global_batch, "error: "),
}
SECOND_LINE = {"output_dir holds another run": "--resume_from_checkpoint latest",  # what else the line says
               "a user's checkpoint in output_dir": "holds checkpoint-500, which no kto-scale run recorded",
               "resume with another global batch": "global batch of 4"}


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory, tiny_model, one_process_run) -> dict[str, tuple[Path, subprocess.CompletedProcess]]:
    """Every case from the command line, each in a directory of its own, all started at once (each stops
    within seconds of starting; offline, so that a mistyped model is not looked up on the hub):
    {case: (its directory, how it ended)}."""
    dirs = {case: tmp_path_factory.mktemp("mistake") for case in CASES}
    commands = {case: [*command, "--config", str(config_file(dirs[case], "run", tiny_model)),
                       *arguments(dirs[case], one_process_run)]
                for case, (command, arguments, _) in CASES.items()}
    results = launch_together(commands, env={"HF_HUB_OFFLINE": "1"})
    return {case: (dirs[case], results[case]) for case in CASES}


@pytest.mark.e2e
@pytest.mark.parametrize("case", CASES)
def test_a_mistake_is_one_line(outcomes, case, one_process_run):
    tmp_path, result = outcomes[case]
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(CASES[case][2].format(t=tmp_path, root=ROOT, run=one_process_run)), last
    assert SECOND_LINE.get(case, "") in last, last
    if case == "length settings drop everything":  # the settings did it: the data (or eval data) is not blamed
        assert "data" not in last, last


@pytest.mark.e2e
def test_a_refused_run_leaves_a_users_files_alone(outcomes):
    """The user's shard and checkpoint are as they were, and no `latest` names anything."""
    cache, _ = outcomes["a user's file in ref_cache"]
    assert (cache / "cache" / "train-00003.safetensors").read_bytes() == b"mine"
    out, _ = outcomes["a user's checkpoint in output_dir"]
    assert (out / "q" / "checkpoint-500" / "adapter_model.safetensors").read_bytes() == b"user's weights"
    assert not (out / "q" / "latest").exists()
