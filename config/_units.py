"""Unit parsers: durations, sizes, CPU amounts, percent-or-count.

Pure functions. Each accepts what a user writes in YAML (a string with a unit, or a bare
number) and also its own normalised form, so ``parse_x(parse_x(v)) == parse_x(v)``: the
JSON service document is read back with the same parsers.

=================  ==================================  ==============================
kind               accepted                            normalised
=================  ==================================  ==============================
duration           ``500ms`` ``5s`` ``2m`` ``1h30m``    float seconds
                   ``0`` ``1.5`` (bare: seconds)
size               ``128MiB`` ``1G`` ``512k`` ``1048576``  int bytes
cpu                ``0.5`` ``500m`` ``2``               float cores
percent-or-count   ``25%`` ``1``                       ``"25%"`` or ``1``
=================  ==================================  ==============================
"""

from __future__ import annotations

import json
import math
import re
from decimal import Decimal
from typing import Any

__all__ = [
    "UnitError",
    "describe",
    "parse_duration",
    "parse_size",
    "parse_cpu",
    "parse_percent_or_count",
    "format_duration",
]


class UnitError(ValueError):
    """A value that is not a valid duration/size/cpu/percent; the message says why."""


def describe(value: Any, limit: int = 40) -> str:
    """How an offending value is quoted in error messages: ``"three"``, ``-1``, ``a list``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        text = value if len(value) <= limit else value[: limit - 3] + "..."
        return json.dumps(text, ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, (bytes, bytearray)):
        return "binary data"
    return f"a {type(value).__name__} ({value})"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# --- durations ------------------------------------------------------------------------

_DURATION_UNITS = {"ns": Decimal("1e-9"), "us": Decimal("1e-6"), "µs": Decimal("1e-6"),
                   "ms": Decimal("0.001"), "s": Decimal(1), "m": Decimal(60), "h": Decimal(3600)}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_BARE_NUMBER = re.compile(r"\d+(?:\.\d*)?|\.\d+")
_DURATION_HINT = "expected a duration like 500ms, 5s or 2m"


def parse_duration(value: Any) -> float:
    """``"500ms"`` -> 0.5, ``"1h30m"`` -> 5400.0, ``0`` / ``1.5`` -> seconds as float.

    Units are Go's (ns, us, ms, s, m, h) and may be combined, largest first as written.
    Negative, infinite and unit-less strings other than plain numbers are refused.
    """
    bad = UnitError(f"{_DURATION_HINT}, got {describe(value)}")
    if _is_number(value):
        if not math.isfinite(value) or value < 0:
            raise bad
        return float(value)
    if not isinstance(value, str):
        raise bad
    text = value.strip()
    if _BARE_NUMBER.fullmatch(text):
        return float(Decimal(text))
    pos, total = 0, Decimal(0)
    for m in _DURATION_PART.finditer(text):
        if m.start() != pos:
            raise bad
        total += Decimal(m.group(1)) * _DURATION_UNITS[m.group(2)]
        pos = m.end()
    if pos == 0 or pos != len(text):
        raise bad
    return float(total)


def format_duration(seconds: float) -> str:
    """The shortest readable form of a normalised duration: 0.5 -> ``500ms``, 90 -> ``1m30s``."""
    if seconds == 0:
        return "0s"
    if seconds < 1:
        return _plain(Decimal(repr(seconds)) * 1000) + "ms"
    whole = int(seconds)
    rest = Decimal(repr(seconds)) - whole
    h, rem = divmod(whole, 3600)
    m, s = divmod(rem, 60)
    out = (f"{h}h" if h else "") + (f"{m}m" if m else "")
    if s or rest:
        out += _plain(Decimal(s) + rest) + "s"
    return out


def _plain(d: Decimal) -> str:
    text = f"{d:f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


# --- sizes ----------------------------------------------------------------------------

_SIZE_UNITS = {"": 1, "k": 10**3, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
               "P": 10**15, "E": 10**18, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30,
               "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kKMGTPE]i?)?B?")
_SIZE_HINT = "expected a size like 128MiB, 1G or 512k"


def parse_size(value: Any) -> int:
    """``"128MiB"`` -> 134217728, ``"1G"`` -> 10**9, ``"512k"`` -> 512000, ints as bytes.

    ``k``/``M``/``G``/``T`` are powers of 1000 and ``Ki``/``Mi``/``Gi``/``Ti`` powers of
    1024 (Kubernetes quantities); a trailing ``B`` is allowed. A lower-case ``m`` is
    refused: Kubernetes reads it as milli, Docker Compose as MiB.
    """
    bad = f"{_SIZE_HINT}, got {describe(value)}"
    if _is_number(value):
        if not math.isfinite(value) or value < 0 or value != int(value):
            raise UnitError(bad)
        return int(value)
    if not isinstance(value, str):
        raise UnitError(bad)
    text = value.strip()
    m = _SIZE.fullmatch(text)
    if not m:
        lower = re.fullmatch(r"(\d+(?:\.\d+)?)\s*[mg]b?", text)
        if lower:
            n = lower.group(1)
            up = text[len(n):].strip()[0].upper()
            raise UnitError(f"{bad} (lower-case {text[len(n):].strip()} is ambiguous: "
                            f"write {n}{up} for powers of 1000 or {n}{up}i for powers of 1024)")
        raise UnitError(bad)
    amount = Decimal(m.group(1)) * _SIZE_UNITS[m.group(2) or ""]
    if amount != amount.to_integral_value():
        raise UnitError(f"{bad} (not a whole number of bytes)")
    return int(amount)


# --- cpu ------------------------------------------------------------------------------

_CPU = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(m?)")
_CPU_HINT = "expected a CPU amount like 0.5, 500m or 2"


def parse_cpu(value: Any) -> float:
    """``"500m"`` -> 0.5 (millicores), ``"0.5"`` / ``0.5`` -> 0.5, ``2`` -> 2.0 cores."""
    bad = UnitError(f"{_CPU_HINT}, got {describe(value)}")
    if _is_number(value):
        if not math.isfinite(value) or value < 0:
            raise bad
        return float(value)
    if not isinstance(value, str):
        raise bad
    m = _CPU.fullmatch(value.strip())
    if not m:
        raise bad
    amount = Decimal(m.group(1))
    return float(amount / 1000 if m.group(2) else amount)


# --- percent or count -----------------------------------------------------------------

_PERCENT = re.compile(r"(\d+)\s*%")
_PERCENT_HINT = "expected a count like 1 or a percentage like 25%"


def parse_percent_or_count(value: Any) -> int | str:
    """``"25%"`` -> ``"25%"``, ``1`` / ``"1"`` -> ``1``; negative numbers are refused."""
    bad = UnitError(f"{_PERCENT_HINT}, got {describe(value)}")
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise bad
        return value
    if not isinstance(value, str):
        raise bad
    text = value.strip()
    if text.isdigit() and text.isascii():
        return int(text)
    m = _PERCENT.fullmatch(text)
    if not m:
        raise bad
    return f"{int(m.group(1))}%"
