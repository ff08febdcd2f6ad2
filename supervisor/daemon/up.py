"""``meshlet up -f FILE``: the whole mesh on this machine, until Ctrl-C.

Order (and the reverse on the way down)::

    catalog (embedded, unless mesh.catalog is a URL or one already answers at catalog_listen)
    DNS     python -m discovery.dns --listen <mesh.dns.listen> --consul <url>
    proxy   python -m proxy --listen <mesh.proxy.listen> --consul <url> --admin <admin_listen>
    apply   FILE's services into the catalog (commands.apply)
    supervisor + admin API on mesh.admin_listen; progress lines ("web: 2/2 ready")

The components are child processes started like static pods (``components.py``): each
prints a ``ready`` line, its stderr goes to ``<data_dir>/logs/<name>.log`` and it is
started again (1 s doubling to 30 s) whenever it dies. They die with ``up`` (SIGTERM on
the parent's death, even a ``kill -9``); workloads do not, and the next ``up`` adopts them
(the catalog's data dir keeps their registrations). Ctrl-C / SIGTERM stops everything: workloads are deregistered and
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

``run_standalone`` (``meshlet supervisor --consul URL --data-dir DIR``) is the supervisor
and its admin API alone against a running catalog: no components, no apply.

Exit codes: 0 stopped cleanly, 1 a component could not start, 2 invalid FILE.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

import config

from discovery.consul import TOKEN_ENV, TOKEN_FILE_ENV, CatalogAccess, access_for_mesh

from ..commands import apply
from ..secrets import DEFAULT_NAME, KeySource, key_source
from .admin import AdminServer
from .components import (Component, ComponentFailed, catalog_argv, component_argvs, dns_settings, docker_answers,
                         engine_notes,
                         preflight, vip_notes)
from .leader import lead
from .supervisor import Supervisor

__all__ = ["docker_answers", "resolve_nodes", "up", "run_standalone", "progress_lines"]

log = logging.getLogger(__name__)


async def resolve_nodes(mesh: config.MeshSettings) -> list[config.NodeSpec]:
    """``mesh.nodes``, or one node "local": docker if an engine answers, else process."""
    if mesh.nodes:
        return [n if n.runtime else dataclasses.replace(
            n, runtime="docker" if n.engine else "process") for n in mesh.nodes]
    if await asyncio.to_thread(docker_answers):
        return [config.NodeSpec(name="local", runtime="docker", engine=config.DEFAULT_DOCKER_ENGINE)]
    return [config.NodeSpec(name="local", runtime="process")]


def _unprivileged_port_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text())
    except (OSError, ValueError):
        return 1024


async def _answers(access: CatalogAccess) -> bool:
    """Does a catalog answer there (``/v1/status/leader``: no token needed)?"""
    from discovery.consul import connect
    try:
        client = connect(access, timeout=2.0)
    except ValueError:
        return False
    try:
        await client.status.leader()
        return True
    except Exception:  # noqa: BLE001 - anything but an answer means "no"
        return False
    finally:
        await client.close()


async def _refusal(access: CatalogAccess) -> str | None:
    """Why the catalog does not serve us (token refused, certificate), or None."""
    from discovery.consul import catalog_problem, connect
    client = connect(access, timeout=5.0)
    try:
        await client.catalog.services()
        return None
    except Exception as exc:  # noqa: BLE001 - every failure is reported as one line
        return catalog_problem(exc, access)
    finally:
        await client.close()


def progress_lines(sup: Supervisor) -> list[str]:
    lines = []
    for s in sup.status()["services"]:
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
    leading: asyncio.Future[None] | None = None
    try:
        url = apply.resolve_catalog_url(None, {}, mesh.catalog.url, mesh.catalog_listen)
        # The embedded catalog's token is its own file; a token in up's environment is for
        # another catalog (see access_for_mesh).
        env = {k: v for k, v in os.environ.items() if not (mesh.catalog.embedded and k in (TOKEN_ENV, TOKEN_FILE_ENV))}
        access = access_for_mesh(url, mesh, env)
        answering = await _answers(access)
        if not mesh.catalog.embedded and not answering:
            print(f"meshlet up: cannot reach the catalog at {url} (mesh.catalog)", file=err)
            return 1
        # what would stop it once started, before anything starts: one line per problem
        problems = await asyncio.to_thread(preflight, mesh, with_catalog=mesh.catalog.embedded and not answering)
        for line in problems:
            print(f"meshlet up: {line}", file=err)
        if problems:
            return 1
        for line in engine_notes(mesh) + vip_notes(cfg.services, os.geteuid(), _unprivileged_port_start()):
            print(f"meshlet up: {line}", file=out, flush=True)
        if answering and mesh.catalog.embedded:
            print(f"meshlet up: using the catalog already answering at {url}", file=out, flush=True)
        elif mesh.catalog.embedded:
            catalog = Component("catalog", catalog_argv(mesh.catalog_listen, Path(mesh.catalog_data_dir),
                                                        mesh.catalog.token_file),
                                log_dir, out=err, env=env)
            ready = await catalog.start()
            started.append(catalog)
            url = "http://" + (ready.get("http") or mesh.catalog_listen)
            print(f"meshlet up: catalog at {url} (data in {mesh.catalog_data_dir})", file=out, flush=True)
            access = access_for_mesh(url, mesh, env)     # its token file exists now
        refused = await _refusal(access)
        if refused is not None:
            print(f"meshlet up: {refused}", file=err)
            return 1
        # DNS and proxy get the catalog's token in their environment, never in their argv
        child_env = access.child_env(os.environ)
        resolver, run_mesh, added = dns_settings(mesh)
        proxy_admins: list[str] = []
        for name, argv in component_argvs(run_mesh, access.child_args()).items():
            comp = Component(name, argv, log_dir, out=err, env=child_env)
            try:
                ready = await comp.start()
            except ComponentFailed:
                if name != "dns" or not added:
                    raise
                # The default resolver address was taken between our check and the bind.
                resolver, run_mesh = None, dataclasses.replace(
                    run_mesh, dns=dataclasses.replace(run_mesh.dns, listen=mesh.dns.listen))
                comp = Component(name, component_argvs(run_mesh, access.child_args())["dns"], log_dir, out=err,
                                 env=child_env)
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
        code, applied = await apply.apply_config(access, cfg, path, err=err)
        if applied is None:
            return code
        apply.print_applied(applied, out)
        out.flush()
        nodes = await resolve_nodes(mesh)
        print("meshlet up: nodes " + ", ".join(f"{n.name} ({n.runtime})" for n in nodes),
              file=out, flush=True)
        held: dict[str, Any] = {"sup": None, "admin": None, "down": False}

        def make(fence: Callable[[], bool]) -> Supervisor:
            return Supervisor(access, nodes, data_dir, dns=resolver, proxy_admins=proxy_admins,
                              secrets_key=key_source(mesh), node_grace=mesh.node_grace, fence=fence)

        async def on_lead(sup: Supervisor) -> None:
            admin = AdminServer(sup, on_down=stop.set)
            bound = await admin.start(mesh.admin_listen)
            held.update(sup=sup, admin=admin)
            print(f"meshlet up: admin API at http://{bound}; press Ctrl-C to stop", file=out, flush=True)

        async def on_step_down(sup: Supervisor) -> None:
            admin = held["admin"]
            if admin is not None:
                held["down"] = held["down"] or admin.down_requested
                await admin.close()
            held.update(sup=None, admin=None)
            if stop.is_set():
                what = "stopping workloads" if not keep or held["down"] else "leaving workloads running (--keep)"
                print(f"meshlet up: {what}", file=out, flush=True)

        leading = asyncio.ensure_future(lead(access, make, stop, on_lead=on_lead, on_step_down=on_step_down,
                                             stop_workloads=lambda: not keep or held["down"], out=out,
                                             admin=mesh.admin_listen))
        last: list[str] = []
        while not leading.done():
            lines = progress_lines(held["sup"]) if held["sup"] is not None else []
            if lines != last:
                for line in lines:
                    if line not in last:
                        print(line, file=out, flush=True)
                last = lines
            await asyncio.wait([leading], timeout=0.5)
        leading.result()
        return 0
    except (ComponentFailed, OSError, ValueError) as exc:   # CatalogAccessError is a ValueError
        print(f"meshlet up: {exc}", file=err)
        return 1
    finally:
        if leading is not None and not leading.done():
            stop.set()
            done_or_forced = asyncio.ensure_future(force.wait())
            await asyncio.wait([leading, done_or_forced], return_when=asyncio.FIRST_COMPLETED)
            done_or_forced.cancel()
            if not leading.done():
                leading.cancel()
                await asyncio.gather(leading, return_exceptions=True)
        for comp in reversed(started):
            await comp.stop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        print("meshlet up: stopped", file=out, flush=True)


async def run_standalone(url: str | CatalogAccess, data_dir: str, admin: str | None, stop_on_exit: bool,
                         runtime: str | None = None, dns: str | None = None,
                         proxy_admins: Sequence[str] = (), engine: str | None = None,
                         secrets_key: KeySource | None = None) -> int:
    """The supervisor alone against a running catalog (the loop of `meshlet up` without
    its components). ``url``: the catalog, or a CatalogAccess with its token and TLS
    files. SIGTERM leaves the workloads running for the next supervisor unless
    ``stop_on_exit``; `meshlet down` (POST /v1/down) always stops them. ``engine``: the
    local node is docker on that engine. ``secrets_key``: the mesh's key-encryption key
    (default: ``<data_dir>/secrets.key``)."""
    if secrets_key is None:
        secrets_key = KeySource(path=Path(data_dir) / DEFAULT_NAME, default=True)
    if engine:
        cfg_nodes = [config.NodeSpec(name="local", runtime="docker", engine=engine)]
    elif runtime:
        cfg_nodes = [config.NodeSpec(name="local", runtime=runtime)]
    else:
        cfg_nodes = await resolve_nodes(config.MeshSettings())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    server: AdminServer | None = None
    down = False

    def make(fence: Callable[[], bool]) -> Supervisor:
        return Supervisor(url, cfg_nodes, data_dir, dns=dns, proxy_admins=proxy_admins, secrets_key=secrets_key,
                          fence=fence)

    async def on_lead(sup: Supervisor) -> None:
        nonlocal server
        ready: dict[str, str] = {}
        if admin:
            server = AdminServer(sup, on_down=stop.set)
            ready["admin"] = await server.start(admin)
        print("ready " + json.dumps(ready), flush=True)

    async def on_step_down(sup: Supervisor) -> None:
        nonlocal server, down
        if server is not None:
            down = down or server.down_requested
            await server.close()
            server = None

    await lead(url, make, stop, on_lead=on_lead, on_step_down=on_step_down,
               stop_workloads=lambda: stop_on_exit or down, out=sys.stderr, admin=admin)
    return 0



