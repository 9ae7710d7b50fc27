"""Nested settings: recursive merging, dotted-key overrides, and checking a nested dict against a typed schema.

Shared by the run config (engine.runs.config) and the studies' own settings. A schema is a tree of dataclasses
whose fields are declared with :func:`key`: the annotation gives the type (``int``, ``float``, ``bool``, ``str``,
``None``, unions, ``Literal``, ``list[...]``, ``dict[str, ...]``, a nested dataclass, or a class with a
``conform`` classmethod for values with their own rules) and ``key``'s rules give ranges and allowed names.
:func:`conform` walks a dict against it: unknown keys, wrong types, out-of-range or non-finite numbers raise
:class:`ConfigError` in one line naming the dotted key, the value and what is allowed.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, Literal, Union

from engine.errors import UserError

BOUNDS = (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))
RULES = ("ge", "gt", "le", "lt", "choices", "nonempty", "distinct", "scalar", "partial")


class ConfigError(UserError):
    """A config key or value is invalid; the message names the key and what is allowed (``key``: the dotted key,
    when one is known)."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


def merge(
    base: Mapping[str, Any],
    update: Mapping[str, Any],
    prefix: str = "",
    name: str = "config",
    free_form: Callable[[str], bool] = lambda dotted: False,
) -> dict[str, Any]:
    """Recursively merge ``update`` into a copy of ``base``. Unknown keys raise ConfigError naming them (``name``
    prefixes the message, e.g. a study's name) unless ``free_form(dotted_key)`` says their contents are free."""
    if not isinstance(update, Mapping):
        raise ConfigError(f"{name} key {prefix.rstrip('.') or name!r} must be a mapping, got {show(update)}")
    out = copy.deepcopy(dict(base))
    for key, value in update.items():
        dotted = f"{prefix}{key}"
        if key not in out and not free_form(dotted):
            raise ConfigError(f"unknown {name} key {dotted!r}; allowed: {sorted(out)}")
        if isinstance(out.get(key), dict) and isinstance(value, Mapping):
            out[key] = merge(out[key], value, dotted + ".", name, free_form)
        else:
            out[key] = copy.deepcopy(value)
    return out


def set_dotted(config: dict[str, Any], key: str, value: Any) -> None:
    """Set ``config[a][b] = value`` for ``key = "a.b"`` (a mapping is merged into the mapping already there; a
    number indexes a list). New keys are created: the schema check that follows refuses unknown ones."""
    node: Any = config
    parts = key.split(".")
    for depth, part in enumerate(parts):
        where = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            if not (part.isdigit() and int(part) < len(node)):
                raise ConfigError(f"config key {where!r}: {part!r} is not an index of the list (0..{len(node) - 1})")
            index: Any = int(part)
        elif isinstance(node, dict) and part:
            index = part
        else:
            raise ConfigError(f"config key {where!r}: {'.'.join(parts[:depth])!r} holds {show(node)}, not a mapping")
        if depth == len(parts) - 1:
            old = node[index] if isinstance(node, list) else node.get(index)
            both = isinstance(old, dict) and isinstance(value, Mapping)
            node[index] = merge(old, value, where + ".", free_form=lambda dotted: True) if both else value
        else:
            node = node.setdefault(index, {}) if isinstance(node, dict) else node[index]


def key(default: Any = None, **rules: Any) -> Any:
    """A schema field: its default (copied per instance) and its rules: ``ge``/``gt``/``le``/``lt`` (numbers, also
    list items), ``choices`` (a collection of allowed names, read when checked), ``nonempty`` and ``distinct``
    (lists), ``scalar`` (a single value is promoted to a one-item list), ``partial`` (a mapping may give only some
    of its keys: nothing is filled in)."""
    unknown = set(rules) - set(RULES)
    if unknown:
        raise TypeError(f"unknown schema rules {sorted(unknown)}; known: {RULES}")
    return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=rules)


def defaults(node: Any) -> Any:
    """The plain nested dict of a schema instance's defaults (a section's ``extra_defaults()`` included)."""
    if not dataclasses.is_dataclass(node):
        return copy.deepcopy(node)
    out = {f.name: defaults(getattr(node, f.name)) for f in dataclasses.fields(node)}
    extra = getattr(node, "extra_defaults", None)
    return {**out, **(extra() if extra else {})}


def conform(schema: Any, value: Any, dotted: str, rules: Mapping[str, Any] | None = None) -> Any:
    """``value`` checked against the type ``schema`` with ``rules`` at ``dotted``; returns it normalised (a scalar
    promoted to a list, a section's missing keys filled with defaults, values of a ``conform`` class canonical)."""
    rules = rules or {}
    origin, args = typing.get_origin(schema), typing.get_args(schema)
    if schema is Any:
        return value
    if hasattr(schema, "conform"):
        return schema.conform(value, dotted, rules)
    if dataclasses.is_dataclass(schema):
        return _section(schema, value, dotted, bool(rules.get("partial")))
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        deeper = []
        for option in (a for a in args if a is not type(None)):
            try:
                return conform(option, value, dotted, rules)
            except ConfigError as exc:
                deeper += [exc] if exc.key not in (None, dotted) else []
        raise deeper[0] if deeper else _bad(schema, value, dotted, rules)  # the value's shape fits: its inner error
    if origin is Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return value
        raise _bad(schema, value, dotted, rules)
    if origin in (list, tuple, Sequence, Collection) or schema in (list, tuple):
        return _items(schema, args, value, dotted, rules)
    if origin in (dict, Mapping) or schema in (dict, Mapping):
        return _mapping(args, value, dotted, rules)
    if not _scalar_ok(schema, value, rules):
        raise _bad(schema, value, dotted, rules)
    return value


def describe(schema: Any, rules: Mapping[str, Any] | None = None) -> str:
    """What ``schema`` with ``rules`` allows, in words (the end of an error message)."""
    rules = rules or {}
    origin, args = typing.get_origin(schema), typing.get_args(schema)
    if schema is Any:
        return "anything"
    if hasattr(schema, "conform"):
        return schema.describe(rules)
    if dataclasses.is_dataclass(schema):
        return f"a mapping with keys among {[f.name for f in dataclasses.fields(schema)]}"
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else describe(a, rules) for a in args)
    if origin is Literal:
        return " or ".join(repr(a) for a in args)
    if origin in (list, tuple, Sequence, Collection) or schema in (list, tuple):
        what = "a non-empty list" if rules.get("nonempty") else "a list"
        item = describe(args[0], _item_rules(rules)) if args else "anything"
        return f"{what} of {item}" + (" (distinct)" if rules.get("distinct") else "")
    if origin in (dict, Mapping) or schema in (dict, Mapping):
        names = f" {sorted(rules['choices'])}" if "choices" in rules else ""
        return f"a mapping of names{names} to " + (describe(args[1]) if len(args) == 2 else "values")
    if "choices" in rules and schema in (str, int):
        return f"one of {list(rules['choices'])}"
    words = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}
    bounds = [f"{op} {rules[name]}" for name, op in BOUNDS if name in rules and schema in (int, float)]
    what = words.get(schema, f"a {getattr(schema, '__name__', schema)}")
    return what + (" " + " and ".join(bounds) if bounds else "")


def show(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters (error messages stay one readable line)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def in_range(number: float, rules: Mapping[str, Any]) -> bool:
    """Whether ``number`` is finite and meets the ``ge``/``gt``/``le``/``lt`` rules."""
    checks = {"ge": number.__ge__, "gt": number.__gt__, "le": number.__le__, "lt": number.__lt__}
    finite = isinstance(number, int) or math.isfinite(number)
    return finite and all(checks[name](rules[name]) for name in checks if name in rules)


def _bad(schema: Any, value: Any, dotted: str, rules: Mapping[str, Any]) -> ConfigError:
    return ConfigError(f"config key {dotted!r} must be {describe(schema, rules)}, got {show(value)}", dotted)


def _scalar_ok(schema: Any, value: Any, rules: Mapping[str, Any]) -> bool:
    if schema is bool:
        return isinstance(value, bool)
    if schema in (int, float):
        kinds = (int,) if schema is int else (int, float)
        return isinstance(value, kinds) and not isinstance(value, bool) and in_range(value, rules) and (
            "choices" not in rules or value in rules["choices"])  # fmt: skip
    if schema is str:
        return isinstance(value, str) and ("choices" not in rules or value in rules["choices"])
    return isinstance(schema, type) and isinstance(value, schema)


def _item_rules(rules: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in rules.items() if k not in ("nonempty", "distinct", "scalar")}


def _items(schema: Any, args: tuple[Any, ...], value: Any, dotted: str, rules: Mapping[str, Any]) -> list[Any]:
    if rules.get("scalar") and not isinstance(value, (list, tuple, Mapping)) and value is not None:
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise _bad(schema, value, dotted, rules)
    if typing.get_origin(schema) is tuple and args and args[-1] is not Ellipsis:  # a fixed-length tuple
        if len(value) != len(args):
            raise _bad(schema, value, dotted, rules)
        kinds = list(args)
    else:
        kinds = [args[0] if args else Any] * len(value)
    pairs = enumerate(zip(kinds, value, strict=True))
    out = [conform(kind, v, f"{dotted}.{i}", _item_rules(rules)) for i, (kind, v) in pairs]
    if (rules.get("nonempty") and not out) or (rules.get("distinct") and len(set(map(repr, out))) != len(out)):
        raise _bad(schema, value, dotted, rules)
    return out


def _mapping(args: tuple[Any, ...], value: Any, dotted: str, rules: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"config key {dotted!r} must be {describe(dict[str, Any], rules)}, got {show(value)}")
    allowed = rules.get("choices")
    out = {}
    for name, item in value.items():
        if not isinstance(name, str) or not name or (allowed is not None and name not in allowed):
            names = sorted(allowed) if allowed is not None else "non-empty names"
            raise ConfigError(f"unknown config key {f'{dotted}.{name}'!r}; allowed: {names}", f"{dotted}.{name}")
        out[name] = conform(args[1] if len(args) == 2 else Any, item, f"{dotted}.{name}", {"partial": True})
    return out


def _section(schema: type, value: Any, dotted: str, partial: bool) -> dict[str, Any]:
    """A mapping checked key by key against the dataclass ``schema``. A section may also take the names its
    ``extra_names()`` lists (e.g. per-method options), each checked by its ``extra(name, value, dotted)``."""
    if not isinstance(value, Mapping):
        raise _bad(schema, value, dotted, {})
    fields = {f.name: f for f in dataclasses.fields(schema)}
    hints = typing.get_type_hints(schema)
    extra = list(schema.extra_names()) if hasattr(schema, "extra_names") else []
    out = {}
    for name, item in value.items():
        where = f"{dotted}.{name}" if dotted else str(name)
        if name in fields:
            rules = {**fields[name].metadata, **({"partial": True} if partial else {})}
            out[name] = conform(hints[name], item, where, rules)
        elif name in extra:
            out[name] = schema.extra(name, item, where)
        else:
            raise ConfigError(f"unknown config key {where!r}; allowed: {sorted([*fields, *extra])}", where)
    if not partial:
        out = {**{k: v for k, v in defaults(schema()).items() if k not in out}, **out}
    return out
