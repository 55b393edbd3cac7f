"""``type: messages`` (the default): a column of OpenAI-style turns, ``[{"role": ..., "content": ...}, ...]``."""

from typing import Optional

from lt_posttrain.data.source_types.base import SourceType


class MessagesSourceType(SourceType):
    """Each row holds its conversation as a list of turns, used as it is (other keys of a turn, such as
    ``reasoning_content`` or a tool turn's ``tool_call_id``, are kept for the chat template; null values are
    dropped). An assistant turn's ``tool_calls`` may hold their arguments as JSON text, as OpenAI's API gives them
    (see :meth:`SourceType.tool_calls`), and such a turn needs no content. The column may also hold the JSON text
    of the list, as hub data sets keep turns of varying fields.

    Reads the source's ``messages_column`` (the column of turns), ``role_key`` and ``content_key`` (the fields of a
    turn holding its role and its text), and ``tools_column`` (the tools the conversation may call).
    """

    reads = frozenset({"messages_column", "role_key", "content_key", "tools_column"})

    def messages(self, row: dict, index: int) -> list[dict]:
        column, role_key, content_key = self.source.messages_column, self.source.role_key, self.source.content_key
        turns = self.column(row, column, index, "messages_column")
        if turns is None:
            return []
        if isinstance(turns, str):
            turns = self.parsed_json(turns, index, f"column {column!r}")
        if not isinstance(turns, list):
            raise self.error(index, f"{column!r} must be a list of turns, got {type(turns).__name__}")
        messages = []
        for position, turn in enumerate(turns):
            if (
                not isinstance(turn, dict)
                or not isinstance(turn.get(role_key), str)
                or content_key not in turn and not turn.get("tool_calls")
            ):
                raise self.error(
                    index,
                    f"each turn of {column!r} needs a {role_key!r} and a {content_key!r} (got {turn!r:.80}): set "
                    "role_key and content_key to the turn's fields",
                )
            message = {"role": turn[role_key], "content": turn.get(content_key)}
            message.update((key, value) for key, value in turn.items() if key not in (role_key, content_key, *message))
            message = {key: value for key, value in message.items() if value is not None}
            messages.append(self.assistant_fields(message, index, f"turn {position} of {column!r}"))
        return messages

    def tools(self, row: dict, index: int) -> Optional[list[dict]]:
        return self.tools_in_column(row, index)
