"""Data-source types: each turns a source row into a conversation, one module per type (``type: NAME`` in a
source picks one; ``registry`` finds it)."""

from lt_posttrain.data.formats.base import Format, Render, RenderError
from lt_posttrain.data.formats.registry import known_types, load_format

__all__ = ["Format", "Render", "RenderError", "known_types", "load_format"]
