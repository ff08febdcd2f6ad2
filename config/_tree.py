"""A located value tree: what the validators walk, built from YAML or from plain data.

YAML is composed (not constructed) so that every node keeps its line: scalars are then
constructed one by one with PyYAML's safe constructor. Duplicate keys, non-string keys
and syntax errors become issues here. Plain data (the JSON service document) becomes the
same tree with ``line=None``, so one set of validators serves both inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import yaml

__all__ = ["N", "Entry", "from_yaml", "from_plain", "Report"]

# report(line, path, message): how tree building reports a problem
Report = Callable[[int | None, str, str], None]

SCALAR, SEQ, MAP = "scalar", "seq", "map"

# Aliases are expanded while walking; this bounds a "billion laughs" document.
MAX_NODES = 200_000


@dataclass(slots=True)
class Entry:
    """One mapping entry: the key's line (unknown/duplicate keys are reported there)."""

    key_line: int | None
    node: "N"


@dataclass(slots=True)
class N:
    """A value with its line. ``value`` is a Python scalar, ``list[N]`` or ``dict[str, Entry]``.

    ``raw`` keeps a YAML scalar's source text (``1.10`` stays ``"1.10"`` for env values).
    """

    kind: str
    value: Any
    line: int | None
    raw: str | None = None

    @property
    def is_null(self) -> bool:
        return self.kind == SCALAR and self.value is None

    def get(self, key: str) -> "N | None":
        """The child node under ``key`` of a mapping node, or None."""
        if self.kind != MAP:
            return None
        entry = self.value.get(key)
        return entry.node if entry else None

    def plain(self) -> Any:
        """Back to plain Python data (lists and dicts)."""
        if self.kind == SEQ:
            return [n.plain() for n in self.value]
        if self.kind == MAP:
            return {k: e.node.plain() for k, e in self.value.items()}
        return self.value


def join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def from_yaml(text: str, report: Report) -> N | None:
    """Compose ``text`` into a located tree; None after a syntax error (already reported).

    An empty document gives a null node. Merge keys (``<<: *base``) are applied; a key
    written twice in one mapping is an error (PyYAML silently keeps the last one).
    """
    try:
        loader = yaml.SafeLoader(text)
    except yaml.reader.ReaderError as exc:
        _report_reader_error(text, exc, report)
        return None
    try:
        root = loader.get_single_node()
        if root is None:
            return N(SCALAR, None, 1)
        budget = [MAX_NODES]
        tree = _walk(root, loader, report, "", set(), budget)
        if budget[0] < 0:
            report(None, "", f"too many values: more than {MAX_NODES} after expanding aliases")
            return None
        return tree
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        problem = exc.problem or exc.context or "syntax error"
        detail = f" (column {mark.column + 1})" if mark else ""
        if exc.context and problem.startswith("but "):  # the composer's "expected X" / "but found Y"
            problem = f"{exc.context}, {problem}"
        elif exc.context and exc.problem and exc.context_mark:
            detail = f" (column {mark.column + 1}; {exc.context} on line {exc.context_mark.line + 1})"
        hint = " - check the indentation" if "<block end>" in problem or "mapping values" in problem else ""
        report(line, "", f"invalid YAML: {problem}{detail}{hint}")
        return None
    except yaml.reader.ReaderError as exc:
        _report_reader_error(text, exc, report)
        return None
    finally:
        loader.dispose()


def _report_reader_error(text: str, exc: yaml.reader.ReaderError, report: Report) -> None:
    """A character YAML does not allow (control characters): the error has no mark."""
    line = text.count("\n", 0, exc.position) + 1
    column = exc.position - text.rfind("\n", 0, exc.position)
    report(line, "", f"invalid YAML: unacceptable character #x{exc.character:04x} (column {column})")


def _walk(node: yaml.Node, loader: yaml.SafeLoader, report: Report, path: str,
          active: set[int], budget: list[int]) -> N:
    line = node.start_mark.line + 1
    budget[0] -= 1
    if budget[0] < 0:
        return N(SCALAR, None, line)
    if isinstance(node, yaml.ScalarNode):
        try:
            value = loader.construct_object(node, deep=True)
        except yaml.constructor.ConstructorError as exc:
            report(line, path, f"cannot read value: {exc.problem}")
            value = node.value
        return N(SCALAR, value, line, node.value)
    if id(node) in active:  # an alias pointing into its own anchor: *a inside &a
        report(line, path, "recursive alias")
        return N(SCALAR, None, line)
    active = active | {id(node)}
    if isinstance(node, yaml.SequenceNode):
        return N(SEQ, [_walk(n, loader, report, join(path, i), active, budget)
                       for i, n in enumerate(node.value)], line)
    # mapping: duplicates among the keys written here; merged keys come first, then these
    seen: dict[str, int] = {}
    for key_node, _ in node.value:
        if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
            key = key_node.value
            kl = key_node.start_mark.line + 1
            if key in seen:
                report(kl, join(path, key), f"duplicate key (first defined on line {seen[key]})")
            else:
                seen[key] = kl
    loader.flatten_mapping(node)
    entries: dict[str, Entry] = {}
    for key_node, value_node in node.value:
        kl = key_node.start_mark.line + 1
        key = loader.construct_object(key_node, deep=True) if isinstance(key_node, yaml.ScalarNode) else None
        if not isinstance(key, str):
            shown = key_node.value if isinstance(key_node, yaml.ScalarNode) else "a collection"
            report(kl, path, f"keys must be strings, got {shown}")
            continue
        child = _walk(value_node, loader, report, join(path, key), active, budget)
        if child.kind != SCALAR:
            child.line = kl  # "services.web: ..." points at the line of "web:"
        entries[key] = Entry(kl, child)
    return N(MAP, entries, line)


def from_plain(value: Any) -> N:
    """Wrap plain data (parsed JSON) as an unlocated tree; non-string keys stay as given."""
    if isinstance(value, (list, tuple)):
        return N(SEQ, [from_plain(v) for v in value], None)
    if isinstance(value, dict):
        return N(MAP, {str(k): Entry(None, from_plain(v)) for k, v in value.items()}, None)
    return N(SCALAR, value, None)
