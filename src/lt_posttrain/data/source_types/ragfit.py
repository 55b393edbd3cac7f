"""``type: ragfit``: RAG-FiT's training rows, a query column and an answer column, with its training keys.

``instruction`` (a file) is the system prompt, or, with ``instruction_in_prompt``, a line before the query.
``template`` (``{query}`` and ``{output}``) replaces the chat template for tokenizers without one: the text before
``{output}`` is the prompt, the rest of the text and the end-of-sequence token are trained. ``completion_start`` is
text the rendered prompt ends with (``<|assistant|>``): loss starts right after it, as with RAG-FiT's completion-only
collator.

A token that starts in the prompt is not trained, so end the prompt where a token ends: with ``Answer: {output}``
the token `` Rome`` starts at the prompt's last space and is not trained; ``Answer:{output}`` with the answer
`` Rome``, or ``completion_start: "Answer:"``, trains it.
"""

import os
from pathlib import Path
from typing import Optional

from lt_posttrain.data.source_types.base import SourceType, Render, RenderError, chat_renderer
from lt_posttrain.errors import UserError

# Stands for the answer while rendering a prompt: the prompt is what the template puts before it.
_ANSWER = "\ue000answer\ue000"


class RagFitSourceType(SourceType):
    """A query and its answer as ``[system?, user, assistant]``.

    Reads the source's ``input_key`` (the query column, default ``prompt`` as in RAG-FiT), ``output_key`` (the
    answer column, required; a list gives its first item, a null or empty answer drops the row), ``instruction``,
    ``instruction_in_prompt``, ``template`` and ``completion_start``.
    """

    reads = frozenset(
        {"input_key", "output_key", "instruction", "instruction_in_prompt", "template", "completion_start"}
    )

    def __init__(self, source):
        super().__init__(source)
        name = source.name_or_path
        if not source.output_key:
            raise UserError(f"data source {name!r} (type ragfit): set output_key, the column of the answer to learn")
        self.instruction = _read_file(name, "instruction", source.instruction) if source.instruction else None
        self.template = _read_template(name, source.template) if source.template else None
        if self.template is not None and self.instruction is not None and not source.instruction_in_prompt:
            raise UserError(
                f"data source {name!r} (type ragfit): a template has no place for a system prompt, so the instruction "
                "would be lost: set instruction_in_prompt: true to put it before the query"
            )

    def messages(self, row: dict, index: int) -> list[dict]:
        query_key = self.source.input_key or "prompt"
        query = self.text(self.column(row, query_key, index, "input_key"), index, repr(query_key))
        answer = self.column(row, self.source.output_key, index, "output_key")
        if isinstance(answer, list):
            answer = answer[0] if answer else None
        if answer is None:
            return []
        messages = [{"role": "user", "content": query}]
        if self.instruction is not None:
            if self.source.instruction_in_prompt:
                messages[0]["content"] = self.instruction + "\n" + query
            else:
                messages.insert(0, {"role": "system", "content": self.instruction})
        return messages + [{"role": "assistant", "content": self.text(answer, index, repr(self.source.output_key))}]

    def renderer(self, tokenizer, chat_template: Optional[str]) -> Optional[Render]:
        render = None
        if self.template is not None:
            if tokenizer.eos_token is None:
                raise UserError(
                    f"data source {self.source.name_or_path!r} (type ragfit): the tokenizer has no end-of-sequence "
                    "token to end each answer of the template with: use a tokenizer that has one"
                )
            render = template_text_renderer(self.template, tokenizer.eos_token)
        if self.source.completion_start is None:
            return render
        base = render or chat_renderer(self.source, tokenizer, chat_template)
        return completion_start_renderer(base, self.source.completion_start)

    def identity(self) -> str:
        return f"{super().identity()}|{self.instruction}|{self.template}"


def template_text_renderer(template: str, eos_token: str) -> Render:
    """Renders ``[user, assistant]`` into ``template``: without an assistant turn, the text before ``{output}``;
    with one, the whole text and ``eos_token``."""

    def render(messages: list[dict], add_generation_prompt: bool) -> str:
        query = next((message["content"] for message in messages if message["role"] == "user"), "")
        answer = next((message["content"] for message in messages if message["role"] == "assistant"), None)
        if answer is None:
            text = template.format(query=query, output=_ANSWER)
            return text[: text.index(_ANSWER)]
        return template.format(query=query, output=answer) + eos_token

    return render


def completion_start_renderer(render: Render, marker: str) -> Render:
    """``render`` with generation prompts that end right after the last ``marker`` before the answer."""

    def prompt(messages: list[dict]) -> str:
        text = render(messages + [{"role": "assistant", "content": _ANSWER}], False)
        if _ANSWER not in text:
            raise RenderError("the template does not render the answer as given, so completion_start cannot be found")
        before = text[: text.index(_ANSWER)]
        end = before.rfind(marker)
        if end < 0:
            raise RenderError(
                f"completion_start {marker!r} does not occur before the answer in the rendered text "
                f"(which ends {before[-80:]!r}): set it to text that the template puts right before the answer"
            )
        return before[: end + len(marker)]

    def render_to_marker(messages: list[dict], add_generation_prompt: bool) -> str:
        if add_generation_prompt:
            return prompt(messages)
        text = render(messages, False)
        if messages and messages[-1]["role"] == "user":
            # a template's text for the query alone can reach past the marker ("Answer: "): the answer's span must
            # still start right after the marker
            return os.path.commonprefix([text, prompt(messages)])
        return text

    return render_to_marker


def _read_file(source_name: str, key: str, path: str) -> str:
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"data source {source_name!r} (type ragfit): {key} {path!r}: no such file (give a text file)")
    return file.read_text()


def _read_template(source_name: str, template: str) -> str:
    text = template if "{" in template else _read_file(source_name, "template", template)
    try:
        rendered = text.format(query="", output=_ANSWER)
    except (KeyError, IndexError, ValueError) as error:
        raise UserError(
            f"data source {source_name!r} (type ragfit): template has a placeholder other than {{query}} and "
            f"{{output}} ({error!r}): write other braces doubled, '{{{{' and '}}}}'"
        ) from None
    if rendered.count(_ANSWER) != 1:
        raise UserError(
            f"data source {source_name!r} (type ragfit): template needs {{output}} exactly once (where the answer "
            "goes; the text before it is the prompt)"
        )
    return text
