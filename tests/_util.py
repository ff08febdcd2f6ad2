"""Helpers every test directory may import: waiting on conditions and starting servers.

* ``wait_for(predicate, timeout=5.0, interval=0.01)``: poll a sync predicate until it
  returns something truthy (returned) or fail with AssertionError at the deadline.
* ``async_wait_for(...)``: the same inside an event loop; the predicate may be a
  coroutine function.
* ``start_server(argv)``: start a meshlet server process (catalog, dns, proxy, ...) and
  return ``(proc, ready)`` where ``ready`` is the JSON object of its ``ready {...}`` line.
  The process's stderr goes to the test's captured stderr; its further stdout is drained.
* ``stop_process(proc)``: SIGTERM, wait, SIGKILL as a last resort; returns the exit code.
* ``free_port()``: a port on 127.0.0.1 for a server the test starts and must know in advance
  (a config file, a restart on the same port). Prefer port 0 and the ready line. It is
  taken outside the kernel's ephemeral range (so no outgoing connection or port-0 bind can
  take it meanwhile) and outside meshlet's replica range, free for TCP and UDP when
  chosen, and never handed out twice in a session.
* ``refusing_port()``: a port that refuses connections for the rest of the session: a socket
  bound to it (not listening) is held open, so nothing else can take it.
* ``CatalogProcess``: a running ``python -m discovery.catalog`` (what the ``catalog``
  fixture of tests/conftest.py yields). The catalog refuses requests without its
  management token: the one place tests get it is here (``.token``, ``.headers``,
  ``.http`` for raw requests, ``.client()``/``.aio()`` for py-consul, ``.access`` for
  meshlet's client, ``.env()`` for a child process).
* ``TEST_TOKEN``, ``cli_env()``: every catalog a test starts through ``CatalogProcess``
  finds this session's one token in its token file (as if an earlier start had made it),
  so a ``meshlet`` command run by a test reaches any of them with ``env=cli_env()`` (the
  environment without CONSUL_HTTP_*, plus CONSUL_HTTP_TOKEN). Catalogs that ``meshlet up``
  starts make their own token, as in real use.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, Sequence

REPO = Path(__file__).resolve().parent.parent

__all__ = [
    "wait_for", "async_wait_for", "start_server", "stop_process", "free_port", "refusing_port",
    "ServerStartError", "CatalogProcess", "pid_alive", "kill_leftovers", "TEST_TOKEN", "cli_env",
]

TEST_TOKEN = str(__import__("uuid").uuid4())


def cli_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """``base`` (default os.environ) without CONSUL_HTTP_*, with this session's catalog
    token in CONSUL_HTTP_TOKEN: the environment of a ``meshlet`` command a test runs."""
    env = {k: v for k, v in (os.environ if base is None else base).items() if not k.startswith("CONSUL_HTTP")}
    env["CONSUL_HTTP_TOKEN"] = TEST_TOKEN
    return env


def wait_for(predicate: Callable[[], Any], timeout: float = 5.0, interval: float = 0.01, what: str | None = None) -> Any:
    """Poll ``predicate`` until it returns a truthy value; return that value.

    Exceptions raised by the predicate count as "not yet" until the deadline, when the
    last one is chained to the AssertionError.
    """
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while True:
        try:
            value = predicate()
            if value:
                return value
            last_exc = None
        except Exception as exc:  # noqa: BLE001 - retried until the deadline
            last_exc = exc
        if time.monotonic() >= deadline:
            name = what or getattr(predicate, "__name__", repr(predicate))
            raise AssertionError(f"condition {name} not met within {timeout}s") from last_exc
        time.sleep(interval)


async def async_wait_for(
    predicate: Callable[[], Any | Awaitable[Any]], timeout: float = 5.0, interval: float = 0.01, what: str | None = None
) -> Any:
    """``wait_for`` for async tests; ``predicate`` may return an awaitable."""
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while True:
        try:
            value = predicate()
            if inspect.isawaitable(value):
                value = await value
            if value:
                return value
            last_exc = None
        except Exception as exc:  # noqa: BLE001
            last_exc = exc
        if time.monotonic() >= deadline:
            name = what or getattr(predicate, "__name__", repr(predicate))
            raise AssertionError(f"condition {name} not met within {timeout}s") from last_exc
        await asyncio.sleep(interval)


class ServerStartError(RuntimeError):
    """A server process exited or stayed silent instead of printing its ready line."""


def _drain(stream: Any, lines: "queue.Queue[str | None]") -> None:
    first = True
    for line in iter(stream.readline, ""):
        if first:
            lines.put(line)
            first = False
    if first:
        lines.put(None)  # EOF before any line
    stream.close()


def start_server(
    argv: Sequence[str], timeout: float = 15.0, env: dict[str, str] | None = None, cwd: str | None = None,
    stderr: Any = None,
) -> tuple[subprocess.Popen, dict[str, str]]:
    """Start ``argv`` and wait for its ``ready {...}`` line; return ``(proc, ready)``.

    Raises ServerStartError (after killing the process) if it exits first, prints
    anything else first, or says nothing within ``timeout`` seconds.
    """
    proc = subprocess.Popen(list(argv), stdout=subprocess.PIPE, stderr=stderr, text=True, env=env, cwd=cwd)
    lines: "queue.Queue[str | None]" = queue.Queue()
    assert proc.stdout is not None
    threading.Thread(target=_drain, args=(proc.stdout, lines), daemon=True).start()
    try:
        line = lines.get(timeout=timeout)
    except queue.Empty:
        stop_process(proc)
        raise ServerStartError(f"{argv!r} printed no ready line within {timeout}s") from None
    if line is None or not line.startswith("ready "):
        code = stop_process(proc)
        raise ServerStartError(f"{argv!r} exited ({code}) or printed {line!r} instead of a ready line")
    try:
        ready = json.loads(line[len("ready "):])
    except ValueError:
        stop_process(proc)
        raise ServerStartError(f"{argv!r} printed a malformed ready line: {line!r}") from None
    return proc, ready


def stop_process(proc: subprocess.Popen, timeout: float = 10.0, sig: int = signal.SIGTERM) -> int:
    """Signal ``proc`` (SIGTERM by default) and wait; SIGKILL if it does not exit in time."""
    if proc.poll() is None:
        try:
            proc.send_signal(sig)
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()


_handed_out: set[int] = set()
_held: list[socket.socket] = []
# meshlet's supervisor assigns replica ports from here (supervisor.daemon.replicas.PORT_RANGE)
_REPLICA_PORTS = range(20000, 30000)


def _ephemeral() -> range:
    try:
        lo, hi = (int(x) for x in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        lo, hi = 32768, 60999
    return range(lo, hi + 1)


def _bindable(host: str, port: int) -> bool:
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        with socket.socket(socket.AF_INET, kind) as s:
            try:
                s.bind((host, port))
            except OSError:
                return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A port for a server this test starts (see the module)."""
    import random
    ephemeral = _ephemeral()
    candidates = [p for p in range(10000, 65536) if p not in ephemeral and p not in _REPLICA_PORTS
                  and p not in _handed_out]
    random.shuffle(candidates)
    for port in candidates:
        if _bindable(host, port):
            _handed_out.add(port)
            return port
    raise RuntimeError("no free port outside the ephemeral and replica ranges")


def refusing_port(host: str = "127.0.0.1") -> int:
    """A port that refuses connections until the test session ends (see the module)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind((host, 0))
    _held.append(s)
    return s.getsockname()[1]


def pid_alive(pid: int) -> bool:
    """Running (a zombie nobody reaped yet counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


class TokenHTTP:
    """``requests``' get/put/post/delete/request with a catalog's token header added (a
    header given explicitly wins; ``headers={"X-Consul-Token": None}`` sends none)."""

    def __init__(self, headers: Callable[[], dict[str, str]], verify: Any = True) -> None:
        self._headers = headers
        self._verify = verify

    def request(self, method: str, url: str, **kwargs: Any) -> Any:
        import requests

        headers = {**self._headers(), **(kwargs.pop("headers", None) or {})}
        kwargs.setdefault("verify", self._verify() if callable(self._verify) else self._verify)
        return requests.request(method, url, headers={k: v for k, v in headers.items() if v is not None}, **kwargs)

    def get(self, url: str, **kwargs: Any) -> Any:
        return self.request("GET", url, **kwargs)

    def put(self, url: str, **kwargs: Any) -> Any:
        return self.request("PUT", url, **kwargs)

    def post(self, url: str, **kwargs: Any) -> Any:
        return self.request("POST", url, **kwargs)

    def delete(self, url: str, **kwargs: Any) -> Any:
        return self.request("DELETE", url, **kwargs)


class CatalogProcess:
    """A running ``python -m discovery.catalog``: what the ``catalog`` fixture of tests/conftest.py yields."""

    TOKEN_FILE = "management-token"    # config.CATALOG_TOKEN_FILE

    def __init__(self, data_dir: Path, extra_args: tuple[str, ...] = ()) -> None:
        self.data_dir = Path(data_dir)
        self.extra_args = tuple(extra_args)
        self.host = "127.0.0.1"
        self.port = 0
        self.scheme = "http"
        self.proc: subprocess.Popen | None = None
        self.ca_file: str | None = None      # set by a test that starts it with TLS
        self.http = TokenHTTP(lambda: self.headers, verify=self._verify)

    def _verify(self) -> Any:
        return self.ca_file or True

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    @property
    def token_file(self) -> Path:
        """The management token's file (the catalog makes it at its first start)."""
        args = list(self.extra_args)
        if "--token-file" in args:
            return Path(args[args.index("--token-file") + 1])
        return self.data_dir / self.TOKEN_FILE

    @property
    def token(self) -> str:
        return self.token_file.read_text().strip()

    @property
    def headers(self) -> dict[str, str]:
        return {"X-Consul-Token": self.token}

    @property
    def access(self) -> Any:
        """meshlet's ``discovery.consul.CatalogAccess`` for this catalog."""
        from discovery.consul import CatalogAccess

        return CatalogAccess(self.url, self.token, ca_file=self.ca_file, token_source="the test catalog's token")

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """``base`` (default os.environ) with this catalog's token in CONSUL_HTTP_TOKEN."""
        env = dict(os.environ if base is None else base)
        env["CONSUL_HTTP_TOKEN"] = self.token
        return env

    def aio(self, **kwargs: Any) -> Any:
        """py-consul's aio client with the token, as meshlet builds it (``discovery.consul.
        connect``: the token on every request, also those py-consul sends without one).
        Build it inside a running loop."""
        from discovery.consul import connect

        return connect(self.access, **kwargs)

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<CatalogProcess {self.url} {state} data_dir={self.data_dir}>"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def argv(self, port: int) -> list[str]:
        return [
            sys.executable, "-m", "discovery.catalog",
            "--listen", f"{self.host}:{port}",
            "--data-dir", str(self.data_dir),
            *self.extra_args,
        ]

    def start(self, port: int = 0) -> "CatalogProcess":
        path = self.token_file
        if not path.exists():                 # this session's token, as an earlier start would have left it
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(TEST_TOKEN + "\n")
        self.proc, ready = start_server(self.argv(port), cwd=str(REPO))
        self.scheme = "https" if "https" in ready else "http"
        host, _, bound = ready[self.scheme].rpartition(":")
        self.host, self.port = host, int(bound)
        return self

    def kill(self, sig: int = signal.SIGKILL) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=15)

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        return stop_process(self.proc)

    def restart(self) -> "CatalogProcess":
        if self.running:
            self.stop()
        port = self.port
        for _ in range(20):
            try:
                return self.start(port)
            except ServerStartError:
                time.sleep(0.1)  # the port may still be held for a moment; try again
        return self.start(0)

    def client(self, **kwargs: Any) -> Any:
        """py-consul's sync client with the token (``token=None`` in kwargs: without one)."""
        import consul

        kwargs.setdefault("token", self.token)
        kwargs.setdefault("scheme", self.scheme)
        if self.ca_file:
            kwargs.setdefault("verify", self.ca_file)
        client = consul.Consul(host=self.host, port=self.port, **kwargs)
        client.token = kwargs["token"]       # py-consul lets $CONSUL_HTTP_TOKEN override it
        if client.token:
            # py-consul sends no token on a few calls (agent.self, agent.members,
            # agent.service_definition); a real Consul with ACLs refuses those too.
            client.http.session.headers["X-Consul-Token"] = client.token
        return client


def kill_leftovers(data_dir: "str | os.PathLike[str]") -> None:
    """Last-resort cleanup after a failed test: SIGKILL every process group recorded in the
    process runtime's state files under ``data_dir`` (so no workload outlives its test)."""
    for path in Path(data_dir).glob("nodes/*/instances/*.json"):
        try:
            record = json.loads(path.read_text())
            if not record.get("exited"):
                os.killpg(int(record["pid"]), signal.SIGKILL)
        except (OSError, ValueError, KeyError, TypeError):
            pass

