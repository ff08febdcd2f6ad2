"""Cross-field rules and defaults that depend on other fields (one hook per dataclass).

A hook gets the converted field values (some may be INVALID: skip rules that need them),
the mapping node (for line numbers) and returns the values, possibly with defaults filled
in. Rules only a whole service can check (port references, mount references) live in the
ServiceSpec hook; references to top-level volumes/configs/secrets need ``cx.names``.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from typing import Any, Callable

from ._convert import HOOKS, INVALID, Ctx, is_ok
from ._tree import N, join
from ._model import (Backoff, CatalogSettings, ConfigSpec, EngineTls, HashOn, ListenerTls, MeshSettings, NodeSpec,
                     PortSpec, Probe, Probes, ProxySettings, ResourceAmounts, Resources, Routes, SecretMount,
                     SecretSpec, SecretsSettings, ServiceSpec, TlsCertificate, UpdateStrategy, UpstreamTls,
                     VolumeSpec)

__all__ = ["DEFAULT_DOCKER_ENGINE"]

from ._process import DEFAULT_DOCKER_ENGINE
Values = dict[str, Any]


def hook(cls: type) -> Callable[[Callable[..., Values]], Callable[..., Values]]:
    def register(fn: Callable[..., Values]) -> Callable[..., Values]:
        HOOKS[cls] = fn
        return fn

    return register


def line_of(n: N | None, *keys: str | int) -> int | None:
    """Line of the deepest node found along ``keys`` below ``n``."""
    line = n.line if n is not None else None
    for key in keys:
        if n is None:
            break
        if isinstance(key, int):
            n = n.value[key] if n.kind == "seq" and key < len(n.value) else None
        else:
            n = n.get(key)
        if n is not None:
            line = n.line
    return line


def _one_of(values: Values, names: tuple[str, ...], n: N, cx: Ctx, path: str,
            is_set: Callable[[Any], bool] = lambda v: v is not None) -> None:
    """Report unless exactly one of ``names`` is set (INVALID counts as set)."""
    given = [k for k in names if is_set(values[k])]
    listed = ", ".join(names[:-1]) + " or " + names[-1]
    if not given:
        cx.error(n.line, path, f"expected exactly one of {listed}")
    elif len(given) > 1:
        cx.error(line_of(n, given[1]), path, f"give only one of {listed} (got {' and '.join(given)})")


@hook(MeshSettings)
def _mesh(v: Values, n: N, cx: Ctx, path: str) -> Values:
    if isinstance(v["data_dir"], str):
        v["data_dir"] = cx.resolve(v["data_dir"])
    if isinstance(v["vip_range"], str):
        try:
            net = ipaddress.IPv4Network(v["vip_range"], strict=True)
        except ValueError as exc:
            v["vip_range"] = cx.error(line_of(n, "vip_range"), join(path, "vip_range"),
                                      f"expected an IPv4 network like 127.10.0.0/16, got "
                                      f'"{v["vip_range"]}" ({exc})')
        else:
            if net.num_addresses < 4:
                v["vip_range"] = cx.error(line_of(n, "vip_range"), join(path, "vip_range"),
                                          f"{net} is too small: it needs at least 4 addresses")
            else:
                v["vip_range"] = str(net)
    if is_ok(v["nodes"]):
        first: dict[str, int] = {}
        for i, node in enumerate(v["nodes"]):
            if node.name in first:
                cx.error(line_of(n, "nodes", i, "name"), join(path, f"nodes[{i}].name"),
                         f'node name "{node.name}" is used twice (also nodes[{first[node.name]}])')
                v["nodes"] = INVALID
            first.setdefault(node.name, i)
    return v


@hook(CatalogSettings)
def _catalog(v: Values, n: N, cx: Ctx, path: str) -> Values:
    for key in ("token_file", "ca_file", "cert_file", "key_file"):
        if isinstance(v[key], str):
            v[key] = cx.resolve(v[key])
    if v["token"] is not None and v["token_file"] is not None:
        cx.error(line_of(n, "token_file"), path, "give token or token_file, not both")
    if (v["cert_file"] is None) != (v["key_file"] is None):
        given, missing = ("cert_file", "key_file") if v["key_file"] is None else ("key_file", "cert_file")
        cx.error(line_of(n, given), join(path, given), f"needs {missing} too (a client certificate is both)")
    url = v["url"]
    if not isinstance(url, str):
        return v
    tls = [k for k in ("ca_file", "cert_file", "key_file") if v[k] is not None]
    if url == "embedded":
        if tls:
            cx.error(line_of(n, tls[0]), join(path, tls[0]),
                     "the embedded catalog serves plain HTTP on catalog_listen; TLS options need url: https://...")
        if v["token"] is not None:
            cx.error(line_of(n, "token"), join(path, "token"),
                     "the embedded catalog makes its own management token; token_file may name where it keeps it")
    elif tls and not url.startswith("https://"):
        cx.error(line_of(n, tls[0]), join(path, tls[0]), f"needs an https:// url (url is {url})")
    return v


@hook(NodeSpec)
def _node(v: Values, n: N, cx: Ctx, path: str) -> Values:
    if v["runtime"] is None:
        v["runtime"] = "docker" if v["engine"] is not None else "process"
    if v["runtime"] == "docker" and v["engine"] is None:
        v["engine"] = DEFAULT_DOCKER_ENGINE
    if v["runtime"] == "process" and v["engine"] is not None:
        v["engine"] = cx.error(line_of(n, "engine"), join(path, "engine"),
                               "engine is only for runtime docker")
    if v["tls"] is not None and is_ok(v["tls"], v["engine"]) and not str(v["engine"] or "").startswith("tcp://"):
        v["tls"] = cx.error(line_of(n, "tls"), join(path, "tls"),
                            "tls is for an engine at tcp://HOST:PORT (unix:// and ssh:// need none)")
    if is_ok(v["capacity"], v["reserved"]):
        declared, kept = v["capacity"], v["reserved"]
        for res in ("cpu", "memory"):
            reserved, capacity = getattr(kept, res), getattr(declared, res)
            where = line_of(n, "reserved", res), join(path, f"reserved.{res}")
            # without a declared capacity, reserved comes off what the engine reports
            if reserved is None or capacity is None:
                continue
            if reserved >= capacity:
                v["reserved"] = cx.error(*where, f"leaves nothing of capacity.{res} "
                                                 f"({_amount(res, capacity)}) for replicas, got "
                                                 f"{_amount(res, reserved)}")
    return v


def _amount(resource: str, value: float) -> str:
    return f"{value:g}" if resource == "cpu" else f"{value} bytes"


@hook(EngineTls)
def _engine_tls(v: Values, n: N, cx: Ctx, path: str) -> Values:
    for key in ("ca_file", "cert_file", "key_file"):
        if isinstance(v[key], str):
            v[key] = cx.resolve(v[key])
    return v


@hook(Resources)
def _resources(v: Values, n: N, cx: Ctx, path: str) -> Values:
    """Per resource, an unset limit is the request and an unset request the limit (as in
    Kubernetes); a request above its limit could never be honoured."""
    requests, limits = v["requests"], v["limits"]
    if not is_ok(requests, limits):
        return v
    filled_requests, filled_limits = {}, {}
    for res in ("cpu", "memory"):
        req, lim = getattr(requests, res), getattr(limits, res)
        if req is not None and lim is not None and req > lim:
            cx.error(line_of(n, "requests", res), join(path, f"requests.{res}"),
                     f"must not be more than limits.{res} ({_amount(res, lim)}), got {_amount(res, req)}")
            v["requests"] = INVALID
        filled_requests[res] = req if req is not None else lim
        filled_limits[res] = lim if lim is not None else req
    if is_ok(v["requests"]):
        v["requests"], v["limits"] = ResourceAmounts(**filled_requests), ResourceAmounts(**filled_limits)
    return v


@hook(Backoff)
def _backoff(v: Values, n: N, cx: Ctx, path: str) -> Values:
    if is_ok(v["initial"], v["max"]) and v["initial"] > v["max"]:
        cx.error(line_of(n, "max"), join(path, "max"),
                 f"must not be less than initial ({v['initial']:g}s), got {v['max']:g}s")
    return v


@hook(PortSpec)
def _port(v: Values, n: N, cx: Ctx, path: str) -> Values:
    if v["name"] is None and is_ok(v["protocol"]):
        v["name"] = v["protocol"]
    if v["vip_port"] is None and is_ok(v["port"], v["protocol"]):
        if v["port"]:
            v["vip_port"] = v["port"]
        elif v["protocol"] == "http":
            v["vip_port"] = 80
        else:
            v["vip_port"] = cx.error(n.line, path, "a tcp port with port 0 needs vip_port "
                                                   "(the port clients use on the service VIP)")
    return v


_PROBE_KINDS = ("http", "tcp", "exec")


@hook(Probe)
def _probe(v: Values, n: N, cx: Ctx, path: str) -> Values:
    _one_of(v, _PROBE_KINDS, n, cx, path)
    return v


@hook(Probes)
def _probes(v: Values, n: N, cx: Ctx, path: str) -> Values:
    for kind in ("liveness", "startup"):
        probe = v[kind]
        if probe and probe.success_threshold != 1:
            cx.error(line_of(n, kind, "success_threshold"), join(path, f"{kind}.success_threshold"),
                     f"must be 1 for {kind} probes (as in Kubernetes), got {probe.success_threshold}")
    return v


@hook(HashOn)
def _hash_on(v: Values, n: N, cx: Ctx, path: str) -> Values:
    _one_of(v, ("header", "cookie", "source_ip"), n, cx, path,
            is_set=lambda x: x is not None and x is not False)
    return v


@hook(Routes)
def _routes(v: Values, n: N, cx: Ctx, path: str) -> Values:
    if v["policy"] == "ring_hash" and v["hash_on"] is None:
        cx.error(line_of(n, "policy"), join(path, "policy"),
                 "ring_hash needs hash_on ({header: X}, {cookie: X} or {source_ip: true})")
    elif v["hash_on"] is not None and is_ok(v["policy"]) and v["policy"] != "ring_hash":
        cx.error(line_of(n, "hash_on"), join(path, "hash_on"),
                 f"hash_on is only used by policy ring_hash, not {v['policy']}")
    if is_ok(v["paths"]):
        first: dict[str, int] = {}
        for i, route in enumerate(v["paths"]):
            if route.prefix in first:
                cx.error(line_of(n, "paths", i, "prefix"), join(path, f"paths[{i}].prefix"),
                         f'prefix "{route.prefix}" is listed twice (also paths[{first[route.prefix]}])')
            first.setdefault(route.prefix, i)
    return v


def _is_zero(x: Any) -> bool:
    return x == 0 or x == "0%"


@hook(UpdateStrategy)
def _update(v: Values, n: N, cx: Ctx, path: str) -> Values:
    surge, unavailable = v["max_surge"], v["max_unavailable"]
    if isinstance(unavailable, str) and int(unavailable[:-1]) > 100:
        v["max_unavailable"] = cx.error(line_of(n, "max_unavailable"), join(path, "max_unavailable"),
                                        f'expected at most 100%, got "{unavailable}"')
    elif _is_zero(surge) and _is_zero(unavailable):
        cx.error(line_of(n, "max_unavailable") or line_of(n, "max_surge"), path,
                 "max_surge and max_unavailable cannot both be 0 (no replica could ever be replaced)")
    steps = v["canary"]
    if is_ok(steps) and steps:
        if v["strategy"] == "recreate":
            cx.error(line_of(n, "canary"), join(path, "canary"), "canary steps need strategy rolling")
        for i in range(1, len(steps)):
            if steps[i].weight <= steps[i - 1].weight:
                cx.error(line_of(n, "canary", i, "weight"), join(path, f"canary[{i}].weight"),
                         f"canary weights must increase, got {steps[i].weight} "
                         f"after {steps[i - 1].weight}")
    return v


@hook(SecretMount)
def _secret_mount(v: Values, n: N, cx: Ctx, path: str) -> Values:
    if v["target"] is None and v["env"] is None and is_ok(v["name"]):
        v["target"] = f"/run/secrets/{v['name']}"  # Docker Swarm's place for secrets
    return v


# What Docker's ``local`` driver accepts (its ``validOpts``; ``size`` only on xfs with
# project quota): anything else the engine refuses at create, so it is refused here first.
LOCAL_DRIVER_OPTS = ("type", "device", "o", "size")


@hook(VolumeSpec)
def _volume(v: Values, n: N, cx: Ctx, path: str) -> Values:
    kind = v["type"]
    if kind == "host" and v["source"] is None:
        cx.error(n.line, path, "a host volume needs source (a directory on the node)")
    if kind == "tmpfs" and v["source"] is not None:
        cx.error(line_of(n, "source"), join(path, "source"), "a tmpfs volume has no source")
    if kind != "tmpfs" and v["size"] is not None and is_ok(kind):
        cx.error(line_of(n, "size"), join(path, "size"), "size is only for tmpfs volumes")
    if is_ok(kind):
        for key, empty in (("driver", None), ("driver_opts", {}), ("per_replica", False)):
            if kind != "named" and v[key] != empty and v[key] is not INVALID:
                cx.error(line_of(n, key), join(path, key), f"{key} is only for named volumes (type {kind} "
                                                           "has no engine volume)")
        if kind != "host" and v["create"]:
            cx.error(line_of(n, "create"), join(path, "create"), "create is only for host volumes")
    if kind == "named":
        if v["driver"] is None:
            v["driver"] = "local"
        if isinstance(v["source"], str):
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}", v["source"]):
                v["source"] = cx.error(line_of(n, "source"), join(path, "source"),
                                       'expected an engine volume name of letters, digits, "_", "." and "-", '
                                       f'got "{v["source"]}"')
            elif v["per_replica"] is True:
                cx.error(line_of(n, "source"), join(path, "source"),
                         "a per_replica volume has no source: each slot gets its own engine volume, "
                         "<service>-<volume>-<slot>")
        if v["driver"] == "local" and is_ok(v["driver_opts"]):
            for key in v["driver_opts"]:
                if key not in LOCAL_DRIVER_OPTS:
                    cx.error(line_of(n, "driver_opts", key), join(path, f"driver_opts.{key}"),
                             f'the local driver takes only {", ".join(LOCAL_DRIVER_OPTS)} (Docker refuses '
                             f'"{key}"); a plugin\'s options need its driver')
    if kind == "host" and isinstance(v["source"], str):
        v["source"] = cx.resolve(v["source"])
    return v


@hook(ConfigSpec)
def _config(v: Values, n: N, cx: Ctx, path: str) -> Values:
    _one_of(v, ("data", "file"), n, cx, path)
    if isinstance(v["file"], str):
        v["file"] = cx.resolve(v["file"])
    return v


@hook(SecretSpec)
def _secret(v: Values, n: N, cx: Ctx, path: str) -> Values:
    _one_of(v, ("file", "env", "external"), n, cx, path, is_set=lambda x: x is not None and x is not False)
    if isinstance(v["file"], str):
        v["file"] = cx.resolve(v["file"])
    return v


@hook(SecretsSettings)
def _secrets_settings(v: Values, n: N, cx: Ctx, path: str) -> Values:
    if v["key_file"] is not None and v["key_env"] is not None:
        cx.error(line_of(n, "key_env"), path, "give key_file or key_env, not both")
    if isinstance(v["key_file"], str):
        v["key_file"] = cx.resolve(v["key_file"])
    return v


# --- the proxy's TLS files ------------------------------------------------------------------

def _resolve_files(v: Values, cx: Ctx, *names: str) -> Values:
    for name in names:
        if isinstance(v[name], str):
            v[name] = cx.resolve(v[name])
    return v


@hook(ListenerTls)
def _listener_tls(v: Values, n: N, cx: Ctx, path: str) -> Values:
    return _resolve_files(v, cx, "cert_file", "key_file")


@hook(TlsCertificate)
def _tls_certificate(v: Values, n: N, cx: Ctx, path: str) -> Values:
    return _resolve_files(v, cx, "cert_file", "key_file")


@hook(UpstreamTls)
def _upstream_tls(v: Values, n: N, cx: Ctx, path: str) -> Values:
    return _resolve_files(v, cx, "ca_file")


@hook(ProxySettings)
def _proxy(v: Values, n: N, cx: Ctx, path: str) -> Values:
    """One listener per address, one upstream_tls entry per service, and within a TLS
    listener one certificate per host name (which one would SNI pick?)."""
    for field, key, what in (("listen", "address", "address"), ("upstream_tls", "service", "service")):
        if not is_ok(v[field]):
            continue
        first: dict[str, int] = {}
        for i, item in enumerate(v[field]):
            value = getattr(item, key)
            if value.endswith(":0"):
                continue   # port 0: any free port, each listener its own
            if value in first:
                cx.error(line_of(n, field, i), join(path, f"{field}[{i}].{key}"),
                         f'{what} "{value}" is listed twice (also {field}[{first[value]}])')
                v[field] = INVALID
                break
            first[value] = i
    if is_ok(v["listen"]):
        for i, listener in enumerate(v["listen"]):
            if listener.tls is None:
                continue
            seen: dict[str, int] = {}
            for j, cert in enumerate(listener.tls.certificates):
                for host in cert.hosts:
                    if host in seen and seen[host] != j:
                        cx.error(line_of(n, "listen", i), join(path, f"listen[{i}].tls.certificates[{j}].hosts"),
                                 f'host "{host}" is also in certificates[{seen[host]}]: give each host one certificate')
                        v["listen"] = INVALID
                    seen.setdefault(host, j)
    return v


# --- the whole service ------------------------------------------------------------------

@hook(ServiceSpec)
def _service(v: Values, n: N, cx: Ctx, path: str) -> Values:
    if v["image"] is None and v["command"] is None:
        cx.error(n.line, path, "missing image or command (exactly one is required)")
    elif v["image"] is not None and v["command"] is not None:
        cx.error(line_of(n, "command"), path, "give image or command, not both")
    elif is_ok(v["command"], v["workdir"]) and v["command"] is not None:
        _resolve_process_paths(v, cx)
    if is_ok(v["ports"]):
        _check_ports(v, n, cx, path)
        if is_ok(v["ports"], v["probes"]):
            v["probes"] = _resolve_probe_ports(v["probes"], v["ports"], n, cx, path)
    if is_ok(v["env"]):
        for key in v["env"]:
            if key == "PORT" or key.startswith("PORT_"):
                cx.error(line_of(n, "env", key), join(path, f"env.{key}"),
                         "PORT and PORT_<NAME> are set by meshlet from ports")
    _check_mounts(v, n, cx, path)
    if v["image"] is not None and is_ok(v["secrets"]):
        for i, mount in enumerate(v["secrets"]):
            if mount.env is not None:
                # the engine keeps a container's variables in its config, which docker
                # inspect prints to anyone who can reach the engine: only files are safe
                cx.error(line_of(n, "secrets", i, "env"), join(path, f"secrets[{i}].env"),
                         "a container's variables are shown by docker inspect, so a secret is "
                         f"delivered to an image service as a file only: drop env and read "
                         f"{mount.target or '/run/secrets/' + mount.name}")
    return v


def _resolve_process_paths(v: Values, cx: Ctx) -> None:
    """Relative paths of a command service are the config file's: ``command[0]`` if it
    contains a "/" and ``workdir``, which defaults to the config file's directory."""
    if cx.base_dir is None:
        return
    command = v["command"]
    if command and "/" in command[0]:
        v["command"] = (cx.resolve(command[0]),) + command[1:]
    v["workdir"] = cx.resolve(v["workdir"]) if v["workdir"] is not None else cx.base_dir


def _first_twice(items: list[tuple[Any, int]], cx: Ctx, where: Callable[[int], tuple[int | None, str]],
                 what: Callable[[Any], str], label: str) -> bool:
    """Report each item equal to an earlier one; True when all are distinct."""
    first: dict[Any, int] = {}
    ok = True
    for value, i in items:
        if value in first:
            line, p = where(i)
            cx.error(line, p, f"{what(value)} is used twice (also {label}[{first[value]}])")
            ok = False
        first.setdefault(value, i)
    return ok


def _check_ports(v: Values, n: N, cx: Ctx, path: str) -> None:
    ports = v["ports"]

    def at(field: str) -> Callable[[int], tuple[int | None, str]]:
        return lambda i: (line_of(n, "ports", i, field), join(path, f"ports[{i}].{field}"))

    names = _first_twice([(p.name, i) for i, p in enumerate(ports)], cx, at("name"),
                         lambda x: f'port name "{x}"', "ports")
    _first_twice([(p.port, i) for i, p in enumerate(ports) if p.port], cx, at("port"),
                 lambda x: f"port {x}", "ports")
    _first_twice([(p.vip_port, i) for i, p in enumerate(ports)], cx, at("vip_port"),
                 lambda x: f"vip_port {x}", "ports")
    if not names:
        v["ports"] = INVALID


def _resolve_probe_ports(probes: Probes, ports: tuple[PortSpec, ...], n: N, cx: Ctx,
                         path: str) -> Any:
    """Check probe ports name declared ports; an absent port means the first one."""
    declared = [p.name for p in ports]
    changes: dict[str, Probe] = {}
    ok = True
    for kind in ("liveness", "readiness", "startup"):
        probe: Probe | None = getattr(probes, kind)
        check = probe and (probe.http or probe.tcp)
        if not probe or not check:
            continue
        style = "http" if probe.http else "tcp"
        where = (kind, style, "port")
        p = join(path, f"probes.{kind}.{style}")
        if check.port is None:
            if not declared:
                cx.error(line_of(n, "probes", *where[:2]), p,
                         "no port given and the service declares no ports")
                ok = False
                continue
            changes[kind] = dataclasses.replace(probe, **{style: dataclasses.replace(check, port=declared[0])})
        elif isinstance(check.port, str) and check.port not in declared:
            known = f"declared: {', '.join(declared)}" if declared else "the service declares no ports"
            cx.error(line_of(n, "probes", *where), join(p, "port"),
                     f'unknown port "{check.port}" ({known})')
            ok = False
    if not ok:
        return INVALID
    return dataclasses.replace(probes, **changes) if changes else probes


_MOUNT_KINDS = (("volumes", "volume"), ("configs", "config"), ("secrets", "secret"))


def _check_mounts(v: Values, n: N, cx: Ctx, path: str) -> None:
    targets: dict[str, str] = {}
    for field, noun in _MOUNT_KINDS:
        mounts = v[field]
        if not is_ok(mounts):
            continue
        defined = cx.names.get(field) if cx.names is not None else None
        for i, mount in enumerate(mounts):
            here = f"{field}[{i}]"
            if defined is not None and mount.name not in defined:
                known = f"defined: {', '.join(sorted(defined))}" if defined else f"no {field} are defined"
                cx.error(line_of(n, field, i, "name"), join(path, f"{here}.name"),
                         f'unknown {noun} "{mount.name}" ({known})')
                v[field] = INVALID
            if mount.target is not None:
                if mount.target in targets:
                    cx.error(line_of(n, field, i, "target"), join(path, f"{here}.target"),
                             f"target {mount.target} is used twice (also {targets[mount.target]})")
                    v[field] = INVALID
                targets.setdefault(mount.target, here)
