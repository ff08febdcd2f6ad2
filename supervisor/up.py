"""``meshlet up -f FILE``: the whole mesh on this machine, until Ctrl-C.

Order (and the reverse on the way down)::

    catalog (embedded, unless mesh.catalog is a URL or one already answers at catalog_listen)
    DNS     python -m discovery.dns --listen <mesh.dns.listen> --consul <url>
    proxy   python -m proxy --listen <mesh.proxy.listen> --consul <url> --admin <admin_listen>
    apply   FILE's services into the catalog (supervisor.apply)
    supervisor + admin API on mesh.admin_listen; progress lines ("web: 2/2 ready")

The components are child processes started like static pods: each prints a ``ready`` line,
its stderr goes to ``<data_dir>/logs/<name>.log`` and it is started again (1 s doubling to
30 s) whenever it dies. They die with ``up`` (SIGTERM on the parent's death, even a
``kill -9``); workloads do not, and the next ``up`` adopts them (the catalog's data dir
keeps their registrations). Ctrl-C / SIGTERM stops everything: workloads are deregistered and
stopped, then proxy, DNS and catalog. With ``--keep`` the workloads keep running for the
next ``meshlet up`` to adopt. A second Ctrl-C skips the graceful steps.

Names inside containers (``<service>.service.<domain>`` without app changes): resolv.conf
cannot name a port, so the DNS server also answers on port 53 of a loopback address, the
*resolver*, and every container on a docker node gets a read-only resolv.conf naming it
(host networking: the container shares the host's loopback). The resolver is the first
``mesh.dns.listen`` entry on port 53 (0.0.0.0/:: count as 127.0.0.1); with none, and when
running as root with 127.0.0.153:53 free, ``up`` adds ``127.0.0.153:53`` to the DNS
listeners (``DEFAULT_RESOLVER``; config has no field of its own for it). Otherwise
containers keep the engine's default resolver and ``up`` says so. Names outside the
domain: ``mesh.dns.recursors``, or when that is empty the host's /etc/resolv.conf
nameservers that are on loopback (a local caching resolver); without any, meshlet DNS
refuses outside names. Processes use the host's resolver (no per-process resolv.conf
without a mount namespace): point the host's /etc/resolv.conf at the resolver
(``nameserver 127.0.0.153``) to give them the same names.

Nodes: ``mesh.nodes``, or when empty one node "local" -- docker if an engine answers at
the default socket, else process (``resolve_nodes``).

``run_standalone`` (``python -m supervisor.agent --consul URL --data-dir DIR``) is the
supervisor and its admin API alone against a running catalog: no components, no apply.

Exit codes: 0 stopped cleanly, 1 a component could not start, 2 invalid FILE.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import ipaddress
import signal
import socket
import sys
from pathlib import Path
from collections.abc import Sequence
from typing import Any, TextIO

import config

from . import apply
from .admin import AdminServer, build_status
from .agent import DEFAULT_ENGINE, Supervisor
from .runtime import RUNTIMES

__all__ = ["docker_answers", "resolve_nodes", "plan_resolver", "loopback_nameservers", "DEFAULT_RESOLVER", "Component", "ComponentFailed", "up", "component_argvs", "run_standalone",
           "standalone_main"]

log = logging.getLogger(__name__)


def docker_answers(engine: str = DEFAULT_ENGINE, timeout: float = 2.0) -> bool:
    """Does a Docker engine answer at ``engine``? (blocking; run in a thread)"""
    if engine.startswith("unix://") and not os.path.exists(engine[len("unix://"):]):
        return False
    try:
        import docker
        client = docker.DockerClient(base_url=engine, timeout=timeout)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:  # noqa: BLE001 - anything but an answer means no engine
        return False


async def resolve_nodes(mesh: config.MeshSettings) -> list[config.NodeSpec]:
    """``mesh.nodes``, or one node "local": docker if an engine answers, else process."""
    if mesh.nodes:
        return [n if n.runtime else dataclasses.replace(
            n, runtime="docker" if n.engine else "process") for n in mesh.nodes]
    if await asyncio.to_thread(docker_answers):
        return [config.NodeSpec(name="local", runtime="docker", engine=DEFAULT_ENGINE)]
    return [config.NodeSpec(name="local", runtime="process")]


# Where the DNS server answers on port 53 for containers when mesh.dns.listen has no
# port-53 entry (an address of 127.0.0.0/8 that nothing else uses by convention).
DEFAULT_RESOLVER = "127.0.0.153"


def _split_hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def _hostport(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def plan_resolver(listen: tuple[str, ...], default: str | None) -> tuple[str | None, tuple[str, ...]]:
    """(resolver IP for the containers' resolv.conf, DNS listen addresses).

    The first ``listen`` entry on port 53 is the resolver (an unspecified host answers on
    loopback too: 127.0.0.1 / ::1); with none, ``default`` (an IP, or None: no resolver)
    is added on port 53."""
    for item in listen:
        host, port = _split_hostport(item)
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
    return default, (*listen, _hostport(default, 53))


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
        if ip.is_loopback and str(ip) != exclude and _hostport(str(ip), 53) not in out:
            out.append(_hostport(str(ip), 53))
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
    if not any(_split_hostport(item)[1] == 53 for item in mesh.dns.listen):
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


def _die_with(parent: int) -> Any:
    """preexec_fn: the component gets SIGTERM when `meshlet up` dies, even by SIGKILL
    (Linux PR_SET_PDEATHSIG), so a killed ``up`` leaves no catalog/DNS/proxy holding the
    ports the next ``up`` needs. Workloads are not components: they keep running.
    prctl is looked up here, in the parent: the child between fork and exec only calls."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def preexec() -> None:
        prctl(1, signal.SIGTERM, 0, 0, 0)   # PR_SET_PDEATHSIG
        if os.getppid() != parent:           # the parent died before prctl took effect
            os._exit(0)
    return preexec


class ComponentFailed(Exception):
    pass


class Component:
    """One meshlet component run as a child process and restarted when it dies."""

    def __init__(self, name: str, argv: list[str], log_dir: Path, *, out: TextIO) -> None:
        self.name = name
        self.argv = argv
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
                stderr=err, preexec_fn=_die_with(os.getpid()),
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
                                  f"(see {self.log_path})")
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
            print(f"meshlet up: {self.name} exited with status {code}; starting it again",
                  file=self.out, flush=True)
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
            try:
                proc.terminate()
                return await asyncio.wait_for(proc.wait(), grace)
            except ProcessLookupError:
                pass
            except asyncio.TimeoutError:
                proc.kill()
        return await proc.wait()

    async def stop(self) -> None:
        self._stopping = True
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)
        await self._terminate()


def component_argvs(mesh: config.MeshSettings, url: str) -> dict[str, list[str]]:
    """The DNS and proxy command lines for ``mesh`` against the catalog at ``url``."""
    py = sys.executable
    dns = [py, "-m", "discovery.dns", "--consul", url, "--domain", mesh.domain,
           "--mode", mesh.dns.mode, "--ttl", f"{mesh.dns.ttl:g}s",
           "--negative-ttl", f"{mesh.dns.negative_ttl:g}s"]
    if not mesh.dns.only_passing:
        dns.append("--include-warning")
    for listen in mesh.dns.listen:
        dns += ["--listen", listen]
    for recursor in mesh.dns.recursors:
        dns += ["--recursor", recursor]
    proxy = [py, "-m", "proxy", "--consul", url, "--domain", mesh.domain,
             "--admin", mesh.proxy.admin_listen, "--workers", str(mesh.proxy.workers)]
    for listen in mesh.proxy.listen:
        proxy += ["--listen", listen]
    return {"dns": dns, "proxy": proxy}


async def _answers(url: str) -> bool:
    from discovery.consul import connect
    client = connect(url, timeout=2.0)
    try:
        await client.status.leader()
        return True
    except Exception:  # noqa: BLE001 - anything but an answer means "no"
        return False
    finally:
        await client.close()


def _progress(sup: Supervisor) -> list[str]:
    lines = []
    for s in build_status(sup)["services"]:
        if s["desired"] or s["instances"]:
            line = f"{s['name']}: {s['ready']}/{s['desired']} ready"
            rollout = s.get("rollout") or {}
            if rollout.get("phase") in ("progressing", "reverting"):
                line += f", rollout {rollout['phase']} to #{rollout.get('number')}: {rollout['progress']}"
            if s.get("problem"):
                line += f" ({s['problem']})"
            lines.append(line)
    return lines


async def up(path: str, *, keep: bool = False, out: TextIO = sys.stdout,
             err: TextIO = sys.stderr) -> int:
    cfg = apply.load_or_report(path, "up", err)
    if cfg is None:
        return 2
    mesh = cfg.mesh
    data_dir = Path(mesh.data_dir)
    log_dir = data_dir / "logs"
    stop = asyncio.Event()
    force = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        if stop.is_set():
            force.set()
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    started: list[Component] = []
    sup: Supervisor | None = None
    admin: AdminServer | None = None
    try:
        url = apply.resolve_catalog_url(None, {}, mesh.catalog, mesh.catalog_listen)
        if mesh.catalog != "embedded":
            if not await _answers(url):
                print(f"meshlet up: cannot reach the catalog at {url} (mesh.catalog)", file=err)
                return 1
        elif await _answers(url):
            print(f"meshlet up: using the catalog already answering at {url}", file=out, flush=True)
        else:
            catalog = Component("catalog", [sys.executable, "-m", "discovery.catalog", "--listen",
                                            mesh.catalog_listen, "--data-dir", str(data_dir / "catalog")],
                                log_dir, out=err)
            ready = await catalog.start()
            started.append(catalog)
            url = "http://" + (ready.get("http") or mesh.catalog_listen)
            print(f"meshlet up: catalog at {url} (data in {data_dir / 'catalog'})", file=out, flush=True)
        resolver, run_mesh, added = dns_settings(mesh)
        proxy_admins: list[str] = []
        for name, argv in component_argvs(run_mesh, url).items():
            comp = Component(name, argv, log_dir, out=err)
            try:
                ready = await comp.start()
            except ComponentFailed:
                if name != "dns" or not added:
                    raise
                # The default resolver address was taken between our check and the bind.
                resolver, run_mesh = None, dataclasses.replace(
                    run_mesh, dns=dataclasses.replace(run_mesh.dns, listen=mesh.dns.listen))
                comp = Component(name, component_argvs(run_mesh, url)["dns"], log_dir, out=err)
                ready = await comp.start()
            started.append(comp)
            if name == "proxy" and isinstance(ready.get("admin"), str):
                proxy_admins.append(ready["admin"])
            print(f"meshlet up: {name} ready {json.dumps(ready)} (pid {comp.pid})", file=out, flush=True)
        if resolver is not None:
            print(f"meshlet up: containers resolve <service>.service.{mesh.domain} through "
                  f"{resolver}:53", file=out, flush=True)
            if not run_mesh.dns.recursors:
                print(f"meshlet up: names outside .{mesh.domain} are refused there: no "
                      "mesh.dns.recursors and no loopback nameserver in /etc/resolv.conf "
                      "(set mesh.dns.recursors to forward them)", file=out, flush=True)
        else:
            print("meshlet up: no DNS listener on port 53 (add one to mesh.dns.listen, or run as "
                  "root): containers keep the engine's resolver", file=out, flush=True)
        changes = await apply.apply_to(url, cfg.services, mesh.vip_range, err=err)
        if changes is None:
            return 1
        for change in changes:
            for line in apply.format_change(change):
                print(line, file=out, flush=True)
        nodes = await resolve_nodes(mesh)
        print("meshlet up: nodes " + ", ".join(f"{n.name} ({n.runtime})" for n in nodes),
              file=out, flush=True)
        sup = Supervisor(url, nodes, data_dir, dns=resolver, proxy_admins=proxy_admins)
        await sup.start()
        admin = AdminServer(sup, on_down=stop.set)
        bound = await admin.start(mesh.admin_listen)
        print(f"meshlet up: admin API at http://{bound}; press Ctrl-C to stop", file=out, flush=True)
        last: list[str] = []
        while not stop.is_set():
            lines = _progress(sup)
            if lines != last:
                for line in lines:
                    if line not in last:
                        print(line, file=out, flush=True)
                last = lines
            try:
                await asyncio.wait_for(stop.wait(), 0.5)
            except asyncio.TimeoutError:
                pass
        return 0
    except (ComponentFailed, OSError, ValueError) as exc:
        print(f"meshlet up: {exc}", file=err)
        return 1
    finally:
        stop_workloads = not keep or (admin is not None and admin.down_requested)
        if admin is not None:
            await admin.close()
        if sup is not None:
            what = "stopping workloads" if stop_workloads else "leaving workloads running (--keep)"
            print(f"meshlet up: {what}", file=out, flush=True)
            closing = asyncio.ensure_future(sup.close(stop=stop_workloads))
            done_or_forced = asyncio.ensure_future(force.wait())
            await asyncio.wait([closing, done_or_forced], return_when=asyncio.FIRST_COMPLETED)
            done_or_forced.cancel()
            if not closing.done():
                closing.cancel()
        for comp in reversed(started):
            await comp.stop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        print("meshlet up: stopped", file=out, flush=True)


async def run_standalone(url: str, data_dir: str, admin: str | None, stop_on_exit: bool,
                         runtime: str | None = None, dns: str | None = None,
                         proxy_admins: Sequence[str] = (), engine: str | None = None) -> int:
    """The supervisor alone against a running catalog (the loop of `meshlet up` without
    its components). SIGTERM leaves the workloads running for the next supervisor unless
    ``stop_on_exit``; `meshlet down` (POST /v1/down) always stops them. ``engine``: the
    local node is docker on that engine."""
    if engine:
        cfg_nodes = [config.NodeSpec(name="local", runtime="docker", engine=engine)]
    elif runtime:
        cfg_nodes = [config.NodeSpec(name="local", runtime=runtime)]
    else:
        cfg_nodes = await resolve_nodes(config.MeshSettings())
    sup = Supervisor(url, cfg_nodes, data_dir, dns=dns, proxy_admins=proxy_admins)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await sup.start()
    server = None
    ready: dict[str, str] = {}
    if admin:
        server = AdminServer(sup, on_down=stop.set)
        ready["admin"] = await server.start(admin)
    print("ready " + json.dumps(ready), flush=True)
    try:
        await stop.wait()
    finally:
        if server is not None:
            await server.close()
        await sup.close(stop=stop_on_exit or (server is not None and server.down_requested))
    return 0



def standalone_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m supervisor.agent",
                                     description="run the supervisor against a running catalog")
    parser.add_argument("--consul", required=True, metavar="URL")
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--admin", metavar="HOST:PORT")
    parser.add_argument("--stop-on-exit", action="store_true",
                        help="deregister and stop the workloads when stopped")
    parser.add_argument("--runtime", choices=sorted(RUNTIMES),
                        help="the local node's runtime (default: docker if an engine answers)")
    parser.add_argument("--engine", metavar="URL",
                        help="run the local node on this Docker engine (e.g. "
                             "unix:///path/docker.sock); implies --runtime docker")
    parser.add_argument("--dns", metavar="IP",
                        help="resolver (port 53) named in the containers' resolv.conf")
    parser.add_argument("--proxy-admin", action="append", default=[], metavar="HOST:PORT",
                        help="a proxy's admin API: retired replicas wait for its in-flight "
                             "requests before SIGTERM (repeatable)")
    args = parser.parse_args(argv)
    if args.engine and args.runtime not in (None, "docker"):
        parser.error(f"--engine is a Docker engine; it cannot go with --runtime {args.runtime}")
    logging.basicConfig(level=os.environ.get("MESHLET_LOG_LEVEL", "INFO"), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return asyncio.run(run_standalone(args.consul, args.data_dir, args.admin, args.stop_on_exit,
                                      args.runtime, args.dns, args.proxy_admin, args.engine))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="meshlet up")
    parser.add_argument("-f", "--file", required=True)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=os.environ.get("MESHLET_LOG_LEVEL", "WARNING"), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return asyncio.run(up(args.file, keep=args.keep))


if __name__ == "__main__":
    sys.exit(main())
