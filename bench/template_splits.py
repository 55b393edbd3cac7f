"""How many conversations of the ShareGPT set each real chat template splits into several samples, and the tokens
the samples hold (a split conversation repeats its earlier turns in every sample).

The templates are the ones TRL ships (``pip install trl``), read as files; the SmolLM2 template is the test
tokenizer's own. Every template renders with the SmolLM2 tokenizer: the split decision is made on the text.

    python bench/template_splits.py [--rows N]
"""

import argparse
import json
import time
from pathlib import Path

from transformers import AutoTokenizer

from lt_posttrain.data.tokenize import render_conversation, template_renderer
from lt_posttrain.testing import real_chat_template

SHARED = Path(__file__).resolve().parents[2] / "shared"
TEMPLATES = ["qwen3", "qwen3_training", "phi3", "phi3_5", "llama3", "qwen2_5", "deepseek_r1_distill"]


def sharegpt(rows: int | None) -> list[list[dict]]:
    roles = {"human": "user", "gpt": "assistant"}
    data = json.loads((SHARED / "data" / "sharegpt_dummy_conversation.json").read_text())[:rows]
    return [[{"role": roles[turn["from"]], "content": turn["value"]} for turn in row["conversations"]] for row in data]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=None)
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(SHARED / "assets" / "smollm2-tokenizer")
    conversations = sharegpt(args.rows)
    multi = sum(sum(m["role"] == "assistant" for m in c) > 1 for c in conversations)
    print(f"{len(conversations)} conversations, {multi} with more than one assistant turn")
    print(f"{'template':<22}{'split':>7}{'samples':>9}{'characters':>12}{'seconds':>9}")
    for name in ["smollm2", *TEMPLATES]:
        render = template_renderer(tokenizer, None if name == "smollm2" else real_chat_template(name))
        began, split, samples, characters = time.perf_counter(), 0, 0, 0
        for messages in conversations:
            parts = render_conversation(messages, render)
            split += len(parts) > 1
            samples += len(parts)
            characters += sum(len(part.text) for part in parts)
        print(f"{name:<22}{split:>7}{samples:>9}{characters:>12}{time.perf_counter() - began:>9.1f}")


if __name__ == "__main__":
    main()
