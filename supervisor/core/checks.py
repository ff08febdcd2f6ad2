"""What a valid config can still get wrong across services, found before anything is
written (``meshlet apply``, ``up``, ``plan``). Pure.

The schema (config) checks each field and the references between them; these checks
need the whole mesh and the rules of placement:

- fixed ports: two services asking for one port, which two replicas on one node cannot
  both bind; a fixed port with more replicas than nodes that can run the service (each
  replica needs a node of its own); a rolling update that would start the new replica
  beside the old one, which holds the port, with no spare node to go to; a port that one
  of meshlet's own listeners (catalog, DNS, proxy, admin) takes on this host.
- routes: two services claiming one host and path prefix (the proxy could give the route
  to only one of them).
- volumes: what a process replica (no mount namespace) cannot be given: read_only, a
  tmpfs size, a volume driver or driver options; two mounts of one service whose
  ``$MESHLET_VOLUME_<NAME>`` would be the same; two volumes naming one engine volume with
  different definitions.

Each ``Problem`` names the path of the field it is about (for ``config.locate``, which
finds its line) and says what is wrong and what to do.
"""

from __future__ import annotations

from dataclasses import dataclass

import config

from .placement import NodeInfo, can_run, matches_constraint
from .rollout_history import RolloutError, resolve_fenceposts

__all__ = ["Problem", "check_mesh"]


@dataclass(frozen=True, slots=True)
class Problem:
    keys: tuple[str | int, ...]       # where, as config.locate takes it
    message: str

    @property
    def path(self) -> str:
        out = ""
        for k in self.keys:
            out += f"[{k}]" if isinstance(k, int) else (f".{k}" if out else k)
        return out


def _nodes(mesh: config.MeshSettings) -> list[NodeInfo] | None:
    """The configured nodes; None when the fleet is "one node local" decided at start."""
    if not mesh.nodes:
        return None
    return [NodeInfo(n.name, n.runtime or ("docker" if n.engine else "process"), n.address,
                     n.capacity.cpu, n.capacity.memory, dict(n.labels)) for n in mesh.nodes]


def _eligible(spec: config.ServiceSpec, nodes: list[NodeInfo] | None) -> int:
    if nodes is None:
        return 1
    return sum(1 for n in nodes if can_run(spec, n) is None
               and all(matches_constraint(n, c) for c in spec.placement.constraints))


def _own_listeners(mesh: config.MeshSettings) -> dict[int, str]:
    out = {}
    for what, addrs in (("mesh.catalog_listen", (mesh.catalog_listen,) if mesh.catalog.embedded else ()),
                        ("mesh.admin_listen", (mesh.admin_listen,)), ("mesh.dns.listen", mesh.dns.listen),
                        ("mesh.proxy.listen", tuple(x.address for x in mesh.proxy.listen)), ("mesh.proxy.admin_listen", (mesh.proxy.admin_listen,))):
        for a in addrs:
            port = config.split_hostport(a)[1]
            if port:
                out.setdefault(port, what)
    return out


def check_mesh(cfg: config.MeshConfig) -> list[Problem]:
    problems: list[Problem] = []
    nodes = _nodes(cfg.mesh)
    own = _own_listeners(cfg.mesh)
    taken: dict[int, tuple[str, int]] = {}
    for name in cfg.services:          # in the file's order: the later claim is the one reported
        spec = cfg.services[name]
        fixed = [(i, p.port) for i, p in enumerate(spec.ports) if p.port]
        for i, port in fixed:
            where = ("services", name, "ports", i, "port")
            if port in own:
                problems.append(Problem(where, f"port {port} is meshlet's own ({own[port]}) on this host; "
                                               "give the service another port, or 0 to have one assigned"))
            if port in taken:
                other, j = taken[port]
                problems.append(Problem(where, f"port {port} is also services.{other}.ports[{j}]'s: two "
                                               "replicas on one node cannot both bind it"))
            taken.setdefault(port, (name, i))
        if not fixed:
            continue
        port = fixed[0][1]
        room = _eligible(spec, nodes)
        if spec.replicas > room:
            problems.append(Problem(("services", name, "replicas"),
                                    f"{spec.replicas} replicas with the fixed port {port}: each needs a node of "
                                    f"its own, and {room} node{'s' if room != 1 else ''} can run {name}; use "
                                    "port 0 (assigned) and the service's VIP"))
        elif spec.update.strategy == "rolling" and spec.replicas:
            try:
                surge, _ = resolve_fenceposts(spec.replicas, spec.update.max_surge, spec.update.max_unavailable)
            except RolloutError:
                surge = 0
            if surge and spec.replicas >= room:
                problems.append(Problem(("services", name, "update", "max_surge"),
                                        f"a rolling update starts a new replica beside the old one, which holds "
                                        f"the fixed port {port}, and no spare node can run {name}: set "
                                        "update.max_surge: 0 (stop first) or strategy: recreate"))
    problems += _route_conflicts(cfg)
    problems += _volume_problems(cfg)
    return problems


def _volume_problems(cfg: config.MeshConfig) -> list[Problem]:
    out: list[Problem] = []
    for name, spec in cfg.services.items():
        seen: dict[str, str] = {}
        for i, m in enumerate(spec.volumes):
            vol = cfg.volumes.get(m.name)
            var = config.volume_env_name(m.name)
            if var in seen:
                out.append(Problem(("services", name, "volumes", i, "name"),
                                   f"volumes {m.name} and {seen[var]} would both be ${var}: rename one"))
            seen.setdefault(var, m.name)
            if vol is None or spec.command is None:
                continue
            # a process replica gets a directory: no mount, so nothing could enforce these
            if m.read_only:
                out.append(Problem(("services", name, "volumes", i, "read_only"),
                                   "a process replica has no mount namespace, so read_only cannot be enforced: "
                                   "drop it, or run the service from an image"))
            if vol.type == "tmpfs" and vol.size is not None:
                out.append(Problem(("volumes", m.name, "size"),
                                   f"services.{name} runs as a process, whose tmpfs volume is a directory on the "
                                   "host's shared tmpfs (/dev/shm), where a size cannot be enforced: drop size, or "
                                   "run the service from an image"))
            if vol.type == "named" and ((vol.driver or "local") != "local" or vol.driver_opts):
                out.append(Problem(("volumes", m.name, "driver_opts" if vol.driver_opts else "driver"),
                                   f"services.{name} runs as a process, and only a Docker engine mounts a volume "
                                   "driver or driver_opts (a process node keeps local named volumes as "
                                   "directories): run the service from an image"))
    engine: dict[str, config.VolumeSpec] = {}
    for name, vol in cfg.volumes.items():
        if vol.type != "named" or vol.per_replica:
            continue
        key = vol.source or vol.name
        other = engine.get(key)
        if other is not None and (other.driver, other.driver_opts) != (vol.driver, vol.driver_opts):
            out.append(Problem(("volumes", name), f"names engine volume {key} like volumes.{other.name}, with "
                                                  "another driver or driver_opts: one volume cannot be both"))
        engine.setdefault(key, vol)
    return out


def _route_conflicts(cfg: config.MeshConfig) -> list[Problem]:
    out: list[Problem] = []
    claimed: dict[tuple[str, str], str] = {}
    for name in cfg.services:          # in the file's order: the later claim is the one reported
        spec = cfg.services[name]
        if not any(p.protocol == "http" for p in spec.ports):
            continue   # no http port: no host route (the proxy routes nothing to it)
        for h, host in enumerate(spec.routes.hosts):
            for path in spec.routes.paths:
                other = claimed.get((host, path.prefix))
                if other is not None and other != name:
                    out.append(Problem(("services", name, "routes", "hosts", h),
                                       f"host {host} with path {path.prefix} is also services.{other}'s: the "
                                       "proxy can give it to one of them only; give them other hosts or paths"))
                claimed.setdefault((host, path.prefix), name)
    return out
