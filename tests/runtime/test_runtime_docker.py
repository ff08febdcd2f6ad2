"""What only the docker runtime does: cpu limits and resolv.conf enforced by the engine,
and riding out an engine restart or an engine that is not there."""

from __future__ import annotations

import asyncio

import pytest

from _runtime_kit import next_exit, read_logs
from docker_env import TEST_IMAGE, EngineSet
from supervisor.runtime import DockerRuntime, EngineUnavailable, InstanceSpec

pytestmark = pytest.mark.slow   # real processes, sockets or engines (tests/conftest.py)


def busybox(instance_id: str, script: str, **kw) -> InstanceSpec:
    return InstanceSpec(instance_id=instance_id, service="job", slot=0, revision="r1",
                        node="local", image=TEST_IMAGE, command=("sh", "-c", script), **kw)


@pytest.fixture
async def runtime(docker_engine):
    rt = DockerRuntime(docker_engine.url, node="local")
    try:
        yield rt
    finally:
        for obs in await rt.list():
            await rt.remove(obs.instance_id)
        await rt.close()


async def test_cpu_limit_is_the_cgroup_quota(runtime: DockerRuntime) -> None:
    await runtime.start(busybox("cpu-half", "exec sleep 1000", cpu=0.5))
    # cgroup v1: quota/period in cpu.cfs_*; cgroup v2: "quota period" in cpu.max.
    code, out = await runtime.exec("cpu-half", ["sh", "-c",
                                                "cat /sys/fs/cgroup/cpu.max 2>/dev/null || "
                                                "echo $(cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us"
                                                " /sys/fs/cgroup/cpu/cpu.cfs_period_us)"],
                                   timeout=10)
    quota, period = (int(x) for x in out.split())
    assert code == 0 and quota / period == 0.5


async def test_dns_is_the_containers_resolver(docker_engine, tmp_path) -> None:
    """With a data dir (local engine) meshlet's resolv.conf is mounted read-only; without
    one (remote engine) the engine writes it."""
    local = DockerRuntime(docker_engine.url, node="local", data_dir=tmp_path)
    remote = DockerRuntime(docker_engine.url, node="local")
    try:
        for name, rt, writable in (("dns-local", local, False), ("dns-remote", remote, True)):
            await rt.start(busybox(name, "exec sleep 1000", dns="127.0.0.53"))
            code, out = await rt.exec(name, ["cat", "/etc/resolv.conf"], timeout=10)
            nameservers = [ln.split()[1] for ln in out.decode().splitlines()
                           if ln.startswith("nameserver")]
            assert code == 0 and nameservers == ["127.0.0.53"], name
            code, _ = await rt.exec(name, ["sh", "-c", "echo x >> /etc/resolv.conf"],
                                    timeout=10)
            assert (code == 0) == writable, name
    finally:
        for rt in (local, remote):
            for obs in await rt.list():
                await rt.remove(obs.instance_id)
            await rt.close()


async def test_an_engine_restart_is_a_resync_and_exits_are_seen(
        docker_engines: EngineSet) -> None:
    engine = docker_engines.get("restarts")
    rt = DockerRuntime(engine.url, node="local")
    try:
        events = rt.events()
        await rt.start(busybox("survivor", "echo up; exec sleep 1000",
                               stop_grace_period=1))   # the engine's own stop honours it
        await asyncio.to_thread(engine.restart)        # its containers stop with it
        kinds: list[str] = []

        async def until_resync() -> None:
            async for event in events:
                kinds.append(event.kind)
                if event.kind == "resync":
                    return
        await asyncio.wait_for(until_resync(), 30)
        [obs] = await rt.list()                        # the full view after the resync
        assert obs.instance_id == "survivor" and obs.state == "exited"
        assert "up" in await read_logs(rt, "survivor")
        # And the stream is live again: a new exit arrives as an event.
        await rt.start(busybox("after", "exit 3"))
        assert (await next_exit(events, "after")).observed.exit_code == 3
    finally:
        await rt.close()
        docker_engines.stop("restarts")


async def test_an_engine_that_is_not_there_is_engine_unavailable(tmp_path) -> None:
    rt = DockerRuntime(f"unix://{tmp_path}/no.sock", node="far")
    try:
        with pytest.raises(EngineUnavailable, match=r"docker engine unix://.*no\.sock of node "
                                                    r"far does not answer"):
            await rt.list()
    finally:
        await rt.close()
