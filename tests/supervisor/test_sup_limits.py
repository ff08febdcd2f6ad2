"""Requests and limits reach the right places: the runtime enforces a replica's limits
(its requests are only what placement reserves)."""

from __future__ import annotations

import pytest

from _util import async_wait_for

pytestmark = pytest.mark.slow   # real processes and a real catalog (tests/conftest.py)

MiB = 2**20


def address_space_limit(pid: int) -> str:
    """The soft RLIMIT_AS of ``pid`` as /proc shows it (bytes, or "unlimited")."""
    with open(f"/proc/{pid}/limits") as f:
        line = next(line for line in f if line.startswith("Max address space"))
    return line.split()[3]


async def test_a_process_replica_runs_under_its_memory_limit_not_its_request(mesh):
    # A request of 1 MiB as the limit would stop Python before it started: the replica
    # serving at all already says the request was not enforced; /proc says what was.
    await mesh.apply(mesh.service_yaml(replicas=1, extra="""\
        resources: {requests: {memory: 1Mi}, limits: {memory: 768Mi}}
        """))
    await mesh.start()
    await async_wait_for(lambda: len(mesh.running("web")) == 1, timeout=15)
    (obs,) = mesh.running("web").values()
    assert address_space_limit(obs.pid) == str(768 * MiB)
