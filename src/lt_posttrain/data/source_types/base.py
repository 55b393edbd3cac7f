"""What a source type is: rows of a source become conversations, rendered by the chat template or by the
type's own renderer."""

import json
from dataclasses import asdict, fields
from typing import Callable, Optional

from lt_posttrain.data.tokenize import REASONING_KEYS, RenderError, template_renderer
from lt_posttrain.errors import UserError

Render = Callable[[list[dict], bool], str]
"""``render(messages, add_generation_prompt) -> str``, the contract of ``tokenize.template_renderer``; a renderer
for conversations with tools also takes them, ``render(messages, add_generation_prompt, tools=tools)``."""

__all__ = ["COMMON_FIELDS", "Render", "RenderError", "SourceType", "chat_renderer"]

# Fields every type understands; the others belong to one type or another (see ``SourceType.reads``).
COMMON_FIELDS = frozenset(
    {"name_or_path", "split", "subset", "sample_count", "shuffle", "seed", "type", "weight", "options", "mask",
     "train_end_of_turn", "train_reasoning", "streaming"}
)  # fmt: skip


class SourceType:
    """Turns the rows of one data source into conversations (lists of ``{"role", "content"}`` messages).

    A subclass implements :meth:`messages` and, to render without the chat template, :meth:`renderer`. It reads its
    settings from the source's fields or from ``source.options`` (for plugins).

    Args:
        source: the :class:`~lt_posttrain.data.sources.Source` whose rows this source type reads.

    Attributes:
        reads: the type-specific ``Source`` fields this source type uses; setting any other one is an error (it usually
            means a forgotten ``type``). ``None`` (the default, for plugins) checks nothing.
    """

    reads: Optional[frozenset] = None

    def __init__(self, source):
        self.source = source
        if self.reads is not None:
            self._check_fields()

    def messages(self, row: dict, index: int) -> list[dict]:
        """The conversation of ``row`` (``index`` is its position, for error messages).

        Raise :meth:`error` for a malformed row; return ``[]`` for a row without an answer to learn from (the
        caller drops and counts it).
        """
        raise NotImplementedError

    def tools(self, row: dict, index: int) -> Optional[list[dict]]:
        """The tools (JSON schemas) the conversation of ``row`` may call, given to the chat template with it;
        ``None`` for none (the default). :meth:`tools_in_column` reads them from the source's ``tools_column``."""
        return None

    def renderer(self, tokenizer, chat_template: Optional[str]) -> Optional[Render]:
        """This type's own renderer, or ``None`` to render with the chat template (``chat_template`` if given, else
        the tokenizer's). An assistant turn is trained from where ``render(messages[:i], True)`` and
        ``render(messages[:i + 1], False)`` part to the end of the latter."""
        return None

    def resolved_renderer(self, tokenizer, chat_template: Optional[str]) -> Render:
        """:meth:`renderer`, else the chat template's, checked to exist."""
        return self.renderer(tokenizer, chat_template) or chat_renderer(self.source, tokenizer, chat_template)

    def identity(self) -> str:
        """Everything besides the rows and the tokenizer that the samples depend on (for the cache fingerprint);
        subclasses add the content of the files they read."""
        kind = f"{type(self).__module__}.{type(self).__qualname__}"
        return f"{kind}|{json.dumps(asdict(self.source), sort_keys=True, default=str)}"

    def error(self, index: int, problem: str) -> UserError:
        """The user's one-line error for row ``index``: ``problem`` says the key and what to do."""
        return UserError(f"data source {self.source.name_or_path!r}, row {index}: {problem}")

    def column(self, row: dict, key: str, index: int, setting: str):
        """``row[key]``; a missing column is an error naming ``setting`` (the ``Source`` field that chose it)."""
        if key not in row:
            columns = ", ".join(row)
            raise self.error(index, f"no column {key!r} ({setting}); the rows have {columns}: set {setting} to one")
        return row[key]

    def text(self, value, index: int, what: str) -> str:
        """``value`` as message text: strings as they are, numbers written out; anything else is an error."""
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise self.error(index, f"{what} must be text, got {type(value).__name__} {value!r:.60}")

    # -- tools, tool calls and reasoning, as hub data sets hold them ----------------------------------------------
    def tools_in_column(self, row: dict, index: int) -> Optional[list[dict]]:
        """The tools in the source's ``tools_column``: a list of JSON schemas, or its JSON text (hub data sets keep
        them as text, as Arrow holds one schema per column); a schema without OpenAI's ``{"type": "function",
        "function": ...}`` wrapper (``{"name", "description", "parameters"}``) is wrapped, as an inference server
        gives it to the template. A row without the column (when it is the default one) or with null has none."""
        key = self.source.tools_column
        if key not in row and key == "tools":
            return None
        value = self.column(row, key, index, "tools_column")
        what = f"column {key!r}"
        if value is None:
            return None
        value = self.parsed_json(value, index, what) if isinstance(value, str) else value
        value = [value] if isinstance(value, dict) else value
        if not isinstance(value, list):
            raise self.error(index, f"{what} must be a list of tool schemas, got {type(value).__name__} {value!r:.60}")
        tools = []
        for number, tool in enumerate(value):
            tool = self.parsed_json(tool, index, f"{what}, tool {number}") if isinstance(tool, str) else tool
            if not isinstance(tool, dict):
                raise self.error(index, f"{what}: tool {number} must be a JSON object, got {tool!r:.60}")
            tools.append({"type": "function", "function": tool} if "function" not in tool and "name" in tool else tool)
        return tools or None

    def tool_calls(self, value, index: int, where: str) -> list[dict]:
        """``value`` as OpenAI-style tool calls, ``[{"type": "function", "function": {"name", "arguments"}}]``,
        the form chat templates read: a list of calls, one call, or the JSON text of either; a flat call (``{"name",
        "arguments"}``, as in xLAM) is wrapped, and arguments given as JSON text (as in OpenAI's API) become the
        object they hold. ``where`` names the message in errors."""
        value = self.parsed_json(value, index, f"{where}: tool_calls") if isinstance(value, str) else value
        value = [value] if isinstance(value, dict) else value
        if not isinstance(value, list):
            raise self.error(index, f"{where}: tool_calls must be a list of calls, got {type(value).__name__}")
        calls = []
        for number, call in enumerate(value):
            what = f"{where}, tool call {number}"
            call = self.parsed_json(call, index, what) if isinstance(call, str) else call
            if not isinstance(call, dict):
                raise self.error(index, f"{what} must be a JSON object with a name and arguments, got {call!r:.60}")
            nested = isinstance(call.get("function"), dict)
            function = call["function"] if nested else call
            name, arguments = function.get("name"), function.get("arguments")
            if not isinstance(name, str) or not name:
                raise self.error(index, f"{what} has no function name (got {call!r:.80})")
            if isinstance(arguments, str):
                arguments = self.parsed_json(arguments, index, f"{what} ({name}): arguments") if arguments else {}
            arguments = {} if arguments is None else arguments
            if not isinstance(arguments, dict):
                raise self.error(index, f"{what} ({name}): arguments must be a JSON object, got {arguments!r:.60}")
            outer = {key: value for key, value in call.items() if value is not None and key != "function"}
            if not nested:
                outer = {key: value for key, value in outer.items() if key in ("id", "type")}
                function = {key: value for key, value in function.items() if key not in ("id", "type")}
            inner = {key: value for key, value in function.items() if value is not None}
            calls.append({**outer, "type": outer.get("type") or "function",
                          "function": {**inner, "name": name, "arguments": arguments}})  # fmt: skip
        return calls

    def assistant_fields(self, message: dict, index: int, where: str) -> dict:
        """``message`` with its tool calls read by :meth:`tool_calls` (none: no ``tool_calls`` key) and its
        reasoning checked to be text. ``where`` names the message in errors."""
        if "tool_calls" in message:
            calls = self.tool_calls(message["tool_calls"], index, where) if message["tool_calls"] is not None else []
            message = {key: value for key, value in message.items() if key != "tool_calls"}
            if calls:
                message["tool_calls"] = calls
        for key in REASONING_KEYS:
            if message.get(key) is not None and not isinstance(message[key], str):
                raise self.error(index, f"{where}: {key!r} must be text, got {type(message[key]).__name__}")
        return message

    def parsed_json(self, text: str, index: int, what: str):
        """The value of JSON ``text``; malformed JSON is the user's error naming ``what``."""
        try:
            return json.loads(text)
        except json.JSONDecodeError as error:
            raise self.error(
                index, f"{what} is not valid JSON ({error.msg} at character {error.pos} of {text!r:.60}): fix the row"
            ) from None

    def answer_turns(self, value, index: int, key: str) -> list[dict]:
        """An answer given as text (one assistant turn) or as a list of turns (the source's ``role_key`` and
        ``content_key`` fields, both text), as ``{"role", "content"}`` messages; anything else is an error naming
        ``key`` (the column)."""
        if isinstance(value, str):
            return [{"role": "assistant", "content": value}]
        role_key, content_key = self.source.role_key, self.source.content_key
        if not isinstance(value, list) or not all(
            isinstance(turn, dict) and isinstance(turn.get(role_key), str) and isinstance(turn.get(content_key), str)
            for turn in value
        ):
            raise self.error(index, f"{key!r} must be text or a list of {{{role_key!r}, {content_key!r}}} turns, got "
                                    f"{value!r:.60}")  # fmt: skip
        return [{"role": turn[role_key], "content": turn[content_key]} for turn in value]

    def _check_fields(self) -> None:
        for item in fields(self.source):
            if item.name in COMMON_FIELDS or item.name in self.reads:
                continue
            if getattr(self.source, item.name) != item.default:
                raise UserError(
                    f"data source {self.source.name_or_path!r}: {item.name!r} has no effect with type "
                    f"{self.source.type!r} (it reads {', '.join(sorted(self.reads)) or 'no other field'}): "
                    "check the source's 'type', or remove the key"
                )


def chat_renderer(source, tokenizer, chat_template: Optional[str]) -> Render:
    """The chat template's renderer for ``source``, or the user's error when there is no chat template."""
    if not (chat_template or tokenizer.chat_template):
        raise UserError(
            f"data source {source.name_or_path!r} (type {source.type!r}): the tokenizer has no chat template: set "
            "data.chat_template (Jinja text or a file), or use a type with its own template (ragfit with 'template', "
            "prompt_generation)"
        )
    return template_renderer(tokenizer, chat_template)
