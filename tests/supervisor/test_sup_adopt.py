"""A supervisor process killed with SIGKILL and started again adopts what runs."""

from __future__ import annotations

import pytest

import json
import os
import signal
import sys
import urllib.request
from pathlib import Path

from _util import async_wait_for, start_server, stop_process
from _util import cli_env, kill_leftovers, pid_alive

pytestmark = pytest.mark.slow   # real processes, sockets or engines (tests/conftest.py)

REPO = Path(__file__).resolve().parents[2]


def start_supervisor(url: str, data_dir: Path, *extra: str):
    proc, ready = start_server([sys.executable, "-m", "supervisor", "supervisor", "--consul", url,
                                "--data-dir", str(data_dir), "--admin", "127.0.0.1:0",
                                "--runtime", "process", *extra], cwd=str(REPO), env=cli_env())
    return proc, ready["admin"]


def status(admin: str) -> dict:
    with urllib.request.urlopen(f"http://{admin}/v1/status", timeout=5) as r:
        return json.load(r)


def web_rows(admin: str) -> list[dict]:
    for s in status(admin)["services"]:
        if s["name"] == "web":
            return s["instances"]
    return []


async def test_kill9_supervisor_then_restart_adopts_everything(mesh):
    await mesh.apply(mesh.service_yaml(replicas=2, probes="""\
        probes:
          readiness: {http: {path: /ready}, period: 0.2s}
        """))
    data = mesh.tmp / "sup"
    proc, admin = start_supervisor(mesh.url, data)
    try:
        await async_wait_for(lambda: len([r for r in web_rows(admin) if r["ready"]]) == 2, timeout=20)
        await async_wait_for(lambda: _passing(mesh, 2), timeout=10)
        # one crash first: its restart count must survive the supervisor
        os.kill(web_rows(admin)[0]["pid"], signal.SIGKILL)
        await async_wait_for(lambda: [r["restarts"] for r in web_rows(admin) if r["ready"]] == [1, 0],
                             timeout=20)
        await async_wait_for(lambda: _passing(mesh, 2), timeout=10)
        before = {r["id"]: r["pid"] for r in web_rows(admin)}
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        assert all(pid_alive(p) for p in before.values()), "workloads outlive their supervisor"

        proc, admin = start_supervisor(mesh.url, data, "--stop-on-exit")
        # The new supervisor has observed, adopted and synced once it reports both ready
        # (ready is seeded from the catalog's passing checks, then re-probed).
        await async_wait_for(lambda: len([r for r in web_rows(admin) if r["ready"]]) == 2, timeout=20)
        after = {r["id"]: r["pid"] for r in web_rows(admin)}
        assert after == before, "nothing restarted, nothing duplicated"
        assert [r["restarts"] for r in web_rows(admin)] == [1, 0]
        assert sorted(await mesh.passing("web")) == sorted(before)
        assert len(list((data / "nodes" / "local" / "instances").glob("*.json"))) == 2
    finally:
        stop_process(proc)
        kill_leftovers(data)
    # --stop-on-exit: SIGTERM deregistered and stopped the workloads
    assert await mesh.health("web") == {}
    assert not any(pid_alive(p) for p in before.values())


async def _passing(mesh, n):
    return len(await mesh.passing("web")) == n
