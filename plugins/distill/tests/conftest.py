"""Fixtures: the SmolLM2 tokenizer from the repository's ../shared (any tokenizer with a chat template works), and two
tiny random Llamas of different weights, a student and a teacher."""

from pathlib import Path

import pytest
from distill_rows import SHARED


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(SHARED / "assets" / "smollm2-tokenizer")


@pytest.fixture(scope="session")
def student_dir(tmp_path_factory, tokenizer) -> Path:
    from lt_posttrain.testing import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("student"), tokenizer, seed=0)


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory, tokenizer) -> Path:
    from lt_posttrain.testing import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("teacher"), tokenizer, seed=1)
