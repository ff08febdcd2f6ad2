"""The runtime contract, run unchanged against both runtimes: local processes and a real
Docker engine (tests/docker_env.py). Where the two differ by design (memory limits, the
exit code of an adopted process), the test states both outcomes."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from supervisor.runtime import (ExecTimeout, ImageNotFound, InstanceExists, InstanceNotFound,
                                InstanceNotRunning, InvalidSpec, StartFailed)

from _util import async_wait_for, free_port
from _runtime_kit import Kit, http_get, next_exit, read_logs

pytestmark = pytest.mark.slow   # real processes, sockets or engines (tests/conftest.py)

SLEEPER = "echo ready; exec sleep 1000"


def env_lines(body: str) -> set[str]:
    return set(body.splitlines())


async def wait_logged(kit: Kit, instance_id: str, text: str, timeout: float = 10.0) -> str:
    async def logged() -> str | None:
        out = await read_logs(kit.runtime, instance_id)
        return out if text in out else None
    return await async_wait_for(logged, timeout, what=f"{text!r} in the logs of {instance_id}")


async def test_start_serves_http_on_assigned_ports_with_env(kit: Kit) -> None:
    rt = kit.runtime
    http, admin = free_port(), free_port()
    spec = kit.spec(ports={"http": http, "admin-api": admin}, env={"GREETING": "hello"},
                    service="web", slot=3, revision="9f86d081884c", labels={"team": "a"})
    started = await rt.start(spec)
    assert started.instance_id == spec.instance_id and started.state == "running"

    body = await http_get(http, "/cgi-bin/env")
    lines = env_lines(body)
    assert f"instance={spec.instance_id}" in lines
    assert {f"PORT={http}", f"PORT_HTTP={http}", f"PORT_ADMIN_API={admin}", "GREETING=hello",
            "MESHLET_SERVICE=web", "MESHLET_SLOT=3", "MESHLET_REVISION=9f86d081884c",
            "MESHLET_NODE=local"} <= lines

    listed = {o.instance_id: o for o in await rt.list()}
    obs = listed[spec.instance_id]
    assert (obs.service, obs.slot, obs.revision, obs.node, obs.state) == \
        ("web", 3, "9f86d081884c", "local", "running")
    assert list(obs.ports.items()) == [("http", http), ("admin-api", admin)]
    assert dict(obs.labels) == {"team": "a"}
    assert obs.address == "127.0.0.1" and obs.pid and obs.exit_code is None
    assert obs.started_at and abs(obs.started_at - time.time()) < 60


async def test_kill9_of_the_workload_is_an_exit_event(kit: Kit) -> None:
    rt = kit.runtime
    events = rt.events()
    obs = await rt.start(kit.spec(SLEEPER))
    await wait_logged(kit, obs.instance_id, "ready")
    os.kill(obs.pid, signal.SIGKILL)

    event = await next_exit(events, obs.instance_id)
    assert event.observed is not None
    assert event.observed.state == "exited" and event.observed.exit_code == 137
    [listed] = [o for o in await rt.list() if o.instance_id == obs.instance_id]
    assert listed.state == "exited" and listed.exit_code == 137 and listed.finished_at


@pytest.mark.parametrize("stop_signal", ["SIGTERM", "SIGUSR1"])
async def test_stop_delivers_the_stop_signal_to_a_workload_that_handles_it(
        kit: Kit, stop_signal: str) -> None:
    rt = kit.runtime
    name = stop_signal[3:]
    script = (f"trap 'echo got-{name}; exit 0' {name}; echo ready; "
              "while true; do sleep 0.1; done")
    obs = await rt.start(kit.spec(script, stop_signal=stop_signal))
    await wait_logged(kit, obs.instance_id, "ready")

    await rt.stop(obs.instance_id, grace=20)

    [listed] = [o for o in await rt.list() if o.instance_id == obs.instance_id]
    assert listed.state == "exited" and listed.exit_code == 0   # its handler, not SIGKILL
    assert f"got-{name}" in await read_logs(rt, obs.instance_id)


async def test_stop_kills_a_workload_ignoring_the_signal_after_the_grace(kit: Kit) -> None:
    rt = kit.runtime
    obs = await rt.start(kit.spec("trap '' TERM; echo ready; while true; do sleep 0.1; done"))
    await wait_logged(kit, obs.instance_id, "ready")

    begun = time.monotonic()
    await rt.stop(obs.instance_id, grace=0.5)
    assert time.monotonic() - begun >= 0.45   # it was given its grace period first

    [listed] = [o for o in await rt.list() if o.instance_id == obs.instance_id]
    assert listed.state == "exited" and listed.exit_code == 137


async def test_stop_and_remove_are_idempotent(kit: Kit) -> None:
    rt = kit.runtime
    await rt.stop("never-started", grace=1)
    await rt.remove("never-started")
    spec = kit.spec(SLEEPER)
    obs = await rt.start(spec)
    await rt.stop(obs.instance_id, grace=0)
    await rt.stop(obs.instance_id, grace=0)
    await rt.remove(obs.instance_id)
    await rt.remove(obs.instance_id)
    assert obs.instance_id not in {o.instance_id for o in await rt.list()}
    with pytest.raises(InstanceNotFound):
        await read_logs(rt, obs.instance_id)
    # Removed means forgotten: the id can be used again.
    again = await rt.start(spec)
    assert again.state == "running"


async def test_a_second_start_of_an_instance_id_is_refused(kit: Kit) -> None:
    rt = kit.runtime
    spec = kit.spec(SLEEPER)
    first = await rt.start(spec)
    with pytest.raises(InstanceExists, match=spec.instance_id):
        await rt.start(spec)
    listed = [o for o in await rt.list() if o.instance_id == spec.instance_id]
    assert len(listed) == 1 and listed[0].state == "running" and listed[0].pid == first.pid
    # An exited instance still holds its id until it is removed.
    await rt.stop(spec.instance_id, grace=0)
    with pytest.raises(InstanceExists):
        await rt.start(spec)


async def test_a_fresh_runtime_adopts_running_instances_and_sees_their_exits(kit: Kit) -> None:
    port = free_port()
    web = await kit.runtime.start(kit.spec(ports={"http": port}, slot=0))
    worker = await kit.runtime.start(kit.spec(SLEEPER, service="worker", slot=1))
    await http_get(port, "/")
    await kit.runtime.close()          # the supervisor goes away; workloads stay

    rt = kit.fresh()
    events = rt.events()
    listed = {o.instance_id: o for o in await rt.list()}
    assert {web.instance_id, worker.instance_id} <= set(listed)
    for before in (web, worker):
        now = listed[before.instance_id]
        assert now.state == "running" and now.pid == before.pid
        assert (now.service, now.slot, now.revision, dict(now.ports)) == \
            (before.service, before.slot, before.revision, dict(before.ports))
    assert "meshlet test app" in await http_get(port, "/")
    with pytest.raises(InstanceExists):
        await rt.start(kit.spec(SLEEPER, instance_id=worker.instance_id))

    os.kill(worker.pid, signal.SIGKILL)
    event = await next_exit(events, worker.instance_id)
    assert event.observed is not None and event.observed.state == "exited"
    # Docker records the code; an adopted process is not our child, so its code is unknown.
    assert event.observed.exit_code == (137 if kit.kind == "docker" else None)

    await rt.stop(web.instance_id, grace=1)
    assert (await next_exit(events, web.instance_id)).observed.state == "exited"


async def test_logs_tail_and_follow(kit: Kit) -> None:
    rt = kit.runtime
    events = rt.events()
    done = await rt.start(kit.spec("for i in 1 2 3 4 5; do echo line$i; done; echo last"))
    await next_exit(events, done.instance_id)
    assert (await read_logs(rt, done.instance_id)).splitlines() == \
        ["line1", "line2", "line3", "line4", "line5", "last"]
    assert await read_logs(rt, done.instance_id, tail=2) == "line5\nlast\n"
    assert await read_logs(rt, done.instance_id, tail=1) == "last\n"
    assert await read_logs(rt, done.instance_id, tail=100) == \
        await read_logs(rt, done.instance_id)

    # follow on a running instance: output written after the call arrives.
    ticker = await rt.start(kit.spec("i=0; while true; do echo tick$i; i=$((i+1)); "
                                     "sleep 0.05; done"))
    await wait_logged(kit, ticker.instance_id, "tick2")
    seen_before = (await read_logs(rt, ticker.instance_id)).count("tick")
    stream = rt.logs(ticker.instance_id, follow=True)
    text = ""

    async def until_new_ticks() -> None:
        nonlocal text
        async for chunk in stream:
            text += chunk.decode()
            if text.count("tick") >= seen_before + 5:
                return
    await asyncio.wait_for(until_new_ticks(), 15)
    await stream.aclose()

    # follow ends by itself when the instance exits.
    # stdout and stderr both land in the log (two pipes: their relative order is not kept).
    short = await rt.start(kit.spec("echo first; sleep 0.3; echo second >&2"))
    followed = await asyncio.wait_for(read_logs(rt, short.instance_id, follow=True), 15)
    assert sorted(followed.splitlines()) == ["first", "second"]


async def test_exec_returns_exit_code_and_output(kit: Kit) -> None:
    rt = kit.runtime
    port = free_port()
    obs = await rt.start(kit.spec(SLEEPER, ports={"http": port}))
    code, out = await rt.exec(obs.instance_id, ["sh", "-c", "echo out; echo err >&2; exit 3"],
                              timeout=10)
    assert code == 3 and set(out.decode().split()) == {"out", "err"}
    code, out = await rt.exec(obs.instance_id, ["sh", "-c", "echo $PORT"], timeout=10)
    assert (code, out) == (0, f"{port}\n".encode())        # the instance's environment
    pidfile = f"{kit.scratch}/exec-{obs.instance_id}.pid"
    with pytest.raises(ExecTimeout):
        await rt.exec(obs.instance_id, ["sh", "-c", f"echo $$ > {pidfile}; exec sleep 30"],
                      timeout=0.5)

    async def timed_out_exec_is_gone() -> bool:
        code, _ = await rt.exec(obs.instance_id, ["sh", "-c", f"kill -0 $(cat {pidfile})"],
                                timeout=5)
        return code != 0
    await async_wait_for(timed_out_exec_is_gone, timeout=10, what="the timed-out exec to be killed")
    code, _ = await rt.exec(obs.instance_id, ["/no/such/program"], timeout=10)
    assert code in (126, 127)
    with pytest.raises(InstanceNotFound):
        await rt.exec("no-such-instance", ["true"], timeout=5)
    await rt.stop(obs.instance_id, grace=0)
    with pytest.raises(InstanceNotRunning):
        await rt.exec(obs.instance_id, ["true"], timeout=5)


ALLOCATE_64MB = 'x=$(head -c 64000000 /dev/zero | tr "\\0" a); echo survived ${#x}'


async def test_memory_limit(kit: Kit) -> None:
    """docker: the kernel's OOM killer ends the container (137, oom_killed). process: the
    documented RLIMIT_AS caveat: the allocation fails and the program exits on its own."""
    rt = kit.runtime
    events = rt.events()
    small = await rt.start(kit.spec('x=$(head -c 1000000 /dev/zero | tr "\\0" a); '
                                    'echo survived ${#x}', memory=32 * 2**20))
    assert (await next_exit(events, small.instance_id)).observed.exit_code == 0
    assert "survived 1000000" in await read_logs(rt, small.instance_id)

    big = await rt.start(kit.spec(ALLOCATE_64MB, memory=32 * 2**20))
    observed = (await next_exit(events, big.instance_id)).observed
    logs = await read_logs(rt, big.instance_id)
    assert "survived" not in logs
    if kit.kind == "docker":
        assert observed.exit_code == 137 and observed.oom_killed
    else:
        assert observed.exit_code not in (0, None) and "out of memory" in logs


async def test_bad_input_is_refused_and_leaves_nothing(kit: Kit, tmp_path) -> None:
    rt = kit.runtime
    with pytest.raises(InvalidSpec, match="instance_id"):
        await rt.start(kit.spec(SLEEPER, instance_id="../escape"))
    with pytest.raises(InvalidSpec, match="image" if kit.kind == "docker" else "command"):
        await rt.start(kit.spec(SLEEPER, image=None, command=None))
    with pytest.raises(InvalidSpec, match="ports"):
        await rt.start(kit.spec(SLEEPER, ports={"http": 0}))
    with pytest.raises(StartFailed, match="/no/such/program"):
        await rt.start(kit.spec(command=("/no/such/program",), instance_id="badcmd"))
    if kit.kind == "docker":
        with pytest.raises(ImageNotFound, match=r"image meshlet-test/nope:1 not found on "
                                                r"node local and could not be pulled: "):
            await rt.start(kit.spec(SLEEPER, image="meshlet-test/nope:1",
                                    instance_id="noimage"))
    else:
        with pytest.raises(StartFailed, match="no-such-dir"):
            await rt.start(kit.spec(SLEEPER, workdir=str(tmp_path / "no-such-dir"),
                                    instance_id="nodir"))
    assert await rt.list() == []
    # A refused start does not hold the id.
    assert (await rt.start(kit.spec(SLEEPER, instance_id="badcmd"))).state == "running"
