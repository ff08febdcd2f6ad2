"""Entry points that read input: ``load``, ``loads`` and ``ServiceSpec.from_dict``.

Each builds a located tree, converts it in one pass that collects every issue, and raises
one ConfigError (issues in file order) if anything was wrong.
"""

from __future__ import annotations

import os
from typing import Any

from . import _checks  # noqa: F401  (registers the cross-field hooks)
from ._convert import INVALID, Ctx, describe_node, raise_issues, read_part, read_plain, struct
from ._errors import ConfigError, ConfigIssue
from ._model import LISTENER, MeshConfig, ProxyListener, ServiceSpec, UpstreamTls
from ._tree import MAP, N, from_yaml

__all__ = ["load", "loads", "service_from_plain", "locate", "proxy_listener", "upstream_tls",
           "proxy_listener_arg", "upstream_tls_arg"]

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


# --- the proxy's command-line options, written as in meshlet.yaml ------------------------

def _flow(text: str, source: str) -> Any:
    import yaml
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError([ConfigIssue(source, None, "", f"invalid YAML/JSON {text!r}: {exc}")]) from None


def proxy_listener(text: str, source: str = "--listen", base_dir: str | None = None) -> ProxyListener:
    """A ``--listen`` value: ``HOST:PORT``, or one ``mesh.proxy.listen`` item as a YAML
    or JSON mapping (``{address: 127.0.0.1:8443, tls: {cert_file: c.pem, key_file: k.pem}}``).
    Relative paths: against ``base_dir`` (default: the current directory). ConfigError."""
    data = _flow(text, source) if text.lstrip().startswith("{") else text
    return read_part(LISTENER, data, source, base_dir=base_dir if base_dir is not None else os.getcwd())


def upstream_tls(text: str, source: str = "--upstream-tls", base_dir: str | None = None) -> UpstreamTls:
    """An ``--upstream-tls`` value: one ``mesh.proxy.upstream_tls`` item as a YAML or JSON
    mapping (``{service: api, ca_file: ca.pem}``). ConfigError."""
    return read_part(struct(UpstreamTls), _flow(text, source), source,
                     base_dir=base_dir if base_dir is not None else os.getcwd())


def proxy_listener_arg(listener: ProxyListener) -> str:
    """The ``--listen`` value that reads back as ``listener`` (its address alone when plain)."""
    import json
    from ._model import to_plain
    return listener.address if listener.tls is None else json.dumps(to_plain(listener), separators=(",", ":"))


def upstream_tls_arg(item: UpstreamTls) -> str:
    """The ``--upstream-tls`` value that reads back as ``item``."""
    import json
    from ._model import to_plain
    return json.dumps(to_plain(item), separators=(",", ":"))


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
