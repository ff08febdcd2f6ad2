"""The rollout commands against a running `meshlet up` (process runtime): apply a new
revision and follow it with `rollout status`, `rollback` to the previous one, and
`restart` every replica; answers through the proxy show which revision serves."""

from __future__ import annotations

import pytest

import json
import queue
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import yaml

from _util import cli_env, free_port, kill_leftovers, stop_process, wait_for

pytestmark = pytest.mark.slow   # real processes, sockets or engines (tests/conftest.py)

REPO = Path(__file__).resolve().parents[2]
HELLO = REPO / "config" / "examples" / "apps" / "hello.py"


def write(path: Path, ports: dict[str, int], greeting: str) -> None:
    doc = {
        "mesh": {
            "catalog_listen": f"127.0.0.1:{ports['catalog']}",
            "admin_listen": f"127.0.0.1:{ports['admin']}",
            "data_dir": str(path.parent / "state"),
            "vip_range": "127.92.0.0/24",
            "dns": {"listen": [f"127.0.0.1:{ports['dns']}"]},
            "proxy": {"listen": [f"127.0.0.1:{ports['proxy']}"],
                      "admin_listen": f"127.0.0.1:{ports['proxy_admin']}"},
            "nodes": [{"name": "local", "runtime": "process"}],
        },
        "services": {"web": {
            "command": [sys.executable, str(HELLO)], "replicas": 3, "ports": [{"name": "http"}],
            "env": {"GREETING": greeting}, "stop_grace_period": "2s",
            "update": {"drain_delay": "0s"},
            "probes": {"readiness": {"http": {"path": "/healthz"}, "period": "0.2s"}},
        }},
    }
    path.write_text(yaml.safe_dump(doc))


def meshlet(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = cli_env()
    return subprocess.run([sys.executable, "-m", "supervisor", *args], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=timeout)


def test_status_rollback_and_restart_on_a_running_mesh(tmp_path) -> None:
    ports = {k: free_port() for k in ("catalog", "admin", "dns", "proxy", "proxy_admin")}
    path = tmp_path / "meshlet.yaml"
    write(path, ports, "v1")
    url = f"http://127.0.0.1:{ports['catalog']}"
    proc = subprocess.Popen([sys.executable, "-m", "supervisor", "up", "-f", str(path)],
                            cwd=str(REPO), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(ln) for ln in proc.stdout], daemon=True).start()

    def ready() -> bool:
        while True:
            try:
                if "web: 3/3 ready" in lines.get_nowait():
                    return True
            except queue.Empty:
                return False

    def greetings() -> set[str]:
        """The greeting of 12 answers through the proxy."""
        out = set()
        for _ in range(12):
            req = urllib.request.Request(f"http://127.0.0.1:{ports['proxy']}/", headers={"Host": "web.service.meshlet"})
            with urllib.request.urlopen(req, timeout=5) as r:
                out.add(r.read().decode().split(" from ")[0])
        return out

    def instances() -> dict[str, str]:
        """Passing instance id -> Meta revision."""
        token = (path.parent / "state" / "catalog" / "management-token").read_text().strip()
        req = urllib.request.Request(f"{url}/v1/health/service/web", headers={"X-Consul-Token": token})
        with urllib.request.urlopen(req, timeout=5) as r:
            entries = json.load(r)
        return {e["Service"]["ID"]: e["Service"]["Meta"]["revision"] for e in entries
                if all(c["Status"] == "passing" for c in e["Checks"])}

    def status() -> subprocess.CompletedProcess:
        r = meshlet("rollout", "status", "web", "-f", str(path), "--timeout", "90s")
        assert r.returncode == 0, (r.stdout, r.stderr)
        return r

    try:
        wait_for(ready, timeout=90, interval=0.1)
        wait_for(lambda: greetings() == {"v1"}, timeout=20, interval=0.2)

        write(path, ports, "v2")
        r = meshlet("apply", "-f", str(path))
        assert r.returncode == 0, r.stderr
        done = status().stdout.splitlines()[-1]
        assert done.startswith("rollout of web to revision ") and done.endswith(" complete")
        assert greetings() == {"v2"} and len(instances()) == 3

        r = meshlet("rollout", "history", "web", "-f", str(path))
        assert r.returncode == 0, r.stderr
        rows = [ln.split() for ln in r.stdout.splitlines()[1:]]
        assert [row[2] for row in rows][-2:] == ["complete", "complete"], r.stdout
        assert r.stdout.splitlines()[-1].endswith("env (GREETING)")

        r = meshlet("rollback", "web", "-f", str(path))
        assert r.returncode == 0, r.stderr
        status()
        assert greetings() == {"v1"}

        before = instances()
        r = meshlet("restart", "web", "-f", str(path), "--wait", "--timeout", "90s")
        assert r.returncode == 0, (r.stdout, r.stderr)
        assert r.stdout.splitlines()[-1].endswith(" complete")
        after = wait_for(lambda: (i := instances()) and len(i) == 3 and i, timeout=10)
        assert not set(after) & set(before), (before, after)    # every replica replaced
        assert greetings() == {"v1"}
    finally:
        code = stop_process(proc, timeout=60)
        kill_leftovers(tmp_path / "state")
    assert code == 0
