"""How meshlet's processes are started and how they log: one convention for all of them.

- ``module_argv(module, *args)``: the command line of a meshlet component run as a child
  (``python -P -m discovery.dns ...``). ``-P`` keeps the working directory off the child's
  import path, so a user's ``config.py`` or ``proxy.py`` beside their meshlet.yaml is never
  imported in place of meshlet's own modules.
- ``die_with_parent()``: Linux ``PR_SET_PDEATHSIG``: the calling process gets SIGTERM when
  its parent dies, even by SIGKILL (for children that must not outlive their parent).
- ``setup_logging(level)``: stderr, one format, for every command and component.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Callable

__all__ = ["add_catalog_arguments", "TOKEN_ENV", "TOKEN_FILE_ENV", "CA_ENV", "CERT_ENV", "KEY_ENV", "module_argv", "die_with_parent", "die_with_parent_preexec", "setup_logging",
           "LOG_FORMAT", "DEFAULT_DOCKER_ENGINE"]

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Docker's own default engine address (dockerd -H, the docker CLI's DOCKER_HOST default).
DEFAULT_DOCKER_ENGINE = "unix:///var/run/docker.sock"
_PR_SET_PDEATHSIG = 1


def module_argv(module: str, *args: str) -> list[str]:
    """``[python, -P, -m, module, *args]`` with this interpreter."""
    return [sys.executable, "-P", "-m", module, *args]


def _prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes
        return ctypes.CDLL(None, use_errno=True).prctl  # type: ignore[no-any-return]
    except (OSError, AttributeError):
        return None


def die_with_parent() -> None:
    """Ask for SIGTERM when the parent process dies (Linux; elsewhere nothing)."""
    prctl = _prctl()
    if prctl is not None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def die_with_parent_preexec() -> Callable[[], None] | None:
    """A ``preexec_fn`` doing ``die_with_parent`` in the child between fork and exec. prctl
    is looked up here, in the parent: the forked child only calls it. If the parent died
    before the call took effect, the child exits at once."""
    prctl = _prctl()
    if prctl is None:
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:
            os._exit(0)
    return preexec


def setup_logging(level: str | int = "INFO") -> None:
    """Log to stderr in meshlet's format at ``level`` (a name like ``"info"`` or a number)."""
    if isinstance(level, str):
        level = level.upper()
    logging.basicConfig(level=level, stream=sys.stderr, format=LOG_FORMAT)


# The variables Consul's own CLI reads (and meshlet's components with it).
TOKEN_ENV, TOKEN_FILE_ENV = "CONSUL_HTTP_TOKEN", "CONSUL_HTTP_TOKEN_FILE"
CA_ENV, CERT_ENV, KEY_ENV = "CONSUL_CACERT", "CONSUL_CLIENT_CERT", "CONSUL_CLIENT_KEY"


def add_catalog_arguments(p: argparse.ArgumentParser, *, default_url: str = "http://127.0.0.1:8500",
                          url_required: bool = False) -> None:
    """``--consul URL``, ``--token-file``, ``--ca-file``, ``--cert-file``, ``--key-file``
    for a component run alone; the token itself is never an argument (argv is public:
    /proc/<pid>/cmdline): $CONSUL_HTTP_TOKEN or a file."""
    if url_required:
        p.add_argument("--consul", required=True, metavar="URL", help="the catalog (Consul HTTP API) URL")
    else:
        p.add_argument("--consul", default=os.environ.get("CONSUL_HTTP_ADDR") or default_url, metavar="URL",
                       help=f"catalog (Consul HTTP API) URL (default $CONSUL_HTTP_ADDR or {default_url})")
    p.add_argument("--token-file", metavar="FILE",
                   help=f"file holding the catalog's ACL token (default ${TOKEN_ENV}, else ${TOKEN_FILE_ENV})")
    p.add_argument("--ca-file", metavar="FILE", help=f"CA certificate of an https catalog (default ${CA_ENV})")
    p.add_argument("--cert-file", metavar="FILE", help=f"client certificate for an https catalog (default ${CERT_ENV})")
    p.add_argument("--key-file", metavar="FILE", help=f"its private key (default ${KEY_ENV})")
