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

import logging
import os
import signal
import sys
from collections.abc import Callable

__all__ = ["module_argv", "die_with_parent", "die_with_parent_preexec", "setup_logging",
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
