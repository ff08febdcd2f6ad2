"""Health check definitions and results: pure rules, no I/O.

* ``check_definition(decoded)``: validate a decoded ``CheckType`` the way Consul's
  ``CheckType.Validate`` does and turn it into the internal definition stored with the
  check (``_def``: ``kind``, ``ttl``, ``interval``, ``timeout`` ... in nanoseconds).
* ``apply_result``: Consul's ``StatusHandler`` (SuccessBeforePassing, FailuresBeforeWarning,
  FailuresBeforeCritical): which status, if any, a probe result turns into.
* ``http_status``: 2xx passing, 429 warning, anything else critical.
* ``truncate_output``: Consul's OutputMaxSize (4 KiB by default).
"""

from __future__ import annotations

from typing import Any

from ._decode import format_go_duration
from ._errors import BadRequest

__all__ = [
    "PASSING", "WARNING", "CRITICAL", "STATUSES",
    "check_definition", "definition_json", "apply_result", "http_status", "truncate_output",
    "script_policy", "script_result", "alias_status", "has_script",
    "DEFAULT_TIMEOUT_NS", "SCRIPT_TIMEOUT_NS", "OUTPUT_MAX", "SCRIPTS_DISABLED", "SCRIPTS_DISABLED_REMOTE",
]

PASSING, WARNING, CRITICAL = "passing", "warning", "critical"
STATUSES = (PASSING, WARNING, CRITICAL)
DEFAULT_TIMEOUT_NS = 10_000_000_000  # HTTP and TCP checks: 10s
OUTPUT_MAX = 4096  # OutputMaxSize default

SCRIPT_TIMEOUT_NS = 30_000_000_000  # script checks: 30s (checks/check.go CheckMonitor)
# agent.go addCheck: a check from a config file ("local") runs if either flag is on; one
# from the HTTP API ("remote") only with enable_script_checks.
SCRIPTS_DISABLED = (
    "Scripts are disabled on this agent; to enable, configure 'enable_script_checks' or "
    "'enable_local_script_checks' to true"
)
SCRIPTS_DISABLED_REMOTE = (
    "Scripts are disabled on this agent from remote calls; to enable, configure 'enable_script_checks' to true"
)


def script_policy(source: str, enable_script_checks: bool, enable_local_script_checks: bool) -> str | None:
    """Why a script check from ``source`` ("local": a config file, "remote": the HTTP API)
    is refused, or None if it may run."""
    if source == "local":
        return None if (enable_script_checks or enable_local_script_checks) else SCRIPTS_DISABLED
    return None if enable_script_checks else SCRIPTS_DISABLED_REMOTE


def script_result(returncode: int | None, tail: bytes, total: int, limit: int, timed_out: bool,
                  timeout_ns: int) -> tuple[str, str]:
    """Consul's CheckMonitor verdict: exit 0 passing, 1 warning, anything else (a signal,
    a timeout) critical. ``tail`` is the last ``limit`` bytes of stdout+stderr out of
    ``total`` written, shown as Consul's circular buffer shows it."""
    output = tail.decode("utf-8", "replace")
    if total > limit:
        output = f"Captured {limit} of {total} bytes\n...\n{output}"
    if timed_out:
        msg = f"Timed out ({format_go_duration(timeout_ns)}) running check"
        return CRITICAL, msg + ("\n\n" + output if output else "")
    if returncode == 0:
        return PASSING, output
    if returncode == 1:
        return WARNING, output
    return CRITICAL, output


def check_definition(c: dict[str, Any]) -> dict[str, Any]:
    """Validate a decoded check type; return its internal definition.

    Raises BadRequest ``Invalid check: ...`` for what Consul rejects and for kinds this
    catalog does not run (gRPC, H2PING, UDP, OSService, Docker). Whether a script check
    may run is the caller's question (``script_policy``).
    """
    interval = c.get("Interval", 0)
    ttl = c.get("TTL", 0)
    is_script = bool(c.get("ScriptArgs"))
    interval_kinds = [k for k in ("HTTP", "TCP", "UDP", "GRPC", "H2PING", "OSService") if c.get(k)]
    interval_check = is_script or bool(interval_kinds)
    is_alias = bool(c.get("AliasNode") or c.get("AliasService"))
    if interval > 0 and ttl > 0:
        raise BadRequest("Invalid check: Interval and TTL cannot both be specified")
    if interval_check and interval <= 0:
        raise BadRequest("Invalid check: Interval must be > 0 for Script, HTTP, H2PING, TCP, UDP or OSService checks")
    if interval_check and is_alias:
        raise BadRequest("Invalid check: Interval cannot be set for Alias checks")
    if is_alias and ttl > 0:
        raise BadRequest("Invalid check: TTL must be not be set for Alias checks")
    if not interval_check and not is_alias and ttl <= 0:
        raise BadRequest("Invalid check: TTL must be > 0 for TTL checks")
    if c.get("OutputMaxSize", 0) < 0:
        raise BadRequest("Invalid check: MaxOutputMaxSize must be positive")
    fbw, fbc = c.get("FailuresBeforeWarning", 0), c.get("FailuresBeforeCritical", 0)
    if fbw > fbc:
        raise BadRequest("Invalid check: FailuresBeforeWarning can't be higher than FailuresBeforeCritical")
    status = c.get("Status", "")
    if status and status not in STATUSES:
        raise BadRequest("Status for checks must 'passing', 'warning', 'critical'")
    if c.get("DockerContainerID") or any(k not in ("HTTP", "TCP") for k in interval_kinds):
        kind = "docker" if c.get("DockerContainerID") else interval_kinds[0].lower()
        raise BadRequest(f"Invalid check: {kind} checks are not supported by this catalog "
                         "(TTL, HTTP, TCP, script and alias are)")
    d: dict[str, Any] = {}
    if is_script:
        d["kind"] = "script"
        d["args"] = list(c["ScriptArgs"])
    elif is_alias:
        d["kind"] = "alias"
        d["alias_service"] = c.get("AliasService", "")
        if c.get("AliasNode"):
            d["alias_node"] = c["AliasNode"]
    elif ttl > 0:
        d["kind"] = "ttl"
        d["ttl"] = ttl
    elif c.get("HTTP"):
        d["kind"] = "http"
        d["http"] = c["HTTP"]
        d["method"] = c.get("Method") or "GET"
        if c.get("Header"):
            d["header"] = c["Header"]
        if c.get("Body"):
            d["body"] = c["Body"]
        if c.get("TLSSkipVerify"):
            d["tls_skip_verify"] = True
        if c.get("DisableRedirects"):
            d["disable_redirects"] = True
    else:
        d["kind"] = "tcp"
        d["tcp"] = c["TCP"]
    if interval > 0:
        d["interval"] = interval
        d["timeout"] = c.get("Timeout") or (SCRIPT_TIMEOUT_NS if is_script else DEFAULT_TIMEOUT_NS)
    elif c.get("Timeout"):
        d["timeout"] = c["Timeout"]
    if c.get("DeregisterCriticalServiceAfter", 0) > 0:
        d["deregister"] = c["DeregisterCriticalServiceAfter"]
    for name, key in (("SuccessBeforePassing", "sbp"), ("FailuresBeforeWarning", "fbw"),
                      ("FailuresBeforeCritical", "fbc"), ("OutputMaxSize", "output_max")):
        if c.get(name, 0) > 0:
            d[key] = c[name]
    return d


def definition_json(d: dict[str, Any]) -> dict[str, Any]:
    """The public ``Definition`` object of a HealthCheck (durations as Go strings)."""
    out: dict[str, Any] = {}
    if d.get("http"):
        out["HTTP"] = d["http"]
        out["Method"] = d.get("method", "GET")
        if d.get("header"):
            out["Header"] = d["header"]
        if d.get("body"):
            out["Body"] = d["body"]
        if d.get("tls_skip_verify"):
            out["TLSSkipVerify"] = True
    if d.get("tcp"):
        out["TCP"] = d["tcp"]
    if d.get("args"):
        out["ScriptArgs"] = d["args"]
    if d.get("kind") == "alias":
        if d.get("alias_node"):
            out["AliasNode"] = d["alias_node"]
        out["AliasService"] = d.get("alias_service", "")
    for key, name in (("interval", "Interval"), ("timeout", "Timeout"), ("ttl", "TTL"),
                      ("deregister", "DeregisterCriticalServiceAfter")):
        if d.get(key):
            out[name] = format_go_duration(d[key])
    return out


def apply_result(
    counters: tuple[int, int], result: str, sbp: int = 0, fbw: int = 0, fbc: int = 0
) -> tuple[tuple[int, int], str | None]:
    """Consul's StatusHandler. ``counters`` = (successes, failures) in a row.

    Returns the new counters and the status to record, or None to keep the current one.
    FailuresBeforeWarning defaults to FailuresBeforeCritical.
    """
    successes, failures = counters
    if result in (PASSING, WARNING):
        successes, failures = successes + 1, 0
        if successes >= sbp:
            return (successes, failures), result
        return (successes, failures), None
    successes, failures = 0, failures + 1
    if failures >= fbc:
        return (successes, failures), CRITICAL
    if failures >= (fbw or fbc):
        return (successes, failures), WARNING
    return (successes, failures), None


def http_status(code: int) -> str:
    if 200 <= code <= 299:
        return PASSING
    if code == 429:
        return WARNING
    return CRITICAL


def truncate_output(output: str, limit: int = OUTPUT_MAX) -> str:
    data = output.encode("utf-8", "replace")
    if len(data) <= limit:
        return output
    kept = data[:limit].decode("utf-8", "ignore")
    return f"{kept} ... (captured {limit} of {len(data)} bytes)"


def has_script(defs: list[dict[str, Any]]) -> bool:
    return any(d.get("kind") == "script" for d in defs)


def alias_status(checks: list[dict[str, Any]], service_exists: bool, service_id: str, node: str) -> tuple[str, str]:
    """Consul's CheckAlias.processChecks: the aliased service's checks and its node's
    checks, worst first (critical ends the walk, a warning is kept unless a critical
    follows). No check at all is passing; a service that does not exist is critical."""
    health, msg, found = PASSING, "No checks found.", False
    for chk in checks:
        match = chk.get("ServiceID") == service_id
        if chk.get("ServiceID") and not match:
            continue
        found = found or match
        if chk["Status"] in (CRITICAL, WARNING):
            health = chk["Status"]
            msg = f'Aliased check "{chk["Name"]}" failing: {chk.get("Output", "")}'
            if chk["Status"] == CRITICAL:
                break
        elif health == PASSING:
            msg = "All checks passing."
    if not found and not service_exists:
        return CRITICAL, f"Service {service_id} could not be found on node {node}"
    return health, msg
