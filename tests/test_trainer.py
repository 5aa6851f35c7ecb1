"""End-to-end training runs on a tiny Llama: one process (plain python) and two ZeRO-3 ranks
(the deepspeed launcher, gloo on CPU). Each run is a subprocess, like a user's."""

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftModel
from safetensors.torch import load_file

from kto_scale.assets import TINY_LLAMA_DIR
from kto_scale.collate import collate
from kto_scale.config import KTOConfig, load_run_config
from kto_scale.model import SequenceLogps, load_base_model, load_tokenizer, reference_mode
from kto_scale.trainer import evaluation_metrics, prepare_data

ROOT = Path(__file__).resolve().parents[1]


def _write_data(path: Path, n: int = 24) -> Path:
    """n/2 arithmetic prompts, each with a right (desirable) and a wrong (undesirable) answer."""
    rows = []
    for i in range(n // 2):
        a, b = i % 7 + 1, i % 5 + 2
        prompt = f"Question {i}: what is {a} + {b}?"
        rows.append({"prompt": prompt, "completion": f" {a} + {b} = {a + b}.", "label": True})
        rows.append({"prompt": prompt, "completion": f" {a} + {b} = {a + b + 1}.", "label": False})
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """The packaged tiny Llama with seeded random weights, saved like a real checkpoint (every run
    then starts from the same weights, however its ZeRO stage initializes models)."""
    path = tmp_path_factory.mktemp("model")
    config = KTOConfig(model_name_or_path=str(TINY_LLAMA_DIR), init_random_weights=True)
    load_base_model(config).save_pretrained(path)
    load_tokenizer(config).save_pretrained(path)
    return path


def _config_file(tmp_path: Path, name: str, model: Path, **overrides) -> Path:
    config = {
        "model_name_or_path": str(model),
        "dataset_name": str(_write_data(tmp_path / "data.jsonl")), "eval_fraction": 0.25,
        "output_dir": str(tmp_path / name), "max_length": 64, "max_prompt_length": 32,
        "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2, "learning_rate": 5e-3,
        "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "max_steps": 4, "logging_steps": 1,
        "eval_steps": 2, "save_steps": 2, "disable_tqdm": True, "deepspeed": str(ROOT / "ds_configs/zero2.json"),
    }
    config.update(overrides)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(command: list[str]) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=480)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-6000:]


def _metrics(run_dir: Path, split: str) -> list[dict]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [line for line in lines if line["split"] == split]


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory, tiny_model) -> Path:
    tmp_path = tmp_path_factory.mktemp("one")
    _run([sys.executable, "launch/train.py", "--config", str(_config_file(tmp_path, "run", tiny_model))])
    return tmp_path / "run"


def test_one_process_run_trains_and_saves(one_process_run):
    train = _metrics(one_process_run, "train")
    assert [m["step"] for m in train] == [1, 2, 3, 4]
    assert all(math.isfinite(m["loss"]) and math.isfinite(m["kl"]) for m in train)
    assert train[0]["loss"] == pytest.approx(0.5, abs=1e-3)  # step 1: policy == reference, so every loss is 1 - sigmoid(0)
    for path in ("adapter", "checkpoint-2"):
        saved = one_process_run / path
        assert {"adapter_config.json", "adapter_model.safetensors", "kto_config.yaml"} <= {p.name for p in saved.iterdir()}
    lora_b = [t for k, t in load_file(one_process_run / "adapter/adapter_model.safetensors").items() if "lora_B" in k]
    assert lora_b and all(t.abs().max() > 0 for t in lora_b)  # peft starts B at zero: training moved it


def test_saved_adapter_reproduces_final_eval(one_process_run):
    """Base (same seed) + saved adapter, scored outside DeepSpeed, gives the eval numbers the run
    logged at its last step: the adapter round-trips and the base weights were never changed."""
    config = load_run_config(one_process_run)
    tokenizer = load_tokenizer(config)
    _, eval_set = prepare_data(config, tokenizer)
    policy = PeftModel.from_pretrained(load_base_model(config), one_process_run / "adapter")
    module = SequenceLogps(policy)
    batch = collate(eval_set, list(range(len(eval_set))), tokenizer.pad_token_id)
    with torch.no_grad():
        scores = {"policy": module(**batch["policy"]), "policy_kl": module(**batch["kl"])}
    with reference_mode(policy):
        scores.update(reference=module(**batch["policy"]), reference_kl=module(**batch["kl"]))
    scores.update(desirable=batch["desirable"], pair_id=batch["pair_id"])
    expected = evaluation_metrics(scores, config.beta, (config.desirable_weight, config.undesirable_weight))
    logged = _metrics(one_process_run, "eval")[-1]
    assert logged["step"] == 4
    for key in ("loss", "kl", "rewards/desirable", "rewards/undesirable", "reward_accuracy"):
        assert logged[key] == pytest.approx(expected[key], abs=1e-5), key


def test_two_rank_zero3_matches_one_process(tmp_path, tiny_model, one_process_run):
    """2 ranks x 1 accumulation x 2 per micro-batch under ZeRO-3 vs 1 rank x 2 x 2 under ZeRO-2:
    the same global batches, so the same per-step losses, KL baselines and eval numbers."""
    config = _config_file(tmp_path, "two", tiny_model, gradient_accumulation_steps=1,
                          deepspeed=str(ROOT / "ds_configs/zero3.json"))
    _run(["deepspeed", "--num_gpus", "2", "--master_port", str(_free_port()), "launch/train.py",
          "--config", str(config)])
    for split, keys in (("train", ("loss", "kl", "rewards/desirable", "grad_norm")), ("eval", ("loss", "kl"))):
        one, two = _metrics(one_process_run, split), _metrics(tmp_path / "two", split)
        assert [m["step"] for m in one] == [m["step"] for m in two]
        for a, b in zip(one, two, strict=True):
            for key in keys:
                assert b[key] == pytest.approx(a[key], abs=1e-4), (split, a["step"], key)
