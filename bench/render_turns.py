"""Rendering one long conversation: turn by turn (a rendering of every prefix) against one pass, with the same
spans. The conversation cycles through the ShareGPT set's turns up to ``--turns`` messages.

    python bench/render_turns.py [--turns 1000] [--templates smollm2 qwen3_training phi3 llama3]
"""

import argparse
import json
import time
from pathlib import Path

from transformers import AutoTokenizer

from lt_posttrain.data.tokenize import render_in_one_pass, render_turn_by_turn, template_renderer
from lt_posttrain.testing import real_chat_template

SHARED = Path(__file__).resolve().parents[2] / "shared"


def long_conversation(turns: int) -> list[dict]:
    roles = {"human": "user", "gpt": "assistant"}
    rows = json.loads((SHARED / "data" / "sharegpt_dummy_conversation.json").read_text())
    pairs = [turn["value"] for row in rows for turn in row["conversations"]]
    return [{"role": ("user", "assistant")[i % 2], "content": pairs[i % len(pairs)]} for i in range(turns)]


def timed(function, *args):
    began = time.perf_counter()
    result = function(*args)
    return result, time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--turns", type=int, default=1000)
    parser.add_argument("--templates", nargs="+", default=["smollm2", "qwen3_training", "phi3", "llama3"])
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(SHARED / "assets" / "smollm2-tokenizer")
    messages = long_conversation(args.turns)
    print(f"{args.turns} messages, {sum(len(m['content']) for m in messages):,} characters of content")
    print(f"{'template':<16}{'turn by turn s':>16}{'one pass s':>12}{'speed-up':>10}  same spans")
    for name in args.templates:
        render = template_renderer(tokenizer, None if name == "smollm2" else real_chat_template(name))
        one, one_seconds = timed(render_in_one_pass, messages, render)
        reference, seconds = timed(render_turn_by_turn, messages, render)
        same = one is not None and [(p.text, p.spans) for p in one] == [(p.text, p.spans) for p in reference]
        print(f"{name:<16}{seconds:>16.2f}{one_seconds:>12.3f}{seconds / one_seconds:>9.0f}x  {same}")


if __name__ == "__main__":
    main()
