"""What only the process runtime does: adopting the workloads of a supervisor process that
was killed, and never mistaking a reused pid for its own."""

from __future__ import annotations

import pytest

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from _util import async_wait_for
from _runtime_kit import next_exit
from docker_env import static_busybox
from supervisor.runtime import InstanceSpec, ProcessRuntime
from supervisor.runtime._proc import Record, read_starttime, write_record

pytestmark = pytest.mark.slow   # real processes, sockets or engines (tests/conftest.py)

REPO = Path(__file__).resolve().parents[2]

# A supervisor that starts one instance, reports it and dies by SIGKILL.
DOOMED_SUPERVISOR = """
import asyncio, json, os, signal, sys
from supervisor.runtime import InstanceSpec, ProcessRuntime

async def main():
    rt = ProcessRuntime(sys.argv[1])
    obs = await rt.start(InstanceSpec(instance_id="orphan", service="worker", slot=1,
                                      revision="r7", node="local",
                                      command=(sys.argv[2], "sh", "-c", "exec sleep 1000")))
    print(json.dumps({"pid": obs.pid}), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)

asyncio.run(main())
"""


def sleeper(instance_id: str) -> InstanceSpec:
    return InstanceSpec(instance_id=instance_id, service="worker", slot=0, revision="r1",
                        node="local", command=(str(static_busybox()), "sleep", "1000"))


async def test_workloads_outlive_a_killed_supervisor_and_are_adopted(tmp_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", DOOMED_SUPERVISOR, str(tmp_path), str(static_busybox()),
        cwd=REPO, stdout=subprocess.PIPE)
    line = await asyncio.wait_for(proc.stdout.readline(), 30)
    assert await asyncio.wait_for(proc.wait(), 30) == -signal.SIGKILL
    pid = json.loads(line)["pid"]

    rt = ProcessRuntime(tmp_path)
    try:
        events = rt.events()
        [obs] = await rt.list()
        assert (obs.instance_id, obs.service, obs.slot, obs.revision, obs.state, obs.pid) == \
            ("orphan", "worker", 1, "r7", "running", pid)
        os.kill(pid, signal.SIGKILL)
        event = await next_exit(events, "orphan")
        # Not our child: the exit is seen at once, its code is unknown (never guessed).
        assert event.observed.state == "exited" and event.observed.exit_code is None
        assert [o.state for o in await rt.list()] == ["exited"]
    finally:
        for o in await rt.list():
            await rt.remove(o.instance_id)
        await rt.close()


async def test_a_reused_pid_is_never_taken_for_the_instance(tmp_path: Path) -> None:
    """A state file whose pid now belongs to another process (same pid, other start time)
    is an exited instance, and stop()/remove() signal nobody."""
    bystander = subprocess.Popen([str(static_busybox()), "sleep", "60"],
                                 start_new_session=True)
    try:
        (tmp_path / "instances").mkdir()
        starttime = read_starttime(bystander.pid)
        assert starttime is not None
        write_record(tmp_path / "instances" / "ghost.json",
                     Record(spec=sleeper("ghost"), pid=bystander.pid, starttime=starttime - 1,
                            started_at=time.time() - 60))
        rt = ProcessRuntime(tmp_path)
        try:
            [obs] = await rt.list()
            assert obs.instance_id == "ghost" and obs.state == "exited"
            assert obs.exit_code is None
            await rt.stop("ghost", grace=0)
            await rt.remove("ghost")
            assert await rt.list() == []
        finally:
            await rt.close()
        assert bystander.poll() is None          # untouched
    finally:
        bystander.kill()
        bystander.wait()


async def test_a_workload_that_exited_unreaped_is_exited_not_running(tmp_path: Path) -> None:
    """An orphan that exits while no supervisor runs stays a zombie when PID 1 does not
    reap (containers without an init, this kind of VM): it still has a /proc entry and its
    start time, yet it is an exited instance."""
    child = subprocess.Popen([str(static_busybox()), "sleep", "60"], start_new_session=True)
    try:
        (tmp_path / "instances").mkdir()
        starttime = read_starttime(child.pid)
        assert starttime is not None
        write_record(tmp_path / "instances" / "gone.json",
                     Record(spec=sleeper("gone"), pid=child.pid, starttime=starttime,
                            started_at=time.time() - 60))
        os.kill(child.pid, signal.SIGKILL)       # not waited for: a zombie until we reap it
        await async_wait_for(lambda: _is_zombie(child.pid), timeout=10, what="the child to be a zombie")
        assert read_starttime(child.pid) is None
        rt = ProcessRuntime(tmp_path)
        try:
            [obs] = await rt.list()
            assert obs.instance_id == "gone" and obs.state == "exited" and obs.exit_code is None
        finally:
            await rt.remove("gone")
            await rt.close()
    finally:
        child.kill()
        child.wait()


async def _is_zombie(pid: int) -> bool:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2] == "Z"


async def test_a_state_file_that_is_not_one_is_skipped(tmp_path: Path) -> None:
    (tmp_path / "instances").mkdir()
    (tmp_path / "instances" / "junk.json").write_text("{not json")
    rt = ProcessRuntime(tmp_path)
    try:
        obs = await rt.start(sleeper("real"))
        assert [o.instance_id for o in await rt.list()] == ["real"]
        await rt.stop(obs.instance_id, grace=0)
        await async_wait_for(lambda: _exited(rt, "real"), timeout=10, what="the stopped instance to be exited")
    finally:
        for o in await rt.list():
            await rt.remove(o.instance_id)
        await rt.close()


async def _exited(rt: ProcessRuntime, instance_id: str) -> bool:
    return any(o.instance_id == instance_id and o.state == "exited" for o in await rt.list())
