"""Fixtures shared by the test files."""

import fcntl
import os
from pathlib import Path

import pytest
from runs import ROOT, TRAIN, config_file, run
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


# The converted SmolLM2 (520 MB) is kept between sessions here: $KTO_SCALE_TEST_CACHE, by default
# .test-cache/ in the checkout (git-ignored). Not pytest's cache plugin, which CI setups often turn off.
TEST_CACHE = Path(os.environ.get("KTO_SCALE_TEST_CACHE", ROOT / ".test-cache"))


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """SmolLM2-135M-Instruct as a plain model dir, converted once into TEST_CACHE.

    Several pytest processes may start at once: the first takes a lock and converts (atomically, so a
    killed conversion leaves nothing under the name), the others wait for it and use its result.
    Missing, the real-model tests skip with the install command, except under CI=true, where they fail."""
    if gguf_dir() is None:
        message = f"SmolLM2-135M-Instruct is not installed: {INSTALL}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    path = TEST_CACHE / "SmolLM2-135M-Instruct"
    TEST_CACHE.mkdir(parents=True, exist_ok=True)
    with (TEST_CACHE / ".smollm2.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or when a killed holder exits
        if not (path / "model.safetensors").is_file():
            convert_smollm2(path)
    return path
