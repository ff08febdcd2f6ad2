"""Entry points that read input: ``load``, ``loads`` and ``ServiceSpec.from_dict``.

Each builds a located tree, converts it in one pass that collects every issue, and raises
one ConfigError (issues in file order) if anything was wrong.
"""

from __future__ import annotations

import os
from typing import Any

from . import _checks  # noqa: F401  (registers the cross-field hooks)
from ._convert import INVALID, Ctx, describe_node, raise_issues, read_plain, struct
from ._errors import ConfigError, ConfigIssue
from ._model import MeshConfig, ServiceSpec
from ._tree import MAP, N, from_yaml

__all__ = ["load", "loads", "service_from_plain", "locate"]

_TOP_NAMED = ("volumes", "configs", "secrets")


def load(path: str | os.PathLike[str]) -> MeshConfig:
    """Read and validate a meshlet.yaml. Relative paths inside it are taken relative to
    its directory. Raises ConfigError listing every problem (also when unreadable)."""
    name = os.fspath(path)
    try:
        with open(name, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ConfigError([ConfigIssue(name, None, "", f"cannot read: {exc.strerror or exc}")]) from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError([ConfigIssue(name, line, "", "not UTF-8 text")]) from None
    return loads(text, filename=name, base_dir=os.path.dirname(os.path.abspath(name)))


def loads(text: str, filename: str = "<string>", base_dir: str | None = None) -> MeshConfig:
    """Validate YAML text; ``filename`` is used in messages only. Relative paths are
    resolved against ``base_dir`` (default: the current directory)."""
    cx = Ctx(filename, os.path.abspath(base_dir) if base_dir is not None else os.getcwd())
    root = from_yaml(text, cx.report)
    result: Any = INVALID
    if root is not None:
        if root.is_null:
            root = N(MAP, {}, 1)
        if root.kind != MAP:
            cx.error(root.line, "", "expected a mapping with keys mesh, services, volumes, "
                                    f"configs and secrets, got {describe_node(root)}")
        else:
            cx.names = {kind: _keys(root.get(kind)) for kind in _TOP_NAMED}
            result = struct(MeshConfig)(root, cx, "")
    raise_issues(cx)
    return result


def _keys(n: N | None) -> frozenset[str]:
    return frozenset(n.value) if n is not None and n.kind == MAP else frozenset()


def service_from_plain(data: Any, source: str, path: str = "") -> ServiceSpec:
    """A ServiceSpec from plain data (parsed JSON); references are not checked."""
    return read_plain(ServiceSpec, data, source, path)



def locate(path: str | os.PathLike[str], *keys: str | int) -> int | None:
    """The line of the value at ``keys`` (``"secrets", "token", "file"``) in the YAML file
    at ``path``: the deepest one found along them. None when the file cannot be read.
    For messages about what a loaded file names (a secret file that is missing, ...)."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            root = from_yaml(f.read(), lambda *_: None)
    except (OSError, UnicodeDecodeError):
        return None
    from ._checks import line_of
    return line_of(root, *keys) if root is not None else None
