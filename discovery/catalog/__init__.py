"""Embedded, single-node catalog speaking Consul's HTTP API over SQLite.

Run it with ``python -m discovery.catalog --listen 127.0.0.1:8500 --data-dir DIR`` or
``meshlet catalog ...`` (which calls :func:`main`). Clients use it as they would use a
Consul agent: py-consul (sync and aio), curl, consul-template-style watchers.

Layout (each module's docstring says more; README.md has the choices made):

    _cli        argument parsing, the ``ready`` line, signals
    _server     start/stop order of the pieces below
    _store      in-memory tables, the single writer with group commit, the global index
    _db         SQLite (WAL, synchronous=FULL) under --data-dir
    _model      the tables and their derived indexes
    _watch      blocking queries: targeted wake-ups, parked waiters, one answer per query
    _wire       the HTTP/1.1 server (httptools): connections, replies, streams
    _kv         KV semantics            _catalog   nodes/services/checks write ops
    _sessions   sessions, their TTLs    _checks    the HTTP/TCP/script/alias/TTL check runner
    _checkdef   check rules (pure)      _script    running one script check
    _connect    sidecar registrations (pure)   _config  config files and reload
    _monitor    /v1/agent/monitor log streaming        _txn  /v1/txn
    _decode     Consul-style JSON and duration decoding (pure); _schemas: the bodies
    _filter     ?filter= expressions (pure)   _render: rows -> Consul JSON
    _http, _h_* routing, Consul's error texts, endpoint handlers; _errors: the exceptions
"""

from __future__ import annotations

from ._cli import main

__all__ = ["main"]
