"""``/v1/agent/*`` handlers (agent/agent_endpoint.go).

The agent's services and checks are the catalog's rows on its own node, minus what the
catalog keeps for itself (the ``consul`` service and the ``serfHealth`` check).
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

from ._catalog import (
    deregister_check, deregister_service, node_maintenance, register_check, register_service,
    service_maintenance, update_ttl_check,
)
from ._checkdef import CRITICAL, PASSING, WARNING, script_policy
from ._decode import DecodeError, decode_struct, parse_bool
from ._errors import BadRequest, NotFound
from ._filter import apply_filter
from ._http import Answer, Req, Router, json_response, text_reply
from ._monitor import monitor_level
from ._wire import Reply, Streaming
from ._render import agent_service_json, check_json
from ._schemas import CHECK_TYPE, CHECK_UPDATE, SERVICE_DEFINITION
from ._model import VERSION

__all__ = ["register"]

_RANK = {PASSING: 0, WARNING: 1, CRITICAL: 2}
_HTTP_FOR_STATUS = {PASSING: 200, WARNING: 429, CRITICAL: 503}


def _decode(body: Any, schema: Any) -> dict[str, Any]:
    try:
        return decode_struct(body, schema)
    except DecodeError as exc:
        raise BadRequest(f"Request decode failed: {exc}") from None


def _local_services(req: Req) -> list[dict[str, Any]]:
    st, node = req.server.state, req.server.opts.node
    rows = (st.services.rows[(node, sid)] for sid in sorted(st.services_by_node.get(node, ())))
    return [r for r in rows if not r.get("_internal")]


def _local_checks(req: Req) -> list[dict[str, Any]]:
    st, node = req.server.state, req.server.opts.node
    return [r for r in st.all_node_checks(node) if not r.get("_internal")]


def member(req: Req, wan: bool = False) -> dict[str, Any]:
    opts = req.server.opts
    node = req.server.state.nodes.get(opts.node) or {}
    return {
        "Name": f"{opts.node}.{opts.datacenter}" if wan else opts.node,
        "Addr": opts.advertise,
        "Port": 8302 if wan else 8301,
        "Tags": {
            "role": "consul", "dc": opts.datacenter, "port": "8300", "bootstrap": "1", "build": VERSION,
            "vsn": "2", "vsn_min": "2", "vsn_max": "3", "raft_vsn": "3", "id": node.get("ID", ""), "segment": "",
        },
        "Status": 1,
        "ProtocolMin": 1, "ProtocolMax": 5, "ProtocolCur": 2,
        "DelegateMin": 2, "DelegateMax": 5, "DelegateCur": 4,
    }


async def agent_self(req: Req) -> Answer:
    server, opts = req.server, req.server.opts
    node = server.state.nodes.get(opts.node) or {}
    services, checks = _local_services(req), _local_checks(req)
    index = str(server.store.index)
    body = {
        "Config": {
            "Datacenter": opts.datacenter, "PrimaryDatacenter": opts.datacenter, "NodeName": opts.node,
            "NodeID": node.get("ID", ""), "Revision": "meshlet", "Server": True, "Version": VERSION,
            "BuildDate": "2026-01-01T00:00:00Z",
        },
        "DebugConfig": {
            "Datacenter": opts.datacenter, "NodeName": opts.node, "ServerMode": True, "ACLsEnabled": True,
            "DataDir": opts.data_dir, "SessionTTLMin": f"{opts.session_ttl_min}s", "KVMaxValueSize": 512 * 1024,
        },
        "Coord": {"Vec": [0.0] * 8, "Error": 1.5, "Adjustment": 0.0, "Height": 1e-05},
        "Member": member(req),
        "Stats": {
            "agent": {"check_monitors": "0", "check_ttls": str(sum(c.get("Type") == "ttl" for c in checks)),
                      "checks": str(len(checks)), "services": str(len(services))},
            "build": {"version": VERSION, "revision": "meshlet", "prerelease": ""},
            "consul": {"acl": "enabled", "bootstrap": "true", "known_datacenters": "1", "leader": "true",
                       "leader_addr": server.leader_addr, "server": "true"},
            "raft": {"state": "Leader", "num_peers": "0", "applied_index": index, "commit_index": index,
                     "last_log_index": index, "protocol_version": "3"},
            "runtime": {"os": "linux", "arch": "amd64", "version": "python", "goroutines": "0"},
        },
        "Meta": {"consul-network-segment": ""},
        "xDS": {"SupportedProxies": {"envoy": []}, "Port": -1, "Ports": {"Plaintext": -1, "TLS": -1}},
    }
    return req.json(body, server.store.index)


async def agent_members(req: Req) -> Answer:
    wan = req.query.get("wan", "") not in ("", "0", "false")
    return req.json([member(req, wan)], req.server.store.index)


async def agent_services(req: Req) -> Answer:
    dc = req.server.opts.datacenter
    items = [agent_service_json(r, dc) for r in _local_services(req)]
    items = apply_filter(items, req.query.get("filter"))
    return req.json({s["ID"]: s for s in items}, req.server.store.index)


async def agent_service(req: Req) -> Answer:
    sid = req.tail
    row = req.server.state.services.get((req.server.opts.node, sid))
    if row is None or row.get("_internal"):
        raise NotFound(f"unknown service ID: {sid}")
    body = agent_service_json(row, req.server.opts.datacenter)
    digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]
    body["ContentHash"] = digest
    resp = req.json(body, req.server.store.index)
    resp.headers["X-Consul-ContentHash"] = digest
    return resp


async def agent_checks(req: Req) -> Answer:
    items = apply_filter([check_json(c) for c in _local_checks(req)], req.query.get("filter"))
    return req.json({c["CheckID"]: c for c in items}, req.server.store.index)


def _remote_scripts(req: Req) -> str | None:
    """Why a script check registered over HTTP is refused here, or None (Consul's
    enable_script_checks; enable_local_script_checks alone only allows config files)."""
    server = req.server
    return script_policy("remote", server.enable_script_checks, server.enable_local_script_checks)


def _replace_flag(req: Req) -> bool:
    if "replace-existing-checks" not in req.query:
        return False
    value = req.query["replace-existing-checks"]
    if value == "":
        return True
    try:
        return parse_bool(value)
    except DecodeError:
        raise BadRequest(f'Invalid value for replace-existing-checks: "{value}"') from None


async def service_register(req: Req) -> Answer:
    d = _decode(await req.json_body(), SERVICE_DEFINITION)
    replace = _replace_flag(req)
    st, node, refusal = req.server.state, req.server.opts.node, _remote_scripts(req)
    await req.server.store.write(lambda tx: register_service(st, tx, node, d, replace, refusal))
    return Reply(200)


async def service_deregister(req: Req) -> Answer:
    st, node, sid = req.server.state, req.server.opts.node, req.tail
    await req.server.store.write(lambda tx: deregister_service(st, tx, node, sid))
    return Reply(200)


def _enable_param(req: Req) -> bool:
    if "enable" not in req.query:
        raise BadRequest("Missing value for enable")
    value = req.query["enable"]
    try:
        return parse_bool(value)
    except DecodeError:
        raise BadRequest(f'Invalid value for enable: "{value}"') from None


async def service_maint(req: Req) -> Answer:
    sid = req.tail
    if not sid:
        raise BadRequest("Missing service ID")
    enable = _enable_param(req)
    reason = req.query.get("reason", "")
    st, node = req.server.state, req.server.opts.node
    await req.server.store.write(lambda tx: service_maintenance(st, tx, node, sid, enable, reason))
    return Reply(200)


async def node_maint(req: Req) -> Answer:
    enable = _enable_param(req)
    reason = req.query.get("reason", "")
    st, node = req.server.state, req.server.opts.node
    await req.server.store.write(lambda tx: node_maintenance(st, tx, node, enable, reason))
    return Reply(200)


async def check_register(req: Req) -> Answer:
    c = _decode(await req.json_body(), CHECK_TYPE)
    st, node, refusal = req.server.state, req.server.opts.node, _remote_scripts(req)
    await req.server.store.write(lambda tx: register_check(st, tx, node, c, refusal))
    return Reply(200)


async def check_deregister(req: Req) -> Answer:
    st, node, cid = req.server.state, req.server.opts.node, req.tail
    await req.server.store.write(lambda tx: deregister_check(st, tx, node, cid))
    return Reply(200)


def _ttl_handler(status: str):
    async def handler(req: Req) -> Answer:
        return await _ttl_update(req, req.tail, status, req.query.get("note", ""))

    return handler


async def _ttl_update(req: Req, cid: str, status: str, output: str) -> Answer:
    server = req.server
    st, node, reset = server.state, server.opts.node, server.checks.ttl_reset
    await server.store.write(lambda tx: update_ttl_check(st, tx, node, cid, status, output, reset))
    return Reply(200)


async def check_update(req: Req) -> Answer:
    u = _decode(await req.json_body(), CHECK_UPDATE)
    return await _ttl_update(req, req.tail, u.get("Status", ""), u.get("Output", ""))


def _aggregate(checks: list[dict[str, Any]]) -> str:
    worst = PASSING
    for c in checks:
        if _RANK.get(c["Status"], 2) > _RANK[worst]:
            worst = c["Status"] if c["Status"] in _RANK else CRITICAL
    return worst


def _service_info(req: Req, row: dict[str, Any]) -> dict[str, Any]:
    st, node = req.server.state, req.server.opts.node
    checks = [c for c in st.node_checks(node) if not c.get("_internal")] + st.service_checks(node, row["ID"])
    return {
        "AggregatedStatus": _aggregate(checks),
        "Service": agent_service_json(row, req.server.opts.datacenter),
        "Checks": [check_json(c) for c in checks],
    }


def _health_reply(req: Req, status: str, body: Any, code: int | None = None) -> Answer:
    code = code or _HTTP_FOR_STATUS[status]
    if req.query.get("format") == "text":
        return text_reply(code, status)
    return json_response(body, pretty=req.pretty, status=code)


async def health_by_id(req: Req) -> Answer:
    sid = req.tail
    row = req.server.state.services.get((req.server.opts.node, sid))
    if row is None or row.get("_internal"):
        reason = f"ServiceId {sid} not found"
        if req.query.get("format") == "text":
            return text_reply(404, reason)
        return json_response({"AggregatedStatus": CRITICAL, "Service": None, "Checks": None}, status=404)
    info = _service_info(req, row)
    return _health_reply(req, info["AggregatedStatus"], info)


async def health_by_name(req: Req) -> Answer:
    name = req.tail
    infos = [_service_info(req, r) for r in _local_services(req) if r["Service"] == name]
    if not infos:
        reason = f"ServiceName {name} Not Found"
        if req.query.get("format") == "text":
            return text_reply(404, reason)
        return json_response([], status=404)
    status = _aggregate([{"Status": i["AggregatedStatus"]} for i in infos])
    return _health_reply(req, status, infos)


async def agent_metrics(req: Req) -> Answer:
    """Consul's metrics JSON shape; our gauges describe the catalog itself.

    ``meshlet.catalog.blocked_queries`` (blocking queries waiting now),
    ``meshlet.catalog.watch_wakeups`` (wake-ups delivered since start) and
    ``meshlet.catalog.answers_encoded`` (blocking-read answers evaluated and encoded: one
    per query and commit, however many watchers share it) let tests and operators see
    that a write woke exactly the watchers it should, and what it cost;
    ``last_write_ms`` (the last batch, taken -> durable) and ``last_fanout_ms`` (durable
    -> every watcher it woke written to) time the last commit.
    """
    server = req.server
    if req.query.get("format") == "prometheus":     # as Consul's /v1/agent/metrics?format=prometheus
        return prometheus_metrics_reply(server)
    st = server.state
    gauges = {
        "meshlet.catalog.index": server.store.index,
        "meshlet.catalog.blocked_queries": server.hub.blocked,
        "meshlet.catalog.watch_wakeups": server.hub.wakeups,
        "meshlet.catalog.answers_encoded": server.hub.encodes,
        "meshlet.catalog.last_write_ms": round(server.store.last_write_s * 1000, 3),
        "meshlet.catalog.last_fanout_ms": round(server.store.last_fanout_s * 1000, 3),
        "meshlet.catalog.kv_entries": len(st.kv),
        "meshlet.catalog.services": len(st.services),
        "meshlet.catalog.checks": len(st.checks),
        "meshlet.catalog.sessions": len(st.sessions),
    }
    body = {
        "Timestamp": time.strftime("%Y-%m-%d %H:%M:%S +0000 UTC", time.gmtime()),
        "Gauges": [{"Name": k, "Value": v, "Labels": {}} for k, v in gauges.items()],
        "Points": [],
        "Counters": [],
        "Samples": [],
    }
    return req.json(body, server.store.index)


async def agent_reload(req: Req) -> Answer:
    """Re-read the config files (services, checks, log_level); 500 with the reason, and
    nothing changed, if one cannot be used."""
    await req.server.reload()
    return Reply(200)


async def agent_monitor(req: Req) -> Answer:
    name = req.query.get("loglevel") or "INFO"
    level = monitor_level(name)
    if level is None:
        raise BadRequest(f"Unknown log level: {name}")
    as_json = "logjson" in req.query
    fanout = req.server.monitor
    assert fanout is not None
    return Streaming(lambda write: fanout.stream(level, as_json, write))


def prometheus_metrics_reply(server) -> Reply:  # type: ignore[no-untyped-def]
    from ._prom import CONTENT_TYPE, render

    return Reply(200, render(server), CONTENT_TYPE)


async def prometheus_metrics(req: Req) -> Answer:
    return prometheus_metrics_reply(req.server)


def register(router: Router) -> None:
    add = router.add
    add("/metrics", {"GET": prometheus_metrics}, check_dc=False)
    add("/v1/agent/reload", {"PUT": agent_reload}, check_dc=False)
    add("/v1/agent/monitor", {"GET": agent_monitor}, check_dc=False)
    add("/v1/agent/self", {"GET": agent_self}, check_dc=False)
    add("/v1/agent/members", {"GET": agent_members}, check_dc=False)
    add("/v1/agent/metrics", {"GET": agent_metrics}, check_dc=False)
    add("/v1/agent/services", {"GET": agent_services}, check_dc=False)
    add("/v1/agent/service/", {"GET": agent_service}, check_dc=False)
    add("/v1/agent/checks", {"GET": agent_checks}, check_dc=False)
    add("/v1/agent/service/register", {"PUT": service_register}, check_dc=False)
    add("/v1/agent/service/deregister/", {"PUT": service_deregister}, check_dc=False)
    add("/v1/agent/service/maintenance/", {"PUT": service_maint}, check_dc=False)
    add("/v1/agent/maintenance", {"PUT": node_maint}, check_dc=False)
    add("/v1/agent/check/register", {"PUT": check_register}, check_dc=False)
    add("/v1/agent/check/deregister/", {"PUT": check_deregister}, check_dc=False)
    add("/v1/agent/check/pass/", {"PUT": _ttl_handler(PASSING)}, check_dc=False)
    add("/v1/agent/check/warn/", {"PUT": _ttl_handler(WARNING)}, check_dc=False)
    add("/v1/agent/check/fail/", {"PUT": _ttl_handler(CRITICAL)}, check_dc=False)
    add("/v1/agent/check/update/", {"PUT": check_update}, check_dc=False)
    add("/v1/agent/health/service/id/", {"GET": health_by_id}, check_dc=False)
    add("/v1/agent/health/service/name/", {"GET": health_by_name}, check_dc=False)
