"""Fixtures: the SmolLM2 tokenizer from the repository's ../shared (any tokenizer with a chat template works) and a
tiny random Llama built from a config."""

from pathlib import Path

import pytest
from kto_rows import SHARED


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(SHARED / "assets" / "smollm2-tokenizer")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    from lt_posttrain.testing import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), tokenizer)
