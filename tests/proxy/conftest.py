"""Fixtures for the proxy tests: a catalog with registered instances, backend processes,
and the real proxy process (``python -m proxy``).

Everything is a real process or a real socket:

* ``mesh_catalog``: the embedded catalog process the proxy's Mirror watches (blocking
  queries), with helpers to register instances with a TTL check, flip its status and
  store service documents built by :mod:`config`.
* ``Backend``: an aiohttp server in its own process (so a test can ``kill -9`` it); every
  answer carries ``X-Backend: <name>``.
* ``Proxy``: the proxy process; its ready line gives the listener addresses.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import types
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import config
from _util import async_wait_for, cli_env, wait_for  # noqa: F401 (px.wait_for, px.async_wait_for)

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable


def read_ready(proc: subprocess.Popen, timeout: float, what: str) -> dict[str, Any]:
    """The JSON of the process's ``ready`` line (stdout), within ``timeout``."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + timeout
    buf = b""
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0 or proc.poll() is not None:
            raise AssertionError(f"{what} did not print its ready line (exit={proc.poll()}, got {buf!r})")
        r, _, _ = select.select([fd], [], [], min(left, 0.2))
        if r:
            chunk = os.read(fd, 4096)
            if not chunk:
                continue
            buf += chunk
    line = buf.split(b"\n", 1)[0].decode()
    assert line.startswith("ready "), line
    return json.loads(line[6:])


# --------------------------------------------------------------------------- catalog


class MeshCatalog:
    """The embedded catalog (``python -m discovery.catalog``) with helpers the tests use:
    register instances (one TTL check each, as the supervisor does), flip their status,
    and store service documents built by :mod:`config` (as ``meshlet apply`` does)."""

    def __init__(self, data_dir: Path) -> None:
        from _util import CatalogProcess

        self.process = CatalogProcess(data_dir).start()
        self.proc = self.process.proc
        self.url = self.process.url
        self.client = self.process.client()

    def register(self, service: str, instance_id: str, port: int, *, address: str = "127.0.0.1",
                 status: str = "passing", meta: dict[str, str] | None = None, port_name: str | None = "http") -> None:
        import consul

        m = dict(meta or {})
        if port_name:
            m.setdefault(f"port_{port_name}", str(port))
        assert self.client.agent.service.register(service, service_id=instance_id, address=address, port=port,
                                                  meta=m, check=consul.Check.ttl("1h"))
        self.set_status(instance_id, status)

    def set_status(self, instance_id: str, status: str) -> None:
        check = f"service:{instance_id}"
        {"passing": self.client.agent.check.ttl_pass, "warning": self.client.agent.check.ttl_warn,
         "critical": self.client.agent.check.ttl_fail}[status](check)

    def deregister(self, instance_id: str) -> None:
        self.client.agent.service.deregister(instance_id)

    def put_service(self, name: str, yaml_service: str, vip: str | None = None) -> None:
        """Store the KV service document of ``name`` built from a YAML service body."""
        text = "services:\n  " + name + ":\n" + "\n".join("    " + line for line in yaml_service.splitlines())
        cfg = config.loads(text)
        doc = json.dumps(config.service_document(cfg.services[name], vip))
        assert self.client.kv.put("meshlet/services/" + name, doc)

    def delete_service(self, name: str) -> None:
        self.client.kv.delete("meshlet/services/" + name)

    def close(self) -> None:
        from _util import stop_process

        stop_process(self.proc)


@pytest.fixture(scope="session")
def mesh_catalog(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MeshCatalog]:
    """One catalog for the whole session; tests use unique service names (``unique``)."""
    c = MeshCatalog(tmp_path_factory.mktemp("catalog"))
    yield c
    c.close()


@pytest.fixture(scope="session")
def px() -> Any:
    """This module: the helper classes and functions (``px.RawClient``, ``px.Env``, ...).
    Test directories are not packages, so tests reach helpers through a fixture rather
    than ``import conftest`` (which could find another directory's conftest)."""
    # Not sys.modules[__name__]: every directory's conftest is named "conftest", so that
    # entry is whichever was imported last. globals() is always this module's own.
    return types.SimpleNamespace(**globals())


# --------------------------------------------------------------------------- backends

BACKEND_SRC = r'''
import asyncio, hashlib, json, sys
from aiohttp import web, WSMsgType

NAME = sys.argv[1]
count = 0

@web.middleware
async def tag(request, handler):
    global count
    count += 1
    resp = await handler(request)
    resp.headers["X-Backend"] = NAME
    return resp

async def info(request):
    if "pause" in request.query:
        await asyncio.sleep(float(request.query["pause"]))  # let the sender run ahead
    h = hashlib.sha256()
    n = 0
    async for chunk in request.content.iter_any():
        h.update(chunk); n += len(chunk)
    peer = request.transport.get_extra_info("peername") if request.transport else None
    return web.json_response({"backend": NAME, "method": request.method, "path": request.path_qs,
                              "peer": peer[1] if peer else None,
                              "version": "%d.%d" % request.version, "headers": list(request.headers.items()),
                              "body_len": n, "sha256": h.hexdigest()})

async def download(request):
    size = int(request.query.get("size", "0"))
    chunked = request.query.get("chunked") == "1"
    resp = web.StreamResponse()
    if chunked:
        resp.enable_chunked_encoding()
    else:
        resp.content_length = size
    await resp.prepare(request)
    block = b"x" * 65536
    left = size
    while left > 0:
        n = min(left, len(block))
        await resp.write(block[:n])
        left -= n
    await resp.write_eof()
    return resp

def chosen(request):
    """?only=NAME: the special behaviour applies to that backend only."""
    only = request.query.get("only")
    return only is None or only == NAME

async def slow(request):
    if chosen(request):
        await asyncio.sleep(float(request.query.get("delay", "1")))
    return web.Response(text="slow done " + NAME)

async def status(request):
    await request.read()
    code = int(request.match_info["code"]) if chosen(request) else 200
    return web.Response(status=code, text="status %d from %s" % (code, NAME))

async def nocontent(request):
    return web.Response(status=204)

async def notmodified(request):
    return web.Response(status=304, headers={"ETag": '"v1"'})

async def ws(request):
    sock = web.WebSocketResponse()
    await sock.prepare(request)
    async for msg in sock:
        if msg.type == WSMsgType.TEXT:
            await sock.send_str("echo:" + msg.data)
        elif msg.type == WSMsgType.BINARY:
            await sock.send_bytes(msg.data)
    return sock

async def counter(request):
    return web.json_response({"backend": NAME, "count": count})

async def main():
    app = web.Application(middlewares=[tag], client_max_size=1 << 40)
    app.router.add_get("/download", download)
    app.router.add_get("/slow", slow)
    app.router.add_route("*", "/status/{code}", status)
    app.router.add_get("/nocontent", nocontent)
    app.router.add_get("/notmodified", notmodified)
    app.router.add_get("/ws", ws)
    app.router.add_get("/count", counter)
    app.router.add_route("*", "/{tail:.*}", info)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", int(sys.argv[2]))
    await site.start()
    print("ready " + json.dumps({"http": "127.0.0.1:%d" % runner.addresses[0][1]}), flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
'''


class Backend:
    def __init__(self, name: str, port: int = 0, wait: bool = True) -> None:
        self.name = name
        self.port = 0
        self.proc = subprocess.Popen([PY, "-c", BACKEND_SRC, name, str(port)], stdout=subprocess.PIPE,
                                     stdin=subprocess.DEVNULL)
        if wait:
            self.wait_ready()

    def wait_ready(self) -> Backend:
        ready = read_ready(self.proc, 15, f"backend {self.name}")
        self.port = int(ready["http"].rsplit(":", 1)[1])
        return self

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(5)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def backends() -> Iterator[Callable[..., Backend]]:
    """Factory: ``backends("b1")`` starts a backend process, stopped at teardown."""
    started: list[Backend] = []

    def start(name: str) -> Backend:
        b = Backend(name)
        started.append(b)
        return b
    yield start
    for b in started:
        b.stop()


# --------------------------------------------------------------------------- proxy


class Proxy:
    def __init__(self, catalog_url: str, *args: str, log_path: Path | None = None) -> None:
        self.log_path = log_path
        self.log = open(log_path, "wb") if log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            [PY, "-m", "proxy", "--consul", catalog_url, "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0",
             *args], stdout=subprocess.PIPE, stderr=self.log, stdin=subprocess.DEVNULL, cwd=ROOT, env=cli_env())
        self.ready = read_ready(self.proc, 30, "proxy")
        self.http = self.ready["http"][0]
        self.host, port = self.http.rsplit(":", 1)
        self.port = int(port)
        self.admin = self.ready.get("admin")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def url(self, path: str = "/") -> str:
        return f"http://{self.http}{path}"

    def rss_kib(self, field: str = "VmRSS") -> int:
        """Resident memory of the proxy process in KiB (VmHWM: the peak so far)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise AssertionError(f"no {field}")

    def stderr_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.log is not subprocess.DEVNULL:
            self.log.close()
        return self.proc.returncode


@pytest.fixture
def start_proxy(mesh_catalog: MeshCatalog, tmp_path: Path) -> Iterator[Callable[..., Proxy]]:
    """Factory: ``start_proxy(*extra_args)`` starts a proxy on the catalog; stopped at teardown."""
    started: list[Proxy] = []

    def start(*args: str) -> Proxy:
        p = Proxy(mesh_catalog.url, *args, log_path=tmp_path / f"proxy{len(started)}.log")
        started.append(p)
        return p
    yield start
    for p in started:
        p.stop()


# --------------------------------------------------------------------------- raw sockets


def raw_exchange(addr: tuple[str, int] | str, data: bytes, timeout: float = 5.0) -> bytes:
    """Send ``data`` on a fresh connection, read until the proxy closes (or ``timeout``)."""
    if isinstance(addr, str):
        h, p = addr.rsplit(":", 1)
        addr = (h, int(p))
    with socket.create_connection(addr, timeout=timeout) as s:
        s.sendall(data)
        out = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                break
            if not chunk:
                break
            out += chunk
        return out


def unique(prefix: str) -> str:
    """A service name unique within the session (tests share the catalog)."""
    unique.n += 1  # type: ignore[attr-defined]
    return f"{prefix}{unique.n}"  # type: ignore[attr-defined]


unique.n = 0  # type: ignore[attr-defined]


class RawResponse:
    def __init__(self, status: int, headers: list[tuple[str, str]], body: bytes,
                 trailers: list[tuple[str, str]]) -> None:
        self.status, self.headers, self.body, self.trailers = status, headers, body, trailers

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None

    def json(self) -> Any:
        return json.loads(self.body)

    def __repr__(self) -> str:
        return f"<RawResponse {self.status} {self.headers} {self.body[:200]!r}>"


class RawClient:
    """A plain socket speaking HTTP/1.1 by hand (pipelining, framing cases, 100-continue)."""

    def __init__(self, addr: str, timeout: float = 5.0) -> None:
        h, p = addr.rsplit(":", 1)
        self.sock = socket.create_connection((h, int(p)), timeout=timeout)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise EOFError("connection closed")
        self.buf += chunk

    def read_until(self, sep: bytes) -> bytes:
        while sep not in self.buf:
            self._fill()
        out, self.buf = self.buf.split(sep, 1)
        return out

    def read_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def response(self, head_request: bool = False) -> RawResponse:
        lines = self.read_until(b"\r\n\r\n").decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = [tuple(x.strip() for x in line.split(":", 1)) for line in lines[1:]]
        r = RawResponse(status, headers, b"", [])  # type: ignore[arg-type]
        if head_request or status in (204, 304) or status < 200:
            return r
        if (r.header("transfer-encoding") or "").lower() == "chunked":
            body = b""
            while True:
                size = int(self.read_until(b"\r\n").split(b";")[0], 16)
                if size == 0:
                    break
                body += self.read_exact(size)
                assert self.read_exact(2) == b"\r\n"
            while True:
                line = self.read_until(b"\r\n")
                if not line:
                    break
                k, v = line.decode("latin-1").split(":", 1)
                r.trailers.append((k.strip(), v.strip()))
            r.body = body
        elif r.header("content-length") is not None:
            r.body = self.read_exact(int(r.header("content-length")))  # type: ignore[arg-type]
        else:
            try:
                while True:
                    self._fill()
            except (EOFError, ConnectionResetError):
                pass
            r.body, self.buf = self.buf, b""
        return r

    def is_closed(self, timeout: float = 5.0) -> bool:
        """True when the peer closes within ``timeout`` (and sent nothing more)."""
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(1) == b""
        except socket.timeout:
            return False
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def get(path: str, host: str, extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode()


class Env:
    """One service registered with its backends, and a proxy watching the catalog."""

    def __init__(self, catalog: MeshCatalog, tmp: Path, name: str, n: int, yaml: str | None,
                 vip: str | None = None, proxy_args: tuple[str, ...] = ()) -> None:
        self.catalog = catalog
        self.name = name
        self.host = f"{name}.service.meshlet"
        self.backends = [Backend(f"{name}-b{i}", wait=False) for i in range(n)]
        for b in self.backends:
            b.wait_ready()
        for i, b in enumerate(self.backends):
            catalog.register(name, f"{name}-{i}", b.port)
        if yaml is not None:
            catalog.put_service(name, yaml, vip)
        self.proxy = Proxy(catalog.url, *proxy_args, log_path=tmp / f"proxy-{name}.log")
        self.addr = self.proxy.http

    def url(self, path: str) -> str:
        return self.proxy.url(path)

    def close(self) -> None:
        self.proxy.stop()
        for i, b in enumerate(self.backends):
            self.catalog.deregister(f"{self.name}-{i}")
            b.stop()
        self.catalog.delete_service(self.name)


class RawUpstream:
    """A hand-written HTTP server in a thread: records every byte it receives and answers
    each request head with the canned bytes for its path (``answers``), else 200 "ok".
    Bodies are not read, except by a callable answer ``f(conn, head, rest) -> rest``, which
    may read the body itself (``rest``: bytes already received after the head)."""

    OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

    def __init__(self, answers: dict[bytes, bytes] | None = None) -> None:
        self.answers = answers or {}
        self.received = bytearray()
        self.requests: list[bytes] = []
        self.accepted = 0
        self.closed_by_peer = 0
        self.lock = threading.Lock()
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self.lock:
                self.accepted += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        buf = b""
        with conn:
            while True:
                try:
                    data = conn.recv(65536)
                except OSError:
                    data = b""
                if not data:
                    with self.lock:
                        self.closed_by_peer += 1
                    return
                with self.lock:
                    self.received += data
                buf += data
                while b"\r\n\r\n" in buf:
                    head, buf = buf.split(b"\r\n\r\n", 1)
                    with self.lock:
                        self.requests.append(head)
                    path = head.split(b" ", 2)[1] if b" " in head else b"/"
                    answer = self.answers.get(path, self.OK)
                    try:
                        if callable(answer):
                            buf = answer(conn, head, buf) or b""
                        else:
                            conn.sendall(answer)
                    except OSError:
                        pass

    def close(self) -> None:
        self.sock.close()


class EchoServer:
    """A TCP echo server in a thread (one thread per connection); echoes until EOF,
    then half-closes its side."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    def _echo(self, conn: socket.socket) -> None:
        with conn:
            try:
                while True:
                    data = conn.recv(65536)
                    if not data:
                        conn.shutdown(socket.SHUT_WR)
                        return
                    conn.sendall(data)
            except OSError:
                return

    def close(self) -> None:
        self.sock.close()
