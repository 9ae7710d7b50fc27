"""Nested settings: recursive merging, dotted-key overrides and dotted-key lookup, with errors that name the key.

Shared by the run config (engine.runs.config) and the studies' own settings.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any

from engine.errors import UserError


class ConfigError(UserError):
    """A config key or value is invalid; the message names the key and what is allowed."""


def merge(
    base: Mapping[str, Any],
    update: Mapping[str, Any],
    prefix: str = "",
    name: str = "config",
    free_form: Callable[[str], bool] = lambda dotted: False,
) -> dict[str, Any]:
    """Recursively merge ``update`` into a copy of ``base``. Unknown keys raise ConfigError naming them (``name``
    prefixes the message, e.g. a study's name) unless ``free_form(dotted_key)`` says their contents are free."""
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


def set_dotted(
    config: dict[str, Any], key: str, value: Any, free_form: Callable[[str], bool] = lambda dotted: False
) -> None:
    """Set ``config[a][b] = value`` for ``key = "a.b"``, refusing keys that the defaults do not have."""
    node: Any = config
    parts = key.split(".")
    for depth, part in enumerate(parts):
        where = ".".join(parts[: depth + 1])
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            index: Any = int(part)
        elif isinstance(node, dict) and (part in node or free_form(where)):
            index = part
        else:
            allowed = sorted(node) if isinstance(node, dict) else f"indices 0..{len(node) - 1}"
            raise ConfigError(f"unknown config key {where!r}; allowed: {allowed}")
        if depth == len(parts) - 1:
            node[index] = value
        else:
            node = node.setdefault(index, {}) if isinstance(node, dict) else node[index]


def values_at(config: Mapping[str, Any], key: str) -> list[Any]:
    """Values at a dotted key; a list along the path fans out over its elements."""
    nodes: list[Any] = [config]
    for part in key.split("."):
        nxt = []
        for node in nodes:
            for item in node if isinstance(node, list) else [node]:
                if isinstance(item, Mapping) and part in item:
                    nxt.append(item[part])
        nodes = nxt
    return nodes
