"""What a user sees at the edges: semantic errors with their line before anything is written,
a prune that would empty the mesh, `meshlet scale`, a closed pipe, a follower's Ctrl-C, a
build script without its tools, `meshlet up` refusing to start half-way, and a VIP the
proxy cannot listen on."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import config
from _util import cli_env, free_port, kill_leftovers, start_server, stop_process, wait_for

pytestmark = pytest.mark.slow   # real processes, sockets (tests/conftest.py)

REPO = Path(__file__).resolve().parents[2]
MESHLET = str(Path(sys.executable).parent / "meshlet")


def meshlet(*args: str, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    env = cli_env()
    return subprocess.run([MESHLET, *args], capture_output=True, text=True, env=env, timeout=timeout, **kw)


def docs(catalog) -> dict:
    _, entries = catalog.client().kv.get("meshlet/", recurse=True)
    return {e["Key"]: e["Value"] for e in entries or ()}


def test_semantic_problems_stop_apply_with_their_line_and_nothing_is_written(catalog, tmp_path) -> None:
    path = tmp_path / "meshlet.yaml"
    path.write_text(textwrap.dedent("""\
        services:
          web:
            command: [x]
            ports: [{name: http, port: 7300}]
            update: {max_surge: 0}
          api:
            command: [y]
            ports: [{name: http, port: 7300}]
            update: {max_surge: 0}
            routes: {hosts: [shop.test]}
          shop:
            command: [z]
            ports: [{name: http}]
            routes: {hosts: [shop.test]}
        """))
    done = meshlet("apply", "-f", str(path), "--consul", catalog.url)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"{path}:8 services.api.ports[0].port: port 7300 is also services.web.ports[0]'s: two replicas on one "
        "node cannot both bind it",
        f"{path}:14 services.shop.routes.hosts[0]: host shop.test with path / is also services.api's: the proxy "
        "can give it to one of them only; give them other hosts or paths"]
    assert done.stdout == "" and docs(catalog) == {}


def test_a_prune_that_would_empty_the_mesh_needs_force(catalog, tmp_path) -> None:
    full, empty = tmp_path / "full.yaml", tmp_path / "empty.yaml"
    full.write_text("services:\n  web: {command: [x], ports: [{name: http}]}\n")
    empty.write_text("services: {}\n")
    assert meshlet("apply", "-f", str(full), "--consul", catalog.url).returncode == 0
    refused = meshlet("apply", "--prune", "-f", str(empty), "--consul", catalog.url)
    assert refused.returncode == 2 and "defines no services" in refused.stderr and "--force" in refused.stderr
    assert "meshlet/services/web" in docs(catalog)
    forced = meshlet("apply", "--prune", "--force", "-f", str(empty), "--consul", catalog.url)
    assert forced.returncode == 0 and "web: deleted" in forced.stdout
    assert "meshlet/services/web" not in docs(catalog)


def test_scale_writes_the_replicas_as_apply_would(catalog, tmp_path) -> None:
    path = tmp_path / "meshlet.yaml"
    path.write_text("services:\n  web: {command: [x], replicas: 2, ports: [{name: http}]}\n")
    assert meshlet("apply", "-f", str(path), "--consul", catalog.url).returncode == 0
    before = json.loads(docs(catalog)["meshlet/services/web"])
    done = meshlet("scale", "web", "5", "--consul", catalog.url)
    assert done.returncode == 0 and done.stdout.strip() == "web: scaled (replicas 2 → 5)"
    after = json.loads(docs(catalog)["meshlet/services/web"])
    assert after["spec"]["replicas"] == 5 and after["vip"] == before["vip"]
    spec, _, revision = config.parse_service_document(json.dumps(after))
    assert revision == config.service_revision(spec)            # a document as apply writes it
    again = meshlet("scale", "web", "5", "--consul", catalog.url)
    assert again.returncode == 0 and "already 5 replicas" in again.stdout
    missing = meshlet("scale", "nope", "1", "--consul", catalog.url)
    assert missing.returncode == 2 and "no service 'nope'" in missing.stderr
    bad = meshlet("scale", "web", "-1", "--consul", catalog.url)
    assert bad.returncode == 2 and "expected a number of replicas >= 0" in bad.stderr
    # a fixed port needs a node per replica: refused as apply refuses it, nothing written
    path.write_text("services:\n  db: {command: [x], ports: [{name: pg, port: 7432}], update: {max_surge: 0}}\n")
    assert meshlet("apply", "-f", str(path), "--consul", catalog.url).returncode == 0
    before = docs(catalog)
    refused = meshlet("scale", "db", "2", "--consul", catalog.url)
    assert refused.returncode == 2 and refused.stderr.startswith(
        "meshlet scale: db: 2 replicas with the fixed port 7432: each needs a node of its own, and 1 node can run db"), \
        refused.stderr
    assert docs(catalog) == before
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(f"mesh:\n  catalog: {catalog.url}\n  nodes: [{{name: a}}, {{name: b}}]\n")
    assert meshlet("scale", "db", "2", "-f", str(fleet)).returncode == 0


def test_a_closed_pipe_ends_the_command_quietly(catalog) -> None:
    """`meshlet secret ls | head -0`: the reader is gone before anything is written."""
    proc = subprocess.Popen([MESHLET, "secret", "ls", "--consul", catalog.url],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cli_env())
    proc.stdout.close()                    # before the command writes a byte
    _, err = proc.communicate(timeout=60)
    assert err == b"" and proc.returncode in (0, 141)


def test_the_build_script_says_what_is_missing(tmp_path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("sh", "dirname", "mktemp", "cp", "rm", "file", "grep"):
        found = subprocess.run(["sh", "-c", f"command -v {tool}"], capture_output=True, text=True).stdout.strip()
        if found:
            (bin_dir / tool).symlink_to(found)
    (bin_dir / "docker").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "docker").chmod(0o755)
    done = subprocess.run(["sh", str(REPO / "config/examples/docker/httpd/build.sh")], capture_output=True,
                          text=True, env={"PATH": str(bin_dir)}, timeout=30)
    assert done.returncode == 1
    assert "no busybox: install Debian's busybox-static" in done.stderr


def test_up_refuses_to_start_half_way_and_says_why_in_one_line_each(tmp_path) -> None:
    """A port another process holds, and a node whose engine does not answer: up says so
    before it starts anything, and leaves nothing behind."""
    taken = socket.socket()
    taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    proxy_port = free_port()
    taken.bind(("127.0.0.1", proxy_port))
    taken.listen()
    ports = {k: free_port() for k in ("catalog", "admin", "dns", "proxy_admin")}
    path = tmp_path / "meshlet.yaml"
    path.write_text(textwrap.dedent(f"""\
        mesh:
          catalog_listen: 127.0.0.1:{ports['catalog']}
          admin_listen: 127.0.0.1:{ports['admin']}
          data_dir: ./state
          dns: {{listen: [127.0.0.1:{ports['dns']}]}}
          proxy: {{listen: [127.0.0.1:{proxy_port}], admin_listen: 127.0.0.1:{ports['proxy_admin']}}}
          nodes: [{{name: far, runtime: docker, engine: "unix://{tmp_path}/no-such-docker.sock"}}]
        services:
          web: {{image: x, ports: [{{name: http}}]}}
        """))
    try:
        done = meshlet("up", "-f", str(path), cwd=str(tmp_path), timeout=120)
    finally:
        taken.close()
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        f"meshlet up: mesh.proxy.listen 127.0.0.1:{proxy_port}: in use (another meshlet up? `meshlet down` stops "
        "it; or give another port)",
        f"meshlet up: node far: no Docker engine answers at unix://{tmp_path}/no-such-docker.sock (start dockerd, "
        "or give the node runtime: process)"]
    assert "Traceback" not in done.stdout + done.stderr
    assert not (tmp_path / "state").exists()                  # nothing started, nothing written


def test_a_component_that_dies_before_ready_says_why(tmp_path) -> None:
    """Run in a process of its own, as `meshlet up` runs it: in the test process, an
    earlier test's un-waited Popen may reap a recycled pid and make asyncio report 255."""
    script = textwrap.dedent(f"""\
        import asyncio, sys
        from supervisor.daemon.components import Component, ComponentFailed

        async def go():
            comp = Component("dns", [sys.executable, "-c",
                                     "import sys; print('listen 127.0.0.1:53: Address already in use',"
                                     " file=sys.stderr); sys.exit(1)"], __import__("pathlib").Path({str(tmp_path)!r}),
                             out=sys.stderr)
            try:
                await comp.start(timeout=30)
            except ComponentFailed as exc:
                print(exc)
                return
            print("started?")

        asyncio.run(go())
        """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "dns exited with status 1 before it was ready" in done.stdout, done.stdout
    assert "Address already in use" in done.stdout              # the reason, not only the log's path


def test_an_interrupted_log_follower_leaves_no_traceback(catalog, tmp_path) -> None:
    """Ctrl-C on `meshlet logs -f`: neither the follower nor the supervisor (which goes on
    streaming into the closed connection) prints a traceback."""
    app = tmp_path / "talk.py"
    app.write_text("import os, threading, time\nfrom http.server import HTTPServer, BaseHTTPRequestHandler\n"
                   "def talk():\n    n = 0\n    while True:\n        n += 1; print('line', n, flush=True); time.sleep(0.05)\n"
                   "threading.Thread(target=talk, daemon=True).start()\n"
                   "HTTPServer(('127.0.0.1', int(os.environ['PORT'])), BaseHTTPRequestHandler).serve_forever()\n")
    path = tmp_path / "meshlet.yaml"
    path.write_text(f"services:\n  web: {{command: [{sys.executable}, {app}], ports: [{{name: http}}]}}\n")
    assert meshlet("apply", "-f", str(path), "--consul", catalog.url).returncode == 0
    log_file = tmp_path / "supervisor.log"
    with open(log_file, "wb") as log:
        proc, ready = start_server([MESHLET, "supervisor", "--consul", catalog.url, "--data-dir",
                                    str(tmp_path / "data"), "--runtime", "process", "--admin", "127.0.0.1:0",
                                    "--stop-on-exit"], stderr=log, env=cli_env())
    try:
        # (SIGINT as a terminal's Ctrl-C delivers it: a test run started in the background
        # of a non-interactive shell inherits SIGINT ignored, which Python then keeps)
        follower = subprocess.Popen([MESHLET, "logs", "web", "-f", "--admin", ready["admin"]],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        wait_for(lambda: follower.stdout.readline().startswith(b"line"), timeout=30, what="the follower's output")
        follower.send_signal(signal.SIGINT)
        _, err = follower.communicate(timeout=30)
        assert b"Traceback" not in err and follower.returncode == 130
        # the replica goes on writing, so the supervisor goes on streaming to the closed
        # connection: wait for many more lines than one write needs to fail
        (instance_log,) = (tmp_path / "data").glob("nodes/*/logs/*.log")
        written = instance_log.read_text().count("\n")
        wait_for(lambda: instance_log.read_text().count("\n") > written + 40, timeout=30, what="more output")
    finally:
        stop_process(proc)
    text = log_file.read_text()
    assert "Traceback" not in text and "Error handling request" not in text, text[-2000:]


def test_a_vip_the_proxy_cannot_listen_on_is_a_problem_in_status(tmp_path) -> None:
    """DNS hands out the VIP either way; when the proxy cannot listen there (a port below
    1024 without root, or, as here, an address another program holds) `meshlet status`
    says so for the service instead of curl's bare "connection refused"."""
    vip_port = free_port()
    holder = socket.socket()                 # the wildcard address: every VIP's port is taken
    holder.bind(("0.0.0.0", vip_port))
    holder.listen()
    ports = {k: free_port() for k in ("catalog", "admin", "dns", "proxy", "proxy_admin")}
    app = tmp_path / "serve.py"
    app.write_text("import os\nfrom http.server import HTTPServer, BaseHTTPRequestHandler\n"
                   "HTTPServer(('127.0.0.1', int(os.environ['PORT'])), BaseHTTPRequestHandler).serve_forever()\n")
    path = tmp_path / "meshlet.yaml"
    path.write_text(textwrap.dedent(f"""\
        mesh:
          catalog_listen: 127.0.0.1:{ports['catalog']}
          admin_listen: 127.0.0.1:{ports['admin']}
          data_dir: ./state
          vip_range: 127.94.0.0/24
          dns: {{listen: [127.0.0.1:{ports['dns']}]}}
          proxy: {{listen: [127.0.0.1:{ports['proxy']}], admin_listen: 127.0.0.1:{ports['proxy_admin']}}}
          nodes: [{{name: local, runtime: process}}]
        services:
          web: {{command: [{sys.executable}, {app}], ports: [{{name: http, vip_port: {vip_port}}}]}}
        """))
    env = cli_env()
    proc = subprocess.Popen([MESHLET, "up", "-f", str(path)], cwd=str(tmp_path), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    admin = f"127.0.0.1:{ports['admin']}"
    try:
        def problem() -> str | None:
            done = meshlet("status", "--json", "--admin", admin)
            if done.returncode != 0:
                return None
            web = next((s for s in json.loads(done.stdout)["services"] if s["name"] == "web"), None)
            return web and web["problem"]
        said = wait_for(problem, timeout=60, what="the VIP problem in status")
        assert said.startswith("VIP 127.94.0.") and f":{vip_port} refuses connections: the proxy cannot listen there" \
            in said and "in use" in said.lower(), said
        text = meshlet("status", "--admin", admin)
        assert text.returncode == 0 and f":{vip_port} refuses connections" in text.stdout, text.stdout
        holder.close()                       # the proxy retries, and the problem goes
        wait_for(lambda: problem() is None and meshlet("status", "--json", "--admin", admin).returncode == 0,
                 timeout=60, what="the problem to clear once the port is free")
    finally:
        holder.close()
        meshlet("down", "--admin", admin)
        stop_process(proc)
        kill_leftovers(tmp_path / "state")
