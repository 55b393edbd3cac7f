"""Data-source types by name: the entry points of the ``lt_posttrain.data_sources`` group (the built-in ones and
those of installed plugins), or a dotted import path. Only the type a source names is imported."""

import difflib
import functools
import importlib

from importlib_metadata import entry_points

from lt_posttrain.errors import UserError

GROUP = "lt_posttrain.data_sources"


@functools.cache
def _registered() -> dict:
    # reading entry points imports nothing: only the chosen one is loaded, in ``_format_class``
    return {entry_point.name: entry_point for entry_point in entry_points(group=GROUP)}


def known_types() -> list[str]:
    """The names of the registered types."""
    return sorted(_registered())


@functools.cache
def _format_class(name: str) -> type:
    registered = _registered()
    if name in registered:
        try:
            cls = registered[name].load()
        except Exception as error:  # a broken plugin: name it, not its traceback
            raise LookupError(f"type {name!r} ({registered[name].value}) cannot be loaded: {error}") from error
    elif "." in name or ":" in name:
        module_name, _, attribute = name.replace(":", ".").rpartition(".")
        try:
            cls = getattr(importlib.import_module(module_name), attribute)
        except ImportError as error:
            raise LookupError(f"type {name!r}: cannot import {module_name!r} ({error})") from error
        except AttributeError:
            raise LookupError(f"type {name!r}: module {module_name!r} has no {attribute!r}") from None
    else:
        close = difflib.get_close_matches(name, registered, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise LookupError(
            f"unknown type {name!r} ({hint}known types: {', '.join(known_types())}; or a dotted import path such as "
            "my_package.formats.MyFormat)"
        )
    if not all(callable(getattr(cls, method, None)) for method in ("messages", "renderer")):
        raise LookupError(f"type {name!r} is not a data-source format: it needs messages(row, index) and renderer(...)")
    return cls


def format_class(source) -> type:
    """The format class that ``source.type`` names."""
    try:
        return _format_class(source.type)
    except LookupError as error:
        raise UserError(f"data source {source.name_or_path!r}: {error}") from None


def load_format(source):
    """The format (a :class:`~lt_posttrain.data.formats.base.Format`) that reads the rows of ``source``."""
    return format_class(source)(source)
