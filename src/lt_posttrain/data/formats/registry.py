"""Data-source types by name: the entry points of the ``lt_posttrain.data_sources`` group (the built-in ones and
those of installed plugins), or a dotted import path. Only the type a source names is imported."""

import functools

from lt_posttrain.errors import UserError
from lt_posttrain.plugins import registry
from lt_posttrain.plugins.groups import DATA_SOURCES

GROUP = DATA_SOURCES.name
_registered = registry.entry_points  # the process's cache of entry points (a test that installs a plugin clears it)


def known_types() -> list[str]:
    """The names of the registered types."""
    return registry.names(DATA_SOURCES)


@functools.cache
def _format_class(name: str) -> type:
    return registry.load(DATA_SOURCES, name)


def format_class(source) -> type:
    """The format class that ``source.type`` names."""
    try:
        return _format_class(source.type)
    except registry.PluginError as error:
        raise UserError(f"data source {source.name_or_path!r}: {error}") from None


def load_format(source):
    """The format (a :class:`~lt_posttrain.data.formats.base.Format`) that reads the rows of ``source``."""
    return format_class(source)(source)
