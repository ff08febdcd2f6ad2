"""``meshlet node run``: meshlet's part on every host of a fleet but the control host.

What it runs (child processes, like ``meshlet up``'s components, restarted when they die)::

    DNS    <service>.service.<domain> for this host's apps, with the resolver on
           127.0.0.153:53 (root) that containers here get in their resolv.conf
    proxy  every service's VIP:port on this host's loopback, the entry listeners, and its
           admin API on --address (the supervisor reads its /routes before stopping a
           replica, so that no request in flight here is cut)

both pointed at the shared catalog (``--catalog URL``, with the token of ``-f FILE``'s
``mesh.catalog.token_file`` or ``$CONSUL_HTTP_TOKEN``, passed to them in their environment). It stores where its proxy's admin
API is in ``meshlet/node-sides/<name>`` (JSON ``{"name", "address", "proxy_admin",
"resolver", "at"}``) and removes the key when it stops. The engine on this host (or its
process runtime) is the supervisor's to drive: it reaches the engine by the URL in
``mesh.nodes``; the node side never starts or stops a workload.

The resolver and the VIPs are loopback addresses: each host has its own loopback, so the
same 127.0.0.153 and 127.10.x.y serve each host's containers from its own DNS and proxy,
and an app never leaves its host to resolve a name or reach a VIP.

Exit codes: 0 stopped cleanly, 1 the catalog did not answer or a component could not
start, 2 invalid FILE.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import TextIO

import config
from discovery.consul import CatalogAccessError, access_for_mesh, catalog_problem, connect, kv_delete, kv_put

from .components import Component, ComponentFailed, component_argvs, dns_settings

__all__ = ["run_node", "side_key"]

log = logging.getLogger(__name__)


def side_key(name: str) -> str:
    return config.NODE_SIDES_PREFIX + name


async def run_node(url: str, *, name: str | None, address: str, path: str | None, data_dir: str,
                   proxy_admin: str | None = None, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    mesh = config.MESH_DEFAULTS
    if path is not None:
        from ..commands import apply
        cfg = apply.load_or_report(path, "node run", err)
        if cfg is None:
            return 2
        mesh = cfg.mesh
    name = name or socket.gethostname()
    _, admin_port = config.split_hostport(mesh.proxy.admin_listen)
    admin = proxy_admin or f"{address}:{admin_port}"
    mesh = dataclasses.replace(mesh, proxy=dataclasses.replace(mesh.proxy, admin_listen=admin))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        # the token: mesh.catalog.token / token_file of FILE, else $CONSUL_HTTP_TOKEN(_FILE)
        access = access_for_mesh(url, mesh, os.environ)
    except CatalogAccessError as exc:
        print(f"meshlet node run: {exc}", file=err)
        return 2
    client = connect(access, timeout=10.0)
    started: list[Component] = []
    stored = False
    try:
        try:
            await client.kv.get(config.NODE_SIDES_PREFIX, keys=True)
        except Exception as exc:  # noqa: BLE001 - anything but an answer: say where and why
            print(f"meshlet node run: {catalog_problem(exc, access)}", file=err)
            return 1
        resolver, run_mesh, _added = dns_settings(mesh)
        log_dir = Path(data_dir) / "logs"
        ready_admin = admin
        # DNS and proxy get the token in their environment, never in their argv
        child_env = access.child_env(os.environ)
        for component, argv in component_argvs(run_mesh, access.child_args()).items():
            comp = Component(component, argv, log_dir, out=err, env=child_env)
            ready = await comp.start()
            started.append(comp)
            if component == "proxy" and isinstance(ready.get("admin"), str):
                ready_admin = ready["admin"]
            print(f"meshlet node run: {component} ready {json.dumps(ready)} (pid {comp.pid})", file=out, flush=True)
        doc = {"name": name, "address": address, "proxy_admin": ready_admin, "resolver": resolver,
               "at": time.time()}
        await kv_put(client, side_key(name), json.dumps(doc))
        stored = True
        print(f"meshlet node run: node side of {name} ready " + json.dumps(doc), file=out, flush=True)
        await stop.wait()
        return 0
    except (ComponentFailed, OSError, ValueError) as exc:
        print(f"meshlet node run: {exc}", file=err)
        return 1
    finally:
        if stored:
            try:
                await kv_delete(client, side_key(name))
            except Exception as exc:  # noqa: BLE001 - the catalog may be gone
                log.warning("cannot remove %s: %s", side_key(name), exc)
        for comp in reversed(started):
            await comp.stop()
        await client.close()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        print("meshlet node run: stopped", file=out, flush=True)
