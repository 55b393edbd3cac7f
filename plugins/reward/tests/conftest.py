"""Fixtures: the SmolLM2 tokenizer from the repository's ../shared (any tokenizer with a chat template works), and a
tiny random Llama built from a config, as a causal LM and as a reward model (its scalar head saved, so every test
loads the same one)."""

from pathlib import Path

import pytest
from reward_rows import SHARED


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(SHARED / "assets" / "smollm2-tokenizer")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    from lt_posttrain.testing import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), tokenizer)


@pytest.fixture(scope="session")
def reward_model_dir(tmp_path_factory, tiny_model_dir, tokenizer) -> Path:
    import torch
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    with torch.no_grad():
        model.score.weight.normal_(std=0.5)  # rewards of order 1, so the loss is not flat at log 2
    model.config.pad_token_id = tokenizer.pad_token_id
    folder = tmp_path_factory.mktemp("tiny-reward")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
