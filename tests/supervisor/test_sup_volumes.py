"""Volumes end to end: the supervisor (process runtime, and a real Docker engine) runs the
stateful example app (config/examples/apps/kv.py) with a per-replica volume. Each slot's
data survives kill -9 of its replica, a supervisor restart (adoption), a rollout (slot by
slot: never two replicas of a slot at once) and scale 3 -> 1 -> 3; the volume's home pins
its replica (pending when that node is gone); ``meshlet volume ls/rm`` through the admin
API; an NFS volume the kernel cannot mount is a pending reason, not a crash loop; a
rollout of a per-replica service under load through the proxy fails no request."""

from __future__ import annotations

import asyncio
import io
import json
import os
import sys
import textwrap
from pathlib import Path

import aiohttp
import pytest

import config
from _util import async_wait_for, cli_env, start_server, stop_process
from docker_env import TEST_IMAGE, build_test_images
from supervisor import cli
from supervisor.commands.admin_client import format_status
from supervisor.commands.apply import apply_config
from supervisor.daemon.admin import AdminServer
from supervisor.daemon.supervisor import Supervisor

pytestmark = pytest.mark.slow   # real processes, sockets or engines (tests/conftest.py)

KV_APP = Path(__file__).resolve().parents[2] / "config" / "examples" / "apps" / "kv.py"


def kv_yaml(replicas: int = 3, version: str = "1", volume: str = "{per_replica: true}") -> str:
    return textwrap.dedent(f"""\
        services:
          kv:
            command: [{sys.executable}, {KV_APP}]
            replicas: {replicas}
            ports: [{{name: http}}]
            env: {{V: "{version}"}}
            volumes: [{{name: data, target: /data}}]
            update: {{drain_delay: 0s}}
            stop_grace_period: 2s
            probes:
              readiness: {{http: {{path: /healthz}}, period: 0.1s, failure_threshold: 1}}
        volumes:
          data: {volume}
        """)


async def apply(mesh, text: str) -> None:
    cfg = config.loads(text, filename="kv.yaml", base_dir=str(mesh.tmp))
    code, applied = await apply_config(mesh.access, cfg, None, prune=True)
    assert code == 0 and applied is not None


def by_slot(mesh, service: str = "kv") -> dict[int, object]:
    return {o.slot: o for o in mesh.running(service).values()}


async def passing_slots(mesh, n: int, revision: str | None = None) -> bool:
    ids = set(await mesh.passing("kv"))
    live = [o for o in mesh.running("kv").values() if o.instance_id in ids
            and (revision is None or o.revision != revision)]
    return len(live) == n and sorted(o.slot for o in live) == list(range(n))


async def kv(port: int, key: str, value: str | None = None) -> str | None:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s:
        if value is not None:
            async with s.put(f"http://127.0.0.1:{port}/kv/{key}", data=value) as r:
                assert r.status == 201
            return value
        async with s.get(f"http://127.0.0.1:{port}/kv/{key}") as r:
            return await r.text() if r.status == 200 else None


async def read_all(mesh, n: int) -> dict[int, str | None]:
    slots = by_slot(mesh)
    return {s: await kv(slots[s].ports["http"], "who") for s in range(n)}


async def homes(mesh) -> dict[str, str]:
    _, entries = await mesh.client.kv.get(config.VOLUMES_PREFIX, recurse=True)
    return {e["Key"][len(config.VOLUMES_PREFIX):]: json.loads(e["Value"])["node"] for e in entries or ()}


async def test_each_slot_keeps_its_data_through_kill_restart_and_rollout(mesh):
    await apply(mesh, kv_yaml())
    sup = await mesh.start()
    await async_wait_for(lambda: passing_slots(mesh, 3), timeout=30)
    for slot, o in by_slot(mesh).items():
        await kv(o.ports["http"], "who", f"slot{slot}")
    want = {0: "slot0", 1: "slot1", 2: "slot2"}
    assert await homes(mesh) == {f"named/kv-data-{s}": "local" for s in range(3)}

    # kill -9 of a replica: its replacement in slot 1 finds slot 1's data
    victim = by_slot(mesh)[1]
    os.kill(victim.pid, 9)
    await async_wait_for(lambda: passing_slots(mesh, 3) if by_slot(mesh).get(1) is not None
                         and by_slot(mesh)[1].instance_id != victim.instance_id else False, timeout=30)
    assert await read_all(mesh, 3) == want

    # a supervisor restart adopts the replicas and keeps the volumes' homes
    before = set(mesh.running("kv"))
    await sup.close(stop=False)
    mesh.sup = sup = Supervisor(mesh.access, [config.NodeSpec(name="local", runtime="process")], mesh.data_dir,
                                resync=1.0)
    await sup.start()
    await async_wait_for(lambda: passing_slots(mesh, 3), timeout=30)
    assert set(mesh.running("kv")) == before
    assert sup.volumes.nodes() == {f"named/kv-data-{s}": "local" for s in range(3)}
    assert await read_all(mesh, 3) == want

    # a rollout: slot by slot, never two replicas of one slot running at once
    old = next(iter(mesh.running("kv").values())).revision
    most: dict[int, int] = {}
    stop = asyncio.Event()

    async def sample() -> None:
        while not stop.is_set():
            counts: dict[int, int] = {}
            for o in mesh.running("kv").values():
                counts[o.slot] = counts.get(o.slot, 0) + 1
            for slot, n in counts.items():
                most[slot] = max(most.get(slot, 0), n)
            await asyncio.sleep(0.005)

    sampler = asyncio.create_task(sample())
    await apply(mesh, kv_yaml(version="2"))
    await async_wait_for(lambda: passing_slots(mesh, 3, revision=old), timeout=60)
    stop.set()
    await sampler
    assert most == {0: 1, 1: 1, 2: 1}
    assert await read_all(mesh, 3) == want


async def test_scale_down_keeps_volumes_and_scale_up_gets_them_back_and_volume_rm(mesh):
    await apply(mesh, kv_yaml(3))
    sup = await mesh.start()
    await async_wait_for(lambda: passing_slots(mesh, 3), timeout=30)
    for slot, o in by_slot(mesh).items():
        await kv(o.ports["http"], "who", f"slot{slot}")
    await apply(mesh, kv_yaml(1))
    await async_wait_for(lambda: len(mesh.running("kv")) == 1 and not sup.replicas.terminating, timeout=30)
    volumes = mesh.data_dir / "nodes" / "local" / "volumes"
    assert sorted(p.name for p in volumes.iterdir()) == ["kv-data-0", "kv-data-1", "kv-data-2"]
    await apply(mesh, kv_yaml(3))
    await async_wait_for(lambda: passing_slots(mesh, 3), timeout=30)
    assert await read_all(mesh, 3) == {0: "slot0", 1: "slot1", 2: "slot2"}

    # volume ls / rm through the admin API and the CLI
    admin = AdminServer(sup, on_down=lambda: None)
    address = await admin.start("127.0.0.1:0")
    try:
        out, err = io.StringIO(), io.StringIO()
        assert await asyncio.to_thread(cli.main, ["volume", "ls", "--json", "--admin", address], out=out, err=err) == 0
        listed = {v["name"]: v for v in json.loads(out.getvalue())}
        assert sorted(listed) == ["kv-data-0", "kv-data-1", "kv-data-2"]
        slot2 = by_slot(mesh)[2].instance_id
        assert listed["kv-data-2"]["users"] == [slot2]
        assert (listed["kv-data-2"]["kind"], listed["kv-data-2"]["node"]) == ("per-replica", "local")
        assert listed["kv-data-2"]["size"] == len("slot2")
        out = io.StringIO()
        assert await asyncio.to_thread(cli.main, ["volume", "ls", "--admin", address], out=out, err=err) == 0
        assert out.getvalue().splitlines()[0].split() == ["NAME", "KIND", "DRIVER", "NODE", "SIZE", "USED", "BY"]
        err = io.StringIO()
        assert await asyncio.to_thread(cli.main, ["volume", "rm", "kv-data-2", "--admin", address], out=out, err=err) == 1
        assert f"meshlet volume: volume kv-data-2 is in use by {slot2}" in err.getvalue()
        assert (volumes / "kv-data-2" / "who").read_text() == "slot2"
        await apply(mesh, kv_yaml(2))
        await async_wait_for(lambda: len(mesh.running("kv")) == 2 and not sup.replicas.terminating, timeout=30)
        out = io.StringIO()
        assert await asyncio.to_thread(cli.main, ["volume", "rm", "kv-data-2", "--admin", address], out=out, err=err) == 0
        assert out.getvalue() == "meshlet volume rm: deleted kv-data-2 on local\n"
        assert not (volumes / "kv-data-2").exists()
        assert "named/kv-data-2" not in await homes(mesh)
    finally:
        await admin.close()
    # removing the service keeps its volumes too
    await mesh.apply("services: {}\n")
    await async_wait_for(lambda: not mesh.running("kv") and not sup.replicas.instances, timeout=30)
    assert sorted(p.name for p in volumes.iterdir()) == ["kv-data-0", "kv-data-1"]


async def test_a_replica_whose_volume_node_is_gone_stays_pending(mesh):
    nodes = [config.NodeSpec(name="a", runtime="process"), config.NodeSpec(name="b", runtime="process")]
    await apply(mesh, kv_yaml(1))
    mesh.sup = sup = Supervisor(mesh.access, nodes, mesh.data_dir, resync=1.0)
    await sup.start()
    await async_wait_for(lambda: passing_slots(mesh, 1), timeout=30)
    home = by_slot(mesh)[0].node
    other = "b" if home == "a" else "a"
    assert await homes(mesh) == {"named/kv-data-0": home}
    await sup.close(stop=True)
    # the node holding kv-data-0 leaves the fleet: the replica waits, it is not started empty on the other
    mesh.sup = sup = Supervisor(mesh.access, [n for n in nodes if n.name == other], mesh.data_dir, resync=1.0)
    await sup.start()
    reason = f"slot 0: volume kv-data-0 lives on node {home}, and node {home} is not in the fleet: waiting for it"
    await async_wait_for(lambda: sup.problems.get("kv") == reason, timeout=15)
    assert not mesh.running("kv")
    assert reason in "\n".join(format_status(sup.status()))         # what `meshlet status` prints
    explained = sup.explain("kv")["slots"][0]
    assert explained["chosen"] is None
    assert explained["nodes"] == [{"node": other, "filtered": f"volume kv-data-0 lives on node {home}", "score": None}]


async def test_apply_refuses_a_per_replica_mismatch_with_the_mesh(mesh, tmp_path, monkeypatch):
    await apply(mesh, kv_yaml(1))
    other = tmp_path / "other.yaml"
    other.write_text(textwrap.dedent(f"""\
        services:
          report:
            command: [{sys.executable}, {KV_APP}]
            volumes: [{{name: data, target: /data}}]
        volumes:
          data: {{per_replica: false}}
        """))
    err = io.StringIO()
    monkeypatch.setenv("CONSUL_HTTP_TOKEN", mesh.access.token)      # as a user's shell would have it
    code = await asyncio.to_thread(cli.main, ["apply", "-f", str(other), "--consul", mesh.url], out=io.StringIO(),
                                   err=err)
    assert code == 2
    assert err.getvalue() == (f"{other}:6 volumes.data: per_replica is false here, but service kv (already in "
                              "the mesh) mounts volume data with per_replica true: one volume name cannot be both; "
                              "rename one\n")
    missing = tmp_path / "missing.yaml"
    missing.write_text("volumes:\n  logs: {type: host, source: nowhere}\n")
    err = io.StringIO()
    assert await asyncio.to_thread(cli.main, ["apply", "-f", str(missing), "--consul", mesh.url], out=io.StringIO(),
                                   err=err) == 2
    assert err.getvalue() == (f"{missing}:2 volumes.logs.source: {tmp_path / 'nowhere'} does not exist (create it, "
                              "or set create: true on the volume)\n")


# --------------------------------------------------------------------------- docker

@pytest.fixture
def engine(docker_engine):
    build_test_images(docker_engine)
    yield docker_engine
    client = docker_engine.client()
    for c in client.containers.list(all=True, filters={"label": "meshlet.owner=meshlet"}):
        c.remove(force=True)
    for v in client.volumes.list(filters={"label": "meshlet.owner=meshlet"}):
        v.remove(force=True)


def docker_sup(mesh, engine) -> Supervisor:
    node = config.NodeSpec(name="dock", runtime="docker", engine=engine.url)
    mesh.sup = Supervisor(mesh.access, [node], mesh.data_dir, resync=1.0)
    return mesh.sup


SCRIPT = 'echo "$MESHLET_INSTANCE" >> "$MESHLET_VOLUME_DATA/log"; exec httpd -f -p 127.0.0.1:$PORT -h /www'


def image_yaml(replicas: int = 2, version: str = "1", volume: str = "{per_replica: true}") -> str:
    return textwrap.dedent(f"""\
        services:
          web:
            image: {TEST_IMAGE}
            args: [/bin/sh, -c, '{SCRIPT}']
            replicas: {replicas}
            ports: [{{name: http}}]
            env: {{V: "{version}"}}
            volumes: [{{name: data, target: /data}}]
            update: {{drain_delay: 0s}}
            stop_grace_period: 1s
            probes:
              readiness: {{http: {{path: /}}, period: 0.1s, failure_threshold: 1}}
        volumes:
          data: {volume}
        """)


@pytest.fixture
def proxy(catalog):
    proc, ready = start_server([sys.executable, "-m", "proxy", "--consul", catalog.url, "--listen", "127.0.0.1:0"],
                               env=cli_env())
    yield int(ready["http"][0].rpartition(":")[2])
    stop_process(proc)


async def test_docker_rollout_of_a_per_replica_service_under_load_fails_no_request(mesh, engine, proxy):
    from test_rollout_live import Load
    await apply(mesh, image_yaml())
    sup = docker_sup(mesh, engine)
    await sup.start()
    await async_wait_for(lambda: len(mesh.running("web")) == 2 and mesh.passing("web"), timeout=60)
    await async_wait_for(lambda: _n_passing(mesh, 2), timeout=60)
    first = {o.slot: o.instance_id for o in mesh.running("web").values()}
    async with Load(proxy) as load:
        await async_wait_for(lambda: load.sent > 20, timeout=15)
        await apply(mesh, image_yaml(version="2"))
        await async_wait_for(lambda: _all_new(mesh, first), timeout=90)
        await async_wait_for(lambda: _n_passing(mesh, 2), timeout=30)
        sent = load.sent
        await async_wait_for(lambda: load.sent > sent + 20, timeout=15)
    assert load.failed == 0, load.reasons
    client = engine.client()
    for slot, old in first.items():
        new = by_slot(mesh, "web")[slot]
        code, out = client.containers.get(new.instance_id).exec_run(["cat", "/data/log"])
        assert out.decode().split() == [old, new.instance_id]        # slot by slot, its own data
        assert client.volumes.get(f"web-data-{slot}").attrs["Labels"]["meshlet.slot"] == str(slot)


async def _n_passing(mesh, n: int) -> bool:
    return len(await mesh.passing("web")) == n


def _all_new(mesh, first: dict[int, str]) -> bool:
    running = by_slot(mesh, "web")
    return len(mesh.running("web")) == 2 and all(running.get(s) and running[s].instance_id != i
                                                 for s, i in first.items())


async def test_docker_an_nfs_volume_it_cannot_mount_is_pending_with_the_engines_reason(mesh, engine):
    nfs = '{driver_opts: {type: nfs, o: "addr=127.0.0.1,nfsvers=4", device: ":/export"}}'
    await apply(mesh, image_yaml(1, volume=nfs))
    sup = docker_sup(mesh, engine)
    await sup.start()
    await async_wait_for(lambda: "cannot start" in sup.problems.get("web", ""), timeout=60)
    problem = sup.problems["web"]
    assert problem.startswith("slot 0: cannot start web-0-") and "data" in problem, problem
    line = next(line for line in format_status(sup.status()) if line.startswith("web  0/1 ready"))
    assert problem in line
    # held back: the next attempt only after a back-off, not a crash loop; nothing runs or is left
    assert sup.start_holds[("web", 0)] > sup.clock()
    assert not engine.client().containers.list(all=True, filters={"label": "meshlet.service=web"})
    assert not engine.client().volumes.list(filters={"name": "data"})
    assert await homes(mesh) == {}              # a network volume pins nothing
