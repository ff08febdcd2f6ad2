"""TLS termination and upstream TLS through the real proxy process, with real TLS clients
(Python's ssl module and curl): SNI picks the certificate, TLS < 1.2 is refused, changed
files are reloaded without touching open connections, bad files are refused at start and
reported (the old certificate staying) on reload, plain HTTP sent to a TLS port gets a 400,
and upstream TLS verifies the replica against a CA file.

Certificates are made at test time (tests/_certs.py)."""

from __future__ import annotations

import json
import os
import re
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from cryptography import x509

from _certs import Authority, new_key, self_signed
from _util import cli_env

pytestmark = pytest.mark.slow   # real processes, sockets or engines (tests/conftest.py)

ROOT = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------- helpers

def tls_listener(cert: Path, key: Path, certificates: list[dict] | None = None, address: str = "127.0.0.1:0") -> str:
    tls: dict = {"cert_file": str(cert), "key_file": str(key)}
    if certificates:
        tls["certificates"] = certificates
    return json.dumps({"address": address, "tls": tls})


def peer_cert(addr: str, server_name: str | None, ca: Path | None = None, **ctx_opts) -> x509.Certificate:
    """The certificate the proxy presents to a client asking for ``server_name`` (None:
    no SNI). With ``ca``: verified (name and chain) as a browser would."""
    host, port = addr.rsplit(":", 1)
    if ca is not None:
        ctx = ssl.create_default_context(cafile=str(ca))
    else:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    for k, v in ctx_opts.items():
        setattr(ctx, k, v)
    with socket.create_connection((host, int(port)), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname=server_name) as s:
            return x509.load_der_x509_certificate(s.getpeercert(binary_form=True))


def names(cert: x509.Certificate) -> list[str]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return san.get_values_for_type(x509.DNSName)


class TlsClient:
    """One keep-alive HTTPS connection, by hand (so a test controls when it is opened)."""

    def __init__(self, addr: str, server_name: str, ca: Path) -> None:
        host, port = addr.rsplit(":", 1)
        ctx = ssl.create_default_context(cafile=str(ca))
        self.sock = ctx.wrap_socket(socket.create_connection((host, int(port)), timeout=5),
                                    server_hostname=server_name)
        self.buf = b""

    @property
    def cert(self) -> x509.Certificate:
        return x509.load_der_x509_certificate(self.sock.getpeercert(binary_form=True))

    def get(self, path: str, host: str) -> tuple[int, bytes]:
        self.sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        while b"\r\n\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("closed")
            self.buf += chunk
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        length = next(int(v) for k, _, v in (line.partition(":") for line in lines[1:])
                      if k.lower() == "content-length")
        while len(self.buf) < length:
            self.buf += self.sock.recv(65536)
        body, self.buf = self.buf[:length], self.buf[length:]
        return int(lines[0].split()[1]), body

    def close(self) -> None:
        self.sock.close()


def curl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["curl", "-sS", "--max-time", "10", *args], capture_output=True, text=True, timeout=20)


def admin_get(proxy, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://{proxy.admin}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def replace(path: Path, data: bytes) -> None:
    """Replace a file atomically, as certificate tools do (write beside it, rename)."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ca = Authority()
    return {"dir": d, "ca": ca, "ca_file": ca.write(d),
            "default": ca.issue(d, "default", ["default.test"]),
            "www": ca.issue(d, "www", ["www.a.test", "*.b.test"]),
            "api": ca.issue(d, "api", ["api.c.test"])}


@pytest.fixture(scope="module")
def web(mesh_catalog, tmp_path_factory, px, pki):
    """One service behind a proxy with a plain and a TLS listener (three certificates)."""
    name = px.unique("tlsweb")
    b = px.Backend(name + "-b0")
    mesh_catalog.register(name, name + "-0", b.port)
    listener = tls_listener(*pki["default"], [
        {"hosts": ["www.a.test", "*.b.test"], "cert_file": str(pki["www"][0]), "key_file": str(pki["www"][1])},
        {"hosts": ["api.c.test"], "cert_file": str(pki["api"][0]), "key_file": str(pki["api"][1])}])
    proxy = px.Proxy(mesh_catalog.url, "--listen", listener, log_path=tmp_path_factory.mktemp("log") / "proxy.log")
    proxy.tls = proxy.ready["https"][0]
    proxy.service_host = f"{name}.service.meshlet"
    yield proxy
    proxy.stop()
    mesh_catalog.deregister(name + "-0")
    b.stop()


# --------------------------------------------------------------------------- SNI, versions

def test_sni_picks_each_hosts_certificate_and_the_default_otherwise(web, pki):
    ca = pki["ca_file"]
    assert names(peer_cert(web.tls, "www.a.test", ca)) == ["www.a.test", "*.b.test"]
    assert names(peer_cert(web.tls, "x.b.test", ca)) == ["www.a.test", "*.b.test"]     # wildcard
    assert names(peer_cert(web.tls, "API.C.TEST", ca)) == ["api.c.test"]               # case-insensitive
    assert names(peer_cert(web.tls, "default.test", ca)) == ["default.test"]
    assert names(peer_cert(web.tls, "unknown.example")) == ["default.test"]            # unknown name
    assert names(peer_cert(web.tls, None)) == ["default.test"]                         # no SNI at all
    assert names(peer_cert(web.tls, "b.test")) == ["default.test"]     # "*.b.test" needs a label before it


def test_requests_over_tls_are_routed_and_marked_https(web, pki):
    port = web.tls.rsplit(":", 1)[1]
    r = curl("--cacert", str(pki["ca_file"]), "--resolve", f"www.a.test:{port}:127.0.0.1",
             "-H", f"Host: {web.service_host}", f"https://www.a.test:{port}/hello?x=1")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    headers = {k.lower(): v for k, v in info["headers"]}
    assert info["path"] == "/hello?x=1"
    assert headers["x-forwarded-proto"] == "https"
    # the plain listener of the same process still says http
    with urllib.request.urlopen(urllib.request.Request(web.url("/"), headers={"Host": web.service_host}),
                                timeout=5) as resp:
        headers = {k.lower(): v for k, v in json.loads(resp.read())["headers"]}
    assert headers["x-forwarded-proto"] == "http"
    # a client's own X-Forwarded-For is extended, and the proto still follows the listener
    r = curl("-k", "-H", f"Host: {web.service_host}", "-H", "X-Forwarded-For: 10.9.8.7", f"https://{web.tls}/")
    headers = {k.lower(): v for k, v in json.loads(r.stdout)["headers"]}
    assert headers["x-forwarded-for"] == "10.9.8.7, 127.0.0.1" and headers["x-forwarded-proto"] == "https"


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
@pytest.mark.parametrize("version", [pytest.param(ssl.TLSVersion.TLSv1, id="1.0"),
                                     pytest.param(ssl.TLSVersion.TLSv1_1, id="1.1")])
def test_tls_1_0_and_1_1_are_refused(web, version):
    with pytest.raises(ssl.SSLError) as info:
        # (SECLEVEL=0: so that it is the proxy that refuses, not this client's own OpenSSL)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
        ctx.minimum_version = ctx.maximum_version = version
        host, port = web.tls.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=5) as raw:
            ctx.wrap_socket(raw, server_hostname="www.a.test")
    assert "PROTOCOL" in str(info.value).upper() or "VERSION" in str(info.value).upper(), info.value
    r = curl("-k", "--tlsv1.0", "--tls-max", "1.1", f"https://{web.tls}/")
    assert r.returncode == 35, (r.returncode, r.stderr)   # curl: SSL connect error
    # TLS 1.2 and 1.3 are served
    for v in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
        assert names(peer_cert(web.tls, "www.a.test", maximum_version=v, minimum_version=v))


def test_plain_http_to_the_tls_port_gets_a_400_saying_so_and_the_proxy_serves_on(web, pki, px):
    t0 = time.monotonic()
    out = px.raw_exchange(web.tls, f"GET / HTTP/1.1\r\nHost: {web.service_host}\r\n\r\n".encode(), timeout=5)
    assert time.monotonic() - t0 < 4, "the proxy held the connection open"
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 "), out
    assert b"connection: close" in head.lower()
    assert body == b"plain HTTP was sent to the TLS (https) port: use https://\n"
    # a real client: curl asked for http:// on the TLS port
    r = curl("-o", "-", "-w", "\n%{http_code}", f"http://{web.tls}/")
    assert r.returncode == 0 and r.stdout.splitlines()[-1] == "400" and "use https://" in r.stdout, (r.stdout, r.stderr)
    # junk bytes are neither TLS nor HTTP: closed as promptly (a reset, as they are unread), without an answer
    t0 = time.monotonic()
    try:
        out = px.raw_exchange(web.tls, b"\x00\xff" * 300, timeout=5)
    except ConnectionResetError:
        out = b""
    assert time.monotonic() - t0 < 4 and out == b"", out
    # clients that connect and close before sending a byte leave no socket behind
    fds = f"/proc/{web.proc.pid}/fd"
    before = len(os.listdir(fds))
    host, port = web.tls.rsplit(":", 1)
    for _ in range(20):
        socket.create_connection((host, int(port)), timeout=5).close()
    px.wait_for(lambda: len(os.listdir(fds)) <= before, 5, what="the proxy's descriptors back to where they were")
    status, text = admin_get(web, "/metrics")
    assert status == 200 and re.search(r'^meshlet_proxy_requests_total\{service="-",code="400"\} [1-9]', text, re.M), text
    assert web.proc.poll() is None
    assert names(peer_cert(web.tls, "www.a.test", pki["ca_file"]))
    assert "Traceback" not in web.stderr_text()


def test_a_silent_client_is_closed_at_the_handshake_time_out(mesh_catalog, start_proxy, pki, px):
    proxy = start_proxy("--listen", tls_listener(*pki["default"]), "--header-timeout", "1")
    host, port = proxy.ready["https"][0].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as s:
        t0 = time.monotonic()
        s.settimeout(5)
        assert s.recv(1) == b""
        assert time.monotonic() - t0 < 4


# --------------------------------------------------------------------------- reload

def test_changed_files_reach_new_connections_and_open_ones_keep_working(mesh_catalog, start_proxy, px, tmp_path):
    ca = Authority()
    ca_file = ca.write(tmp_path)
    cert, key = ca.issue(tmp_path, "site", ["www.r.test"])
    name = px.unique("tlsreload")
    b = px.Backend(name + "-b0")
    mesh_catalog.register(name, name + "-0", b.port)
    try:
        proxy = start_proxy("--listen", tls_listener(cert, key))
        addr, host = proxy.ready["https"][0], f"{name}.service.meshlet"
        old = TlsClient(addr, "www.r.test", ca_file)
        assert old.get("/1", host)[0] == 200
        old_serial = old.cert.serial_number

        staged = tmp_path / "staged"
        new_cert, new_key = ca.issue(staged, "site", ["www.r.test", "new.r.test"])
        replace(key, new_key.read_bytes())
        replace(cert, new_cert.read_bytes())

        fresh = px.wait_for(lambda: peer_cert(addr, "www.r.test", ca_file).serial_number != old_serial
                            and peer_cert(addr, "www.r.test", ca_file), 10, what="the new certificate")
        assert names(fresh) == ["www.r.test", "new.r.test"]
        # the connection opened before the reload: same session, still served
        assert old.get("/2", host)[0] == 200 and old.cert.serial_number == old_serial
        old.close()
        status, body = admin_get(proxy, "/tls")
        doc = json.loads(body)["listeners"][0]
        assert doc["error"] is None and doc["default"]["names"] == ["www.r.test", "new.r.test"]
        metrics = admin_get(proxy, "/metrics")[1]
        assert f'meshlet_proxy_tls_reloads_total{{kind="listener",name="{addr}",result="ok"}} 1' in metrics
    finally:
        mesh_catalog.deregister(name + "-0")
        b.stop()


def test_a_bad_file_on_reload_keeps_the_old_certificate_and_is_reported(start_proxy, px, tmp_path):
    ca = Authority()
    ca_file = ca.write(tmp_path)
    cert, key = ca.issue(tmp_path, "site", ["www.bad.test"])
    proxy = start_proxy("--listen", tls_listener(cert, key))
    addr = proxy.ready["https"][0]
    serial = peer_cert(addr, "www.bad.test", ca_file).serial_number

    def error() -> str | None:
        return json.loads(admin_get(proxy, "/tls")[1])["listeners"][0]["error"]

    # a key of another pair: refused, the old pair serves on
    replace(key, ca.issue(tmp_path / "other", "other", ["www.bad.test"])[1].read_bytes())
    msg = px.wait_for(error, 10, what="the reload error in /tls")
    assert f"key file {key} does not match the certificate in {cert}" in msg
    assert peer_cert(addr, "www.bad.test", ca_file).serial_number == serial
    metrics = admin_get(proxy, "/metrics")[1]
    assert f'meshlet_proxy_tls_files_invalid{{kind="listener",name="{addr}"}} 1' in metrics
    assert f'meshlet_proxy_tls_reloads_total{{kind="listener",name="{addr}",result="error"}} 1' in metrics
    px.wait_for(lambda: "cannot reload" in proxy.stderr_text() and str(key) in proxy.stderr_text(), 5,
                what="the error in the log")

    # garbage in the certificate file: another error, the old certificate still serves
    replace(cert, b"not a certificate\n")
    px.wait_for(lambda: "no PEM certificate" in (error() or ""), 10, what="the second error")
    assert peer_cert(addr, "www.bad.test", ca_file).serial_number == serial

    # fixed: a good pair again, the error is gone and the new certificate serves
    good_cert, good_key = ca.issue(tmp_path / "good", "site", ["www.bad.test"])
    replace(key, good_key.read_bytes())
    replace(cert, good_cert.read_bytes())
    px.wait_for(lambda: error() is None, 10, what="the error to clear")
    assert peer_cert(addr, "www.bad.test", ca_file).serial_number != serial
    assert f'meshlet_proxy_tls_files_invalid{{kind="listener",name="{addr}"}} 0' in admin_get(proxy, "/metrics")[1]


# --------------------------------------------------------------------------- bad files at start

def _start_fails(mesh_catalog, *args: str) -> str:
    """Start a proxy that must exit at once; its stderr."""
    p = subprocess.run([sys.executable, "-m", "proxy", "--consul", mesh_catalog.url, "--listen", "127.0.0.1:0", *args],
                       capture_output=True, text=True, timeout=30, cwd=ROOT, env=cli_env())
    assert p.returncode != 0 and not p.stdout.startswith("ready"), (p.returncode, p.stdout, p.stderr)
    assert "Traceback" not in p.stderr, p.stderr
    return p.stderr


def _bad_files(tmp: Path, case: str) -> tuple[Path, Path, str]:
    ca = Authority()
    cert, key = ca.issue(tmp, "site", ["www.s.test"])
    if case == "missing":
        return tmp / "nope.pem", key, f"certificate file {tmp / 'nope.pem'}: no such file"
    if case == "missing-key":
        return cert, tmp / "nope.key", f"key file {tmp / 'nope.key'}: no such file"
    if case == "mismatched":
        other = ca.issue(tmp / "o", "o", ["www.s.test"])[1]
        return cert, other, f"key file {other} does not match the certificate in {cert}"
    if case == "expired":
        c, k = ca.issue(tmp, "old", ["www.s.test"], days=-1)
        return c, k, f"certificate file {c}: the certificate (CN=www.s.test) expired on"
    if case == "not-yet-valid":
        c, k = self_signed(tmp, "future", ["www.s.test"], not_before_days=2, days=30)
        return c, k, f"certificate file {c}: the certificate (CN=www.s.test) is not valid before"
    if case == "garbage":
        (tmp / "junk.pem").write_text("hello\n")
        return tmp / "junk.pem", key, f"certificate file {tmp / 'junk.pem'}: no PEM certificate in it"
    if case == "key-is-a-cert":
        return cert, cert, f"key file {cert}: no PEM private key in it"
    if case == "encrypted-key":
        from cryptography.hazmat.primitives import serialization
        k = new_key()
        c, _ = self_signed(tmp, "enc", ["www.s.test"], key=k)
        (tmp / "enc.key").write_bytes(k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                      serialization.BestAvailableEncryption(b"secret")))
        return c, tmp / "enc.key", f"key file {tmp / 'enc.key'}: the key is encrypted with a passphrase"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["missing", "missing-key", "mismatched", "expired", "not-yet-valid", "garbage",
                                  "key-is-a-cert", "encrypted-key"])
def test_an_unusable_file_at_start_stops_the_proxy_with_a_clear_error(mesh_catalog, tmp_path, case):
    cert, key, expected = _bad_files(tmp_path, case)
    err = _start_fails(mesh_catalog, "--listen", tls_listener(cert, key))
    assert expected in err, err


def test_an_unusable_per_host_certificate_or_ca_file_at_start_is_named(mesh_catalog, tmp_path):
    cert, key = self_signed(tmp_path, "site", ["www.s.test"])
    err = _start_fails(mesh_catalog, "--listen", tls_listener(cert, key, [
        {"hosts": ["x.test"], "cert_file": str(tmp_path / "x.pem"), "key_file": str(key)}]))
    assert f"certificate file {tmp_path / 'x.pem'}: no such file" in err
    err = _start_fails(mesh_catalog, "--upstream-tls", json.dumps({"service": "api", "ca_file": str(cert) + ".nope"}))
    assert f"CA file {cert}.nope: no such file" in err
    # (the workers parent checks once, before starting any)
    err = _start_fails(mesh_catalog, "--workers", "2", "--listen", tls_listener(tmp_path / "x.pem", key))
    assert f"certificate file {tmp_path / 'x.pem'}: no such file" in err and err.count("no such file") == 1


def test_a_listener_option_with_a_mistake_is_refused_by_name(mesh_catalog, tmp_path):
    err = _start_fails(mesh_catalog, "--listen", '{address: 127.0.0.1:0, tls: {cert_file: a.pem, kee_file: a.key}}')
    assert 'tls.kee_file: unknown key (did you mean "key_file"?)' in err
    assert 'tls: missing required key "key_file"' in err


# --------------------------------------------------------------------------- upstream TLS

class TlsBackend:
    """An HTTPS server in a thread of the test process, answering "tls ok <path>"."""

    def __init__(self, cert: Path, key: Path) -> None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802
                body = f"tls ok {self.path}".encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def get_request(self):  # the handshake in the connection's thread, not the accept loop
                sock, addr = self.socket.accept()
                return ctx.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), addr

            def handle_error(self, request, client_address) -> None:
                pass   # a handshake the proxy aborted (wrong CA): expected here

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_upstream_tls_verifies_with_the_ca_file_and_a_wrong_ca_is_a_502(mesh_catalog, start_proxy, px, tmp_path):
    ca, other_ca = Authority("upstream CA"), Authority("another CA")
    good, bad = px.unique("upgood"), px.unique("upbad")
    backends = {}
    for svc in (good, bad):
        backends[svc] = TlsBackend(*ca.issue(tmp_path, svc, [f"{svc}.service.meshlet"]))
        mesh_catalog.register(svc, f"{svc}-0", backends[svc].port)
    try:
        proxy = start_proxy(
            "--upstream-tls", json.dumps({"service": good, "ca_file": str(ca.write(tmp_path, "ca"))}),
            "--upstream-tls", json.dumps({"service": bad, "ca_file": str(other_ca.write(tmp_path, "other-ca"))}))
        req = urllib.request.Request(proxy.url("/x?y=1"), headers={"Host": f"{good}.service.meshlet"})
        with urllib.request.urlopen(req, timeout=10) as r:
            assert r.status == 200 and r.read() == b"tls ok /x?y=1"

        req = urllib.request.Request(proxy.url("/"), headers={"Host": f"{bad}.service.meshlet"})
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(req, timeout=10)
        assert info.value.code == 502
        body = info.value.read().decode()
        assert "TLS certificate verification failed" in body, body
        px.wait_for(lambda: f"TLS to 127.0.0.1:{backends[bad].port} (service {bad}" in proxy.stderr_text(), 5,
                    what="the upstream TLS failure in the log")
        assert "failed: TLS certificate verification failed: " in proxy.stderr_text()
        doc = json.loads(admin_get(proxy, "/tls")[1])
        assert {u["service"]: u["server_name"] for u in doc["upstreams"]} == {
            good: f"{good}.service.meshlet", bad: f"{bad}.service.meshlet"}
    finally:
        for svc, backend in backends.items():
            mesh_catalog.deregister(f"{svc}-0")
            backend.close()


def test_upstream_server_name_is_checked(mesh_catalog, start_proxy, px, tmp_path):
    """The replica's certificate must name server_name: a valid chain for another name fails."""
    ca = Authority()
    svc = px.unique("upname")
    backend = TlsBackend(*ca.issue(tmp_path, svc, ["somebody-else.test"]))
    mesh_catalog.register(svc, f"{svc}-0", backend.port)
    try:
        ca_file = str(ca.write(tmp_path))
        proxy = start_proxy("--upstream-tls", json.dumps({"service": svc, "ca_file": ca_file}))
        req = urllib.request.Request(proxy.url("/"), headers={"Host": f"{svc}.service.meshlet"})
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(req, timeout=10)
        assert info.value.code == 502 and "Hostname mismatch" in info.value.read().decode()
        proxy2 = start_proxy("--upstream-tls", json.dumps({"service": svc, "ca_file": ca_file,
                                                          "server_name": "somebody-else.test"}))
        req = urllib.request.Request(proxy2.url("/"), headers={"Host": f"{svc}.service.meshlet"})
        with urllib.request.urlopen(req, timeout=10) as r:
            assert r.read() == b"tls ok /"
    finally:
        mesh_catalog.deregister(f"{svc}-0")
        backend.close()


# --------------------------------------------------------------------------- workers: auto

def test_workers_auto_is_one_per_core_sharing_tls_and_the_admin_sums_them(mesh_catalog, start_proxy, px, pki):
    from prometheus_client.parser import text_string_to_metric_families

    cores = len(os.sched_getaffinity(0))
    name = px.unique("tlsworkers")
    b = px.Backend(name + "-b0")
    mesh_catalog.register(name, name + "-0", b.port)
    try:
        proxy = start_proxy("--workers", "auto", "--listen", tls_listener(*pki["www"]))
        assert proxy.admin and proxy.ready["https"] == [proxy.ready["http"][1]]
        assert admin_get(proxy, "/ready") == (200, f"ready ({cores} of {cores} workers)\n")
        addr, host, n = proxy.ready["https"][0], f"{name}.service.meshlet", 30
        prefixes = set()
        for i in range(n):   # a new TLS connection each: the kernel spreads them over the workers
            c = TlsClient(addr, "www.a.test", pki["ca_file"])
            status, body = c.get(f"/w{i}", host)
            c.close()
            assert status == 200
            info = json.loads(body)
            headers = {k.lower(): v for k, v in info["headers"]}
            assert headers["x-forwarded-proto"] == "https"
            prefixes.add(headers["x-request-id"].split("-")[0])
        assert len(prefixes) == cores, prefixes if cores > 1 else None   # every worker served some
        text = admin_get(proxy, "/metrics")[1]
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for f in text_string_to_metric_families(text) for s in f.samples}
        assert samples[("meshlet_proxy_requests_total", (("code", "200"), ("service", name)))] == n
        doc = json.loads(admin_get(proxy, "/tls")[1])
        assert doc["workers"] == cores and doc["listeners"][0]["listen"] == addr
    finally:
        mesh_catalog.deregister(name + "-0")
        b.stop()


def test_a_tls_listener_on_a_taken_port_stops_the_proxy_naming_the_address(mesh_catalog, tmp_path, pki):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        err = _start_fails(mesh_catalog, "--listen", tls_listener(*pki["default"], address=f"127.0.0.1:{port}"))
    assert f"cannot listen: [Errno 98] error while attempting to bind on address ('127.0.0.1', {port}): " \
           "address already in use" in err, err
