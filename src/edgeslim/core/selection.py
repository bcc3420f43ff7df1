"""Choosing layers: by name, glob pattern, module type and a ``filter_fn``.

Every technique narrows a model to the layers it works on the same way: the modules of some
types, minus those an ``exclude`` glob matches, kept by an optional ``filter_fn(module, name)``
(:func:`select_layers`, :func:`layer_filter`). Per-layer tables (``layer_sparsity``, ``rank``,
``layer_bits`` ...) are keyed by exact names or globs (:func:`lookup_layer`), and a key that
names no layer is a mistake worth reporting (:func:`unmatched`).

A pattern matches a name if it is the name itself or a case-sensitive ``fnmatch`` glob
(``"fc*"``, ``"layers.?.attn"``) that matches it.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable
from typing import Any

from torch import nn

FilterFn = Callable[[nn.Module, str], bool]
"""``filter_fn(module, name)``: True keeps the layer for a technique, False leaves it alone."""


def matches(name: str, patterns: Iterable[str]) -> bool:
    """True if any of ``patterns`` is ``name`` or a glob that matches it."""
    return any(name == p or fnmatch.fnmatchcase(name, p) for p in patterns)


def unmatched(patterns: Iterable[str], names: Iterable[str]) -> list[str]:
    """The ``patterns`` (in order) that match none of ``names``: the "unknown layer" keys."""
    names = list(names)
    return [p for p in patterns if not any(matches(n, (p,)) for n in names)]


def lookup_layer(table: dict[str, Any], name: str) -> Any | None:
    """The value for layer ``name`` in a per-layer table (``layer_sparsity``, ``rank``,
    ``layer_bits`` ...): an exact key wins, then the first glob pattern that matches; None if
    nothing does."""
    if name in table:
        return table[name]
    for pattern, value in table.items():
        if fnmatch.fnmatchcase(name, pattern):
            return value
    return None


def layer_filter(exclude: Iterable[str], filter_fn: FilterFn | None) -> FilterFn:
    """A filter that keeps layers that no ``exclude`` glob matches and ``filter_fn`` accepts
    (``filter_fn`` is not asked about excluded layers)."""
    exclude = tuple(exclude)

    def keep(module: nn.Module, name: str) -> bool:
        if matches(name, exclude):
            return False
        return filter_fn is None or filter_fn(module, name)

    return keep


def select_layers(
    model: nn.Module,
    types: type[nn.Module] | tuple[type[nn.Module], ...] | None = None,
    *,
    exclude: Iterable[str] = (),
    filter_fn: FilterFn | None = None,
) -> dict[str, nn.Module]:
    """``model``'s named modules (the model itself included, as ``""``) that are instances of
    ``types`` (any module if None), minus those ``exclude`` matches, kept by ``filter_fn``."""
    keep = layer_filter(exclude, filter_fn)
    return {
        name: m
        for name, m in model.named_modules()
        if (types is None or isinstance(m, types)) and keep(m, name)
    }
