"""Source types: each turns a source row into a conversation, one module per type (``type: NAME`` in a
source picks one; ``registry`` finds it)."""

from lt_posttrain.data.source_types.base import Render, RenderError, SourceType
from lt_posttrain.data.source_types.registry import known_types, load_source_type

__all__ = ["Render", "RenderError", "SourceType", "known_types", "load_source_type"]
