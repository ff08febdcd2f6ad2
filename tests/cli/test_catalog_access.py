"""How meshlet's commands and components reach a catalog that wants a token (and TLS):
refusals are one clear line, the token never shows in argv, output or errors, and
``meshlet up`` hands the embedded catalog's token to its children in their environment."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pytest
import yaml

from _util import REPO, TEST_TOKEN, CatalogProcess, cli_env, free_port, kill_leftovers, stop_process, wait_for

pytestmark = pytest.mark.slow   # real processes, sockets or engines (tests/conftest.py)

HELLO = REPO / "config" / "examples" / "apps" / "hello.py"
SERVICE = f"services:\n  web: {{command: [{sys.executable}, {HELLO}], ports: [{{name: http}}]}}\n"


def meshlet(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "supervisor", *args], capture_output=True, text=True, cwd=REPO,
                          env=env if env is not None else cli_env(), timeout=timeout)


def no_token_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("CONSUL_HTTP")}


# --------------------------------------------------------------------------- refusals


def test_a_missing_token_is_one_line_naming_what_to_set(catalog, tmp_path) -> None:
    f = tmp_path / "m.yaml"
    f.write_text(SERVICE)
    for args in (("apply", "-f", str(f)), ("scale", "web", "2"), ("secret", "ls"), ("rollout", "history", "web")):
        done = meshlet(*args, "--consul", catalog.url, env=no_token_env())
        assert done.returncode == 1, (args, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in done.stderr, (args, done.stderr)
        assert f"the catalog at {catalog.url} refused the token (no token): 403 Permission denied" in lines[0]
        assert "mesh.catalog.token_file, or $CONSUL_HTTP_TOKEN" in lines[0]


def test_a_wrong_token_names_where_it_came_from_and_is_never_printed(catalog, tmp_path) -> None:
    wrong = "0badc0de-0000-4000-8000-000000000000"
    token_file = tmp_path / "token"
    token_file.write_text(wrong + "\n")
    f = tmp_path / "m.yaml"
    f.write_text(f"mesh:\n  catalog: {{url: {catalog.url}, token_file: {token_file}}}\n" + SERVICE)
    done = meshlet("apply", "-f", str(f), env=no_token_env())
    assert done.returncode == 1
    assert f"refused the token (mesh.catalog.token_file ({token_file})): 403 ACL not found" in done.stderr
    assert wrong not in done.stderr + done.stdout and "Traceback" not in done.stderr
    via_env = meshlet("apply", "-f", str(tmp_path / "m.yaml"), env={**no_token_env(), "CONSUL_HTTP_TOKEN": wrong})
    assert via_env.returncode == 1 and wrong not in via_env.stderr   # the file's setting wins over the variable
    # the right token in the file: applied
    token_file.write_text(TEST_TOKEN)
    assert meshlet("apply", "-f", str(f), env=no_token_env()).returncode == 0
    assert catalog.client().kv.get("meshlet/services/web")[1] is not None


def test_a_token_file_that_cannot_be_read_is_named(catalog, tmp_path) -> None:
    f = tmp_path / "m.yaml"
    f.write_text(f"mesh:\n  catalog: {{url: {catalog.url}, token_file: missing.token}}\n" + SERVICE)
    done = meshlet("apply", "-f", str(f), env=no_token_env())
    assert done.returncode == 2
    assert done.stderr.strip() == (f"meshlet apply: mesh.catalog.token_file: cannot read {tmp_path / 'missing.token'}: "
                                   "No such file or directory")


def test_components_refuse_to_start_without_the_token(catalog) -> None:
    for module in ("discovery.dns", "proxy"):
        done = subprocess.run([sys.executable, "-m", module, "--consul", catalog.url, "--listen", "127.0.0.1:0"],
                              capture_output=True, text=True, cwd=REPO, env=no_token_env(), timeout=60)
        assert done.returncode == 1, (module, done.stderr)
        assert f"the catalog at {catalog.url} refused the token (no token): 403" in done.stderr, module


# --------------------------------------------------------------------------- TLS


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    import trustme

    d = tmp_path_factory.mktemp("tls")
    ca, other = trustme.CA(), trustme.CA()
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    other.cert_pem.write_to_path(str(d / "other-ca.pem"))
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(d / "server.pem"))
    return d


@pytest.fixture
def https_catalog(tmp_path, tls):
    cat = CatalogProcess(tmp_path / "tls-catalog", ("--tls-cert-file", str(tls / "server.pem"),
                                                     "--tls-key-file", str(tls / "server.pem")))
    cat.ca_file = str(tls / "ca.pem")
    cat.start()
    yield cat
    cat.stop()


def test_https_catalog_with_its_ca_file_and_a_clear_error_with_another(https_catalog, tls, tmp_path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TEST_TOKEN)
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    for path, ca in ((good, "ca.pem"), (bad, "other-ca.pem")):
        path.write_text(f"mesh:\n  catalog: {{url: {https_catalog.url}, token_file: {token_file}, "
                        f"ca_file: {tls / ca}}}\n" + SERVICE)
    done = meshlet("apply", "-f", str(good), env=no_token_env())
    assert done.returncode == 0, done.stderr
    assert https_catalog.client().kv.get("meshlet/services/web")[1] is not None
    refused = meshlet("apply", "-f", str(bad), env=no_token_env())
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert refused.stderr.strip().splitlines() == [
        f"meshlet apply: cannot verify the TLS certificate of the catalog at {https_catalog.url} with CA file "
        f"{tls / 'other-ca.pem'}: unable to get local issuer certificate; set mesh.catalog.ca_file (or "
        "$CONSUL_CACERT / --ca-file) to the CA that signed it"]


def test_dns_and_proxy_watch_an_https_catalog(https_catalog, tls) -> None:
    from _util import start_server

    c = https_catalog.client()
    c.agent.service.register("web", service_id="web-1", address="127.0.0.1", port=9, check={"TTL": "1h",
                                                                                         "Status": "passing"})
    env = https_catalog.env(no_token_env())
    procs = []
    try:
        dns_proc, dns_ready = start_server([sys.executable, "-m", "discovery.dns", "--listen", "127.0.0.1:0",
                                            "--consul", https_catalog.url, "--ca-file", str(tls / "ca.pem"),
                                            "--mode", "endpoints"], cwd=str(REPO), env=env, timeout=30)
        procs.append(dns_proc)
        px_proc, px_ready = start_server([sys.executable, "-m", "proxy", "--consul", https_catalog.url,
                                          "--ca-file", str(tls / "ca.pem"), "--listen", "127.0.0.1:0",
                                          "--admin", "127.0.0.1:0"], cwd=str(REPO), env=env, timeout=30)
        procs.append(px_proc)
        import dns.message
        import dns.query
        import dns.rdatatype

        host, port = dns_ready["udp"].rsplit(":", 1)
        answer = dns.query.udp(dns.message.make_query("web.service.meshlet", dns.rdatatype.A), host,
                               port=int(port), timeout=5)
        assert [a.address for rr in answer.answer for a in rr] == ["127.0.0.1"]
        with urllib.request.urlopen(f"http://{px_ready['admin']}/routes", timeout=5) as r:
            assert "web" in json.dumps(json.load(r))
    finally:
        for p in procs:
            stop_process(p)


# --------------------------------------------------------------------------- meshlet up


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""


def test_up_hands_its_token_to_the_children_in_their_environment_never_argv(tmp_path) -> None:
    ports = {k: free_port() for k in ("catalog", "admin", "dns", "proxy", "proxy_admin")}
    state = tmp_path / "state"
    path = tmp_path / "meshlet.yaml"
    path.write_text(yaml.safe_dump({
        "mesh": {"catalog_listen": f"127.0.0.1:{ports['catalog']}", "admin_listen": f"127.0.0.1:{ports['admin']}",
                 "data_dir": str(state), "vip_range": "127.93.0.0/24",
                 "dns": {"listen": [f"127.0.0.1:{ports['dns']}"]},
                 "proxy": {"listen": [f"127.0.0.1:{ports['proxy']}"],
                           "admin_listen": f"127.0.0.1:{ports['proxy_admin']}"},
                 "nodes": [{"name": "local", "runtime": "process"}]},
        "services": {"web": {"command": [sys.executable, str(HELLO)], "ports": [{"name": "http"}],
                             "probes": {"readiness": {"http": {"path": "/healthz"}, "period": "0.2s"}}}}}))
    # a token for some other Consul in up's environment is neither used nor passed on
    env = {**no_token_env(), "CONSUL_HTTP_TOKEN": "token-of-another-consul"}
    proc = subprocess.Popen([sys.executable, "-m", "supervisor", "up", "-f", str(path)], cwd=str(REPO),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: queue.Queue[str] = queue.Queue()
    seen: list[str] = []
    threading.Thread(target=lambda: [lines.put(ln) for ln in proc.stdout], daemon=True).start()

    def said(text: str) -> bool:
        while not lines.empty():
            seen.append(lines.get_nowait())
        return any(text in line for line in seen)

    try:
        wait_for(lambda: said("web: 1/1 ready"), timeout=60, what="web ready")
        token_file = state / "catalog" / "management-token"
        token = token_file.read_text().strip()
        assert oct(token_file.stat().st_mode & 0o777) == "0o600" and len(token) == 36

        def through_proxy() -> bool:
            req = urllib.request.Request(f"http://127.0.0.1:{ports['proxy']}/", headers={"Host": "web.service.meshlet"})
            with urllib.request.urlopen(req, timeout=5) as r:
                return r.status == 200
        wait_for(through_proxy, timeout=15)

        children = _descendants(proc.pid)
        argvs = {pid: _read(Path(f"/proc/{pid}/cmdline")).split(b"\0") for pid in children}
        assert any(b"discovery.dns" in a for a in argvs.values()) and any(b"proxy" in a for a in argvs.values())
        for pid, argv in argvs.items():
            assert token.encode() not in b" ".join(argv), f"token in the argv of {pid}: {argv}"
        for pid, argv in argvs.items():
            environ = _read(Path(f"/proc/{pid}/environ")).split(b"\0")
            joined = b" ".join(argv)
            if b"-m discovery.dns" in joined or b"-m proxy" in joined:     # and the DNS zone builder
                assert f"CONSUL_HTTP_TOKEN={token}".encode() in environ, pid
            else:                                  # the catalog itself, and the workloads
                assert token.encode() not in b" ".join(environ), (pid, argv)
            assert b"token-of-another-consul" not in b" ".join(environ) or b"discovery.catalog" in joined, pid
        # commands run beside it find the token by the file, whatever the shell holds
        status = meshlet("rollout", "history", "web", "-f", str(path), env=env)
        assert status.returncode == 0, status.stderr
        admin_status = meshlet("status", "--admin", f"127.0.0.1:{ports['admin']}", env=env)
        assert admin_status.returncode == 0 and token not in admin_status.stdout + admin_status.stderr
    finally:
        stop_process(proc, timeout=30)
        kill_leftovers(state)
    logs = b"".join(_read(p) for p in (state / "logs").glob("*.log"))
    assert token.encode() not in logs and token not in "\n".join(seen)
