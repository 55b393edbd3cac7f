"""Prompts for generation: each conversation up to its last assistant turn (``lt-posttrain predict``), each
validation sample up to its last trained answer (the answers generated during validation)."""

import torch

from lt_posttrain.batch import IGNORE_INDEX
from lt_posttrain.data.tokenize import TRAINED_ROLES, template_renderer


def prompt_of(
    messages: list[dict], tokenizer, chat_template: str | None = None, render=None, tools: list[dict] | None = None
) -> dict:
    """The conversation before its last assistant turn, rendered with the generation prompt (by ``render``, else the
    chat template; with the ``tools`` the conversation may call), as ``input_ids``; the held-back assistant text is
    the ``reference``."""
    last = max((i for i, message in enumerate(messages) if message["role"] in TRAINED_ROLES), default=len(messages))
    render = render or template_renderer(tokenizer, chat_template)
    text = render(messages[:last], True, tools=tools) if tools else render(messages[:last], True)
    reference = messages[last].get("content") or "" if last < len(messages) else ""
    return {"input_ids": tokenizer(text, add_special_tokens=False)["input_ids"], "prompt": text, "reference": reference}


def collate_prompts(prompts: list[dict], pad_id: int) -> dict:
    """Left-padded ``input_ids`` and ``attention_mask`` (generation appends on the right), plus the texts."""
    width = max(len(prompt["input_ids"]) for prompt in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        length = len(prompt["input_ids"])
        input_ids[row, width - length :] = torch.tensor(prompt["input_ids"])
        attention_mask[row, width - length :] = 1
    texts = {key: [prompt[key] for prompt in prompts] for key in ("prompt", "reference")}
    return {"input_ids": input_ids, "attention_mask": attention_mask, **texts}


def sample_prompt(input_ids: list[int], labels: list[int], tokenizer) -> dict:
    """A tokenized sample as a prompt to answer: its tokens before its last run of trained tokens (the last answer it
    trains, which starts after the template's generation prompt) as ``input_ids`` (and their text as ``prompt``), and
    that run's text as the ``reference`` (special tokens such as the end of turn left out). Read from the tokens, so
    every source type, masking mode and held-out split gives its prompts as it gives its samples."""
    trained = [position for position, label in enumerate(labels) if label != IGNORE_INDEX]
    end = trained[-1] + 1 if trained else len(input_ids)
    start = end - 1 if trained else end
    while start > 1 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    start = max(start, 1)  # at least one token to answer after
    return {
        "input_ids": list(input_ids[:start]),
        "prompt": tokenizer.decode(input_ids[:start]),
        "reference": tokenizer.decode(input_ids[start:end], skip_special_tokens=True),
    }
