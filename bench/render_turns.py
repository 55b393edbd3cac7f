"""Rendering one long conversation: turn by turn (a rendering of every prefix) against one pass, with the same
spans. The conversation cycles through the ShareGPT set's turns up to ``--turns`` messages; with ``--tool-calls``,
it is an agent's run instead: one user turn, then calls (each with its reasoning and one argument from the ShareGPT
turns) and their results, then the answer, with two tools given to the template.

    python bench/render_turns.py [--turns 1000] [--templates smollm2 qwen3_training phi3 llama3]
    python bench/render_turns.py --tool-calls --turns 400 --templates qwen3_training qwen3 qwen2_5 llama3_1
"""

import argparse
import functools
import json
import time
from pathlib import Path

from transformers import AutoTokenizer

from lt_posttrain.data.tokenize import Masking, render_in_one_pass, render_turn_by_turn, template_renderer
from lt_posttrain.testing import real_chat_template

SHARED = Path(__file__).resolve().parents[2] / "shared"


TOOLS = [
    {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}}}
    for name, description in (("search", "Search the web"), ("read", "Read a page"))
]  # fmt: skip


def sharegpt_texts() -> list[str]:
    rows = json.loads((SHARED / "data" / "sharegpt_dummy_conversation.json").read_text())
    return [turn["value"] for row in rows for turn in row["conversations"]]


def long_conversation(turns: int) -> list[dict]:
    texts = sharegpt_texts()
    return [{"role": ("user", "assistant")[i % 2], "content": texts[i % len(texts)]} for i in range(turns)]


def agent_run(turns: int, reasoning: bool) -> list[dict]:
    texts = sharegpt_texts()
    messages = [{"role": "system", "content": "You research questions."}, {"role": "user", "content": texts[0]}]
    for number in range((turns - 3) // 2):
        name = TOOLS[number % 2]["function"]["name"]
        call = {"type": "function", "function": {"name": name, "arguments": {"query": texts[number % len(texts)][:200]}}}
        turn = {"role": "assistant", "content": "", "tool_calls": [call]}
        messages += [{**turn, "reasoning_content": f"Step {number}."} if reasoning else turn,
                     {"role": "tool", "content": texts[(number + 1) % len(texts)]}]  # fmt: skip
    return messages + [{"role": "assistant", "content": texts[1]}]


def timed(function, *args):
    began = time.perf_counter()
    result = function(*args)
    return result, time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--turns", type=int, default=1000)
    parser.add_argument("--templates", nargs="+", default=["smollm2", "qwen3_training", "phi3", "llama3"])
    parser.add_argument("--tool-calls", action="store_true", help="an agent's run of calls (reasoning where read)")
    parser.add_argument("--untrained-reasoning", action="store_true", help="with train_reasoning: false")
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(SHARED / "assets" / "smollm2-tokenizer")
    masking = Masking(train_reasoning=not args.untrained_reasoning)
    print(f"{'template':<24}{'turn by turn s':>16}{'one pass s':>12}{'speed-up':>10}  same spans")
    for name in args.templates:
        template = None if name == "smollm2" else real_chat_template(name)
        render = template_renderer(tokenizer, template)
        messages = long_conversation(args.turns)
        if args.tool_calls:
            messages = agent_run(args.turns, reasoning="reasoning_content" in (template or ""))
            render = functools.partial(render, tools=TOOLS)
        one, one_seconds = timed(render_in_one_pass, messages, render, masking)
        reference, seconds = timed(render_turn_by_turn, messages, render, masking)
        same = one is not None and [(p.text, p.spans) for p in one] == [(p.text, p.spans) for p in reference]
        print(f"{name:<24}{seconds:>16.2f}{one_seconds:>12.3f}{seconds / one_seconds:>9.0f}x  {same}")


if __name__ == "__main__":
    main()
