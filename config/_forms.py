"""Older and shorter forms of some model parts, read into the one canonical shape.

A converter here looks at a mapping before the dataclass's own ``struct`` converter does:

``resources``
    ``{cpu, memory}`` (the short form, and the only one before requests and limits) means
    requests = limits = those amounts. ``{requests: {...}, limits: {...}}`` is the full
    form. The two are not mixed in one mapping.
``placement``
    ``spread: true`` / ``spread: false`` (the older form of ``strategy``) mean
    ``strategy: spread`` / ``strategy: binpack``; giving both is an error.
``mesh.catalog``
    ``catalog: embedded`` or ``catalog: http://...`` (the only form before tokens and TLS)
    means ``catalog: {url: ...}``.

Either way the model holds, and ``to_dict()`` writes, only the canonical shape, so KV
documents written before these fields existed still read, and a service's revision does
not depend on which form its file used.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ._convert import INVALID, Conv, Ctx, boolean, struct, unknown_key
from ._tree import MAP, SCALAR, Entry, N, join

__all__ = ["resources", "placement", "catalog"]

_SHORT = ("cpu", "memory")
_FULL = ("requests", "limits")


def _known(n: N, cx: Ctx, path: str, allowed: tuple[str, ...]) -> N:
    """``n`` without the keys it should not have, each reported (with a suggestion) once."""
    keep = {}
    for key, entry in n.value.items():
        if key in allowed or key.startswith("x-"):
            keep[key] = entry
        else:
            cx.error(entry.key_line, join(path, key), unknown_key(key, list(allowed)))
    return N(MAP, keep, n.line)


def resources(full_cls: type, amounts_cls: type) -> Conv:
    """``Resources`` from either form (see the module docstring)."""
    full, short = struct(full_cls), struct(amounts_cls)

    def conv(n: N, cx: Ctx, path: str) -> Any:
        if n.kind != MAP:
            return full(n, cx, path)     # reports "expected a mapping"
        n = _known(n, cx, path, _SHORT + _FULL)
        given_short = [k for k in _SHORT if k in n.value]
        given_full = [k for k in _FULL if k in n.value]
        if given_short and given_full:
            return cx.error(n.value[given_full[0]].key_line, join(path, given_full[0]),
                            f"give {' and '.join(given_short)} (the short form: requests = limits) "
                            f"or requests/limits, not both")
        if not given_short:
            return full(n, cx, path)
        amounts = short(n, cx, path)
        return INVALID if amounts is INVALID else full_cls(requests=amounts, limits=amounts)

    conv.struct_cls = full_cls  # type: ignore[attr-defined]
    return conv


def placement(cls: type) -> Conv:
    """``Placement`` with ``spread: bool`` read as ``strategy`` (see the module docstring)."""
    inner = struct(cls)
    allowed = tuple(f.name for f in dataclasses.fields(cls)) + ("spread",)

    def conv(n: N, cx: Ctx, path: str) -> Any:
        if n.kind != MAP or "spread" not in n.value:
            return inner(_known(n, cx, path, allowed) if n.kind == MAP else n, cx, path)
        n = _known(n, cx, path, allowed)
        older = n.value["spread"]
        rest = N(MAP, {k: e for k, e in n.value.items() if k != "spread"}, n.line)
        spread = boolean(older.node, cx, join(path, "spread")) if not older.node.is_null else None
        if "strategy" in rest.value and spread is not None:
            cx.error(older.key_line, join(path, "spread"),
                     "give strategy (spread or binpack) or the older spread: true/false, not both")
            spread = INVALID
        value = inner(rest, cx, path)
        if value is INVALID or spread is INVALID:
            return INVALID
        if spread is None:
            return value
        return dataclasses.replace(value, strategy="spread" if spread else "binpack")

    conv.struct_cls = cls  # type: ignore[attr-defined]
    return conv


def catalog(cls: type) -> Conv:
    """``CatalogSettings`` from a URL (or ``embedded``) alone, or the mapping."""
    inner = struct(cls)

    def conv(n: N, cx: Ctx, path: str) -> Any:
        if n.kind == SCALAR and not n.is_null:
            return inner(N(MAP, {"url": Entry(n.line, n)}, n.line), cx, path)
        return inner(n, cx, path)

    conv.struct_cls = cls  # type: ignore[attr-defined]
    return conv
