"""meshlet's own components (catalog, DNS, proxy) run as child processes, the way a
kubelet runs static pods, and what ``meshlet up`` decides before starting them.

``Component``: one child, started with ``config.module_argv`` (``python -P -m ...``: a
user's ``config.py`` or ``proxy.py`` in the working directory is never imported in their
place). It prints one ``ready {json}`` line once bound; its stderr goes to
``<data_dir>/logs/<name>.log``; it is started again (1 s doubling to 30 s) whenever it
dies; it gets SIGTERM when ``meshlet up`` dies, even by SIGKILL (PR_SET_PDEATHSIG), so a
killed ``up`` leaves no catalog/DNS/proxy holding the ports the next ``up`` needs. Its own
session: a terminal's Ctrl-C reaches only ``up``, which stops workloads first
(deregistering them in the catalog) and the catalog last.

``component_argvs``: the DNS and proxy command lines for the mesh settings.
``plan_resolver`` / ``dns_settings`` / ``loopback_nameservers``: the DNS listeners and
recursors ``up`` runs (the resolver on port 53 that containers are given).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import json
import os
import signal
import socket
from pathlib import Path
from typing import Any, TextIO

import config

from ..runtime import WorkloadError
from ..runtime.docker import engine_tls, open_client

__all__ = ["Component", "ComponentFailed", "component_argvs", "plan_resolver", "dns_settings",
           "loopback_nameservers", "DEFAULT_RESOLVER", "catalog_argv", "preflight", "vip_notes", "log_tail", "docker_answers",
           "engine_notes"]


# Where the DNS server answers on port 53 for containers when mesh.dns.listen has no
# port-53 entry (an address of 127.0.0.0/8 that nothing else uses by convention).
DEFAULT_RESOLVER = "127.0.0.153"


def plan_resolver(listen: tuple[str, ...], default: str | None) -> tuple[str | None, tuple[str, ...]]:
    """(resolver IP for the containers' resolv.conf, DNS listen addresses).

    The first ``listen`` entry on port 53 is the resolver (an unspecified host answers on
    loopback too: 127.0.0.1 / ::1); with none, ``default`` (an IP, or None: no resolver)
    is added on port 53."""
    for item in listen:
        host, port = config.split_hostport(item)
        if port != 53:
            continue
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            continue
        if ip.is_unspecified:
            return ("::1" if ip.version == 6 else "127.0.0.1"), listen
        return str(ip), listen
    if default is None:
        return None, listen
    return default, (*listen, config.join_hostport(default, 53))


def loopback_nameservers(resolv_conf: str, exclude: str | None = None) -> tuple[str, ...]:
    """The ``nameserver`` lines of a resolv.conf that are on loopback, as HOST:53 (a local
    caching resolver is a safe recursor; ``exclude``, our own resolver, would loop)."""
    out: list[str] = []
    for line in resolv_conf.splitlines():
        parts = line.split()
        if len(parts) < 2 or parts[0] != "nameserver":
            continue
        try:
            ip = ipaddress.ip_address(parts[1].split("%")[0])
        except ValueError:
            continue
        if ip.is_loopback and str(ip) != exclude and config.join_hostport(str(ip), 53) not in out:
            out.append(config.join_hostport(str(ip), 53))
    return tuple(out)


def _can_bind(ip: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
        with socket.socket(family, kind) as s:
            if kind == socket.SOCK_STREAM:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((ip, port))
            except OSError:
                return False
    return True


def dns_settings(mesh: config.MeshSettings) -> tuple[str | None, config.MeshSettings, bool]:
    """(resolver IP, ``mesh`` with the DNS listeners and recursors ``up`` runs, whether
    the DEFAULT_RESOLVER listener was added). Reads /etc/resolv.conf; binds a test socket."""
    default = None
    if not any(config.split_hostport(item)[1] == 53 for item in mesh.dns.listen):
        if hasattr(os, "geteuid") and os.geteuid() == 0 and _can_bind(DEFAULT_RESOLVER, 53):
            default = DEFAULT_RESOLVER
    resolver, listen = plan_resolver(mesh.dns.listen, default)
    recursors = mesh.dns.recursors
    if not recursors:
        try:
            recursors = loopback_nameservers(Path("/etc/resolv.conf").read_text(), exclude=resolver)
        except OSError:
            recursors = ()
    dns = dataclasses.replace(mesh.dns, listen=listen, recursors=recursors)
    return resolver, dataclasses.replace(mesh, dns=dns), default is not None


class ComponentFailed(Exception):
    pass


def log_tail(path: Path, lines: int = 5) -> str:
    """The last ``lines`` lines of a component's log, indented, for a failure message."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    tail = [line for line in text.splitlines() if line.strip()][-lines:]
    return "".join(f"\n    {line}" for line in tail)


def _bind_problem(addr: str, udp: bool) -> str | None:
    import errno
    host, port = config.split_hostport(addr)
    if port == 0:
        return None
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for kind in ((socket.SOCK_STREAM, socket.SOCK_DGRAM) if udp else (socket.SOCK_STREAM,)):
        with socket.socket(family, kind) as s:
            if kind == socket.SOCK_STREAM:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError as exc:
                hint = {errno.EADDRINUSE: "in use (another meshlet up? `meshlet down` stops it; or give another port)",
                        errno.EACCES: "not allowed: ports below 1024 need root",
                        errno.EADDRNOTAVAIL: "no such address on this host"}.get(exc.errno, exc.strerror or str(exc))
                return hint
    return None


def docker_answers(engine: str = config.DEFAULT_DOCKER_ENGINE, timeout: float = 2.0, tls: Any = None) -> bool:
    """Does a Docker engine answer at ``engine``? (blocking; run in a thread)"""
    if engine.startswith("unix://") and not os.path.exists(engine[len("unix://"):]):
        return False
    try:
        client = open_client(engine, timeout=timeout, tls=tls)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:  # noqa: BLE001 - anything but an answer means no engine
        return False


def preflight(mesh: config.MeshSettings, *, with_catalog: bool) -> list[str]:
    """What would stop ``meshlet up`` once started, checked before it starts anything:
    its listeners' addresses (free, allowed) and its nodes' Docker engines (answering).
    One line per problem."""
    problems = []
    listeners = [("mesh.admin_listen", mesh.admin_listen, False), ("mesh.proxy.admin_listen", mesh.proxy.admin_listen, False)]
    listeners += [("mesh.dns.listen", a, True) for a in mesh.dns.listen]
    listeners += [("mesh.proxy.listen", listener.address, False) for listener in mesh.proxy.listen]
    if with_catalog:
        listeners.insert(0, ("mesh.catalog_listen", mesh.catalog_listen, False))
    for what, addr, udp in listeners:
        why = _bind_problem(addr, udp)
        if why:
            problems.append(f"{what} {addr}: {why}")
    for node in mesh.nodes:
        if (node.runtime or ("docker" if node.engine else "process")) != "docker":
            continue
        engine = node.engine or config.DEFAULT_DOCKER_ENGINE
        try:
            tls = engine_tls(node.tls.ca_file, node.tls.cert_file, node.tls.key_file) if node.tls else None
        except WorkloadError as exc:
            problems.append(f"node {node.name}: {exc}")
            continue
        # One engine of a fleet may be down when the control plane starts: its node is
        # unreachable (status says so) and its replicas go elsewhere after the grace.
        # With a single node nothing could run: that is a mistake to stop at.
        if len(mesh.nodes) == 1 and not docker_answers(engine, tls=tls):
            problems.append(f"node {node.name}: no Docker engine answers at {engine} (start dockerd, "
                            "or give the node runtime: process)")
    return problems


def engine_notes(mesh: config.MeshSettings) -> list[str]:
    """Nodes whose engine is reached over TCP without TLS: anyone on that network can run
    containers as root there (Docker's own warning)."""
    return [f"node {n.name}: engine {n.engine} without tls: anyone who reaches that address controls "
            "the engine (give the node tls: {ca_file, cert_file, key_file} and run dockerd with --tlsverify)"
            for n in mesh.nodes if (n.engine or "").startswith("tcp://") and n.tls is None]


def vip_notes(services: Any, euid: int, unprivileged_start: int) -> list[str]:
    """Without root, what the proxy will not be able to listen on: the VIP ports below
    ``unprivileged_start`` (net.ipv4.ip_unprivileged_port_start)."""
    if euid == 0:
        return []
    low = sorted(f"{name} ({p.vip_port})" for name, spec in services.items() for p in spec.ports
                 if p.vip_port is not None and p.vip_port < unprivileged_start)
    if not low:
        return []
    return [f"not root: the proxy cannot listen on VIP ports below {unprivileged_start}: {', '.join(low)}; "
            "those VIPs will refuse connections (use vip_port >= 1024, or run meshlet up as root)"]


class Component:
    """One meshlet component run as a child process and restarted when it dies."""

    def __init__(self, name: str, argv: list[str], log_dir: Path, *, out: TextIO,
                 env: dict[str, str] | None = None) -> None:
        self.name = name
        self.argv = argv
        self.env = env          # None: up's own; the catalog token travels here, never in argv
        self.log_path = log_dir / f"{name}.log"
        self.out = out
        self.proc: asyncio.subprocess.Process | None = None
        self.ready: dict[str, Any] = {}
        self.restarts = 0
        self._stopping = False
        self._watcher: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    async def _spawn(self, timeout: float) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as err:
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=err, preexec_fn=config.die_with_parent_preexec(), env=self.env,
                # Its own session: a terminal's Ctrl-C (or `timeout`'s group signal) reaches
                # only `up`, which stops workloads first (deregistering them in the
                # catalog) and the catalog last. Sharing the group, the catalog died first
                # and `up` restarted it while stopping.
                start_new_session=True)
        assert self.proc.stdout is not None
        try:
            line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        except asyncio.TimeoutError:
            await self._terminate()
            raise ComponentFailed(f"{self.name} did not report ready within {timeout:g}s "
                                  f"(see {self.log_path})") from None
        text = line.decode("utf-8", "replace").strip()
        if not text.startswith("ready "):
            code = await self._terminate()
            raise ComponentFailed(f"{self.name} exited with status {code} before it was ready "
                                  f"({self.log_path}):{log_tail(self.log_path)}")
        try:
            self.ready = json.loads(text[6:])
        except ValueError:
            await self._terminate()
            raise ComponentFailed(f"{self.name} printed an unreadable ready line {text!r}") from None
        asyncio.get_running_loop().create_task(self._drain(self.proc))

    @staticmethod
    async def _drain(proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        while await proc.stdout.read(65536):
            pass

    async def start(self, timeout: float = 30.0) -> dict[str, Any]:
        await self._spawn(timeout)
        self._watcher = asyncio.get_running_loop().create_task(self._watch(), name=f"watch {self.name}")
        return self.ready

    async def _watch(self) -> None:
        delay = 1.0
        while not self._stopping:
            assert self.proc is not None
            code = await self.proc.wait()
            if self._stopping:
                return
            print(f"meshlet up: {self.name} exited with status {code}; starting it again "
                  f"({self.log_path}):{log_tail(self.log_path)}", file=self.out, flush=True)
            while not self._stopping:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
                try:
                    await self._spawn(30.0)
                    self.restarts += 1
                    delay = 1.0
                    break
                except (ComponentFailed, OSError) as exc:
                    print(f"meshlet up: {exc}", file=self.out, flush=True)

    async def _terminate(self, grace: float = 10.0) -> int | None:
        proc = self.proc
        if proc is None:
            return None
        if proc.returncode is None:
            # os.kill, not proc.terminate(): Popen.send_signal polls first (waitpid WNOHANG)
            # and reaps a child that has just exited, before asyncio's child watcher does,
            # which then reports status 255 ("Unknown child process pid"). A signal to a
            # zombie is harmless, and its pid stays ours until the watcher reaps it.
            try:
                os.kill(proc.pid, signal.SIGTERM)
                return await asyncio.wait_for(proc.wait(), grace)
            except ProcessLookupError:
                pass
            except asyncio.TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
        return await proc.wait()

    async def stop(self) -> None:
        self._stopping = True
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)
        await self._terminate()


def component_argvs(mesh: config.MeshSettings, catalog: list[str] | str) -> dict[str, list[str]]:
    """The DNS and proxy command lines for ``mesh`` against the catalog: ``catalog`` is
    its URL or its arguments (``CatalogAccess.child_args()``: ``--consul URL`` and the TLS
    files; the token goes in the environment)."""
    catalog_args = ["--consul", catalog] if isinstance(catalog, str) else list(catalog)
    dns = config.module_argv("discovery.dns", *catalog_args, "--domain", mesh.domain,
           "--mode", mesh.dns.mode, "--ttl", f"{mesh.dns.ttl:g}s",
           "--negative-ttl", f"{mesh.dns.negative_ttl:g}s")
    if not mesh.dns.only_passing:
        dns.append("--include-warning")
    for listen in mesh.dns.listen:
        dns += ["--listen", listen]
    for recursor in mesh.dns.recursors:
        dns += ["--recursor", recursor]
    # workers "auto" is resolved by the proxy (config.resolve_workers): on the host it runs on
    proxy = config.module_argv("proxy", *catalog_args, "--domain", mesh.domain,
                               "--admin", mesh.proxy.admin_listen, "--workers", str(mesh.proxy.workers))
    for listener in mesh.proxy.listen:
        proxy += ["--listen", config.proxy_listener_arg(listener)]
    for item in mesh.proxy.upstream_tls:
        proxy += ["--upstream-tls", config.upstream_tls_arg(item)]
    return {"dns": dns, "proxy": proxy}




def catalog_argv(listen: str, data_dir: Path, token_file: str | None = None) -> list[str]:
    """The embedded catalog's command line (``token_file``: where it keeps its management
    token, mesh.catalog.token_file; default in its data dir)."""
    # sessions down to 1 s (Consul's session_ttl_min; its default is 10 s): the
    # supervisors' leader lock uses 5 s, so a standby takes over in about 11 s
    argv = config.module_argv("discovery.catalog", "--listen", listen, "--data-dir", str(data_dir),
                              "--session-ttl-min", "1s")
    if token_file:
        argv += ["--token-file", token_file]
    return argv
