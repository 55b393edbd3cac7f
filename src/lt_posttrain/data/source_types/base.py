"""What a source type is: rows of a source become conversations, rendered by the chat template or by the
type's own renderer."""

import json
from dataclasses import asdict, fields
from typing import Callable, Optional

from lt_posttrain.data.tokenize import template_renderer
from lt_posttrain.errors import UserError

Render = Callable[[list[dict], bool], str]
"""``render(messages, add_generation_prompt) -> str``, the contract of ``tokenize.template_renderer``."""

# Fields every type understands; the others belong to one type or another (see ``SourceType.reads``).
COMMON_FIELDS = frozenset(
    {"name_or_path", "split", "subset", "sample_count", "shuffle", "seed", "type", "weight", "options", "mask",
     "train_end_of_turn"}
)  # fmt: skip


class RenderError(ValueError):
    """A renderer cannot render a conversation; the caller names the source and the row in the user's message."""


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
