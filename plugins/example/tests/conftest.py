"""Fixtures: the SmolLM2 tokenizer and GSM8K from the repository's ../shared (any tokenizer with a chat template
works), and a tiny random Llama built from a config."""

import json
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[4] / "shared"


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(SHARED / "assets" / "smollm2-tokenizer")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    from lt_posttrain.testing import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), tokenizer)


@pytest.fixture
def alpaca_file(tmp_path) -> Path:
    """Eight GSM8K problems as Alpaca rows (every other one with an ``input``)."""
    rows = []
    with open(SHARED / "data" / "gsm8k_train.jsonl") as file:
        for index, line in zip(range(8), file):
            row = json.loads(line)
            extra = {"instruction": "Solve this problem.", "input": row["question"]} if index % 2 else {
                "instruction": row["question"], "input": ""}  # fmt: skip
            rows.append({**extra, "output": row["answer"]})
    path = tmp_path / "alpaca.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path
