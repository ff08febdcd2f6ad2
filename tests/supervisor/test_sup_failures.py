"""What a user sees when a replica fails: the reason and the last lines it wrote, in
`meshlet status` (text and JSON), `meshlet logs --previous` and a failed rollout's reason."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from _util import async_wait_for, cli_env
from supervisor.commands.admin_client import format_status
from supervisor.daemon.admin import AdminServer

pytestmark = pytest.mark.slow   # real processes, sockets (tests/conftest.py)

APPS = Path(__file__).resolve().parent / "apps"
MISSING = "/nonexistent/apps/nosuch.py"


def yaml_of(command: list[str], replicas: int = 1) -> str:
    return textwrap.dedent(f"""\
        services:
          web:
            command: {command!r}
            replicas: {replicas}
            ports: [{{name: http}}]
            update: {{drain_delay: 0s, progress_deadline: 20s}}
            restart: {{backoff: {{initial: 0.2s, max: 1s}}}}
            probes:
              readiness: {{http: {{path: /ready}}, period: 0.1s}}
        """).replace("'", '"')


def failing(sup) -> list[dict]:
    return next(s for s in sup.status()["services"] if s["name"] == "web")["failing"]


def meshlet(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).parent / "meshlet"), *args], capture_output=True, text=True,
                          timeout=60, env=cli_env())


async def test_a_command_that_cannot_start_shows_why_in_status_and_logs_previous(mesh):
    await mesh.apply(yaml_of([sys.executable, MISSING]))
    sup = await mesh.start()
    await async_wait_for(lambda: failing(sup) and failing(sup)[0]["line"], timeout=20, what="a kept exit")
    (f,) = failing(sup)
    assert f["slot"] == 0 and f["code"] == 2
    assert "can't open file" in f["line"] and MISSING in f["line"]
    web = next(s for s in sup.status()["services"] if s["name"] == "web")
    assert any(MISSING in line for e in web["last_exits"] for line in e["lines"])
    text = "\n".join(format_status(sup.status()))
    assert "slot 0: exited with code 2" in text and "can't open file" in text and "--previous" in text

    admin = AdminServer(sup, on_down=lambda: None)
    address = await admin.start("127.0.0.1:0")
    try:
        done = await asyncio.to_thread(meshlet, "logs", "web", "--previous", "--admin", address)
        assert done.returncode == 0, done.stderr
        head, _, body = done.stdout.partition("\n")
        assert head.startswith("==> web-0-") and "exited with code 2" in head
        assert "can't open file" in body
        missing = await asyncio.to_thread(meshlet, "logs", "nope", "--previous", "--admin", address)
        assert missing.returncode == 1 and "no exited replica of service 'nope'" in missing.stderr
    finally:
        await admin.close()


async def test_a_rollout_that_crashes_fails_with_the_last_line_it_wrote(mesh):
    good = [sys.executable, str(APPS / "flaky.py")]
    await mesh.apply(yaml_of(good))
    sup = await mesh.start()
    await async_wait_for(lambda: "web" in sup.rollouts.states and sup.rollouts.states["web"].phase == "complete",
                         timeout=20)
    first = sup.rollouts.states["web"].revision
    await mesh.apply(yaml_of([sys.executable, MISSING]))
    await async_wait_for(lambda: sup.rollouts.states["web"].revision == first
                         and sup.rollouts.states["web"].phase == "complete"
                         and sup.rollouts.states["web"].reverted_from, timeout=30, what="the revert")
    reason = sup.rollouts.states["web"].reason
    assert "(last exit: code 2: " in reason and "can't open file" in reason and MISSING in reason, reason


async def test_a_replica_no_node_can_hold_is_pending_and_explain_says_why(mesh):
    """Two nodes of 1 and 2 CPUs; slot 0 asks for 1.5: only `big` holds it. `meshlet
    explain` shows the other filtered out with the reason; a service asking for more than
    any node has stays pending, and status and explain say why."""
    import config
    from supervisor.daemon.supervisor import Supervisor
    text = yaml_of([sys.executable, str(APPS / "flaky.py")])
    await mesh.apply(text.replace("replicas: 1", "replicas: 1\n    resources: {requests: {cpu: 1.5}}")
                     + text.replace("web:", "huge:").replace("services:\n", "")
                     .replace("replicas: 1", "replicas: 1\n    resources: {requests: {cpu: 8}}"))
    nodes = [config.NodeSpec(name="small", runtime="process", capacity=config.NodeCapacity(cpu=1.0)),
             config.NodeSpec(name="big", runtime="process", capacity=config.NodeCapacity(cpu=2.0))]
    mesh.sup = sup = Supervisor(mesh.access, nodes, mesh.data_dir, resync=1.0)
    await sup.start()
    await async_wait_for(lambda: any(r["ready"] for s in sup.status()["services"] if s["name"] == "web"
                                     for r in s["instances"]), timeout=30, what="web ready")
    await async_wait_for(lambda: next((s["problem"] for s in sup.status()["services"] if s["name"] == "huge"), None),
                         timeout=30, what="huge's pending reason")
    huge = next(s for s in sup.status()["services"] if s["name"] == "huge")
    assert huge["ready"] == 0 and "cpu" in huge["problem"], huge["problem"]

    admin = AdminServer(sup, on_down=lambda: None)
    address = await admin.start("127.0.0.1:0")
    try:
        done = await asyncio.to_thread(meshlet, "explain", "web", "--admin", address)
        assert done.returncode == 0, done.stderr
        lines = done.stdout.splitlines()
        assert lines[0] == "web: 1 replica"
        assert lines[1].startswith("slot 0: big; placement now: big")
        assert any(line.startswith("  * big: fit") for line in lines), lines
        assert any(line.startswith("    small: filtered out:") and "cpu" in line for line in lines), lines
        pending = await asyncio.to_thread(meshlet, "explain", "huge", "--admin", address)
        assert pending.returncode == 0 and "slot 0: not running; pending: no node can hold it" in pending.stdout
        assert pending.stdout.count("filtered out:") == 2, pending.stdout
        missing = await asyncio.to_thread(meshlet, "explain", "nope", "--admin", address)
        assert missing.returncode == 1 and "no service 'nope' is desired" in missing.stderr
        nodes = await asyncio.to_thread(meshlet, "node", "ls", "--admin", address)
        assert nodes.returncode == 0, nodes.stderr
        # memory is not declared: the process runtime offers the host's
        from supervisor.runtime.process import host_capacity
        host_mem = f"{host_capacity().memory / 2**20:g}Mi"
        assert [line.split() for line in nodes.stdout.splitlines()] == [
            ["NODE", "STATE", "RUNTIME", "ADDRESS", "REPLICAS", "CPU", "REQUESTED", "MEMORY", "REQUESTED"],
            ["small", "ready", "process", "127.0.0.1", "0", "0", "of", "1", "0Mi", "of", host_mem],
            ["big", "ready", "process", "127.0.0.1", "1", "1.5", "of", "2", "0Mi", "of", host_mem]]
    finally:
        await admin.close()


async def test_a_pending_replica_is_placed_as_soon_as_room_appears(mesh):
    """One node of 2 CPUs, two services asking 1.5 each: the second waits, with the reason,
    and starts when the first is scaled to 0, without waiting for a periodic resync."""
    import config
    from supervisor.daemon.supervisor import Supervisor
    text = yaml_of([sys.executable, str(APPS / "flaky.py")]).replace(
        "replicas: 1", "replicas: 1\n    resources: {requests: {cpu: 1.5}}")
    second = text.replace("web:", "later:").replace("services:\n", "")
    await mesh.apply(text + second)
    nodes = [config.NodeSpec(name="only", runtime="process", capacity=config.NodeCapacity(cpu=2.0))]
    mesh.sup = sup = Supervisor(mesh.access, nodes, mesh.data_dir, resync=600.0)   # no periodic help

    def service(name: str) -> dict:
        return next(s for s in sup.status()["services"] if s["name"] == name)
    await sup.start()
    await async_wait_for(lambda: service("web")["ready"] == 1 or service("later")["ready"] == 1, timeout=30)
    first, waiting = ("web", "later") if service("web")["ready"] == 1 else ("later", "web")
    await async_wait_for(lambda: service(waiting)["problem"], timeout=10, what="the pending reason")
    assert "cpu" in service(waiting)["problem"]
    await mesh.apply(_with_replicas(text + second, first, 0))
    await async_wait_for(lambda: service(waiting)["ready"] == 1, timeout=30, what=f"{waiting} placed once room appeared")
    assert service(waiting)["problem"] is None


def _with_replicas(text: str, name: str, n: int) -> str:
    """``text`` with service ``name``'s replicas set to ``n``."""
    head, _, rest = text.partition(f"  {name}:\n")
    return head + f"  {name}:\n" + rest.replace("replicas: 1", f"replicas: {n}", 1)
