"""Fixtures: the SmolLM2 tokenizer from the repository's ../shared (any tokenizer with a chat template works), a tiny
random Llama built from a config, and preference pairs made from GSM8K."""

from pathlib import Path

import pytest
from dpo_rows import SHARED, gsm8k_pairs, write_jsonl


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(SHARED / "assets" / "smollm2-tokenizer")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    from lt_posttrain.testing import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), tokenizer)


@pytest.fixture
def pairs_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "pairs.jsonl", gsm8k_pairs(8))
