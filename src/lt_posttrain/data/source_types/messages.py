"""``type: messages`` (the default): a column of OpenAI-style turns, ``[{"role": ..., "content": ...}, ...]``."""

from lt_posttrain.data.source_types.base import SourceType


class MessagesSourceType(SourceType):
    """Each row holds its conversation as a list of turns, used as it is (other keys of a turn, such as
    ``tool_calls``, are kept for the chat template; null values are dropped).

    Reads the source's ``messages_column`` (the column of turns), ``role_key`` and ``content_key`` (the fields of a
    turn holding its role and its text).
    """

    reads = frozenset({"messages_column", "role_key", "content_key"})

    def messages(self, row: dict, index: int) -> list[dict]:
        column, role_key, content_key = self.source.messages_column, self.source.role_key, self.source.content_key
        turns = self.column(row, column, index, "messages_column")
        if turns is None:
            return []
        if not isinstance(turns, list):
            raise self.error(index, f"{column!r} must be a list of turns, got {type(turns).__name__}")
        messages = []
        for turn in turns:
            if not isinstance(turn, dict) or not isinstance(turn.get(role_key), str) or content_key not in turn:
                raise self.error(
                    index,
                    f"each turn of {column!r} needs a {role_key!r} and a {content_key!r} (got {turn!r:.80}): set "
                    "role_key and content_key to the turn's fields",
                )
            message = {"role": turn[role_key], "content": turn[content_key]}
            message.update((key, value) for key, value in turn.items() if key not in (role_key, content_key, *message))
            messages.append({key: value for key, value in message.items() if value is not None})
        return messages
