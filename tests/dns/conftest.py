"""Fixtures of the DNS tests: a real ``python -m discovery.dns`` reading a real catalog.

``dns_server(*extra_args, catalog=...)`` starts the DNS server against the ``catalog``
fixture (or the catalog given) and returns a ``DnsProcess``; every server started is
stopped at the end of the test with SIGTERM, and must exit 0.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, Iterator

import pytest

from _util import start_server, stop_process

from _dnstest import DnsProcess

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def dns_server(catalog) -> Iterator[Callable[..., DnsProcess]]:
    started: list[DnsProcess] = []

    def start(*extra: str, catalog_url: str | None = None, listen: str = "127.0.0.1:0") -> DnsProcess:
        argv = [sys.executable, "-m", "discovery.dns", "--listen", listen,
                "--consul", catalog_url or catalog.url, "--log-level", "DEBUG", *extra]
        proc, ready = start_server(argv, cwd=str(REPO), timeout=30, env=catalog.env())
        server = DnsProcess(proc, ready)
        started.append(server)
        return server

    yield start
    codes = [stop_process(s.proc) for s in started]
    assert codes == [0] * len(started), f"dns server exit codes on SIGTERM: {codes}"
