"""Fixtures shared by every test directory.

``catalog``: a real embedded catalog process (``python -m discovery.catalog``) on a free
loopback port with its own data dir, stopped after the test. The object it yields:

    .url        "http://127.0.0.1:PORT"          .host, .port, .data_dir, .proc
    .client(**kw)      a sync ``consul.Consul(host, port)`` pointed at it
    .kill(sig=SIGKILL) signal the process and wait for it to exit
    .stop()            SIGTERM and wait; returns the exit code
    .restart()         stop it (SIGTERM) if running, start again on the same data dir and port

``catalog_factory(*extra_args)``: the same with extra command-line arguments, e.g.
``catalog_factory("--session-ttl-min", "1s")``; every catalog started is stopped at the end.

The async client (``consul.aio.Consul``) must be built inside a running loop, so tests
build it themselves: ``consul.aio.Consul(host=catalog.host, port=catalog.port)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import pytest

from _util import CatalogProcess, free_port


@pytest.fixture
def catalog_factory(tmp_path: Path) -> Iterator[Callable[..., CatalogProcess]]:
    started: list[CatalogProcess] = []

    def make(*extra_args: str, data_dir: Path | None = None) -> CatalogProcess:
        d = data_dir or tmp_path / f"catalog{len(started)}"
        # a port outside the ephemeral range: a restart gets it back (nothing else takes it)
        cat = CatalogProcess(d, extra_args).start(free_port())
        started.append(cat)
        return cat

    yield make
    for cat in started:
        cat.stop()


@pytest.fixture
def catalog(catalog_factory: Callable[..., CatalogProcess]) -> CatalogProcess:
    return catalog_factory()


# --------------------------------------------------------------------------- the fast lane

SLOW = "slow"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", f"{SLOW}: starts processes, servers or engines, or opens sockets; left out of the "
                   f"fast lane (pytest -m 'not {SLOW}'), which runs the pure core in seconds")


def _fast_lane(config: pytest.Config) -> bool:
    return f"not {SLOW}" in (config.getoption("markexpr") or "")


@pytest.fixture(autouse=True)
def _fast_lane_does_no_io(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """In the fast lane a test that binds or connects a socket or starts a process fails at
    once, naming what it did: it belongs in the slow lane (``pytestmark = pytest.mark.slow``).
    So a slow test can never hide in the fast lane and make it slow."""
    if not _fast_lane(request.config):
        yield
        return
    import socket
    import subprocess

    def refuse(what: str):
        def call(*args: object, **kwargs: object) -> None:
            raise AssertionError(f"{what} in the fast lane: mark the module slow (pytestmark = pytest.mark.slow)")
        return call

    monkeypatch.setattr(socket.socket, "bind", refuse("socket bind"))
    monkeypatch.setattr(socket.socket, "connect", refuse("socket connect"))
    monkeypatch.setattr(socket.socket, "connect_ex", refuse("socket connect"))
    monkeypatch.setattr(subprocess.Popen, "__init__", refuse("a process started"))
    yield
