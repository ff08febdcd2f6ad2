"""Volumes on both runtimes (a real Docker engine, real processes): data written through a
volume outlives its instance, a tmpfs is bounded by its size, driver options reach the
engine, an NFS volume this kernel cannot mount is refused with the engine's reason and
nothing left behind, and a volume in use is never deleted."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import docker
import pytest

from _runtime_kit import Kit, next_exit
from _util import async_wait_for
from supervisor.runtime import InvalidSpec, StartFailed, VolumeAttachment, VolumeInUse

pytestmark = pytest.mark.slow   # real processes, sockets or engines (tests/conftest.py)

WRITE = 'echo "$MESHLET_INSTANCE" >> "$MESHLET_VOLUME_DATA/log"; echo x >> "$MESHLET_VOLUME_LOGS/log"; exec sleep 600'


def _volumes(tmp_path: Path, **named) -> list[VolumeAttachment]:
    return [VolumeAttachment("data", "named", "/data", source=named.get("source", "db-data-0"), per_replica=True),
            VolumeAttachment("logs", "host", "/logs", source=str(tmp_path / "host" / "logs"))]


async def _read(kit: Kit, iid: str, var: str) -> str:
    code, out = await kit.runtime.exec(iid, ["/bin/sh", "-c", f'cat "${var}/log"'] if kit.kind == "docker"
                                       else [*kit.spec("true").command[:2], "-c", f'cat "${var}/log"'], timeout=10)
    assert code == 0, out
    return out.decode()


async def test_data_outlives_a_killed_and_removed_instance(kit: Kit, tmp_path: Path):
    rt = kit.runtime
    events = rt.events()
    (tmp_path / "host" / "logs").mkdir(parents=True)
    os.chmod(tmp_path / "host" / "logs", 0o777)
    first = await rt.start(kit.spec(WRITE, volumes=_volumes(tmp_path)))
    await async_wait_for(lambda: _has_line(tmp_path / "host" / "logs" / "log", 1), timeout=15)
    os.kill(first.pid, signal.SIGKILL)                       # kill -9 of the replica
    await next_exit(events, first.instance_id)
    await rt.remove(first.instance_id)
    second = await rt.start(kit.spec(WRITE, volumes=_volumes(tmp_path)))
    await async_wait_for(lambda: _has_line(tmp_path / "host" / "logs" / "log", 2), timeout=15)
    assert (await _read(kit, second.instance_id, "MESHLET_VOLUME_DATA")).split() == [first.instance_id,
                                                                                    second.instance_id]
    if kit.kind == "process":
        assert (tmp_path / "data" / "volumes" / "db-data-0" / "log").exists()   # under the data dir
    [info] = [v for v in await rt.volumes() if v.name == "db-data-0"]
    assert info.users == (second.instance_id,) or set(info.users) == {second.instance_id}
    assert info.labels["meshlet.service"] == "web" and info.labels["meshlet.slot"] == "0"
    assert info.size is None or info.size > 0
    with pytest.raises(VolumeInUse, match=second.instance_id):
        await rt.remove_volume("db-data-0")
    await rt.remove(second.instance_id)
    assert [v.name for v in await rt.volumes()] == ["db-data-0"]  # removing instances keeps volumes
    await rt.remove_volume("db-data-0")
    assert await rt.volumes() == []
    assert (tmp_path / "host" / "logs" / "log").read_text() == "x\nx\n"   # a host directory is the user's


def _has_line(path: Path, n: int) -> bool:
    return path.exists() and len(path.read_text().splitlines()) >= n


@pytest.fixture(params=["process", "docker"])
def local_kit(request, tmp_path: Path):
    """A runtime whose engine shares this host (the docker one has a data dir)."""
    from supervisor.runtime import DockerRuntime, ProcessRuntime
    if request.param == "docker":
        from docker_env import build_test_images
        engine = request.getfixturevalue("docker_engine")
        build_test_images(engine)
        return Kit("docker", lambda: DockerRuntime(engine.url, node="local", data_dir=tmp_path / "node"), "/tmp")
    return Kit("process", lambda: ProcessRuntime(tmp_path / "data", node="local"), str(tmp_path))


async def test_a_missing_host_directory_is_refused_unless_create(local_kit: Kit, tmp_path: Path):
    kit = local_kit
    vol = VolumeAttachment("logs", "host", "/logs", source=str(tmp_path / "nope"))
    try:
        with pytest.raises(StartFailed, match=r"host volume logs: .*/nope does not exist (on node local )?\(create "
                                              r"it, or set create: true"):
            await kit.runtime.start(kit.spec("sleep 600", volumes=[vol]))
        assert await kit.runtime.list() == []
        made = VolumeAttachment("logs", "host", "/logs", source=str(tmp_path / "nope"), create=True)
        o = await kit.runtime.start(kit.spec('echo y > "$MESHLET_VOLUME_LOGS/f"; exec sleep 600', volumes=[made]))
        await async_wait_for(lambda: (tmp_path / "nope" / "f").exists(), timeout=15)
        assert o.is_running
    finally:
        await kit.cleanup()


async def test_process_refuses_what_a_directory_cannot_enforce(tmp_path: Path):
    from _runtime_kit import Kit as K
    from supervisor.runtime import ProcessRuntime
    kit = K("process", lambda: ProcessRuntime(tmp_path / "data", node="local"), str(tmp_path))
    bad = [VolumeAttachment("ro", "named", "/ro", source="ro", read_only=True),
           VolumeAttachment("t", "tmpfs", "/t", size=2**20),
           VolumeAttachment("n", "named", "/n", source="n", driver_opts={"type": "nfs"})]
    with pytest.raises(InvalidSpec) as err:
        await kit.runtime.start(kit.spec("sleep 600", volumes=bad))
    text = str(err.value)
    assert "volumes ro: read_only cannot be enforced for a process (no mount namespace)" in text
    assert "volumes t: a process's tmpfs volume is a directory on the host's shared tmpfs, where size cannot " \
           "be enforced" in text
    assert "volumes n: driver local with options {'type': 'nfs'} needs a Docker engine" in text
    await kit.cleanup()


async def test_process_tmpfs_volume_is_a_directory_on_a_tmpfs_removed_with_the_instance(tmp_path: Path):
    from supervisor.runtime import ProcessRuntime
    from supervisor.runtime._files import is_tmpfs
    kit = Kit("process", lambda: ProcessRuntime(tmp_path / "data", node="local"), str(tmp_path))
    try:
        o = await kit.runtime.start(kit.spec('echo hi > "$MESHLET_VOLUME_SCRATCH/f"; exec sleep 600',
                                             volumes=[VolumeAttachment("scratch", "tmpfs", "/scratch")]))
        env = dict(line.split("=", 1) for line in Path(f"/proc/{o.pid}/environ").read_text().split("\0") if "=" in line)
        path = Path(env["MESHLET_VOLUME_SCRATCH"])
        await async_wait_for(lambda: (path / "f").exists(), timeout=10)
        assert is_tmpfs(path)
        await kit.runtime.remove(o.instance_id)
        assert not path.exists()
    finally:
        await kit.cleanup()


# --------------------------------------------------------------------------- docker only

@pytest.fixture
def docker_kit(docker_engine, tmp_path: Path):
    from docker_env import build_test_images
    from supervisor.runtime import DockerRuntime
    build_test_images(docker_engine)
    k = Kit("docker", lambda: DockerRuntime(docker_engine.url, node="local", data_dir=tmp_path / "node"), "/tmp")
    yield k, docker_engine


async def test_docker_tmpfs_size_is_enforced(docker_kit):
    kit, _ = docker_kit
    try:
        o = await kit.runtime.start(kit.spec("exec sleep 600", volumes=[
            VolumeAttachment("scratch", "tmpfs", "/scratch", size=2 * 2**20)]))
        code, out = await kit.runtime.exec(o.instance_id, ["df", "-k", "/scratch"], timeout=10)
        assert code == 0 and out.decode().splitlines()[1].split()[1] == "2048", out   # 1K-blocks
        code, out = await kit.runtime.exec(o.instance_id, ["dd", "if=/dev/zero", "of=/scratch/big", "bs=1024",
                                                           "count=4096"], timeout=10)
        assert code != 0 and b"No space left on device" in out, out
    finally:
        await kit.cleanup()


async def test_docker_driver_options_reach_the_engine_and_a_changed_volume_is_refused(docker_kit):
    kit, engine = docker_kit
    opts = {"type": "tmpfs", "device": "tmpfs", "o": "size=3m"}
    vol = VolumeAttachment("cache", "named", "/cache", source="shop-cache", driver_opts=opts)
    client = engine.client()
    try:
        o = await kit.runtime.start(kit.spec("exec sleep 600", volumes=[vol]))
        made = client.volumes.get("shop-cache").attrs
        assert (made["Driver"], made["Options"]) == ("local", opts)
        assert made["Labels"]["meshlet.owner"] == "meshlet" and made["Labels"]["meshlet.volume"] == "cache"
        code, out = await kit.runtime.exec(o.instance_id, ["df", "-k", "/cache"], timeout=10)
        assert out.decode().splitlines()[1].split()[1] == "3072", out
        other = VolumeAttachment("cache", "named", "/cache", source="shop-cache", driver_opts={**opts, "o": "size=9m"})
        with pytest.raises(StartFailed, match=r"volume shop-cache exists with driver local and options .*size=3m.*"
                                              r"the spec asks for .*size=9m"):
            await kit.runtime.start(kit.spec("exec sleep 600", volumes=[other]))
    finally:
        await kit.cleanup()
        for v in client.volumes.list(filters={"label": "meshlet.owner=meshlet"}):
            v.remove(force=True)


@pytest.mark.parametrize("vol, reason", [
    pytest.param(VolumeAttachment("media", "named", "/media", source="media-nfs",
                                  driver_opts={"type": "nfs", "o": "addr=127.0.0.1,nfsvers=4", "device": ":/export"}),
                 r"cannot start .*: .*(mount|nfs|protocol|device)", id="nfs-this-kernel-cannot-mount"),
    pytest.param(VolumeAttachment("ebs", "named", "/ebs", source="ebs-0", driver="nosuch/plugin"),
                 r"the engine refused to create volume ebs-0 \(driver nosuch/plugin\): .*(plugin|not found)",
                 id="unknown-driver"),
])
async def test_docker_a_volume_the_engine_cannot_make_is_refused_and_nothing_is_left(docker_kit, vol, reason):
    kit, engine = docker_kit
    client = engine.client()
    try:
        with pytest.raises(StartFailed, match=reason):
            await kit.runtime.start(kit.spec("exec sleep 600", volumes=[vol]))
        assert await kit.runtime.list() == []
        with pytest.raises(docker.errors.NotFound):
            client.volumes.get(vol.source)          # made for the start, removed with it
    finally:
        await kit.cleanup()
