"""``type: prompt_generation``: ``{"prompt", "generation"}`` rows, trained as plain text without a chat template.

The text is the prompt followed directly by the generation and the tokenizer's end-of-sequence token; only the
generation and that token carry loss.
"""

from typing import Optional

from lt_posttrain.data.source_types.base import SourceType, Render
from lt_posttrain.errors import UserError


class PromptGenerationSourceType(SourceType):
    """A user turn (the prompt) and an assistant turn (the generation), rendered by concatenation.

    Reads the source's ``input_key`` (the prompt column, default ``prompt``) and ``output_key`` (the generation
    column, default ``generation``). A row whose generation is null gives ``[]``.
    """

    reads = frozenset({"input_key", "output_key"})

    def messages(self, row: dict, index: int) -> list[dict]:
        prompt_key, generation_key = self.source.input_key or "prompt", self.source.output_key or "generation"
        prompt = self.column(row, prompt_key, index, "input_key")
        generation = self.column(row, generation_key, index, "output_key")
        if generation is None:
            return []
        if prompt is None:
            raise self.error(index, f"{prompt_key!r} is null: give every row a prompt, or leave the row out")
        return [
            {"role": "user", "content": self.text(prompt, index, repr(prompt_key))},
            {"role": "assistant", "content": self.text(generation, index, repr(generation_key))},
        ]

    def renderer(self, tokenizer, chat_template: Optional[str]) -> Render:
        return concatenation_renderer(end_of_sequence(self.source, tokenizer, "prompt_generation"))


def end_of_sequence(source, tokenizer, type_name: str) -> str:
    """The tokenizer's end-of-sequence token, which ends every trained text of a type without a chat template; the
    user's error when there is none."""
    if tokenizer.eos_token is None:
        raise UserError(
            f"data source {source.name_or_path!r} (type {type_name}): the tokenizer has no end-of-sequence token to "
            "end each text with: use a tokenizer that has one"
        )
    return tokenizer.eos_token


def concatenation_renderer(eos_token: str) -> Render:
    """Messages rendered as their texts back to back, each assistant text followed by ``eos_token``: the generation
    prompt is the text so far, so an answer is trained from its first character to its ``eos_token``."""

    def render(messages: list[dict], add_generation_prompt: bool) -> str:
        texts = [message["content"] + (eos_token if message["role"] == "assistant" else "") for message in messages]
        return "".join(texts)

    return render
