"""Errors of the config package.

Exception tree::

    ValueError
     +-- ConfigError      one or more ConfigIssue; raised by load, loads, from_dict and
     |                    parse_service_document after collecting every problem found
     +-- UnitError        one bad duration/size/cpu/percent value (from the unit parsers)

A ``ConfigIssue`` renders as ``file:line field.path: message``; the line is left out when
the input had none (a JSON document), the path when the problem is about the whole file.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ConfigIssue", "ConfigError"]


@dataclass(frozen=True, slots=True)
class ConfigIssue:
    """One problem: where (file, 1-based line or None, dotted field path) and what."""

    file: str
    line: int | None
    path: str
    message: str

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        return f"{where} {self.path}: {self.message}" if self.path else f"{where} {self.message}"


class ConfigError(ValueError):
    """Every problem found in one input, in file order; ``str()`` is one issue per line."""

    def __init__(self, issues: list[ConfigIssue] | tuple[ConfigIssue, ...]) -> None:
        if not issues:
            raise ValueError("ConfigError needs at least one issue")
        self.issues: tuple[ConfigIssue, ...] = tuple(issues)
        super().__init__("\n".join(str(i) for i in self.issues))

    def __str__(self) -> str:
        return "\n".join(str(i) for i in self.issues)
