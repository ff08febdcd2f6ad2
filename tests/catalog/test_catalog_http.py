"""Cross-cutting HTTP rules, bad input, and the process lifecycle (ready line, signals)."""

from __future__ import annotations

import http.client
import signal
import subprocess
import sys
import threading
import time

import pytest
import requests

from _util import ServerStartError, start_server, wait_for
from catalog_helpers import blocked, shared_catalog  # noqa: F401 (fixture)

pytestmark = pytest.mark.slow   # real processes, sockets or engines (tests/conftest.py)

READ_PATHS = [
    "/v1/kv/missing", "/v1/kv/?recurse", "/v1/kv/?keys", "/v1/catalog/services", "/v1/catalog/nodes",
    "/v1/catalog/service/web", "/v1/catalog/node/meshlet", "/v1/health/service/web", "/v1/health/checks/web",
    "/v1/health/state/any", "/v1/health/node/meshlet", "/v1/session/list", "/v1/session/info/x",
    "/v1/session/node/meshlet", "/v1/agent/services", "/v1/agent/checks", "/v1/status/leader",
    "/v1/status/peers", "/v1/catalog/datacenters", "/v1/agent/self", "/v1/agent/members", "/v1/agent/metrics",
    "/v1/agent/service/nope", "/v1/health/connect/web", "/v1/health/ingress/web", "/v1/catalog/connect/web",
    "/v1/catalog/gateway-services/gw", "/v1/health/service/web?peer=p", "/v1/catalog/service/web?peer=p",
    "/v1/catalog/services?peer=p", "/v1/health/service/web?merge-central-config",
    "/v1/catalog/services?filter=ServiceName%20%3D%3D%20%22web%22", "/v1/kv/missing?index=1&wait=1ms",
    "/v1/catalog/node/nope", "/v1/session/info/nope?index=1&wait=1ms",
]


@pytest.mark.parametrize("path", [pytest.param(p, id=p.strip("/").replace("/", "-").replace("?", "-")) for p in READ_PATHS])
def test_read_endpoints_carry_consul_headers(shared_catalog, path: str) -> None:
    r = shared_catalog.http.get(shared_catalog.url + path, timeout=5)
    assert r.status_code in (200, 404)
    assert int(r.headers["X-Consul-Index"]) >= 1
    assert r.headers["X-Consul-KnownLeader"] == "true"
    assert r.headers["X-Consul-LastContact"] == "0"
    if r.status_code == 200:
        assert r.headers["Content-Type"].startswith("application/json")
        r.json()


@pytest.mark.parametrize(
    "method, path, allow",
    [
        pytest.param("GET", "/v1/agent/service/register", "OPTIONS,PUT", id="register-get"),
        pytest.param("POST", "/v1/health/service/web", "OPTIONS,GET", id="health-post"),
        pytest.param("DELETE", "/v1/session/create", "OPTIONS,PUT", id="session-delete"),
        pytest.param("GET", "/v1/txn", "OPTIONS,PUT", id="txn-get"),
    ],
)
def test_wrong_method(shared_catalog, method: str, path: str, allow: str) -> None:
    r = requests.request(method, shared_catalog.url + path, timeout=5)
    assert (r.status_code, r.text, r.headers["Allow"]) == (405, f"method {method} not allowed", allow)


def test_acl_token_self_describes_the_management_token(shared_catalog) -> None:
    me = shared_catalog.client().acl.token.read_self()
    assert (me["SecretID"], me["Description"]) == (shared_catalog.token, "Initial Management Token")
    assert [p["Name"] for p in me["Policies"]] == ["global-management"]


@pytest.mark.parametrize("path", ["/v1/acl/tokens", "/v1/acl/bootstrap", "/v1/agent/token/default"])
def test_acl_management_is_not_served(shared_catalog, path: str) -> None:
    for method in ("GET", "PUT"):
        r = shared_catalog.http.request(method, shared_catalog.url + path, timeout=5)
        assert (r.status_code, r.text) == (404, "Invalid URL path: not a recognized HTTP API endpoint\n")


def test_unknown_paths(shared_catalog) -> None:
    for path in ("/v1/nothing", "/v1/agent/nothing", "/v1/catalog"):
        r = shared_catalog.http.get(shared_catalog.url + path, timeout=5)
        assert (r.status_code, r.text) == (404, "Invalid URL path: not a recognized HTTP API endpoint\n")


def test_pretty(catalog) -> None:
    catalog.client().agent.service.register("web")
    compact = catalog.http.get(catalog.url + "/v1/health/service/web", timeout=5)
    pretty = catalog.http.get(catalog.url + "/v1/health/service/web?pretty", timeout=5)
    assert "\n" not in compact.text
    assert pretty.text.endswith("\n") and '\n    {\n        "Node"' in "\n" + pretty.text[1:]
    assert pretty.json() == compact.json()


@pytest.mark.parametrize(
    "method, path, body",
    [
        pytest.param("PUT", "/v1/agent/service/register", b"\xff\xfe\x00", id="not-utf8"),
        pytest.param("PUT", "/v1/agent/service/register", b"[" * 100_000, id="deep-nesting"),
        pytest.param("PUT", "/v1/catalog/register", b'{"Node": 1}', id="wrong-type"),
        pytest.param("PUT", "/v1/session/create", b'"just a string"', id="session-string"),
        pytest.param("PUT", "/v1/agent/check/register", b'{"Name": "c", "Interval": {}}', id="object-duration"),
        pytest.param("GET", "/v1/kv/%00%01?recurse", b"", id="control-chars"),
        pytest.param("GET", "/v1/health/service/web?index=99999999999999999999999", b"", id="index-overflow"),
        pytest.param("PUT", "/v1/txn", b"[null]", id="txn-null-op"),
        pytest.param("PUT", "/v1/agent/check/update/x", b"{}", id="update-unknown"),
    ],
)
def test_bad_input_never_crashes_or_leaks_a_trace(shared_catalog, method: str, path: str, body: bytes) -> None:
    conn = http.client.HTTPConnection(shared_catalog.host, shared_catalog.port, timeout=10)
    conn.request(method, path, body=body, headers=shared_catalog.headers)
    r = conn.getresponse()
    text = r.read().decode("utf-8", "replace")
    conn.close()
    assert r.status < 500 or r.status == 500 and "Internal error" not in text, text
    assert "Traceback" not in text and 'File "' not in text
    assert shared_catalog.http.get(shared_catalog.url + "/v1/status/leader", timeout=5).status_code == 200  # still serving


def test_sigterm_answers_blocked_queries_and_exits_0(catalog) -> None:
    c = catalog.client()
    c.kv.put("k", "v")
    index, _ = c.kv.get("k")
    answers = []

    def watch() -> None:
        r = catalog.http.get(catalog.url + "/v1/kv/k", params={"index": index, "wait": "60s"}, timeout=30)
        answers.append(r.status_code)

    threads = [threading.Thread(target=watch) for _ in range(5)]
    for t in threads:
        t.start()
    wait_for(lambda: blocked(catalog) >= 5, what="5 blocked")
    start = time.monotonic()
    assert catalog.kill(signal.SIGTERM) == 0
    for t in threads:
        t.join(10)
    assert answers == [200] * 5
    assert time.monotonic() - start < 10


def test_busy_port_fails_to_start(catalog, tmp_path) -> None:
    argv = [sys.executable, "-m", "discovery.catalog", "--listen", f"127.0.0.1:{catalog.port}",
            "--data-dir", str(tmp_path / "other")]
    with pytest.raises(ServerStartError):
        start_server(argv, timeout=15)


def test_ready_line_and_bad_arguments(tmp_path) -> None:
    proc, ready = start_server([sys.executable, "-m", "discovery.catalog", "--listen", "127.0.0.1:0",
                                "--data-dir", str(tmp_path / "d"), "--node", "n7", "--datacenter", "east"])
    try:
        assert set(ready) == {"http"}
        host, port = ready["http"].rsplit(":", 1)
        auth = {"X-Consul-Token": (tmp_path / "d" / "management-token").read_text().strip()}
        me = requests.get(f"http://{host}:{port}/v1/agent/self", headers=auth, timeout=5).json()
        assert (me["Config"]["NodeName"], me["Config"]["Datacenter"]) == ("n7", "east")
        r = requests.get(f"http://{host}:{port}/v1/kv/a", params={"dc": "dc1"}, headers=auth, timeout=5)
        assert (r.status_code, r.text) == (500, "No path to datacenter")
    finally:
        proc.terminate()
        assert proc.wait(10) == 0
    bad = subprocess.run([sys.executable, "-m", "discovery.catalog", "--listen", "nowhere"],
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "HOST:PORT" in bad.stderr


def test_main_is_importable() -> None:
    from discovery.catalog import main

    assert main(["--listen", "bad"]) == 2


def _read_answers(sock, n: int) -> list[tuple[int, bytes]]:
    """Read ``n`` whole HTTP answers (Content-Length framed) from ``sock``."""
    buf, out = b"", []
    while len(out) < n:
        while b"\r\n\r\n" not in buf:
            chunk = sock.recv(65536)
            assert chunk, "connection closed early"
            buf += chunk
        head, _, buf = buf.partition(b"\r\n\r\n")
        length = int(next(line.split(b":", 1)[1] for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:")))
        while len(buf) < length:
            buf += sock.recv(65536)
        out.append((int(head.split()[1]), buf[:length]))
        buf = buf[length:]
    return out


def test_pipelined_requests_are_answered_in_order(catalog) -> None:
    import socket

    catalog.client().kv.put("p", "1")
    host = b"Host: x\r\nX-Consul-Token: " + catalog.token.encode()
    with socket.create_connection((catalog.host, catalog.port), timeout=10) as s:
        s.sendall(b"GET /v1/kv/p?raw HTTP/1.1\r\n%s\r\n\r\n"
                  b"PUT /v1/kv/p HTTP/1.1\r\n%s\r\nContent-Length: 1\r\n\r\n2"
                  b"GET /v1/kv/p?raw HTTP/1.1\r\n%s\r\n\r\n"
                  b"GET /v1/kv/missing HTTP/1.1\r\n%s\r\n\r\n" % (host, host, host, host))
        assert _read_answers(s, 4) == [(200, b"1"), (200, b"true"), (200, b"2"), (404, b"")]


def test_client_gone_unparks_its_blocking_query(catalog) -> None:
    import socket

    index = catalog.client().kv.put("k", "v") and catalog.client().kv.get("k")[0]
    socks = []
    for _ in range(3):
        s = socket.create_connection((catalog.host, catalog.port), timeout=10)
        s.sendall(f"GET /v1/kv/k?index={index}&wait=60s HTTP/1.1\r\nHost: x\r\n"
                  f"X-Consul-Token: {catalog.token}\r\n\r\n".encode())
        socks.append(s)
    wait_for(lambda: blocked(catalog) == 3, what="3 blocked")
    socks.pop().close()
    wait_for(lambda: blocked(catalog) == 2, what="the closed one unparked")
    catalog.client().kv.put("k", "w")
    for s in socks:
        assert _read_answers(s, 1)[0][0] == 200
        s.close()
    assert blocked(catalog) == 0


@pytest.mark.parametrize("raw", [
    pytest.param(b"GARBAGE\r\n\r\n", id="not-http"),
    pytest.param(b"GET /v1/kv/a HTTP/1.1\r\nContent-Length: nope\r\n\r\n", id="bad-length"),
    pytest.param(b"GET /v1/kv/a HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n", id="upgrade"),
])
def test_malformed_request_gets_400_and_the_server_keeps_serving(shared_catalog, raw: bytes) -> None:
    import socket

    with socket.create_connection((shared_catalog.host, shared_catalog.port), timeout=10) as s:
        s.sendall(raw)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 400 ")
    assert shared_catalog.http.get(shared_catalog.url + "/v1/status/leader", timeout=5).status_code == 200


@pytest.mark.parametrize("raw, status", [
    pytest.param(b"GET /v1/kv/a?" + b"x" * 70_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 400, id="huge-url"),
    pytest.param(b"GET /v1/kv/a HTTP/1.1\r\n" + b"X-Big: " + b"y" * 70_000 + b"\r\n\r\n", 400, id="huge-header"),
    pytest.param(b"PUT /v1/kv/a HTTP/1.1\r\nHost: x\r\nContent-Length: 9000000\r\n\r\n" + b"z" * 9_000_000, 413,
                 id="huge-body"),
])
def test_oversized_requests_are_refused_and_nothing_is_written(shared_catalog, raw: bytes, status: int) -> None:
    import socket

    with socket.create_connection((shared_catalog.host, shared_catalog.port), timeout=10) as s:
        try:
            s.sendall(raw)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused and closed before all of it was read: the answer is still there
        data = b""
        try:
            while chunk := s.recv(65536):
                data += chunk
        except ConnectionResetError:
            pass
    assert data.startswith(f"HTTP/1.1 {status} ".encode()), data[:80]
    assert shared_catalog.http.get(shared_catalog.url + "/v1/kv/a", timeout=5).status_code == 404  # nothing written
