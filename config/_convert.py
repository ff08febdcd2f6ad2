"""Generic converters from a located tree (``_tree.N``) to typed values.

A converter is ``conv(node, cx, path) -> value``; on bad input it records a ConfigIssue
in ``cx`` and returns ``INVALID`` instead of raising, so one pass finds every problem.
Dataclass fields name their converter in ``field(metadata={"conv": ...})`` (see ``opt``
and ``req``); ``struct`` walks a mapping against a dataclass, reports unknown keys with a
suggestion, fills defaults and then runs the class's cross-field hook from ``HOOKS``.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import shlex
from typing import Any, Callable

from ._errors import ConfigError, ConfigIssue
from ._frozen import FrozenDict
from ._tree import MAP, SCALAR, SEQ, N, from_plain, join
from ._units import (UnitError, describe, parse_cpu, parse_duration, parse_percent_or_count,
                     parse_size)

__all__ = ["INVALID", "Ctx", "Conv", "HOOKS", "opt", "req", "struct", "text", "word", "words",
           "integer", "boolean", "choice", "duration", "size", "cpu", "percent_or_count",
           "listof", "mapof", "named_map", "describe_node", "DNS_LABEL", "is_ok"]


class _Invalid:
    __slots__ = ()

    def __repr__(self) -> str:
        return "INVALID"

    def __bool__(self) -> bool:
        return False


INVALID: Any = _Invalid()


def is_ok(*values: Any) -> bool:
    """True when none of ``values`` failed conversion."""
    return not any(v is INVALID for v in values)


class Ctx:
    """Where issues go, plus what validators need to know about the whole input.

    ``base_dir`` is the directory relative paths are resolved against (the config file's),
    None when reading a normalised document (paths are then kept as they are).
    ``names`` maps "volumes"/"configs"/"secrets" to the names defined at top level, or
    None when references cannot be checked (a single service document).
    """

    def __init__(self, file: str, base_dir: str | None = None) -> None:
        self.file = file
        self.base_dir = base_dir
        self.names: dict[str, frozenset[str]] | None = None
        self.issues: list[ConfigIssue] = []

    def error(self, line: int | None, path: str, message: str) -> Any:
        self.issues.append(ConfigIssue(self.file, line, path, message))
        return INVALID

    def report(self, line: int | None, path: str, message: str) -> None:
        self.error(line, path, message)

    def resolve(self, path: str) -> str:
        """``path`` made absolute against the config file's directory (``~`` expanded)."""
        path = os.path.expanduser(path)
        if self.base_dir is None or os.path.isabs(path):
            return path
        return os.path.normpath(os.path.join(self.base_dir, path))


Conv = Callable[[N, Ctx, str], Any]

# cross-field checks per dataclass: hook(values, node, cx, path) -> values (may replace some)
HOOKS: dict[type, Callable[[dict[str, Any], N, Ctx, str], dict[str, Any]]] = {}


def describe_node(n: N) -> str:
    if n.kind == SEQ:
        return "a list"
    if n.kind == MAP:
        return "a mapping"
    return describe(n.value)


def opt(default: Any, conv: Conv) -> Any:
    """A dataclass field with a default; null or absent in the input means the default."""
    return dataclasses.field(default=default, metadata={"conv": conv})


def req(conv: Conv) -> Any:
    """A required dataclass field."""
    return dataclasses.field(metadata={"conv": conv})


def struct(cls: type, given: dict[str, Any] | None = None) -> Conv:
    """Convert a mapping to dataclass ``cls``; ``given`` fields come from outside (a key)."""

    def conv(n: N, cx: Ctx, path: str) -> Any:
        if n.kind != MAP:
            return cx.error(n.line, path, f"expected a mapping, got {describe_node(n)}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        allowed = [name for name in fields if not (given and name in given)]
        for key, entry in n.value.items():
            if given and key in given:
                cx.error(entry.key_line, join(path, key),
                         f"the {key} comes from the key above ({describe(given[key])}); remove this line")
            elif key not in allowed and not key.startswith("x-"):  # x-: Compose extension keys
                cx.error(entry.key_line, join(path, key), unknown_key(key, allowed))
        values: dict[str, Any] = {}
        for name, f in fields.items():
            if given and name in given:
                values[name] = given[name]
                continue
            child = n.get(name)
            if (child is None or child.is_null) and hasattr(f.metadata["conv"], "struct_cls") \
                    and f.default is not None:
                # a nested part left out is read as an empty mapping, so its defaults get
                # the same resolution as written ones (relative paths, inferred fields)
                child = N(MAP, {}, n.line)
            if child is None or child.is_null:
                if f.default is dataclasses.MISSING:
                    values[name] = cx.error(n.line, path, f'missing required key "{name}"')
                else:
                    values[name] = f.default
            else:
                values[name] = f.metadata["conv"](child, cx, join(path, name))
        hook = HOOKS.get(cls)
        if hook is not None:
            values = hook(values, n, cx, path)
        if not is_ok(*values.values()):
            return INVALID
        return cls(**values)

    conv.struct_cls = cls  # type: ignore[attr-defined]
    return conv


def unknown_key(key: str, allowed: list[str]) -> str:
    close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
    if close:
        return f'unknown key (did you mean "{close[0]}"?)'
    return f"unknown key (expected one of: {', '.join(allowed)})"


# --- scalars --------------------------------------------------------------------------

def text(pattern: str | None = None, hint: str | None = None, nonempty: bool = True) -> Conv:
    """A string, optionally matching ``pattern`` (full match); ``hint`` says what is expected."""
    rx = re.compile(pattern) if pattern else None
    expected = hint or "a string"

    def conv(n: N, cx: Ctx, path: str) -> Any:
        v = n.value
        if n.kind != SCALAR or not isinstance(v, str):
            return cx.error(n.line, path, f"expected {expected}, got {describe_node(n)}")
        if (nonempty and not v) or (rx is not None and not rx.fullmatch(v)):
            return cx.error(n.line, path, f"expected {expected}, got {describe(v)}")
        return v

    return conv


def word(n: N, cx: Ctx, path: str) -> Any:
    """A string; a YAML number counts as its source text (``1.10`` stays ``"1.10"``)."""
    v = n.value
    if n.kind == SCALAR and isinstance(v, str):
        return v
    if n.kind == SCALAR and isinstance(v, (int, float)) and not isinstance(v, bool):
        return n.raw if n.raw is not None else str(v)
    hint = " (quote it)" if n.kind == SCALAR and (v is None or isinstance(v, bool)) else ""
    return cx.error(n.line, path, f"expected a string{hint}, got {describe_node(n)}")


def words(n: N, cx: Ctx, path: str) -> Any:
    """A list of strings, or one string split like a shell would (``"python3 -m app"``)."""
    if n.kind == SCALAR and isinstance(n.value, str):
        try:
            parts = shlex.split(n.value)
        except ValueError as exc:
            return cx.error(n.line, path, f"cannot split command: {exc}")
    else:
        parts = listof(word)(n, cx, path)
        if parts is INVALID:
            return INVALID
    if not parts:
        return cx.error(n.line, path, "expected a command like [python3, app.py], got an empty one")
    return tuple(parts)


def integer(minimum: int | None = None, maximum: int | None = None) -> Conv:
    if minimum is not None and maximum is not None:
        expected = f"an integer in {minimum}..{maximum}"
    elif minimum is not None:
        expected = f"an integer >= {minimum}"
    else:
        expected = "an integer"

    def conv(n: N, cx: Ctx, path: str) -> Any:
        v = n.value
        ok = n.kind == SCALAR and isinstance(v, int) and not isinstance(v, bool)
        if ok and (minimum is None or v >= minimum) and (maximum is None or v <= maximum):
            return v
        return cx.error(n.line, path, f"expected {expected}, got {describe_node(n)}")

    return conv


def file_mode(n: N, cx: Ctx, path: str) -> Any:
    """Unix permission bits: YAML's octal ``0400`` (an int), or the text ``"0400"``/``"0o400"``."""
    v = n.value
    if n.kind == SCALAR and isinstance(v, str):
        digits = v.strip().lower().removeprefix("0o")
        if digits and all(c in "01234567" for c in digits):
            v = int(digits, 8)
    if n.kind == SCALAR and isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 0o777:
        return v
    return cx.error(n.line, path, f"expected permission bits like 0400, got {describe_node(n)}")


def set_by_apply(conv: Conv) -> Conv:
    """A field ``meshlet apply`` fills in the stored document (a version): refused in a
    file, read as ``conv`` from a document."""
    def read(n: N, cx: Ctx, path: str) -> Any:
        if cx.base_dir is not None and not n.is_null:
            return cx.error(n.line, path, "set by meshlet apply in the stored document, not in a file")
        return conv(n, cx, path)
    return read


def boolean(n: N, cx: Ctx, path: str) -> Any:
    if n.kind == SCALAR and isinstance(n.value, bool):
        return n.value
    return cx.error(n.line, path, f"expected true or false, got {describe_node(n)}")


def choice(*options: str) -> Conv:
    expected = ", ".join(options[:-1]) + " or " + options[-1] if len(options) > 1 else options[0]

    def conv(n: N, cx: Ctx, path: str) -> Any:
        if n.kind == SCALAR and isinstance(n.value, str) and n.value in options:
            return n.value
        return cx.error(n.line, path, f"expected {expected}, got {describe_node(n)}")

    return conv


def _unit(parse: Callable[[Any], Any], positive: bool = False) -> Conv:
    def conv(n: N, cx: Ctx, path: str) -> Any:
        try:
            value = parse(n.value if n.kind == SCALAR else n.plain())
        except UnitError as exc:
            return cx.error(n.line, path, str(exc))
        if positive and not value:
            return cx.error(n.line, path, f"must be greater than 0, got {describe_node(n)}")
        return value

    return conv


def duration(positive: bool = False) -> Conv:
    return _unit(parse_duration, positive)


def size(positive: bool = False) -> Conv:
    return _unit(parse_size, positive)


def cpu(positive: bool = False) -> Conv:
    return _unit(parse_cpu, positive)


percent_or_count: Conv = _unit(parse_percent_or_count)


# --- collections ----------------------------------------------------------------------

def listof(item: Conv, unique: bool = False) -> Conv:
    """A YAML list -> tuple; ``unique`` reports repeated items."""

    def conv(n: N, cx: Ctx, path: str) -> Any:
        if n.kind != SEQ:
            return cx.error(n.line, path, f"expected a list, got {describe_node(n)}")
        out = []
        first: dict[Any, int] = {}
        for i, child in enumerate(n.value):
            value = item(child, cx, join(path, i))
            if unique and value is not INVALID:
                if value in first:
                    cx.error(child.line, join(path, i), f"{describe(value)} is listed twice "
                                                        f"(also at [{first[value]}])")
                    value = INVALID
                else:
                    first[value] = i
            out.append(value)
        return INVALID if not is_ok(*out) else tuple(out)

    return conv


def mapof(key_pattern: str, key_hint: str, value: Conv) -> Conv:
    """A mapping with free keys (env, labels) -> FrozenDict; keys must match ``key_pattern``."""
    rx = re.compile(key_pattern)

    def conv(n: N, cx: Ctx, path: str) -> Any:
        if n.kind != MAP:
            return cx.error(n.line, path, f"expected a mapping, got {describe_node(n)}")
        out: dict[str, Any] = {}
        for key, entry in n.value.items():
            if not rx.fullmatch(key):
                out[key] = cx.error(entry.key_line, join(path, key),
                                    f"expected {key_hint} as key, got {describe(key)}")
                continue
            out[key] = value(entry.node, cx, join(path, key))
        return INVALID if not is_ok(*out.values()) else FrozenDict(out)

    return conv


DNS_LABEL = r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
DNS_LABEL_HINT = 'a DNS label (lowercase letters, digits and "-", at most 63 characters)'


def named_map(cls: type, key_pattern: str, key_hint: str, noun: str) -> Conv:
    """``{name: {...}}`` -> FrozenDict of ``cls`` whose ``name`` field is the key."""
    rx = re.compile(key_pattern)

    def conv(n: N, cx: Ctx, path: str) -> Any:
        if n.kind != MAP:
            return cx.error(n.line, path, f"expected a mapping, got {describe_node(n)}")
        out: dict[str, Any] = {}
        for key, entry in n.value.items():
            if not rx.fullmatch(key):
                out[key] = cx.error(entry.key_line, join(path, key),
                                    f"{noun} name must be {key_hint}, got {describe(key)}")
                continue
            node = entry.node if not entry.node.is_null else N(MAP, {}, entry.node.line)
            out[key] = struct(cls, given={"name": key})(node, cx, join(path, key))
        return INVALID if not is_ok(*out.values()) else FrozenDict(out)

    return conv


def raise_issues(cx: Ctx) -> None:
    """ConfigError with every issue ``cx`` collected, by line (none: nothing raised)."""
    if cx.issues:
        order = sorted(range(len(cx.issues)),
                       key=lambda i: (cx.issues[i].line is None, cx.issues[i].line or 0, i))
        raise ConfigError([cx.issues[i] for i in order])


def read_plain(cls: type, data: Any, source: str, path: str = "") -> Any:
    """An instance of the model class ``cls`` from plain data (parsed JSON), checked as
    a file would be (the cross-field checks are registered in HOOKS when config loads)."""
    return read_part(struct(cls), data, source, path)


def read_part(conv: Conv, data: Any, source: str, path: str = "", base_dir: str | None = None) -> Any:
    """One part of the model read with its converter ``conv`` from plain data (a
    command-line option's value); ``base_dir``: where relative paths are resolved
    (None: kept as written). Raises ConfigError naming every problem."""
    cx = Ctx(source, base_dir)
    result = conv(from_plain(data), cx, path)
    raise_issues(cx)
    return result
