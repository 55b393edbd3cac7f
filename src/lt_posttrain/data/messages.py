"""Stage 2: a source row becomes a conversation, a list of ``{"role", "content"}`` messages."""

from lt_posttrain.errors import UserError


def messages_from_row(row: dict, source_name: str, row_index: int, column: str = "messages") -> list[dict]:
    """The OpenAI-style ``messages`` column of ``row``, checked: a list of turns with a string role and content."""
    if column not in row:
        raise UserError(
            f"data source {source_name!r}, row {row_index}: no {column!r} column (columns: {', '.join(row)})"
        )
    messages = row[column]
    if not isinstance(messages, list) or not messages:
        raise UserError(f"data source {source_name!r}, row {row_index}: {column!r} must be a non-empty list of turns")
    turns = []
    for turn in messages:
        if not isinstance(turn, dict) or not isinstance(turn.get("role"), str) or "content" not in turn:
            raise UserError(
                f"data source {source_name!r}, row {row_index}: each turn needs a 'role' and a 'content' (got {turn!r:.80})"
            )
        turns.append({key: value for key, value in turn.items() if value is not None})
    return turns
