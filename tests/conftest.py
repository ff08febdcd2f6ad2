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
import sys
from pathlib import Path
from typing import Callable, Iterator

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from _util import CatalogProcess  # noqa: E402


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
