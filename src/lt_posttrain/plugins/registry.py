"""Plugins by name: the entry points of an entry-point group, read from package metadata without importing anything
(once per process); only the plugin that is asked for (or listed) is imported, and checked to be of its group's kind.

A name is a registered entry-point name (``dpo``) or a dotted import path (``my_package.module.MyClass`` or
``my_package.module:MyClass``), so a class on ``PYTHONPATH`` needs no packaging.
"""

import difflib
import functools
import importlib
from dataclasses import dataclass
from typing import Callable, Optional

from importlib_metadata import EntryPoint
from importlib_metadata import entry_points as installed_entry_points


class PluginError(LookupError):
    """A plugin that cannot be used (unknown, not importable, of the wrong kind, or claimed twice); the message is one
    line that names it."""


@dataclass(frozen=True)
class PluginGroup:
    """One entry-point group and what its plugins must be.

    Args:
        name: the entry-point group, e.g. ``lt_posttrain.trainers``.
        noun: what one plugin is called in messages (``trainer``, ``type``).
        example: a dotted import path shown in the error for an unknown name.
        base: the import path of the class every plugin of the group subclasses (``lt_posttrain.SFTModule``), or
            None when ``check`` decides.
        check: ``check(obj)``: why ``obj`` cannot be a plugin of the group, or None if it can (used without ``base``).
    """

    name: str
    noun: str
    example: str
    base: Optional[str] = None
    check: Optional[Callable[[object], Optional[str]]] = None

    def base_class(self) -> Optional[type]:
        """The class named by ``base`` (imported now, not when the group is defined)."""
        return _import_object(self.base) if self.base else None

    def problem(self, obj) -> Optional[str]:
        """Why ``obj`` cannot be a plugin of this group, or None if it can."""
        if self.base:
            if not (isinstance(obj, type) and issubclass(obj, self.base_class())):
                return f"is not a subclass of {self.base}"
            return None
        return self.check(obj) if self.check else None


@dataclass(frozen=True)
class PluginInfo:
    """One registered plugin as ``lt-posttrain plugins`` lists it: its group, name, target (``value``,
    ``module:Class``), distribution and version, and ``error``, the one-line reason it cannot be used (None if it
    can)."""

    group: str
    name: str
    value: str
    dist: Optional[str]
    version: Optional[str]
    error: Optional[str]

    @property
    def status(self) -> str:
        return "ok" if self.error is None else "error"


@functools.cache
def entry_points(group: str) -> dict[str, tuple[EntryPoint, ...]]:
    """The entry points of ``group`` by name (several where distributions claim the same name), read once."""
    found: dict[str, list[EntryPoint]] = {}
    for entry_point in installed_entry_points(group=group):
        found.setdefault(entry_point.name, []).append(entry_point)
    return {name: tuple(points) for name, points in found.items()}


def names(group: PluginGroup) -> list[str]:
    """The registered names of ``group``, sorted."""
    return sorted(entry_points(group.name))


def load(group: PluginGroup, name: str):
    """The class ``name`` stands for in ``group``: a registered name or a dotted import path.

    Raises:
        PluginError: unknown, not importable, not of the group's kind, or a name claimed by several distributions.
    """
    registered = entry_points(group.name)
    if name in registered:
        points = registered[name]
        if len(points) > 1:
            raise PluginError(f"{group.noun} {name!r} {_clash(points)}")
        obj, problem = _load_entry_point(group, points[0])
        if problem is not None:
            dist = _dist_label(points[0])
            origin = f"{points[0].value}, from {dist}"
            raise PluginError(f"{group.noun} {name!r} ({origin}) {problem}; fix or uninstall {dist}")
        return obj
    if "." not in name and ":" not in name:
        close = difflib.get_close_matches(name, registered, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise PluginError(
            f"unknown {group.noun} {name!r} ({hint}known {group.noun}s: {', '.join(names(group)) or 'none'}; or a "
            f"dotted import path such as {group.example})"
        )
    module_name, _, attribute = name.replace(":", ".").rpartition(".")
    try:
        obj = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, ValueError) as error:
        raise PluginError(f"{group.noun} {name!r}: cannot import {module_name!r} ({error})") from error
    except AttributeError:
        raise PluginError(f"{group.noun} {name!r}: module {module_name!r} has no {attribute!r}") from None
    problem = group.problem(obj)
    if problem is not None:
        raise PluginError(f"{group.noun} {name!r} {problem}")
    return obj


def inspect_group(group: PluginGroup) -> list[PluginInfo]:
    """Every registered plugin of ``group``, each imported and checked (a broken one gets its reason, never raises)."""
    infos = []
    for name, points in sorted(entry_points(group.name).items()):
        clash = _clash(points) if len(points) > 1 else None
        for point in points:
            error = clash or _load_entry_point(group, point)[1]
            dist = point.dist
            infos.append(PluginInfo(group.name, name, point.value, dist and dist.name, dist and dist.version, error))
    return infos


def _load_entry_point(group: PluginGroup, entry_point: EntryPoint) -> tuple[object, Optional[str]]:
    """``(obj, None)``, or ``(None, reason)`` when it cannot be imported or is not of the group's kind."""
    try:
        obj = entry_point.load()
    except (Exception, SystemExit) as error:  # a broken plugin: its reason, never its traceback
        return None, f"cannot be loaded: {type(error).__name__}: {_first_line(error)}"
    return obj, group.problem(obj)


def _clash(points: tuple[EntryPoint, ...]) -> str:
    claims = "; ".join(f"{_dist_label(point)}: {point.value}" for point in points)
    return (
        f"is claimed by {len(points)} distributions ({claims}): uninstall all but one, or give the import path of "
        "the one you want"
    )


def _dist_label(entry_point: EntryPoint) -> str:
    dist = entry_point.dist
    return f"{dist.name} {dist.version}" if dist is not None else "an unknown distribution"


def _import_object(path: str):
    module_name, _, attribute = path.replace(":", ".").rpartition(".")
    return getattr(importlib.import_module(module_name), attribute)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else "no message"
