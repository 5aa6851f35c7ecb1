"""Fixtures shared by the test files."""

import pytest
from transformers import AutoTokenizer

from kto_scale.assets import TINY_LLAMA_DIR


@pytest.fixture(scope="session")
def tokenizer():
    """The packaged tiny byte-level BPE tokenizer (BOS added on its own, chat template, no network)."""
    return AutoTokenizer.from_pretrained(TINY_LLAMA_DIR)
