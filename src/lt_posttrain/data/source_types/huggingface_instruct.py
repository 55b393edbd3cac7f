"""``type: huggingface_instruct``: columns mapped to roles, ArcticTraining's ``role_mapping``.

A role maps either to a string column (``{user: question, assistant: answer}``) or to the turns of a list column
whose filter field has a given value (``{user: conversations.from.human, assistant: conversations.from.gpt}``, the
text under ``content_key``). Turns keep the order of the source list: unlike ArcticTraining, which groups turns by
role and zips the groups (so a mapped system prompt cuts a multi-turn chat to its first exchange), every turn of a
multi-turn chat is kept.

Tool-calling data sets map too. A list column's turns bring their OpenAI fields (``tool_calls``, a tool turn's
``tool_call_id`` and ``name``, ``reasoning_content`` or ``thinking``), with ``tools`` and arguments as JSON text where
the data set keeps them so. Two parts of an assistant turn can be mapped like roles: ``tool_calls`` (text holding the
JSON of a call or a list of calls: a column, or turns such as ShareGPT's ``function_call``) and ``reasoning`` (a
column): they join the assistant turn next to them.
"""

from typing import NamedTuple, Optional

from lt_posttrain.data.source_types.base import SourceType
from lt_posttrain.errors import UserError

DEFAULT_ROLE_MAPPING = {"user": "user", "assistant": "assistant"}

SHAREGPT_WITH_SYSTEM = {
    "system": "conversations.from.system",
    "user": "conversations.from.human",
    "assistant": "conversations.from.gpt",
}

# Hub data sets whose layout is known: used when a source of one of them gives no role_mapping.
KNOWN_DATASETS = {
    "HuggingFaceH4/ultrachat_200k": ({"user": "messages.role.user", "assistant": "messages.role.assistant"}, "content"),
    "lmsys/lmsys-chat-1m": ({"user": "conversation.role.user", "assistant": "conversation.role.assistant"}, "content"),
    "Open-Orca/SlimOrca": (SHAREGPT_WITH_SYSTEM, "value"),
    "teknium/OpenHermes-2.5": (SHAREGPT_WITH_SYSTEM, "value"),
    "Open-Orca/OpenOrca": ({"system": "system_prompt", "user": "question", "assistant": "response"}, "content"),
    "openai/gsm8k": ({"user": "question", "assistant": "answer"}, "content"),
    "meta-math/MetaMathQA": ({"user": "query", "assistant": "response"}, "content"),
    "ise-uiuc/Magicoder-OSS-Instruct-75K": ({"user": "problem", "assistant": "solution"}, "content"),
    "Salesforce/xlam-function-calling-60k": ({"user": "query", "tool_calls": "answers"}, "content"),
}

TOOL_CALLS, REASONING = "tool_calls", "reasoning"  # parts of an assistant turn, mapped like roles
# String columns around the list turns: a system prompt first, the answer last (its reasoning, text, then calls).
_ROLE_ORDER = {"system": 0, REASONING: 2, "assistant": 3, TOOL_CALLS: 4}
# The fields of a list column's turn kept besides its role and text: tool calls, tool results, reasoning.
TURN_FIELDS = ("tool_calls", "tool_call_id", "name", "reasoning_content", "thinking")


class ListTurns(NamedTuple):
    """The turns of list column ``column`` whose ``field`` equals ``value`` have role ``role``."""

    role: str
    column: str
    field: str
    value: str


class HuggingFaceInstructSourceType(SourceType):
    """Roles mapped to columns, with ``role_mapping`` (role to ``column`` or ``column.field.value``) and
    ``content_key`` (the text field of a turn in a list column).

    The conversation is: system string columns, then the turns of each mapped list column in list order (a turn
    whose filter field matches no mapped role is skipped), then the other string columns (user before assistant).
    Null values and turns with null text (and no tool calls) are skipped; a row without an assistant turn gives
    ``[]``. ``tool_calls`` and ``reasoning`` parts join the assistant turn before (tool calls) or after (reasoning)
    them, or make one of their own. The tools come from the ``tools_column``.
    """

    reads = frozenset({"role_mapping", "content_key", "tools_column"})

    def __init__(self, source):
        super().__init__(source)
        mapping, self.content_key = source.role_mapping, source.content_key
        if mapping is None:
            mapping, known_key = KNOWN_DATASETS.get(source.name_or_path, (DEFAULT_ROLE_MAPPING, "content"))
            if source.content_key == "content":
                self.content_key = known_key
        if not mapping:
            raise UserError(f"data source {source.name_or_path!r}: role_mapping is empty: map roles to columns")
        self.mapping = dict(mapping)
        self.strings, self.lists = [], {}
        for role, spec in self.mapping.items():
            parts = str(spec).split(".", 2)
            if len(parts) == 1:
                self.strings.append((role, spec))
            elif len(parts) == 3 and all(parts):
                self.lists.setdefault(parts[0], []).append(ListTurns(role, *parts))
            else:
                raise UserError(
                    f"data source {source.name_or_path!r}: role_mapping {role}: {spec!r} is neither a column nor "
                    "'column.field.value' (e.g. conversations.from.human)"
                )
        self.strings.sort(key=lambda item: _ROLE_ORDER.get(item[0], 1))

    def messages(self, row: dict, index: int) -> list[dict]:
        for column in [column for _, column in self.strings] + list(self.lists):
            if column not in row:
                roles = [role for role, spec in self.mapping.items() if str(spec).split(".")[0] == column]
                raise self.error(
                    index,
                    f"role_mapping {roles[0]}: {self.mapping[roles[0]]!r} names column {column!r}, which does not "
                    f"exist (columns: {', '.join(row)}): set role_mapping to existing columns",
                )
        system = [(role, column) for role, column in self.strings if role == "system"]
        others = [(role, column) for role, column in self.strings if role != "system"]
        messages = self._string_turns(row, index, system)
        for column, specs in self.lists.items():
            messages += self._list_turns(row, index, column, specs)
        return _joined(messages + self._string_turns(row, index, others))

    def tools(self, row: dict, index: int) -> Optional[list[dict]]:
        return self.tools_in_column(row, index)

    def _string_turns(self, row: dict, index: int, columns: list[tuple[str, str]]) -> list[dict]:
        messages = []
        for role, column in columns:
            value = row[column]
            if isinstance(value, list) and role != TOOL_CALLS:
                raise self.error(
                    index,
                    f"role_mapping {role}: column {column!r} holds a list: map its turns as '{column}.FIELD.VALUE' "
                    f"(e.g. {column}.from.human) and set content_key",
                )
            if value is None:
                continue
            if role == TOOL_CALLS:
                messages.append({"role": role, "tool_calls": self.tool_calls(value, index, f"column {column!r}")})
            else:
                messages.append({"role": role, "content": self.text(value, index, f"column {column!r}")})
        return messages

    def _list_turns(self, row: dict, index: int, column: str, specs: list[ListTurns]) -> list[dict]:
        turns = row[column]
        if turns is None:
            return []
        if not isinstance(turns, list):
            raise self.error(
                index,
                f"role_mapping {specs[0].role}: column {column!r} is not a list of turns ({type(turns).__name__}): "
                f"map it as a plain column, '{column}'",
            )
        messages = []
        for position, turn in enumerate(turns):
            if not isinstance(turn, dict):
                raise self.error(index, f"turn {position} of {column!r} is not a mapping of fields: {turn!r:.60}")
            if not any(spec.field in turn for spec in specs):
                raise self.error(
                    index,
                    f"turn {position} of {column!r} has no field {specs[0].field!r} (role_mapping {specs[0].role}: "
                    f"{self.mapping[specs[0].role]!r}; its fields: {', '.join(turn)}): filter on one of them",
                )
            role = next((spec.role for spec in specs if _matches(turn.get(spec.field), spec.value)), None)
            if role is None:
                continue
            if self.content_key not in turn:
                raise self.error(
                    index,
                    f"turn {position} of {column!r} has no {self.content_key!r} (content_key; its fields: "
                    f"{', '.join(turn)}): set content_key to the field holding the text",
                )
            where = f"turn {position} of {column!r}"
            if role == TOOL_CALLS:
                if turn[self.content_key] is not None:
                    messages.append({"role": role, "tool_calls": self.tool_calls(turn[self.content_key], index, where)})
                continue
            message = {"role": role}
            if turn[self.content_key] is not None:
                message["content"] = self.text(turn[self.content_key], index, where)
            message.update((key, turn[key]) for key in TURN_FIELDS if turn.get(key) is not None)
            message = self.assistant_fields(message, index, where)
            if "content" in message or message.get("tool_calls"):
                messages.append(message)
        return messages


def _matches(value, wanted: str) -> bool:
    # mapping values come from YAML as text; a field may hold a number or a boolean
    return value is not None and str(value) == wanted


def _joined(messages: list[dict]) -> list[dict]:
    """``messages`` with the ``tool_calls`` parts joined to the assistant turn before them (or made an assistant
    turn) and the ``reasoning`` parts to the one after them (a reasoning with no answer after it is dropped)."""
    joined, reasoning = [], None
    for message in messages:
        if message["role"] == REASONING:
            reasoning = message["content"]
            continue
        if message["role"] == TOOL_CALLS:
            if joined and joined[-1]["role"] == "assistant" and reasoning is None:
                joined[-1] = {**joined[-1], "tool_calls": joined[-1].get("tool_calls", []) + message["tool_calls"]}
                continue
            message = {"role": "assistant", "tool_calls": message["tool_calls"]}
        if message["role"] == "assistant" and reasoning is not None:
            message, reasoning = {**message, "reasoning_content": reasoning}, None
        joined.append(message)
    return joined
