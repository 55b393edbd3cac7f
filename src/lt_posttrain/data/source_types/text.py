"""``type: text``: plain text rows (a ``text`` column), for continued pre-training: every token is trained.

A row's text is followed by the tokenizer's end-of-sequence token, trained too, so packed documents end where they
end. No chat template is used.
"""

from typing import Optional

from lt_posttrain.data.source_types.base import Render, SourceType
from lt_posttrain.data.source_types.prompt_generation import concatenation_renderer, end_of_sequence
from lt_posttrain.errors import UserError


class TextSourceType(SourceType):
    """Each row is one document, trained whole: one assistant turn rendered as its text and the end-of-sequence
    token. Reads the source's ``input_key`` (the column of the text, default ``text``); a null or empty text drops
    the row."""

    reads = frozenset({"input_key"})

    def __init__(self, source):
        super().__init__(source)
        if source.mask not in ("all_assistant", "all_tokens"):
            raise UserError(
                f"data source {source.name_or_path!r} (type text): mask {source.mask!r} has no turns to choose "
                "from: every token of a text is trained; remove 'mask'"
            )

    def messages(self, row: dict, index: int) -> list[dict]:
        key = self.source.input_key or "text"
        text = self.column(row, key, index, "input_key")
        if text is None or text == "":
            return []
        return [{"role": "assistant", "content": self.text(text, index, repr(key))}]

    def renderer(self, tokenizer, chat_template: Optional[str]) -> Render:
        return concatenation_renderer(end_of_sequence(self.source, tokenizer, "text"))
