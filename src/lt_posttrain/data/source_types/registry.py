"""Source types by name: the entry points of the ``lt_posttrain.source_types`` group (the built-in ones and
those of installed plugins), or a dotted import path. Only the type a source names is imported."""

import functools

from lt_posttrain.errors import UserError
from lt_posttrain.plugins import registry
from lt_posttrain.plugins.groups import SOURCE_TYPES

_registered = registry.entry_points  # the process's cache of entry points (a test that installs a plugin clears it)


def known_types() -> list[str]:
    """The names of the registered types."""
    return registry.names(SOURCE_TYPES)


@functools.cache
def _source_type_class(name: str) -> type:
    return registry.load(SOURCE_TYPES, name)


def source_type_class(source) -> type:
    """The source-type class that ``source.type`` names."""
    try:
        return _source_type_class(source.type)
    except registry.PluginError as error:
        raise UserError(f"data source {source.name_or_path!r}: {error}") from None


def load_source_type(source):
    """The source type (a :class:`~lt_posttrain.data.source_types.base.SourceType`) that reads the rows of ``source``."""
    return source_type_class(source)(source)
