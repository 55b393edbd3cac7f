"""Stage 2 for callers that hold only a source's name: its ``messages`` column as a conversation.

Every data-source type turns rows into conversations in ``data/formats/`` (``load_format(source).messages(row,
index)``); this is the default type's, kept for code written before types existed.
"""

from lt_posttrain.data.formats.messages import MessagesFormat
from lt_posttrain.data.sources import Source


def messages_from_row(row: dict, source_name: str, row_index: int, column: str = "messages") -> list[dict]:
    """The OpenAI-style ``column`` of ``row``, checked: a list of turns with a string role and a content (``[]`` for a
    null column)."""
    return MessagesFormat(Source(name_or_path=source_name, messages_column=column)).messages(row, row_index)
