"""`meshlet up` end to end on the demo config: catalog, DNS, proxy and supervisor."""

from __future__ import annotations

import pytest

import io
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import dns.message
import dns.query
import dns.rdatatype
import yaml

from _util import free_port, stop_process, wait_for
from _util import kill_leftovers, pid_alive
from docker_env import docker_engine, docker_engines  # noqa: F401 (fixtures)
from supervisor.cli import main as meshlet_main

pytestmark = pytest.mark.slow   # real processes, sockets or engines (tests/conftest.py)

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "config" / "examples"


def demo_copy(tmp: Path) -> tuple[Path, dict[str, int]]:
    ports = {k: free_port() for k in ("catalog", "admin", "dns", "proxy", "proxy_admin")}
    doc = yaml.safe_load((EXAMPLES / "demo.yaml").read_text())
    doc["mesh"] = {
        "catalog_listen": f"127.0.0.1:{ports['catalog']}",
        "admin_listen": f"127.0.0.1:{ports['admin']}",
        "data_dir": "./state",
        "vip_range": "127.91.0.0/24",
        "dns": {"listen": [f"127.0.0.1:{ports['dns']}"]},
        "proxy": {"listen": [f"127.0.0.1:{ports['proxy']}"],
                  "admin_listen": f"127.0.0.1:{ports['proxy_admin']}"},
        "nodes": [{"name": "local", "runtime": "process"}],
    }
    shutil.copytree(EXAMPLES / "apps", tmp / "apps")
    path = tmp / "demo.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path, ports


class Lines:
    def __init__(self, stream) -> None:
        self.q: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream) -> None:
        for line in iter(stream.readline, ""):
            self.q.put(line.rstrip("\n"))

    def wait(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in s for s in self.seen):
            left = deadline - time.monotonic()
            assert left > 0, f"{text!r} not printed within {timeout}s; got {self.seen}"
            try:
                self.seen.append(self.q.get(timeout=left))
            except queue.Empty:
                pass


def run_cmd(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    code = meshlet_main(list(argv), out=out)
    return code, out.getvalue()


def test_meshlet_up_serves_the_demo_through_proxy_and_dns(tmp_path):
    path, ports = demo_copy(tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "supervisor", "up", "-f", str(path)],
                            cwd=str(REPO), stdout=subprocess.PIPE, text=True)
    lines = Lines(proc.stdout)
    try:
        lines.wait("web: 2/2 ready", timeout=60)
        lines.wait("api: 1/1 ready", timeout=30)

        def through_proxy():
            req = urllib.request.Request(f"http://127.0.0.1:{ports['proxy']}/",
                                         headers={"Host": "web.service.meshlet"})
            with urllib.request.urlopen(req, timeout=5) as r:
                return r.status == 200 and r.read().decode()
        body = wait_for(through_proxy, timeout=15)
        assert body.startswith("hello from web-")

        def resolves():
            q = dns.message.make_query("web.service.meshlet", dns.rdatatype.A)
            r = dns.query.udp(q, "127.0.0.1", port=ports["dns"], timeout=2)
            return [a.address for rrset in r.answer for a in rrset]
        addresses = wait_for(resolves, timeout=10)
        assert addresses and all(a.startswith("127.91.0.") for a in addresses)

        # no port-53 listener configured: as root, up adds the default resolver address
        # (unless another mesh on this machine holds it, which up then says)
        said = "\n".join(lines.seen)
        if os.geteuid() == 0 and "through 127.0.0.153:53" in said:
            q = dns.message.make_query("web.service.meshlet", dns.rdatatype.A)
            r = dns.query.udp(q, "127.0.0.153", port=53, timeout=2)
            assert [a.address for rrset in r.answer for a in rrset] == addresses
        else:
            assert "no DNS listener on port 53" in said, said

        admin = f"127.0.0.1:{ports['admin']}"
        code, text = run_cmd("status", "--admin", admin)
        assert code == 0
        assert "web  2/2 ready" in text and "api  1/1 ready" in text
        assert text.count("local  127.0.0.1:") == 3
        code, text = run_cmd("logs", "web", "--admin", admin)
        assert code == 0 and "listening on" in text

        follow = subprocess.Popen([sys.executable, "-m", "supervisor", "logs", "web", "-f",
                                   "--admin", admin], cwd=str(REPO), stdout=subprocess.PIPE, text=True)
        followed = Lines(follow.stdout)
        followed.wait("listening on", timeout=15)
        code, _ = run_cmd("down", "--admin", admin)
        assert code == 0
        assert proc.wait(timeout=30) == 0
        follow.wait(timeout=15)   # -f ends with the supervisor
        assert not list((tmp_path / "state" / "nodes" / "local" / "instances").glob("*.json")), \
            "down stops and removes every workload"
        code, _ = run_cmd("status", "--admin", admin)
        assert code == 1
    finally:
        stop_process(proc)
        kill_leftovers(tmp_path / "state")


def test_files_beside_the_config_never_replace_meshlets_modules(tmp_path):
    """A user's config.py, proxy.py, discovery.py or supervisor.py in the directory
    ``meshlet up`` runs from is never imported in place of meshlet's own modules: not by
    the command, nor by the catalog, DNS (and its zone builder) and proxy (and its workers)
    it starts."""
    path, ports = demo_copy(tmp_path)
    doc = yaml.safe_load(path.read_text())
    doc["mesh"]["proxy"]["workers"] = 2
    path.write_text(yaml.safe_dump(doc))
    marker = tmp_path / "imported"
    for name in ("config", "proxy", "discovery", "supervisor", "uvloop"):
        (tmp_path / f"{name}.py").write_text(
            f"open({str(marker)!r}, 'a').write({name!r} + '\\n')\nraise SystemExit('the user\\'s {name}.py')\n")
    meshlet = Path(sys.executable).parent / "meshlet"
    proc = subprocess.Popen([str(meshlet), "up", "-f", path.name], cwd=str(tmp_path), stdout=subprocess.PIPE,
                            text=True)
    lines = Lines(proc.stdout)
    try:
        lines.wait("web: 2/2 ready", timeout=60)

        def through_proxy():
            req = urllib.request.Request(f"http://127.0.0.1:{ports['proxy']}/", headers={"Host": "web.service.meshlet"})
            with urllib.request.urlopen(req, timeout=5) as r:
                return r.status == 200 and r.read().decode()
        assert wait_for(through_proxy, timeout=15).startswith("hello from web-")

        def resolves():
            q = dns.message.make_query("web.service.meshlet", dns.rdatatype.A)
            r = dns.query.udp(q, "127.0.0.1", port=ports["dns"], timeout=2)
            return [a.address for rrset in r.answer for a in rrset]
        assert wait_for(resolves, timeout=10)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        assert not marker.exists(), marker.read_text()
    finally:
        stop_process(proc)
        kill_leftovers(tmp_path / "state")


def _pid_after(lines: Lines, prefix: str) -> int:
    line = next(s for s in lines.seen if s.startswith(prefix))
    return int(line.rsplit("(pid ", 1)[1].rstrip(")"))


def _bindable(port: int) -> bool:
    import socket
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def test_up_keep_leaves_workloads_for_the_next_up_and_restarts_dead_components(tmp_path):
    path, ports = demo_copy(tmp_path)
    admin = f"127.0.0.1:{ports['admin']}"
    argv = [sys.executable, "-m", "supervisor", "up", "-f", str(path), "--keep"]
    proc = subprocess.Popen(argv, cwd=str(REPO), stdout=subprocess.PIPE, text=True)
    try:
        lines = Lines(proc.stdout)
        lines.wait("web: 2/2 ready", timeout=60)
        lines.wait("api: 1/1 ready", timeout=30)

        # a component that dies is started again (like a static pod)
        os.kill(_pid_after(lines, "meshlet up: dns ready"), signal.SIGKILL)

        def resolves():
            q = dns.message.make_query("web.service.meshlet", dns.rdatatype.A)
            return dns.query.udp(q, "127.0.0.1", port=ports["dns"], timeout=1).answer
        wait_for(resolves, timeout=20)

        code, text = run_cmd("status", "--admin", admin, "--json")
        before = {i["id"]: i["pid"] for s in json.loads(text)["services"]
                  for i in s["instances"]}
        assert len(before) == 3
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert len(list((tmp_path / "state" / "nodes" / "local" / "instances").glob("*.json"))) == 3

        proc = subprocess.Popen(argv, cwd=str(REPO), stdout=subprocess.PIPE, text=True)
        lines = Lines(proc.stdout)
        lines.wait("web: 2/2 ready", timeout=60)
        lines.wait("api: 1/1 ready", timeout=30)
        code, text = run_cmd("status", "--admin", admin, "--json")
        after = {i["id"]: i["pid"] for s in json.loads(text)["services"]
                 for i in s["instances"]}
        assert after == before, "the second up adopted every workload, restarted none"

        # kill -9 of `meshlet up`: its components go with it (their ports are free for the
        # next up), the workloads stay, and the next up adopts them all again
        components = [_pid_after(lines, f"meshlet up: {n} ready") for n in ("dns", "proxy")]
        proc.kill()
        proc.wait(timeout=10)
        wait_for(lambda: not any(pid_alive(pid) for pid in components), timeout=15)
        wait_for(lambda: _bindable(ports["catalog"]) and _bindable(ports["proxy"]), timeout=15)
        assert all(pid_alive(pid) for pid in before.values())
        proc = subprocess.Popen(argv, cwd=str(REPO), stdout=subprocess.PIPE, text=True)
        lines = Lines(proc.stdout)
        lines.wait("web: 2/2 ready", timeout=60)
        lines.wait("api: 1/1 ready", timeout=30)
        code, text = run_cmd("status", "--admin", admin, "--json")
        again = {i["id"]: i["pid"] for s in json.loads(text)["services"]
                 for i in s["instances"]}
        assert again == before, "after kill -9 of up: every workload adopted, none restarted"
        code, _ = run_cmd("down", "--admin", admin)
        assert code == 0 and proc.wait(timeout=30) == 0
        assert not list((tmp_path / "state" / "nodes" / "local" / "instances").glob("*.json"))
    finally:
        stop_process(proc)
        kill_leftovers(tmp_path / "state")


def test_up_with_a_bad_file_exits_2_and_says_where(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("services:\n  web:\n    command: [x]\n    replicas: three\n")
    proc = subprocess.run([sys.executable, "-m", "supervisor", "up", "-f", str(bad)],
                          cwd=str(REPO), capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert "bad.yaml:4 services.web.replicas" in proc.stderr
    assert not (tmp_path / ".meshlet").exists(), "nothing was started"


def _unique_loopback() -> str:
    """A 127.x.y.z of this test alone, so its port-53 listener collides with nothing."""
    import random
    return f"127.53.{random.randint(1, 254)}.{random.randint(1, 254)}"


class FakeRecursor:
    """A loopback DNS server answering every A question with 127.1.2.3 (stands in for
    the recursor that names outside the mesh's domain are forwarded to)."""

    def __init__(self) -> None:
        import socket
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.address = "127.0.0.1:%d" % self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        from dnslib import QTYPE, RR, A, DNSRecord
        while True:
            try:
                data, peer = self.sock.recvfrom(4096)
            except OSError:
                return
            q = DNSRecord.parse(data)
            reply = q.reply()
            if q.q.qtype == QTYPE.A:
                reply.add_answer(RR(q.q.qname, QTYPE.A, rdata=A("127.1.2.3"), ttl=5))
            self.sock.sendto(reply.pack(), peer)

    def close(self) -> None:
        self.sock.close()


def test_meshlet_up_on_a_docker_node(tmp_path, docker_engine):  # noqa: F811
    """Served through the proxy; a container resolves another service by name through the
    DNS listener on port 53 (resolv.conf mounted by meshlet); a missing image is a clear
    problem in the progress lines and in status, and the rest runs on; SIGTERM removes
    every container."""
    from docker_env import TEST_IMAGE, build_test_images
    build_test_images(docker_engine)
    path, ports = demo_copy(tmp_path)
    resolver = _unique_loopback()
    doc = yaml.safe_load(path.read_text())
    doc["mesh"]["nodes"] = [{"name": "box", "runtime": "docker", "engine": docker_engine.url}]
    doc["mesh"]["dns"]["listen"].append(f"{resolver}:53")
    recursor = FakeRecursor()
    doc["mesh"]["dns"]["recursors"] = [recursor.address]
    box = {"image": TEST_IMAGE, "ports": [{"name": "http", "vip_port": 80}],
           "stop_grace_period": "1s", "update": {"drain_delay": "0s"},
           "probes": {"readiness": {"http": {"path": "/"}, "period": "0.2s"}}}
    doc["services"] = {"web": {**box, "replicas": 2}, "client": {**box, "replicas": 1},
                       "ghost": {**box, "image": "meshlet-test/missing:404", "replicas": 1}}
    path.write_text(yaml.safe_dump(doc))
    proc = subprocess.Popen([sys.executable, "-m", "supervisor", "up", "-f", str(path)],
                            cwd=str(REPO), stdout=subprocess.PIPE, text=True)
    client = docker_engine.client()
    labels = ["meshlet.node=box"]
    try:
        lines = Lines(proc.stdout)
        lines.wait(f"containers resolve <service>.service.meshlet through {resolver}:53", timeout=60)
        lines.wait("web: 2/2 ready", timeout=60)
        lines.wait("client: 1/1 ready", timeout=30)
        lines.wait("ghost: 0/1 ready (slot 0: image meshlet-test/missing:404 not found on node box",
                   timeout=30)

        def through_proxy():
            req = urllib.request.Request(f"http://127.0.0.1:{ports['proxy']}/cgi-bin/env",
                                         headers={"Host": "web.service.meshlet"})
            with urllib.request.urlopen(req, timeout=5) as r:
                return r.status == 200 and r.read().decode()
        body = wait_for(through_proxy, timeout=15)
        assert "web-" in body

        # the app in a container resolves another service by name, unchanged
        (box_client,) = client.containers.list(filters={"label": ["meshlet.service=client", *labels]})
        code, conf = box_client.exec_run(["cat", "/etc/resolv.conf"])
        assert f"nameserver {resolver}" in conf.decode()
        code, out = box_client.exec_run(["nslookup", "web.service.meshlet"])
        assert code == 0, out.decode()
        answer = out.decode().split("web.service.meshlet", 1)[1]
        vip = answer.split("Address:", 1)[1].split()[0]
        assert vip.startswith("127.91.0."), out.decode()

        # a name outside the domain goes to the recursor
        code, out = box_client.exec_run(["nslookup", "outside.example"])
        assert code == 0 and "127.1.2.3" in out.decode().split("outside.example", 1)[1], out.decode()

        # ... and an HTTP client there reaches it by name: DNS -> VIP -> proxy -> a web
        # replica. (The port is explicit: the static busybox's wget crashes looking up the
        # "http" service name without glibc's NSS modules; the host name is no problem.)
        def wget_by_name():
            code, out = box_client.exec_run(["wget", "-O", "-",
                                             "http://web.service.meshlet:80/cgi-bin/env"])
            return code == 0 and out.decode()
        env = wait_for(wget_by_name, timeout=15)
        assert "MESHLET_SERVICE=web" in env and "HTTP_HOST=web.service.meshlet:80" in env

        # readiness: a web replica failing its probe leaves DNS and the proxy without a
        # restart, and comes back when it passes again
        web = sorted(client.containers.list(filters={"label": ["meshlet.service=web", *labels]}),
                     key=lambda c: c.labels["meshlet.slot"])
        sick, healthy = web
        port_of = {c.name: json.loads(c.labels["meshlet.ports"])["http"] for c in web}

        def srv_ports():
            q = dns.message.make_query("web.service.meshlet", dns.rdatatype.SRV)
            r = dns.query.udp(q, "127.0.0.1", port=ports["dns"], timeout=2)
            return sorted(rr.port for rrset in r.answer for rr in rrset)
        assert wait_for(lambda: srv_ports() == sorted(port_of.values()), timeout=10)
        assert sick.exec_run(["mv", "/www/index.html", "/www/away.html"]).exit_code == 0
        wait_for(lambda: srv_ports() == [port_of[healthy.name]], timeout=10)
        wait_for(lambda: all(f"instance={healthy.name}" in through_proxy() for _ in range(5)), timeout=10)
        assert all(f"instance={healthy.name}" in through_proxy() for _ in range(20))
        assert sick.exec_run(["mv", "/www/away.html", "/www/index.html"]).exit_code == 0
        wait_for(lambda: srv_ports() == sorted(port_of.values()), timeout=10)
        wait_for(lambda: f"instance={sick.name}" in through_proxy(), timeout=10)
        assert {c.id for c in client.containers.list(filters={"label": ["meshlet.service=web", *labels]})} \
            == {c.id for c in web}, "readiness never restarts"

        # scale up and down with `meshlet apply`
        def apply(replicas: int) -> None:
            doc["services"]["web"]["replicas"] = replicas
            path.write_text(yaml.safe_dump(doc))
            done = subprocess.run([sys.executable, "-m", "supervisor", "apply", "-f", str(path)],
                                  cwd=str(REPO), capture_output=True, text=True, timeout=60)
            assert done.returncode == 0, done.stderr

        def web_slots():
            return sorted(int(c.labels["meshlet.slot"]) for c in
                          client.containers.list(filters={"label": ["meshlet.service=web", *labels]}))
        apply(3)
        lines.wait("web: 3/3 ready", timeout=30)
        assert web_slots() == [0, 1, 2]
        apply(1)
        wait_for(lambda: web_slots() == [0], timeout=30)
        assert client.containers.get(sick.id).status == "running", "scaling down keeps slot 0"

        # the missing image: status says so, the supervisor runs on
        code, text = run_cmd("status", "--admin", f"127.0.0.1:{ports['admin']}")
        assert code == 0
        events = json.loads(run_cmd("status", "--admin", f"127.0.0.1:{ports['admin']}", "--json")[1])["events"]
        assert "web  1/1 ready" in text and "client  1/1 ready" in text, (text, events)
        assert "ghost  0/1 ready" in text and "meshlet-test/missing:404 not found" in text
        assert proc.poll() is None

        # kill -9 of `meshlet up`: the containers run on and the next up adopts them all
        running = {c.id for c in client.containers.list(filters={"label": labels})}
        assert len(running) == 2
        proc.kill()
        proc.wait(timeout=10)
        wait_for(lambda: _bindable(ports["proxy"]) and _bindable(ports["catalog"]), timeout=15)
        proc = subprocess.Popen([sys.executable, "-m", "supervisor", "up", "-f", str(path)],
                                cwd=str(REPO), stdout=subprocess.PIPE, text=True)
        lines = Lines(proc.stdout)
        lines.wait("web: 1/1 ready", timeout=60)
        lines.wait("client: 1/1 ready", timeout=30)
        # (an exited container of the scale-down may still be awaiting removal: wait for it)
        wait_for(lambda: {c.id for c in client.containers.list(all=True, filters={"label": labels})}
                 == running, timeout=15, what="adopted: nothing restarted, nothing duplicated")

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        assert not client.containers.list(all=True, filters={"label": labels})
    finally:
        stop_process(proc)
        recursor.close()
        for c in client.containers.list(all=True, filters={"label": labels}):
            c.remove(force=True)


def test_meshlet_up_on_the_docker_demo(tmp_path, docker_engine):  # noqa: F811
    """config/examples/demo-docker.yaml as shipped (only its engine and listen addresses
    moved to the test's): the image built by its build.sh, both routes served, status and
    logs through the admin API, and Ctrl-C leaves no container behind."""
    build = subprocess.run(["sh", str(EXAMPLES / "docker" / "httpd" / "build.sh")],
                           env={**os.environ, "DOCKER_HOST": docker_engine.url},
                           capture_output=True, text=True, timeout=180)
    assert build.returncode == 0, build.stderr
    ports = {k: free_port() for k in ("catalog", "admin", "dns", "proxy", "proxy_admin")}
    doc = yaml.safe_load((EXAMPLES / "demo-docker.yaml").read_text())
    doc["mesh"].update({
        "catalog_listen": f"127.0.0.1:{ports['catalog']}",
        "admin_listen": f"127.0.0.1:{ports['admin']}",
        "data_dir": "./state",
        "vip_range": "127.92.0.0/24",
        "dns": {"listen": [f"127.0.0.1:{ports['dns']}", f"{_unique_loopback()}:53"]},
        "proxy": {"listen": [f"127.0.0.1:{ports['proxy']}"],
                  "admin_listen": f"127.0.0.1:{ports['proxy_admin']}"}})
    assert [n["name"] for n in doc["mesh"]["nodes"]] == ["local"]
    doc["mesh"]["nodes"][0]["engine"] = docker_engine.url
    path = tmp_path / "demo-docker.yaml"
    path.write_text(yaml.safe_dump(doc))
    proc = subprocess.Popen([sys.executable, "-m", "supervisor", "up", "-f", str(path)],
                            cwd=str(REPO), stdout=subprocess.PIPE, text=True)
    client = docker_engine.client()
    labels = ["meshlet.node=local", "meshlet.owner=meshlet"]
    try:
        lines = Lines(proc.stdout)
        lines.wait("web: 2/2 ready", timeout=90)
        lines.wait("api: 1/1 ready", timeout=30)

        def get(path: str):
            req = urllib.request.Request(f"http://127.0.0.1:{ports['proxy']}{path}",
                                         headers={"Host": "demo.localhost"})
            with urllib.request.urlopen(req, timeout=5) as r:
                return r.status == 200 and r.read().decode()
        assert wait_for(lambda: get("/"), timeout=15).startswith("hello from web-")
        assert wait_for(lambda: get("/api/"), timeout=15).startswith("api from api-")

        admin = f"127.0.0.1:{ports['admin']}"
        code, text = run_cmd("status", "--admin", admin)
        assert code == 0
        assert "web  2/2 ready" in text and "api  1/1 ready" in text
        rows = [line.split() for line in text.splitlines() if line.strip().startswith(("web-", "api-"))]
        assert len(rows) == 3
        header = next(line.split() for line in text.splitlines() if "NODE" in line)
        assert header[:6] == ["INSTANCE", "NODE", "ADDRESS", "STATE", "RESTARTS", "AGE"]
        for row in rows:
            assert row[1] == "local" and row[2].startswith("127.0.0.1:") and row[3] == "ready" \
                and row[4] == "0", row
        code, text = run_cmd("logs", "web", "--admin", admin)
        assert code == 0 and "response:200" in text, text
        follow = subprocess.Popen([sys.executable, "-m", "supervisor", "logs", "api", "-f",
                                   "--admin", admin], cwd=str(REPO), stdout=subprocess.PIPE, text=True)
        followed = Lines(follow.stdout)

        def missing_page():
            try:
                get("/api/missing")
            except urllib.error.HTTPError as exc:
                return exc.code == 404
            return False
        assert wait_for(missing_page, timeout=5)
        followed.wait("response:404", timeout=15)   # new output arrives while following

        proc.send_signal(signal.SIGINT)   # Ctrl-C
        follow.wait(timeout=15)           # -f ends with the supervisor
        assert proc.wait(timeout=60) == 0
        lines.wait("meshlet up: stopped", timeout=5)
        assert not client.containers.list(all=True, filters={"label": labels})
    finally:
        stop_process(proc)
        for c in client.containers.list(all=True, filters={"label": labels}):
            c.remove(force=True)
