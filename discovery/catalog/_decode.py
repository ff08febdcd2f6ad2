"""Decoding what clients send, the way Consul's Go decoders do.

Pure functions, no I/O. Three jobs:

* Go durations: ``parse_go_duration("1m30s") -> 90_000_000_000`` (nanoseconds) and
  ``format_go_duration`` back, exactly as Go's ``time.ParseDuration`` / ``Duration.String``.
* JSON bodies into Consul's structs (``decode_struct``): field names match
  case-insensitively, snake_case aliases are accepted (``deregister_critical_service_after``),
  unknown fields are an error (Consul decodes with ``DisallowUnknownFields``) and durations
  are strings or numbers of nanoseconds.
* Query parameters: ``parse_bool`` (Go's ``strconv.ParseBool``) and ``parse_uint``.

Errors raise :class:`DecodeError` whose message is the text after
``Request decode failed: `` in Consul's 400 responses.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

__all__ = [
    "DecodeError",
    "Field",
    "Schema",
    "decode_struct",
    "parse_go_duration",
    "format_go_duration",
    "parse_bool",
    "parse_uint",
    "norm_key",
]

NS_PER_S = 1_000_000_000

_UNITS = {
    "ns": 1,
    "us": 1_000,
    "\u00b5s": 1_000,  # micro sign
    "\u03bcs": 1_000,  # Greek mu
    "ms": 1_000_000,
    "s": NS_PER_S,
    "m": 60 * NS_PER_S,
    "h": 3600 * NS_PER_S,
}
_PART = re.compile(r"([0-9]*(?:\.[0-9]*)?)([^0-9.]+)")


class DecodeError(ValueError):
    """A value a client sent cannot be decoded; ``str()`` is the reason."""


def parse_go_duration(text: str) -> int:
    """Parse a Go duration string ("300ms", "1h2m", "-1.5s", "0") into nanoseconds."""
    if not isinstance(text, str):
        raise DecodeError(f"time: invalid duration {text!r}")
    return _parse_go_duration(text)


@functools.lru_cache(maxsize=256)  # the same few strings ("30s", "10m") come again and again
def _parse_go_duration(text: str) -> int:
    orig = text
    neg = False
    if text[:1] in ("-", "+"):
        neg = text[0] == "-"
        text = text[1:]
    if text == "0":
        return 0
    if text == "":
        raise DecodeError(f'time: invalid duration "{orig}"')
    total = 0.0
    pos = 0
    while pos < len(text):
        m = _PART.match(text, pos)
        if m is None:
            if re.fullmatch(r"[0-9.]+", text[pos:]):
                raise DecodeError(f'time: missing unit in duration "{orig}"')
            raise DecodeError(f'time: invalid duration "{orig}"')
        num, unit = m.group(1), m.group(2)
        if num in ("", "."):
            raise DecodeError(f'time: invalid duration "{orig}"')
        if unit not in _UNITS:
            raise DecodeError(f'time: unknown unit "{unit}" in duration "{orig}"')
        total += float(num) * _UNITS[unit]
        pos = m.end()
    if total > 2**63 - 1:
        raise DecodeError(f'time: invalid duration "{orig}"')
    ns = int(round(total))
    return -ns if neg else ns


def _frac(value: int, unit: int) -> str:
    whole, frac = divmod(value, unit)
    if frac == 0:
        return str(whole)
    digits = str(frac).rjust(len(str(unit)) - 1, "0").rstrip("0")
    return f"{whole}.{digits}"


def format_go_duration(ns: int) -> str:
    """Format nanoseconds as Go's ``time.Duration.String()`` does ("1m30s", "100ms", "0s")."""
    ns = int(ns)
    if ns == 0:
        return "0s"
    sign = "-" if ns < 0 else ""
    u = abs(ns)
    if u < NS_PER_S:
        if u < 1_000:
            return f"{sign}{u}ns"
        if u < 1_000_000:
            return f"{sign}{_frac(u, 1_000)}\u00b5s"
        return f"{sign}{_frac(u, 1_000_000)}ms"
    h, rem = divmod(u, 3600 * NS_PER_S)
    m, rem = divmod(rem, 60 * NS_PER_S)
    secs = _frac(rem, NS_PER_S) + "s"
    if h:
        return f"{sign}{h}h{m}m{secs}"
    if m:
        return f"{sign}{m}m{secs}"
    return f"{sign}{secs}"


def parse_bool(text: str) -> bool:
    """Go's ``strconv.ParseBool``; raises DecodeError otherwise."""
    if text in ("1", "t", "T", "TRUE", "true", "True"):
        return True
    if text in ("0", "f", "F", "FALSE", "false", "False"):
        return False
    raise DecodeError(f'strconv.ParseBool: parsing "{text}": invalid syntax')


def parse_uint(text: str) -> int:
    """Go's ``strconv.ParseUint(text, 10, 64)``; raises DecodeError otherwise."""
    if not text or not text.isdigit() or not text.isascii():
        raise DecodeError(f'strconv.ParseUint: parsing "{text}": invalid syntax')
    value = int(text)
    if value >= 2**64:
        raise DecodeError(f'strconv.ParseUint: parsing "{text}": value out of range')
    return value


def norm_key(name: str) -> str:
    """The form two field names are compared in: case folded, underscores dropped."""
    return name.replace("_", "").lower()


# --------------------------------------------------------------------------------------
# Struct decoding

# Field kinds. Each is checked against the JSON type, then converted.
STR, INT, UINT, BOOL, DURATION, STRLIST, STRMAP, HEADERS, ANY, STRUCT, STRUCTLIST, STRUCTMAP = (
    "string", "int", "uint64", "bool", "time.Duration", "[]string", "map[string]string",
    "map[string][]string", "interface {}", "struct", "[]struct", "map[string]struct",
)


@dataclass(frozen=True)
class Field:
    """One field of a Consul struct: its canonical name, kind and (for nested kinds) schema."""

    name: str
    kind: str
    schema: "Schema | None" = None
    aliases: tuple[str, ...] = ()


@dataclass(frozen=True)
class Schema:
    """A Consul struct: its Go name (for error messages) and its fields."""

    go_name: str
    fields: tuple[Field, ...]
    by_key: Mapping[str, Field] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        table: dict[str, Field] = {}
        for f in self.fields:
            table[norm_key(f.name)] = f
            for alias in f.aliases:
                table[norm_key(alias)] = f
        object.__setattr__(self, "by_key", table)


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return "null"


def _mismatch(value: Any, where: str, kind: str) -> DecodeError:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        what = f"number {value}"
    else:
        what = _json_type(value)
    return DecodeError(f"json: cannot unmarshal {what} into Go struct field {where} of type {kind}")


def _convert(f: Field, value: Any, where: str) -> Any:
    kind = f.kind
    if kind == ANY:
        return value
    if value is None:  # JSON null leaves Go's zero value
        return None
    if kind == STR:
        if not isinstance(value, str):
            raise _mismatch(value, where, kind)
        return value
    if kind in (INT, UINT):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _mismatch(value, where, kind)
        if isinstance(value, float) and not value.is_integer():
            raise _mismatch(value, where, kind)
        value = int(value)
        if kind == UINT and value < 0:
            raise _mismatch(value, where, kind)
        return value
    if kind == BOOL:
        if not isinstance(value, bool):
            raise _mismatch(value, where, kind)
        return value
    if kind == DURATION:
        if isinstance(value, bool):
            raise _mismatch(value, where, kind)
        if isinstance(value, (int, float)):
            return int(value)
        if isinstance(value, str):
            try:
                return parse_go_duration(value)
            except DecodeError as exc:
                raise DecodeError(f"invalid duration for {where}: {exc}") from None
        raise _mismatch(value, where, kind)
    if kind == STRLIST:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise _mismatch(value, where, kind)
        return list(value)
    if kind == STRMAP:
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise _mismatch(value, where, kind)
        return dict(value)
    if kind == HEADERS:
        if not isinstance(value, dict):
            raise _mismatch(value, where, kind)
        out: dict[str, list[str]] = {}
        for k, v in value.items():
            if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
                raise _mismatch(v, f"{where}[{k}]", "[]string")
            out[k] = list(v)
        return out
    assert f.schema is not None
    if kind == STRUCT:
        return decode_struct(value, f.schema, where)
    if kind == STRUCTLIST:
        if not isinstance(value, list):
            raise _mismatch(value, where, "[]" + f.schema.go_name)
        return [decode_struct(v, f.schema, where) for v in value]
    if kind == STRUCTMAP:
        if not isinstance(value, dict):
            raise _mismatch(value, where, "map[string]" + f.schema.go_name)
        return {k: decode_struct(v, f.schema, f"{where}[{k}]") for k, v in value.items()}
    raise AssertionError(kind)


def decode_struct(obj: Any, schema: Schema, where: str | None = None) -> dict[str, Any]:
    """Decode a JSON object into ``{canonical field name: value}``.

    Only fields present (and not null) in ``obj`` appear in the result. ``where`` is the
    Go path used in error messages.
    """
    where = where or schema.go_name
    if obj is None:
        return {}
    if not isinstance(obj, dict):
        raise DecodeError(f"json: cannot unmarshal {_json_type(obj)} into Go value of type {schema.go_name}")
    out: dict[str, Any] = {}
    for key, value in obj.items():
        f = schema.by_key.get(norm_key(key))
        if f is None:
            raise DecodeError(f'json: unknown field "{key}"')
        converted = _convert(f, value, f"{where}.{f.name}")
        if converted is not None:
            out[f.name] = converted
        else:
            out.pop(f.name, None)
    return out
