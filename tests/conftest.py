"""Fixtures shared by the test files."""

import os
from pathlib import Path

import pytest
from runs import TRAIN, config_file, run
from transformers import AutoTokenizer

from kto_scale.assets import TINY_LLAMA_DIR
from kto_scale.config import KTOConfig
from kto_scale.model import load_base_model, load_tokenizer
from kto_scale.smollm2 import INSTALL, convert_smollm2, gguf_dir


@pytest.fixture(scope="session")
def tokenizer():
    """The packaged tiny byte-level BPE tokenizer (BOS added on its own, chat template, no network)."""
    return AutoTokenizer.from_pretrained(TINY_LLAMA_DIR)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """The packaged tiny Llama with seeded random weights, saved like a real checkpoint (every run
    then starts from the same weights, however its ZeRO stage initializes models)."""
    path = tmp_path_factory.mktemp("model")
    config = KTOConfig(model_name_or_path=str(TINY_LLAMA_DIR), init_random_weights=True)
    load_base_model(config).save_pretrained(path)
    load_tokenizer(config).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def one_process_run(tmp_path_factory, tiny_model) -> Path:
    """The reference run: plain `python launch/train.py`, 1 rank x 2 accumulation x 2 per
    micro-batch, ZeRO-2, 4 steps. Runs with other layouts of the same global batch must match it."""
    tmp_path = tmp_path_factory.mktemp("one")
    run([*TRAIN, "--config", str(config_file(tmp_path, "run", tiny_model))])
    return tmp_path / "run"


@pytest.fixture(scope="session")
def smollm2(request) -> Path:
    """SmolLM2-135M-Instruct as a plain model dir, converted once and kept in pytest's cache dir.

    Missing, the real-model tests skip with the install command, except under CI=true, where they fail."""
    if gguf_dir() is None:
        message = f"SmolLM2-135M-Instruct is not installed: {INSTALL}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    path = request.config.cache.mkdir("smollm2") / "SmolLM2-135M-Instruct"
    if not (path / "model.safetensors").is_file():
        convert_smollm2(path)
    return path
