"""Fixtures shared by every test directory.

``catalog``: a real embedded catalog process (``python -m discovery.catalog``) on a free
loopback port with its own data dir, stopped after the test. The object it yields:

    .url        "http://127.0.0.1:PORT"          .host, .port, .data_dir, .proc
    .client(**kw)      a sync ``consul.Consul(host, port)`` pointed at it
    .kill(sig=SIGKILL) signal the process and wait for it to exit
    .stop()            SIGTERM and wait; returns the exit code
    .restart()         stop it (SIGTERM) if running, start again on the same data dir,
                       keeping the port when the OS still lets us bind it (check .port)

``catalog_factory(*extra_args)``: the same with extra command-line arguments, e.g.
``catalog_factory("--session-ttl-min", "1s")``; every catalog started is stopped at the end.

The async client (``consul.aio.Consul``) must be built inside a running loop, so tests
build it themselves: ``consul.aio.Consul(host=catalog.host, port=catalog.port)``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from _util import ServerStartError, start_server, stop_process  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


class CatalogProcess:
    """A running ``python -m discovery.catalog`` (see the module docstring)."""

    def __init__(self, data_dir: Path, extra_args: tuple[str, ...] = ()) -> None:
        self.data_dir = Path(data_dir)
        self.extra_args = tuple(extra_args)
        self.host = "127.0.0.1"
        self.port = 0
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<CatalogProcess {self.url} {state} data_dir={self.data_dir}>"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def argv(self, port: int) -> list[str]:
        return [
            sys.executable, "-m", "discovery.catalog",
            "--listen", f"{self.host}:{port}",
            "--data-dir", str(self.data_dir),
            *self.extra_args,
        ]

    def start(self, port: int = 0) -> "CatalogProcess":
        self.proc, ready = start_server(self.argv(port), cwd=str(REPO))
        host, _, bound = ready["http"].rpartition(":")
        self.host, self.port = host, int(bound)
        return self

    def kill(self, sig: int = signal.SIGKILL) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=15)

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        return stop_process(self.proc)

    def restart(self) -> "CatalogProcess":
        if self.running:
            self.stop()
        port = self.port
        for _ in range(20):
            try:
                return self.start(port)
            except ServerStartError:
                time.sleep(0.1)  # the port may still be held for a moment; try again
        return self.start(0)

    def client(self, **kwargs) -> "consul.Consul":  # noqa: F821
        import consul

        return consul.Consul(host=self.host, port=self.port, **kwargs)


@pytest.fixture
def catalog_factory(tmp_path: Path) -> Iterator[Callable[..., CatalogProcess]]:
    started: list[CatalogProcess] = []

    def make(*extra_args: str, data_dir: Path | None = None) -> CatalogProcess:
        d = data_dir or tmp_path / f"catalog{len(started)}"
        cat = CatalogProcess(d, extra_args).start()
        started.append(cat)
        return cat

    yield make
    for cat in started:
        cat.stop()


@pytest.fixture
def catalog(catalog_factory: Callable[..., CatalogProcess]) -> CatalogProcess:
    return catalog_factory()
