"""``HOST:PORT`` text: the one parser and the one formatter every component uses.

Forms: ``127.0.0.1:8600``, ``[::1]:53``, ``localhost:80``; with ``default_port`` also a
bare ``HOST``, ``[V6]`` or ``V6`` address. Port 0 is allowed ("any free port", which
servers bind and report back).
"""

from __future__ import annotations

__all__ = ["split_hostport", "join_hostport"]


def split_hostport(text: str, default_port: int | None = None, *,
                   default_host: str | None = None) -> tuple[str, int]:
    """``(host, port)`` of ``text``; ValueError saying what was expected.

    ``default_port``: the port of a text without one (None: a port is required).
    ``default_host``: the host of ``:PORT`` (None: a host is required)."""
    raw = text
    text = text.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"expected [IPv6]:PORT, got {raw!r}")
        port_text = rest[1:] if rest else ""
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    elif ":" in text:
        host, port_text = text, ""        # a bare IPv6 address
    else:
        host, port_text = text, ""
    if not host:
        if default_host is None:
            raise ValueError(f"expected HOST:PORT, got {raw!r}")
        host = default_host
    if not port_text:
        if default_port is None or (":" in text and not text.startswith("[") and text.count(":") == 1):
            raise ValueError(f"expected HOST:PORT, got {raw!r}")
        return host, default_port
    if not port_text.isdigit() or int(port_text) > 65535:
        raise ValueError(f"expected a port 0-65535 in {raw!r}")
    return host, int(port_text)


def join_hostport(host: str, port: int) -> str:
    """``host:port``, with an IPv6 address in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
