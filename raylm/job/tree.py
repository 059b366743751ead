"""Nested dicts addressed by dotted paths: the one deep merge raylm uses (overrides onto a job,
a trial's values onto its job, a raw DeepSpeed config onto the generated one)."""

from __future__ import annotations

import copy
from typing import Any


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """A copy of `base` with `extra` merged in: dicts merge key by key, anything else replaces,
    and an empty dict empties (so `serve.promote_if={}` clears a job's gate). Neither argument is
    changed, and the result shares no mutable value with them."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and value and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def nest(parts: list[str], value: Any) -> dict[str, Any]:
    """`["a", "b"], v` → `{"a": {"b": v}}`."""
    tree: dict[str, Any] = {parts[-1]: value}
    for part in reversed(parts[:-1]):
        tree = {part: tree}
    return tree
