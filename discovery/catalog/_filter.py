"""The ``?filter=`` expressions of Consul's list endpoints (a go-bexpr subset). Pure.

Grammar::

    expr     := and_expr ("or" and_expr)*
    and_expr := unary ("and" unary)*
    unary    := "not" unary | "(" expr ")" | match
    match    := selector ("==" | "!=") value
              | selector ("contains" | "not contains" | "matches" | "not matches") value
              | selector "is" ["not"] "empty"
              | value ["not"] "in" selector
    selector := name ("." name | "[" string "]")*
    value    := "string" | `string` | number | true | false | bare-word

Selectors walk the JSON object an endpoint returns (``Service.Tags``, ``Node.Meta.env``,
``Meta["k"]``); a missing field is empty. Through a list, a match holds if it holds for
any element. ``in`` tests list membership, a substring, or a map key.

``compile_filter`` raises FilterError (400 ``Failed to create boolean expression
evaluator: ...``) for anything it cannot parse.
"""

from __future__ import annotations

import re
from typing import Any, Callable

from ._errors import BadRequest

__all__ = ["FilterError", "compile_filter", "apply_filter"]

Predicate = Callable[[Any], bool]

_TOKEN = re.compile(
    r"""\s*(?:
        (?P<str>"(?:[^"\\]|\\.)*")|(?P<raw>`[^`]*`)|(?P<op>==|!=|\(|\)|\[|\]|\.)|
        (?P<word>[A-Za-z0-9_\-:/+@*]+)
    )""",
    re.VERBOSE,
)


class FilterError(BadRequest):
    def __init__(self, detail: str) -> None:
        super().__init__(f"Failed to create boolean expression evaluator: {detail}")


def _tokenize(text: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    pos = 0
    text = text.rstrip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            raise FilterError(f"1:{pos + 1}: unexpected character {text[pos:pos + 1]!r}")
        kind = m.lastgroup or ""
        value = m.group(kind)
        if kind == "str":
            value = bytes(value[1:-1], "utf-8").decode("unicode_escape")
            kind = "value"
        elif kind == "raw":
            value, kind = value[1:-1], "value"
        out.append((kind, value))
        pos = m.end()
    return out


def _resolve(obj: Any, path: list[str]) -> list[Any]:
    """Every value at ``path`` (several when the path crosses a list)."""
    current = [obj]
    for name in path:
        nxt: list[Any] = []
        for item in current:
            items = item if isinstance(item, list) else [item]
            for it in items:
                if isinstance(it, dict):
                    if name in it:
                        nxt.append(it[name])
                    else:
                        lowered = {k.lower(): v for k, v in it.items()}
                        if name.lower() in lowered:
                            nxt.append(lowered[name.lower()])
        current = nxt
    return current


def _as_text(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return ""
    return str(v)


def _equal(field: Any, value: str) -> bool:
    if isinstance(field, list):
        return False
    if isinstance(field, bool):
        return _as_text(field) == value.lower()
    if isinstance(field, (int, float)):
        try:
            return float(value) == float(field)
        except ValueError:
            return False
    return _as_text(field) == value


def _contains(field: Any, value: str) -> bool:
    if isinstance(field, list):
        return any(_as_text(x) == value for x in field)
    if isinstance(field, dict):
        return value in field
    return value in _as_text(field)


def _empty(field: Any) -> bool:
    return field in (None, "", [], {}) or field == 0 and not isinstance(field, bool)


class _Parser:
    def __init__(self, tokens: list[tuple[str, str]]) -> None:
        self.t = tokens
        self.i = 0

    def peek(self, k: int = 0) -> tuple[str, str] | None:
        j = self.i + k
        return self.t[j] if j < len(self.t) else None

    def word(self, k: int = 0) -> str | None:
        tok = self.peek(k)
        return tok[1].lower() if tok and tok[0] == "word" else None

    def take(self) -> tuple[str, str]:
        tok = self.peek()
        if tok is None:
            raise FilterError("unexpected end of expression")
        self.i += 1
        return tok

    def expect(self, text: str) -> None:
        tok = self.take()
        if tok[1].lower() != text:
            raise FilterError(f"expected {text!r}, got {tok[1]!r}")

    def parse(self) -> Predicate:
        pred = self.expr()
        if self.peek() is not None:
            raise FilterError(f"unexpected {self.peek()[1]!r}")  # type: ignore[index]
        return pred

    def expr(self) -> Predicate:
        left = self.and_expr()
        while self.word() == "or":
            self.i += 1
            right = self.and_expr()
            left = (lambda a, b: lambda o: a(o) or b(o))(left, right)
        return left

    def and_expr(self) -> Predicate:
        left = self.unary()
        while self.word() == "and":
            self.i += 1
            right = self.unary()
            left = (lambda a, b: lambda o: a(o) and b(o))(left, right)
        return left

    def unary(self) -> Predicate:
        if self.word() == "not" and not (self.word(1) == "in"):
            self.i += 1
            inner = self.unary()
            return lambda o: not inner(o)
        tok = self.peek()
        if tok is not None and tok == ("op", "("):
            self.i += 1
            inner = self.expr()
            self.expect(")")
            return inner
        return self.match()

    def selector(self) -> list[str]:
        kind, name = self.take()
        if kind != "word":
            raise FilterError(f"expected a selector, got {name!r}")
        path = [name]
        while True:
            tok = self.peek()
            if tok == ("op", "."):
                self.i += 1
                kind, name = self.take()
                if kind != "word":
                    raise FilterError(f"expected a field name after '.', got {name!r}")
                path.append(name)
            elif tok == ("op", "["):
                self.i += 1
                kind, name = self.take()
                path.append(name)
                self.expect("]")
            else:
                return path

    def value(self) -> str:
        kind, text = self.take()
        if kind not in ("value", "word"):
            raise FilterError(f"expected a value, got {text!r}")
        return text

    def match(self) -> Predicate:
        tok = self.peek()
        # value [not] in selector
        if tok is not None and (tok[0] == "value" or self.word(1) == "in" or (self.word(1) == "not" and self.word(2) == "in")):
            value = self.value()
            negate = self.word() == "not"
            if negate:
                self.i += 1
            self.expect("in")
            path = self.selector()
            pred = lambda o: any(_contains(f, value) for f in _resolve(o, path))  # noqa: E731
            return (lambda o: not pred(o)) if negate else pred
        path = self.selector()
        w = self.word()
        op = self.peek()
        if op == ("op", "==") or op == ("op", "!="):
            self.i += 1
            value = self.value()
            eq = lambda o: any(_equal(f, value) for f in _resolve(o, path))  # noqa: E731
            return eq if op[1] == "==" else (lambda o: not eq(o))
        if w == "is":
            self.i += 1
            negate = self.word() == "not"
            if negate:
                self.i += 1
            self.expect("empty")
            empty = lambda o: all(_empty(f) for f in _resolve(o, path))  # noqa: E731
            return (lambda o: not empty(o)) if negate else empty
        negate = w == "not"
        if negate:
            self.i += 1
        verb = self.word()
        if verb == "contains":
            self.i += 1
            value = self.value()
            pred = lambda o: any(_contains(f, value) for f in _resolve(o, path))  # noqa: E731
        elif verb == "matches":
            self.i += 1
            try:
                rx = re.compile(self.value())
            except re.error as exc:
                raise FilterError(f"invalid regular expression: {exc}") from None
            pred = lambda o: any(isinstance(f, str) and rx.search(f) for f in _resolve(o, path))  # noqa: E731
        else:
            raise FilterError(f"expected an operator after selector {'.'.join(path)!r}")
        return (lambda o: not pred(o)) if negate else pred


def compile_filter(text: str) -> Predicate:
    if not text.strip():
        raise FilterError("1:1: no match found, expected: filter expression")
    return _Parser(_tokenize(text)).parse()


def apply_filter(items: list[Any], text: str | None) -> list[Any]:
    if text is None:
        return items
    pred = compile_filter(text)
    return [it for it in items if pred(it)]
