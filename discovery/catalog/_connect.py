"""Connect registrations: a ``SidecarService`` becomes its own proxy service. Pure.

``Connect: {SidecarService: {...}}`` in an agent service registration is sugar
(agent/sidecar_service.go): the agent registers a second service, ``<id>-sidecar-proxy``,
of kind ``connect-proxy``, and keeps nothing of the sugar in the parent. Its defaults:

* name ``<name>-sidecar-proxy``; tags, meta and address of the parent unless given;
* ``Proxy.DestinationServiceName`` / ``DestinationServiceID`` = the parent;
  ``LocalServiceAddress`` 127.0.0.1 and ``LocalServicePort`` = the parent's port (or the
  parent's socket path) unless given;
* a port from 21000-21255 (Consul's sidecar_min_port/sidecar_max_port): the lowest one no
  other service uses, or the one this sidecar already has;
* checks, unless given: "Connect Sidecar Listening" (TCP to the proxy every 10s) and
  "Connect Sidecar Aliasing <parent id>" (an alias of the parent's health).

No proxy runs behind it here: these are the registrations Consul makes, for the clients
that read them (health/connect, catalog/connect, DNS ``.connect``).
"""

from __future__ import annotations

from typing import Any, Iterable

from ._errors import BadRequest, CatalogError

__all__ = ["SIDECAR_SUFFIX", "MIN_PORT", "MAX_PORT", "sidecar_id", "split_sidecar", "sidecar_definition",
           "proxy_json"]

SIDECAR_SUFFIX = "-sidecar-proxy"
MIN_PORT, MAX_PORT = 21000, 21255  # sidecar_min_port, sidecar_max_port
CONNECT_PROXY = "connect-proxy"
LISTENING_INTERVAL_NS = 10_000_000_000


def sidecar_id(parent_id: str) -> str:
    return parent_id + SIDECAR_SUFFIX


def split_sidecar(d: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The parent definition without the sugar, and the SidecarService (or None)."""
    connect = d.get("Connect") or {}
    if "SidecarService" not in connect:
        return d, None
    parent = dict(d)
    rest = {k: v for k, v in connect.items() if k != "SidecarService"}
    parent["Connect"] = rest if rest.get("Native") else None
    return parent, dict(connect["SidecarService"] or {})


def _pick_port(used: Iterable[int], current: int | None) -> int:
    if current is not None and MIN_PORT <= current <= MAX_PORT:
        return current
    taken = set(used)
    for port in range(MIN_PORT, MAX_PORT + 1):
        if port not in taken:
            return port
    raise CatalogError(
        f"no port provided for sidecar_service and none left in the configured range [{MIN_PORT}, {MAX_PORT}]")


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def sidecar_definition(parent: dict[str, Any], parent_id: str, sidecar: dict[str, Any], used_ports: Iterable[int],
                       current_port: int | None) -> dict[str, Any]:
    """The ServiceDefinition Consul registers for ``parent``'s SidecarService.

    ``used_ports``: ports of the other services on the node; ``current_port``: the port
    this sidecar has now, if registered (kept across re-registrations).
    """
    if sidecar.get("ID") and sidecar["ID"] != sidecar_id(parent_id):
        raise BadRequest(f"Invalid SidecarService: ID must be {sidecar_id(parent_id)!r} or empty")
    kind = sidecar.get("Kind") or CONNECT_PROXY
    if kind != CONNECT_PROXY:
        raise BadRequest(f"Invalid SidecarService: Kind must be {CONNECT_PROXY!r}")
    out = dict(sidecar)
    out["ID"] = sidecar_id(parent_id)
    out["Kind"] = kind
    out["Name"] = sidecar.get("Name") or parent["Name"] + SIDECAR_SUFFIX
    if not sidecar.get("Meta") and parent.get("Meta"):
        out["Meta"] = dict(parent["Meta"])
    if not sidecar.get("Tags") and parent.get("Tags"):
        out["Tags"] = list(parent["Tags"])
    if not sidecar.get("Address"):
        out["Address"] = parent.get("Address", "")
    proxy = dict(sidecar.get("Proxy") or {})
    proxy.setdefault("DestinationServiceName", parent["Name"])
    proxy["DestinationServiceName"] = proxy["DestinationServiceName"] or parent["Name"]
    proxy["DestinationServiceID"] = proxy.get("DestinationServiceID") or parent_id
    if not proxy.get("LocalServiceSocketPath") and (not proxy.get("LocalServiceAddress")
                                                     or proxy.get("LocalServicePort", 0) < 1):
        if parent.get("SocketPath"):
            proxy["LocalServiceSocketPath"] = parent["SocketPath"]
        else:
            proxy["LocalServiceAddress"] = proxy.get("LocalServiceAddress") or "127.0.0.1"
            if proxy.get("LocalServicePort", 0) < 1:
                proxy["LocalServicePort"] = parent.get("Port", 0)
    out["Proxy"] = proxy
    port = sidecar.get("Port") or 0
    if port < 1:
        port = _pick_port(used_ports, current_port)
    out["Port"] = port
    out.pop("Connect", None)
    if not sidecar.get("Check") and not sidecar.get("Checks"):
        address = out["Address"] or proxy.get("LocalServiceAddress") or "127.0.0.1"
        out["Checks"] = [
            {"Name": "Connect Sidecar Listening", "TCP": _host_port(address, port), "Interval": LISTENING_INTERVAL_NS},
            {"Name": f"Connect Sidecar Aliasing {parent_id}", "AliasService": parent_id},
        ]
    return out


def proxy_json(proxy: dict[str, Any]) -> dict[str, Any]:
    """A proxy's ``Proxy`` object as Consul shows it (Mode, MeshGateway, Expose present)."""
    return {"Mode": "", "MeshGateway": {}, "Expose": {}, **proxy}
