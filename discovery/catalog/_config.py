"""Consul-style agent configuration files: what ``--config-file``/``--config-dir`` and a
reload (SIGHUP or ``PUT /v1/agent/reload``) read.

JSON only, and the keys this catalog acts on (anything else is refused by name, so a
typo is not silently ignored)::

    {"service": {...}, "services": [...],     # ServiceDefinitions, as the HTTP API takes them
     "check": {...}, "checks": [...],         # CheckDefinitions
     "enable_script_checks": false, "enable_local_script_checks": false,
     "log_level": "info"}

Several files are read in order; services and checks add up, later scalars win.
Services and checks from files are "local" (Consul's ConfigSourceLocal): script checks
among them need either script flag, and a reload removes the ones the files no longer
name and replaces the checks of the ones they do. The script flags are read at start
only (a change needs a restart, as in Consul).

``parse_config`` is pure; ``read_config`` reads the files; ``apply_config`` is the op.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Iterable

from ._catalog import _remove_check, _remove_service, register_check, register_service
from ._connect import sidecar_id, split_sidecar
from ._decode import DecodeError, decode_struct
from ._errors import CatalogError
from ._model import State
from ._schemas import CHECK_TYPE, SERVICE_DEFINITION
from ._store import Tx

__all__ = ["AgentConfig", "ConfigError", "parse_config", "read_config", "apply_config", "LOG_LEVELS"]

KEYS = ("service", "services", "check", "checks", "enable_script_checks", "enable_local_script_checks", "log_level")
LOG_LEVELS = ("trace", "debug", "info", "warn", "error")


class ConfigError(CatalogError):
    """A configuration file cannot be used; nothing of it was applied."""


@dataclass(frozen=True)
class AgentConfig:
    services: tuple[dict[str, Any], ...] = ()
    checks: tuple[dict[str, Any], ...] = ()
    enable_script_checks: bool = False
    enable_local_script_checks: bool = False
    log_level: str | None = None


def _list(doc: dict[str, Any], one: str, many: str, where: str) -> list[Any]:
    items = [doc[one]] if one in doc else []
    more = doc.get(many, [])
    if not isinstance(more, list):
        raise ConfigError(f"{where}: {many!r} must be a list")
    return items + more


def parse_config(docs: Iterable[tuple[str, str]]) -> AgentConfig:
    """``docs``: (name, JSON text) in order. Raises ConfigError naming the file."""
    services: list[dict[str, Any]] = []
    checks: list[dict[str, Any]] = []
    flags = {"enable_script_checks": False, "enable_local_script_checks": False}
    log_level: str | None = None
    for name, text in docs:
        try:
            doc = json.loads(text)
        except ValueError as exc:
            raise ConfigError(f"{name}: not JSON: {exc}") from None
        if not isinstance(doc, dict):
            raise ConfigError(f"{name}: expected a JSON object")
        for key in doc:
            if key not in KEYS:
                raise ConfigError(f"{name}: unknown configuration key {key!r} (this catalog reads {', '.join(KEYS)})")
        try:
            services += [decode_struct(s, SERVICE_DEFINITION) for s in _list(doc, "service", "services", name)]
            checks += [decode_struct(c, CHECK_TYPE) for c in _list(doc, "check", "checks", name)]
        except DecodeError as exc:
            raise ConfigError(f"{name}: {exc}") from None
        for flag in flags:
            if flag in doc:
                if not isinstance(doc[flag], bool):
                    raise ConfigError(f"{name}: {flag} must be true or false")
                flags[flag] = doc[flag]
        if "log_level" in doc:
            level = str(doc["log_level"]).strip().lower()
            if level not in LOG_LEVELS:
                raise ConfigError(f"{name}: log_level must be one of {', '.join(LOG_LEVELS)}")
            log_level = level
    for s in services:
        if not s.get("Name"):
            raise ConfigError("a service in the configuration has no name")
    for c in checks:
        if not c.get("Name"):
            raise ConfigError("a check in the configuration has no name")
    return AgentConfig(tuple(services), tuple(checks), log_level=log_level, **flags)


def read_config(paths: Iterable[str]) -> list[tuple[str, str]]:
    """The files named, and the ``*.json`` files of the directories named (in name order)."""
    docs = []
    for path in paths:
        try:
            if os.path.isdir(path):
                for entry in sorted(os.listdir(path)):
                    if entry.endswith(".json"):
                        full = os.path.join(path, entry)
                        with open(full, encoding="utf-8") as f:
                            docs.append((full, f.read()))
            else:
                with open(path, encoding="utf-8") as f:
                    docs.append((path, f.read()))
        except OSError as exc:
            raise ConfigError(f"{path}: {exc.strerror or exc}") from None
    return docs


def apply_config(st: State, tx: Tx, node: str, cfg: AgentConfig, script_refusal: str | None) -> None:
    """Register the configured services and checks (their checks replaced) and remove the
    local ones the configuration no longer names. One op: all of it or none."""
    services: set[str] = set()
    for d in cfg.services:
        sid = d.get("ID") or d["Name"]
        services.add(sid)
        if split_sidecar(d)[1] is not None:
            services.add(sidecar_id(sid))
        register_service(st, tx, node, d, replace_checks=True, script_refusal=script_refusal, local=True)
    checks: set[str] = set()
    for c in cfg.checks:
        checks.add(c.get("ID") or c["Name"])
        register_check(st, tx, node, c, script_refusal=script_refusal, local=True)
    for sid in sorted(st.services_by_node.get(node, ())):
        row = st.services.rows[(node, sid)]
        if row.get("_local") and sid not in services:
            _remove_service(st, tx, node, sid)
    for cid in sorted(st.checks_by_node.get(node, ())):
        row = st.checks.rows[(node, cid)]
        if not row.get("_local") or cid in checks:
            continue
        if row.get("ServiceID") in services and st.services.rows[(node, row["ServiceID"])].get("_local"):
            continue  # a configured service's own check (register_service replaced those)
        _remove_check(st, tx, node, cid)
