"""A fleet of three hosts, each a network namespace with its own address: a control host
(catalog, supervisor, its DNS and proxy: ``meshlet up``) and two nodes, each with its own
dockerd (own data root, exec root and socket, listening on its address) and its own
``meshlet node run``. The supervisor reaches the engines over TCP through the namespaces'
switch, never through this machine's own network; cutting a host's cable is a real
partition.

What a user of a fleet relies on, in order (one fleet for the module, cleaned up even when
a test fails): replicas spread over the hosts within the capacity their engines report; a
replica bigger than any host is pending with the reason; an app on host b reaches a service
that runs only on host a by its DNS name and VIP, resolved and proxied on b itself; a host
whose cable is cut is lost after the grace period, its replicas start on the other host,
and when it comes back what still ran there is stopped (never two live replicas of a slot);
a drain under load through the proxy fails no request.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import textwrap
import time
from pathlib import Path

import pytest

from _util import wait_for
from docker_env import TEST_IMAGE, start_engine
from fleet_env import NetFleet, engine_certs, ssh_access

pytestmark = pytest.mark.slow

MESHLET = str(Path(sys.executable).parent / "meshlet")
GRACE = 4.0
HTTPD = "exec httpd -f -p $HOST:$PORT -h /www"


def fleet_yaml(net: NetFleet, data: Path, certs: Path) -> str:
    a, b, ctl = net.addresses["a"], net.addresses["b"], net.addresses["ctl"]
    return textwrap.dedent(f"""\
        mesh:
          catalog_listen: {ctl}:8500
          data_dir: {data}
          node_grace: {GRACE:g}s
          nodes:
            - {{name: a, runtime: docker, address: {a}, engine: "tcp://{a}:2375", labels: {{zone: za}}}}
            - name: b
              address: {b}
              engine: "tcp://{b}:2376"
              tls: {{ca_file: {certs}/ca.pem, cert_file: {certs}/client.pem, key_file: {certs}/client.key}}
              labels: {{zone: zb}}
        services:
          web:
            image: {TEST_IMAGE}
            args: [/bin/sh, -c, '{HTTPD}']
            replicas: 2
            resources: {{cpu: 100m, memory: 16Mi}}
            ports: [{{name: http, vip_port: 8081}}]
            probes:
              readiness: {{tcp: {{port: http}}, period: 0.5s}}
            update: {{drain_delay: 1s}}
          api:
            image: {TEST_IMAGE}
            args: [/bin/sh, -c, '{HTTPD}']
            replicas: 1
            resources: {{cpu: 100m, memory: 16Mi}}
            ports: [{{name: http, vip_port: 8082}}]
            probes:
              readiness: {{tcp: {{port: http}}, period: 0.5s}}
            placement: {{constraints: ["node.name == a"]}}
          huge:
            image: {TEST_IMAGE}
            replicas: 1
            resources: {{cpu: 64}}
          store:
            image: {TEST_IMAGE}
            args: [/bin/sh, -c, 'exec httpd -f -p $HOST:$PORT -h /www']
            replicas: 1
            resources: {{cpu: 100m, memory: 16Mi}}
            ports: [{{name: http}}]
            volumes: [{{name: data, target: /data}}]
            placement: {{constraints: ["node.labels.zone == za"]}}
        volumes:
          data: {{per_replica: true}}
        """)


class Fleet:
    def __init__(self, net: NetFleet, tmp: Path) -> None:
        self.net, self.tmp = net, tmp
        self.engines: dict = {}
        self.certs = tmp / "certs"
        self.ssh_bin = tmp / "ssh" / "bin"

    def meshlet(self, *args: str, timeout: float = 60.0):
        return self.net.call("ctl", [MESHLET, *args], timeout=timeout)

    def status(self) -> dict:
        done = self.meshlet("status", "--json")
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    def service(self, name: str) -> dict:
        return next(s for s in self.status()["services"] if s["name"] == name)

    def ready_nodes(self, name: str) -> list[str]:
        return sorted(i["node"] for i in self.service(name)["instances"] if i["ready"])

    def node(self, name: str) -> dict:
        return next(n for n in self.status()["nodes"] if n["name"] == name)

    def containers(self, host: str, service: str) -> list:
        client = self.engines[host].client()
        return client.containers.list(filters={"label": f"meshlet.service={service}"})


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    if not shutil.which("nsenter"):
        pytest.fail("nsenter (util-linux) is needed for the fleet tests")
    tmp = tmp_path_factory.mktemp("fleet")
    net = NetFleet(["ctl", "a", "b"])
    f = Fleet(net, tmp)
    try:
        # a: plain TCP, and sshd (the engine at ssh://root@a); b: TCP with --tlsverify, the
        # supervisor's client certificate in the config
        f.certs = engine_certs(tmp / "certs", net.addresses["b"])
        f.engines["a"] = start_engine("fla", netns=net.netns["a"], tcp=f"{net.addresses['a']}:2375")
        f.engines["b"] = start_engine("flb", netns=net.netns["b"], tcp=f"{net.addresses['b']}:2376", tls=f.certs)
        f.ssh_bin = ssh_access(net, "a", tmp / "ssh", f.engines["a"].socket_path)
        path = tmp / "fleet.yaml"
        path.write_text(fleet_yaml(net, tmp / "ctl", f.certs))
        net.run("ctl", [MESHLET, "--log-level", "INFO", "up", "-f", str(path)], log=tmp / "ctl.log")
        wait_for(lambda: f.meshlet("status").returncode == 0, timeout=90, interval=0.5,
                 what="the supervisor on the control host")
        url = f"http://{net.addresses['ctl']}:8500"
        for host in ("a", "b"):
            net.run(host, [MESHLET, "node", "run", "--catalog", url, "--address", net.addresses[host],
                           "--name", host, "-f", str(path), "--data-dir", str(tmp / host)],
                    log=tmp / f"node-{host}.log")
        wait_for(lambda: "node side of b ready" in (tmp / "node-b.log").read_text()
                 and "node side of a ready" in (tmp / "node-a.log").read_text(), timeout=60, interval=0.2,
                 what="both node sides")
        yield f
    finally:
        for proc in reversed(net.procs):
            net.stop(proc, grace=40)
        net.procs.clear()
        for engine in f.engines.values():
            engine.stop()
        net.close()


def test_replicas_spread_within_the_engines_capacity_and_a_too_big_one_waits(fleet):
    wait_for(lambda: fleet.ready_nodes("web") == ["a", "b"], timeout=90, interval=0.5,
             what="web ready on both hosts")
    nodes = {n["name"]: n for n in fleet.status()["nodes"]}
    for host in ("a", "b"):
        info = fleet.engines[host].client().info()
        # nothing declared: what the host's engine reports
        assert nodes[host]["capacity"] == {"cpu": float(info["NCPU"]), "memory": info["MemTotal"]}
        assert nodes[host]["state"] == "ready"
    huge = fleet.service("huge")
    assert huge["ready"] == 0 and huge["instances"] == []
    assert "cpu" in huge["problem"] and "a:" in huge["problem"] and "b:" in huge["problem"], huge["problem"]
    ls = fleet.meshlet("node", "ls")
    assert ls.returncode == 0 and [line.split()[:2] for line in ls.stdout.splitlines()[1:]] == [
        ["a", "ready"], ["b", "ready"]], ls.stdout


ENGINE_HEALTH = """
import asyncio, sys
from supervisor.runtime import EngineUnavailable
from supervisor.runtime.docker import DockerRuntime, engine_tls
url, certs, ca = sys.argv[1], sys.argv[2], sys.argv[3]
tls = engine_tls(f"{certs}/{ca}", f"{certs}/client.pem", f"{certs}/client.key") if ca else None
async def main():
    rt = DockerRuntime(url, node="b", tls=tls)
    try:
        print("answers", await rt.health(timeout=5))
    except EngineUnavailable as exc:
        print("refused", exc)
    finally:
        await rt.close()
asyncio.run(main())
"""


@pytest.mark.parametrize("ca, expected", [("ca.pem", "answers"), ("other-ca.pem", "refused"), ("", "refused")])
def test_an_engine_behind_tls_answers_only_with_the_right_certificates(fleet, ca, expected):
    """From the control host: the right CA and client certificate reach b's engine; a CA
    that did not sign the engine's certificate, or no TLS at all, does not."""
    done = fleet.net.call("ctl", [sys.executable, "-c", ENGINE_HEALTH, f"tcp://{fleet.net.addresses['b']}:2376",
                                  str(fleet.certs), ca])
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(expected), done.stdout
    if ca == "other-ca.pem":
        assert "certificate verify failed" in done.stdout, done.stdout


OVER_SSH = """
import asyncio, sys, time
from supervisor.runtime import EngineUnavailable, InstanceSpec
from supervisor.runtime.docker import DockerRuntime
url, image = sys.argv[1], sys.argv[2]
async def main():
    # a node name of its own: the running supervisor drives node a on this engine and would
    # stop a container of node a it did not start
    rt = DockerRuntime(url, node="ssh-test", address="127.0.0.1")
    try:
        cap = await rt.health(timeout=15)
        print("health", cap.cpu is not None and cap.memory is not None, flush=True)
        # PID 1 of the container ignores SIGTERM: the grace runs out, then SIGKILL
        spec = InstanceSpec(instance_id="ssh-0-test", service="ssh", slot=0, revision="r1", node="ssh-test",
                            image=image,
                            args=("/bin/sh", "-c", "exec sleep 600"), ports={"http": 23999})
        obs = await asyncio.wait_for(rt.start(spec), 30)
        print("started", obs.is_running, "ssh-0-test" in [o.instance_id for o in await rt.list()], flush=True)
        t0 = time.monotonic()
        await asyncio.wait_for(rt.stop("ssh-0-test", grace=1.0), 30)
        took = time.monotonic() - t0
        # exits over ssh are seen by listing (what the supervisor's re-list does)
        (gone,) = [o for o in await rt.list() if o.instance_id == "ssh-0-test"]
        print("stopped", round(took), gone.state, gone.exit_code, flush=True)
        await asyncio.wait_for(rt.remove("ssh-0-test"), 30)
        print("removed", "ssh-0-test" in [o.instance_id for o in await rt.list()], flush=True)
    finally:
        await asyncio.wait_for(rt.close(), 15)
asyncio.run(main())
"""


def test_an_engine_reached_over_ssh_runs_watches_and_stops_workloads(fleet):
    """ssh://root@a through the system's ssh client (key, known host, strict checking: the
    ssh config a user has), as `docker -H ssh://` reaches an engine: health and capacity,
    start, list, a stop whose grace runs out (PID 1 ignores SIGTERM) ending in SIGKILL,
    remove."""
    env = {**os.environ, "PATH": f"{fleet.ssh_bin}:{os.environ.get('PATH', '')}"}
    done = fleet.net.call("ctl", [sys.executable, "-c", OVER_SSH, f"ssh://root@{fleet.net.addresses['a']}",
                                  TEST_IMAGE], env=env, timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[0] == "health True"
    assert lines[1] == "started True True"
    stopped = lines[2].split()
    assert stopped[0] == "stopped" and 1 <= int(stopped[1]) < 30 and stopped[2:] == ["exited", "137"], lines
    assert lines[3] == "removed False"


def test_an_app_on_one_host_reaches_a_service_on_another_by_name_and_vip(fleet):
    wait_for(lambda: fleet.ready_nodes("api") == ["a"], timeout=90, interval=0.5, what="api ready on a")
    wait_for(lambda: fleet.ready_nodes("web") == ["a", "b"], timeout=90, interval=0.5)
    api_id = fleet.service("api")["instances"][0]["id"]
    (on_b,) = fleet.containers("b", "web")
    # the name resolves in the container (its resolv.conf: b's own DNS) to the VIP, which
    # b's own proxy serves. (busybox's own nslookup and nc: its static wget crashes on
    # glibc's resolver)
    code, out = on_b.exec_run(["nslookup", "api.service.meshlet"])
    assert code == 0, out
    vips = [line.split()[-1] for line in out.decode().splitlines()[2:] if line.startswith("Address")]
    looked = fleet.net.call("b", ["dig", "+short", "@127.0.0.153", "api.service.meshlet"])
    assert vips == [looked.stdout.strip()] and vips[0].startswith("127."), (out, looked)
    # nc ends when the proxy closes the HTTP/1.0 exchange; stdin is kept open at most 10 s
    # (busybox nc stops reading the network when its stdin ends)
    request = f"{{ printf 'GET /cgi-bin/env HTTP/1.0\\r\\n\\r\\n'; sleep 10; }} | nc {vips[0]} 8082"
    code, out = on_b.exec_run(["sh", "-c", request])
    assert code == 0 and f"MESHLET_INSTANCE={api_id}" in out.decode(), out


def test_a_lost_host_is_replaced_and_its_return_leaves_no_duplicate(fleet):
    wait_for(lambda: fleet.ready_nodes("web") == ["a", "b"], timeout=90, interval=0.5)
    before = {i["slot"]: i["id"] for i in fleet.service("web")["instances"]}
    (on_a,) = fleet.containers("a", "web")
    wait_for(lambda: fleet.ready_nodes("store") == ["a"], timeout=60, interval=0.5, what="store on a")
    (store,) = fleet.containers("a", "store")
    assert store.exec_run(["sh", "-c", "echo kept > /data/mark"])[0] == 0
    cut = time.monotonic()
    fleet.net.link("a", False)
    try:
        wait_for(lambda: fleet.node("a")["state"] == "lost", timeout=GRACE + 30, interval=0.2, what="a lost")
        wait_for(lambda: fleet.ready_nodes("web") == ["b", "b"], timeout=60, interval=0.3,
                 what="web's slot on a started again on b")
        moved = time.monotonic() - cut
        api = fleet.service("api")
        assert api["ready"] == 0 and "node lost" in (api["problem"] or ""), api   # constrained to a: waits
        # its data lives on a: pending with the reason, never started empty elsewhere
        wait_for(lambda: "store-data-0" in (fleet.service("store")["problem"] or ""), timeout=30, interval=0.3)
        assert "node lost" in fleet.service("store")["problem"] and fleet.containers("b", "store") == []
        # the replica on a never stopped: a partition, not a crash
        on_a.reload()
        assert on_a.status == "running"
    finally:
        fleet.net.link("a", True)
    assert moved < GRACE + 30
    wait_for(lambda: fleet.node("a")["state"] == "ready", timeout=30, interval=0.3, what="a back")
    # what still ran on a of a replaced slot is stopped and removed; never two live per slot
    wait_for(lambda: fleet.containers("a", "web") == [], timeout=60, interval=0.3,
             what="the stale replica on a removed")
    web = fleet.service("web")
    slots = [i["slot"] for i in web["instances"] if i["state"] != "exited"]
    assert sorted(slots) == [0, 1], web["instances"]
    assert on_a.name in before.values()
    wait_for(lambda: fleet.ready_nodes("api") == ["a"], timeout=60, interval=0.5, what="api back on a")
    # the store's replica rode out the partition on a and still has its data
    wait_for(lambda: fleet.ready_nodes("store") == ["a"], timeout=60, interval=0.5, what="store back on a")
    (back,) = fleet.containers("a", "store")
    assert back.id == store.id and back.exec_run(["cat", "/data/mark"]) == (0, b"kept\n")


LOAD = r"""
import json, os, sys, time, urllib.request
url, stop, out = sys.argv[1], sys.argv[2], sys.argv[3]
ok = failed = 0
errors = []
while not os.path.exists(stop):
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            r.read()
            ok += r.status == 200
            failed += r.status != 200
    except Exception as exc:
        failed += 1
        errors.append(repr(exc))
json.dump({"ok": ok, "failed": failed, "errors": errors[:5]}, open(out, "w"))
"""


def test_a_drain_under_load_through_the_proxy_fails_no_request(fleet):
    wait_for(lambda: len(fleet.ready_nodes("web")) == 2, timeout=90, interval=0.5)
    vip = fleet.net.call("ctl", ["dig", "+short", "@127.0.0.153", "web.service.meshlet"]).stdout.strip()
    assert vip.startswith("127."), vip
    source = fleet.ready_nodes("web")[0]
    target = "a" if source == "b" else "b"
    script, stop, result = fleet.tmp / "load.py", fleet.tmp / "stop", fleet.tmp / "load.json"
    script.write_text(LOAD)
    load = fleet.net.run("ctl", [sys.executable, str(script), f"http://{vip}:8081/", str(stop), str(result)],
                         log=fleet.tmp / "load.log")
    try:
        drained = fleet.meshlet("node", "drain", source, "--timeout", "120", timeout=150)
        assert drained.returncode == 0, drained.stdout + drained.stderr
        assert f"node {source}: drained" in drained.stdout
        assert fleet.ready_nodes("web") == [target, target]
        assert fleet.node(source)["draining"] is True
    finally:
        stop.touch()
        load.wait(30)
    counts = json.loads(result.read_text())
    assert counts["failed"] == 0 and counts["ok"] > 50, counts
    # cordoned: nothing new goes there until uncordoned
    # a command run on the control host with the catalog's URL: the token from its environment
    token = (fleet.tmp / "ctl" / "catalog" / "management-token").read_text().strip()
    scaled = fleet.net.call("ctl", [MESHLET, "scale", "web", "3", "--consul",
                                    f"http://{fleet.net.addresses['ctl']}:8500"],
                            env={**os.environ, "CONSUL_HTTP_TOKEN": token})
    assert scaled.returncode == 0, scaled.stderr
    wait_for(lambda: len(fleet.ready_nodes("web")) == 3, timeout=60, interval=0.5)
    assert fleet.ready_nodes("web") == [target] * 3
    done = fleet.meshlet("node", "uncordon", source)
    assert done.returncode == 0 and fleet.node(source)["cordoned"] is False
    # nothing moves back by itself; meshlet rebalance spreads again, under load, failing nothing
    assert fleet.ready_nodes("web") == [target] * 3
    planned = fleet.meshlet("rebalance", "--dry-run")
    assert planned.returncode == 0 and planned.stdout.splitlines() == [
        f"would move web slot 0: {target} -> {source}"], planned.stdout
    stop.unlink()
    load = fleet.net.run("ctl", [sys.executable, str(script), f"http://{vip}:8081/", str(stop), str(result)],
                         log=fleet.tmp / "load2.log")
    try:
        moved = fleet.meshlet("rebalance", "--timeout", "120", timeout=150)
        assert moved.returncode == 0 and "rebalanced" in moved.stdout, moved.stdout + moved.stderr
        assert sorted(fleet.ready_nodes("web")) == sorted([target, target, source])
    finally:
        stop.touch()
        load.wait(30)
    counts = json.loads(result.read_text())
    assert counts["failed"] == 0 and counts["ok"] > 20, counts
    assert fleet.meshlet("rebalance", "--dry-run").stdout.startswith("nothing to move")
