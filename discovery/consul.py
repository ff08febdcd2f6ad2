"""Client side of the catalog: watches (blocking queries), KV, a leader lock, and the Mirror.

Everything here talks to a Consul-compatible HTTP API (the embedded catalog or a real Consul)
through py-consul's asyncio client and runs inside one event loop.

Vocabulary
----------
watch
    An async iterator over one blocking query: it yields a snapshot when (and only when) the
    answer changed, and keeps the last good one through outages (it never yields "nothing"
    because the catalog is unreachable). Index rules follow Consul's blocking-query
    guidance: an index that goes backwards resets to 0, an index < 1 is treated as 1.
Mirror
    The catalog as the data plane sees it: one watch on the service list, one health watch
    per service, one on the KV service documents and one on the node list, merged into an
    immutable :class:`discovery.view.View` that is replaced whole on every change.
LeaderLock
    A Consul session (TTL, behavior ``release``) holding a KV key: at most one holder.

Flow::

    catalog --blocking queries--> watch_* --snapshots--> Mirror --View--> on_change / changes()

CatalogAccess
    How to reach a catalog: its URL, the ACL token (never in a repr, a log line or an error
    text) and the TLS files. ``access_for_mesh`` builds it from ``mesh.catalog`` and the
    environment (meshlet's commands and ``meshlet up``), ``access_from_args`` from a
    component's command line (``config.add_catalog_arguments``) and the environment (DNS, proxy,
    ``meshlet supervisor``). ``catalog_problem`` turns a failure into one line saying what
    to fix.

Error handling: watches and the Mirror retry forever with exponential backoff and jitter
(50 ms doubling to 5 s) and log once per outage. ``Mirror.start`` raises :class:`MirrorError`
when no complete first View arrives in time. KV helpers and LeaderLock propagate
``consul.ConsulException`` and ``aiohttp.ClientError`` to the caller.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import dataclasses
import json
import logging
import os
import random
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import consul
import consul.aio
from consul.callback import CB
from consul.exceptions import ClientError

import config
from discovery.view import Instance, Node, ServiceView, View, worst_status

__all__ = [
    "DEFAULT_URL", "CatalogAccess", "CatalogAccessError", "access_for_mesh", "access_from_args",
    "catalog_problem", "TOKEN_ENV", "TOKEN_FILE_ENV", "Backoff", "LeaderLock", "Mirror", "MirrorError", "connect", "instances_from_health",
    "TxnRolledBack", "kv_cas", "kv_delete", "kv_get", "kv_op", "kv_put", "kv_txn", "next_index", "read_service_document", "watch_kv_prefix",
    "watch_nodes", "watch_service", "watch_services",
]

log = logging.getLogger(__name__)

DEFAULT_URL = "http://127.0.0.1:8500"


class MirrorError(Exception):
    """The Mirror could not load a first View (catalog unreachable or not answering in time)."""


# --------------------------------------------------------------------------- connection


def split_url(url: str) -> tuple[str, str, int]:
    """``http://host:port`` (or bare ``host:port``) -> (scheme, host, port). Raises ValueError."""
    parts = urlsplit(url if "//" in url else "//" + url)
    scheme = parts.scheme or "http"
    if scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"invalid catalog URL {url!r}: expected http://HOST:PORT")
    port = parts.port or (443 if scheme == "https" else 8500)  # .port raises ValueError when invalid
    return scheme, parts.hostname, port


# The variables Consul's own CLI reads; a child process gets its token through the first.
TOKEN_ENV, TOKEN_FILE_ENV = config.TOKEN_ENV, config.TOKEN_FILE_ENV
CA_ENV, CERT_ENV, KEY_ENV = config.CA_ENV, config.CERT_ENV, config.KEY_ENV


class CatalogAccessError(ValueError):
    """The catalog settings cannot be used (a token file missing, TLS files without https);
    the text names the setting and never holds the token."""


@dataclasses.dataclass(frozen=True)
class CatalogAccess:
    """Where the catalog is and how to talk to it. ``token_source`` says where the token
    came from ("$CONSUL_HTTP_TOKEN", "mesh.catalog.token_file (/path)", "no token"), for
    messages; the token itself never shows in a repr."""

    url: str = DEFAULT_URL
    token: str | None = dataclasses.field(default=None, repr=False)
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    token_source: str = "no token"

    def __post_init__(self) -> None:
        scheme = split_url(self.url)[0]       # ValueError on a bad URL
        tls = [f for f in ("ca_file", "cert_file", "key_file") if getattr(self, f)]
        if tls and scheme != "https":
            raise CatalogAccessError(f"{tls[0].replace('_', ' ')} {getattr(self, tls[0])} needs an https:// "
                                     f"catalog URL, not {self.url}")
        if bool(self.cert_file) != bool(self.key_file):
            raise CatalogAccessError("a client certificate needs both a cert file and a key file")

    def child_env(self, base: Mapping[str, str]) -> dict[str, str]:
        """``base`` with this token in CONSUL_HTTP_TOKEN (and no other token variable): how
        a child process started with ``--consul URL`` gets the token, never in its argv."""
        env = {k: v for k, v in base.items() if k not in (TOKEN_ENV, TOKEN_FILE_ENV)}
        if self.token:
            env[TOKEN_ENV] = self.token
        return env

    def child_args(self) -> list[str]:
        """``--consul URL`` and the TLS files for a child's command line (no token)."""
        args = ["--consul", self.url]
        for flag, value in (("--ca-file", self.ca_file), ("--cert-file", self.cert_file),
                            ("--key-file", self.key_file)):
            if value:
                args += [flag, value]
        return args


def read_token_file(path: str, what: str) -> str:
    """The token in ``path`` (surrounding white space dropped). CatalogAccessError naming
    ``what`` (the setting) when it is missing, unreadable or empty."""
    try:
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
    except OSError as exc:
        raise CatalogAccessError(f"{what}: cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise CatalogAccessError(f"{what}: {path} is not a text file") from None
    if not token:
        raise CatalogAccessError(f"{what}: {path} is empty")
    return token


def _env_token(env: Mapping[str, str]) -> tuple[str, str] | None:
    if env.get(TOKEN_ENV):
        return env[TOKEN_ENV], f"${TOKEN_ENV}"
    if env.get(TOKEN_FILE_ENV):
        path = env[TOKEN_FILE_ENV]
        return read_token_file(path, f"${TOKEN_FILE_ENV}"), f"${TOKEN_FILE_ENV} ({path})"
    return None


def access_for_mesh(url: str, mesh: config.MeshSettings, env: Mapping[str, str]) -> CatalogAccess:
    """How meshlet's commands reach the catalog at ``url`` (already chosen: --consul,
    $CONSUL_HTTP_ADDR or mesh.catalog). The token, first found of:

    1. mesh.catalog.token / token_file (given explicitly: as Nomad's consul block, the
       configuration wins over the environment);
    2. the embedded catalog's management token file, when ``url`` is the embedded catalog
       of ``mesh`` and the file exists (``meshlet up`` makes it): a token in the shell for
       some other Consul is not sent to it;
    3. $CONSUL_HTTP_TOKEN, else $CONSUL_HTTP_TOKEN_FILE.

    TLS files: mesh.catalog's, else $CONSUL_CACERT / $CONSUL_CLIENT_CERT / $CONSUL_CLIENT_KEY.
    Raises CatalogAccessError naming the setting that cannot be used."""
    cat = mesh.catalog
    found: tuple[str | None, str] | None = None
    if cat.token is not None:
        found = cat.token, "mesh.catalog.token"
    elif cat.token_file is not None:
        found = read_token_file(cat.token_file, "mesh.catalog.token_file"), \
            f"mesh.catalog.token_file ({cat.token_file})"
    embedded = cat.embedded and url.rstrip("/") == f"http://{mesh.catalog_listen}" \
        and mesh.catalog_token_file is not None
    if found is None and embedded and os.path.exists(mesh.catalog_token_file or ""):
        path = mesh.catalog_token_file
        found = read_token_file(path, "the embedded catalog's token file"), f"the embedded catalog's token file ({path})"
    if found is None:
        found = _env_token(env)
    if found is None and embedded:
        found = None, (f"no token (the embedded catalog's token file {mesh.catalog_token_file} does not exist "
                       "yet: `meshlet up` makes it)")
    token, source = found if found is not None else (None, "no token")
    try:
        return CatalogAccess(url, token, cat.ca_file or env.get(CA_ENV), cat.cert_file or env.get(CERT_ENV),
                             cat.key_file or env.get(KEY_ENV), source)
    except CatalogAccessError as exc:
        raise CatalogAccessError(f"mesh.catalog: {exc}") from None


def access_from_args(args: argparse.Namespace, env: Mapping[str, str]) -> CatalogAccess:
    """The CatalogAccess of ``config.add_catalog_arguments``' options and the environment (the
    options win). Raises CatalogAccessError."""
    if args.token_file:
        found: tuple[str, str] | None = (read_token_file(args.token_file, "--token-file"),
                                         f"--token-file ({args.token_file})")
    else:
        found = _env_token(env)
    token, source = found if found is not None else (None, "no token")
    try:
        return CatalogAccess(args.consul, token, args.ca_file or env.get(CA_ENV),
                             args.cert_file or env.get(CERT_ENV), args.key_file or env.get(KEY_ENV), source)
    except ValueError as exc:
        raise CatalogAccessError(str(exc)) from None


def _ssl_context(access: CatalogAccess) -> ssl.SSLContext:
    """The system's CAs plus ``ca_file``, and the client certificate; CatalogAccessError
    naming the file that cannot be used."""
    ctx = ssl.create_default_context()
    try:
        if access.ca_file:
            ctx.load_verify_locations(access.ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise CatalogAccessError(f"CA file {access.ca_file}: {getattr(exc, 'strerror', None) or exc}") from None
    try:
        if access.cert_file:
            ctx.load_cert_chain(access.cert_file, access.key_file)
    except (OSError, ssl.SSLError) as exc:
        raise CatalogAccessError(f"client certificate {access.cert_file} / key {access.key_file}: "
                                 f"{getattr(exc, 'strerror', None) or exc}") from None
    return ctx


def connect(target: str | CatalogAccess = DEFAULT_URL, token: str | None = None, *,
            timeout: float | None = None, connections_limit: int | None = None) -> consul.aio.Consul:
    """py-consul's aio client for ``target`` (a URL, or a CatalogAccess with its token and
    TLS files); must run inside a loop. ``timeout`` bounds each request (seconds; blocking
    queries need more than their ``wait``). ValueError (CatalogAccessError) when the URL or
    a TLS file cannot be used."""
    access = target if isinstance(target, CatalogAccess) else CatalogAccess(target, token)
    scheme, host, port = split_url(access.url)
    if ":" in host:  # IPv6 literal: py-consul formats "scheme://host:port" itself
        host = f"[{host}]"
    tls: dict[str, Any] = {}
    if scheme == "https":
        _ssl_context(access)                  # a file that cannot be used is named here, not at the first request
        tls = {"verify": access.ca_file or True,
               "cert": (access.cert_file, access.key_file) if access.cert_file else None}
    client = _Consul(host=host, port=port, scheme=scheme, token=access.token,
                     connections_timeout=timeout, connections_limit=connections_limit, **tls)
    # py-consul lets $CONSUL_HTTP_TOKEN override the token given: the caller already chose.
    client.token = client.http.token = access.token
    return client


class _TokenHTTPClient(consul.aio.HTTPClient):
    """py-consul's aio HTTP client sending the token on every request: py-consul leaves
    it out of some (``txn.put``, ``agent.self``, ``agent.members``), which a catalog with
    ACLs (a real Consul, the embedded one) then refuses."""

    token: str | None = None

    def _with_token(self, headers: dict[str, str] | None) -> dict[str, str] | None:
        if not self.token or (headers and any(k.lower() == "x-consul-token" for k in headers)):
            return headers
        return {**(headers or {}), "X-Consul-Token": self.token}

    def get(self, callback, path, params=None, headers=None, **kwargs):  # type: ignore[no-untyped-def]
        return super().get(callback, path, params, self._with_token(headers), **kwargs)

    def put(self, callback, path, params=None, data="", headers=None, **kwargs):  # type: ignore[no-untyped-def]
        return super().put(callback, path, params, data, self._with_token(headers), **kwargs)

    def delete(self, callback, path, params=None, data="", headers=None, **kwargs):  # type: ignore[no-untyped-def]
        return super().delete(callback, path, params, data, self._with_token(headers), **kwargs)

    def post(self, callback, path, params=None, data="", headers=None, **kwargs):  # type: ignore[no-untyped-def]
        return super().post(callback, path, params, data, self._with_token(headers), **kwargs)


class _Consul(consul.aio.Consul):
    def http_connect(self, host: str, port: int, scheme, verify: bool | str = True, cert=None):  # type: ignore[no-untyped-def]
        return _TokenHTTPClient(host, port, scheme, loop=self.loop, connections_limit=self.connections_limit,
                                connections_timeout=self.connections_timeout, verify=verify, cert=cert)


def catalog_problem(exc: BaseException, access: CatalogAccess) -> str:
    """One line saying why talking to the catalog failed and what to fix; never the token."""
    where = access.url
    if isinstance(exc, consul.ACLPermissionDenied):
        reason = str(exc).strip() or "403"
        hint = ("send the catalog's token: mesh.catalog.token_file, or $CONSUL_HTTP_TOKEN / --token-file "
                "(the embedded catalog keeps its management token in <data_dir>/catalog/"
                f"{config.CATALOG_TOKEN_FILE})")
        return f"the catalog at {where} refused the token ({access.token_source}): 403 {reason}; {hint}"
    cert_error = _certificate_error(exc)
    if cert_error is not None:
        ca = f"CA file {access.ca_file}" if access.ca_file else "the system's CAs (no CA file given)"
        return (f"cannot verify the TLS certificate of the catalog at {where} with {ca}: {cert_error}; "
                "set mesh.catalog.ca_file (or $CONSUL_CACERT / --ca-file) to the CA that signed it")
    if isinstance(exc, consul.ConsulException):
        return f"the catalog at {where} refused the request: {exc}"
    if isinstance(exc, asyncio.TimeoutError):
        return f"the catalog at {where} did not answer in time"
    return f"cannot reach the catalog at {where}: {exc or type(exc).__name__}"


def _certificate_error(exc: BaseException) -> str | None:
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, aiohttp.ClientConnectorCertificateError):
            inner = cur.certificate_error
            return getattr(inner, "verify_message", None) or str(inner)
        if isinstance(cur, ssl.SSLCertVerificationError):
            return getattr(cur, "verify_message", None) or str(cur)
        if isinstance(cur, ssl.SSLError):
            return cur.reason or str(cur)
        cur = cur.__cause__ or cur.__context__
    return None


def parse_seconds(value: str | float | int) -> float:
    """Go-style duration ("15s", "500ms", "2m", "1h") or a number of seconds -> seconds."""
    if isinstance(value, (int, float)):
        return float(value)
    text = value.strip()
    for suffix, factor in (("ms", 0.001), ("s", 1.0), ("m", 60.0), ("h", 3600.0)):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)


# --------------------------------------------------------------------------- pure helpers


def next_index(previous: int, returned: int) -> int:
    """The index for the next blocking query after one sent with ``previous`` returned
    ``returned``: reset to 0 when it went backwards (snapshot restore, a fresh catalog),
    and never below 1 otherwise (index 0 would make every query non-blocking)."""
    if returned < previous:
        return 0
    return max(returned, 1)


class Backoff:
    """Exponential backoff with full jitter: 50 ms doubling to 5 s."""

    def __init__(self, initial: float = 0.05, maximum: float = 5.0) -> None:
        self.initial, self.maximum, self._next = initial, maximum, initial

    def next(self) -> float:
        delay = self._next
        self._next = min(self._next * 2, self.maximum)
        return delay / 2 + random.uniform(0, delay / 2)

    def reset(self) -> None:
        self._next = self.initial


def _int(value: Any, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def instances_from_health(entries: list[dict[str, Any]] | None) -> tuple[Instance, ...]:
    """``/v1/health/service/<name>`` entries -> Instances (catalog order kept)."""
    out = []
    for entry in entries or ():
        svc, node = entry.get("Service") or {}, entry.get("Node") or {}
        meta = {str(k): str(v) for k, v in (svc.get("Meta") or {}).items()}
        ports = {k[5:]: p for k, v in meta.items() if k.startswith("port_") and (p := _int(v, -1)) >= 0}
        out.append(Instance(
            id=svc.get("ID") or svc.get("Service", ""),
            service=svc.get("Service", ""),
            node=node.get("Node", ""),
            address=svc.get("Address") or node.get("Address", ""),
            port=_int(svc.get("Port"), 0),
            status=worst_status(tuple(c.get("Status", "critical") for c in entry.get("Checks") or ())),
            tags=tuple(svc.get("Tags") or ()),
            meta=MappingProxyType(meta),
            weight=max(0, _int(meta.get("weight"), 1)),
            ports=MappingProxyType(ports),
        ))
    return tuple(out)


def read_service_document(name: str, raw: bytes | None) -> tuple[config.ServiceSpec, str | None, str]:
    """The KV document of service ``name`` -> (spec, vip, revision), parsed and validated
    once by ``config.parse_service_document``, so the data plane never sees a spec it
    cannot read. Raises ValueError saying what is wrong."""
    try:
        spec, vip, revision = config.parse_service_document(raw or b"", source=config.service_key(name))
    except config.ConfigError as exc:
        raise ValueError("; ".join(str(i) for i in exc.issues)) from None
    if spec.name != name:
        raise ValueError(f"name {spec.name!r} does not match the key")
    return spec, vip, revision


# --------------------------------------------------------------------------- watches


class _Outage:
    """Logs a catalog outage once when it starts and once when it ends (shared by watches),
    and keeps what the data plane reports about it: ``reachable``, ``since`` (wall-clock
    time the outage began), ``last_error``. ``on_change(reachable)`` runs on each turn."""

    def __init__(self, what: str, on_change: Callable[[bool], None] | None = None) -> None:
        self.what, self.failing, self.last_error, self.errors = what, set[object](), "", 0
        self.since: float | None = None
        self.on_change = on_change
        self.refused: BaseException | None = None   # the last 403: a token problem, not an outage
        self.on_refused: Callable[[], None] | None = None

    @property
    def reachable(self) -> bool:
        return not self.failing

    def failed(self, key: object, exc: BaseException) -> None:
        self.last_error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        self.errors += 1
        if isinstance(exc, consul.ACLPermissionDenied):
            self.refused = exc
            if self.on_refused is not None:
                self.on_refused()
        if not self.failing:
            log.warning("%s: catalog unreachable or failing (%s); keeping the last known state, retrying",
                        self.what, self.last_error)
            self.since = time.time()
            self.failing.add(key)
            self._changed(False)
        self.failing.add(key)

    def ok(self, key: object) -> None:
        """``key`` answered again (or its watch ended)."""
        if self.failing:
            self.failing.discard(key)
            if not self.failing:
                log.warning("%s: catalog reachable again", self.what)
                self.since = None
                self.refused = None
                self._changed(True)

    def _changed(self, reachable: bool) -> None:
        if self.on_change is not None:
            try:
                self.on_change(reachable)
            except Exception:  # noqa: BLE001 - a reporting bug must not stop the watches
                log.exception("catalog reachability callback failed")


async def _watch(fetch: Callable[[int], Awaitable[tuple[Any, Any]]], transform: Callable[[Any], Any],
                 outage: _Outage, key: object = None) -> AsyncIterator[Any]:
    """Generic blocking-query loop: yields ``transform(data)`` whenever it changes."""
    index, last, backoff, unset = 0, None, Backoff(), True
    while True:
        started = time.monotonic()
        try:
            raw_index, data = await fetch(index)
            returned = int(raw_index)
            value = transform(data)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure of the catalog: retry, keep last good
            outage.failed(key, exc)
            await asyncio.sleep(backoff.next())
            # Ask without blocking first: a catalog that came back with nothing new would
            # otherwise hold the query for its whole wait before we know it is back.
            index = 0
            continue
        outage.ok(key)
        backoff.reset()
        if unset or value != last:
            unset, last = False, value
            yield value
        elif index > 0 and returned == index and time.monotonic() - started < 0.01:
            # An unchanged answer that did not block: a misbehaving server. Do not spin.
            await asyncio.sleep(backoff.next())
        index = next_index(index, returned)


def watch_service(client: consul.aio.Consul, name: str, *, wait: str = "30s",
                  _outage: _Outage | None = None) -> AsyncIterator[tuple[Instance, ...]]:
    """Instances of ``name`` (all health states), yielded whenever they change."""
    return _watch(lambda i: client.health.service(name, index=i, wait=wait), instances_from_health,
                  _outage or _Outage(f"watch of service {name!r}"), ("health", name))


def watch_services(client: consul.aio.Consul, *, wait: str = "30s",
                   _outage: _Outage | None = None) -> AsyncIterator[dict[str, tuple[str, ...]]]:
    """The catalog's service list: {name: tags}."""
    return _watch(lambda i: client.catalog.services(index=i, wait=wait),
                  lambda d: {str(k): tuple(v or ()) for k, v in (d or {}).items()},
                  _outage or _Outage("watch of the service list"), "services")


def watch_kv_prefix(client: consul.aio.Consul, prefix: str, *, wait: str = "30s",
                    _outage: _Outage | None = None) -> AsyncIterator[dict[str, bytes]]:
    """All keys under ``prefix``: {key: value bytes} (empty values are b"")."""
    return _watch(lambda i: client.kv.get(prefix, index=i, recurse=True, wait=wait),
                  lambda d: {e["Key"]: e.get("Value") or b"" for e in d or ()},
                  _outage or _Outage(f"watch of KV {prefix!r}"), ("kv", prefix))


def watch_nodes(client: consul.aio.Consul, *, wait: str = "30s",
                _outage: _Outage | None = None) -> AsyncIterator[dict[str, Node]]:
    """The catalog's nodes: {name: Node}."""
    def nodes(data: Any) -> dict[str, Node]:
        return {n["Node"]: Node(n["Node"], n.get("Address", ""), MappingProxyType(dict(n.get("Meta") or {})))
                for n in data or ()}
    return _watch(lambda i: client.catalog.nodes(index=i, wait=wait), nodes,
                  _outage or _Outage("watch of the node list"), "nodes")


# --------------------------------------------------------------------------- KV


async def kv_get(client: consul.aio.Consul, key: str) -> tuple[int, bytes | None]:
    """(ModifyIndex, value) of ``key``; (0, None) when it does not exist."""
    _, entry = await client.kv.get(key)
    if entry is None:
        return 0, None
    return int(entry["ModifyIndex"]), entry.get("Value") or b""


async def kv_put(client: consul.aio.Consul, key: str, value: bytes | str) -> bool:
    return bool(await client.kv.put(key, value))


async def kv_cas(client: consul.aio.Consul, key: str, value: bytes | str, index: int) -> bool:
    """Write ``key`` only if its ModifyIndex is still ``index`` (0: only if it does not exist)."""
    return bool(await client.kv.put(key, value, cas=index))


async def kv_delete(client: consul.aio.Consul, key: str, *, recurse: bool = False) -> bool:
    return bool(await client.kv.delete(key, recurse=recurse or None))


class TxnRolledBack(Exception):
    """The catalog rolled a transaction back (a CAS failed, ...); the text says which op and why."""


def kv_op(verb: str, key: str, index: int = 0, value: bytes | str | None = None) -> dict[str, Any]:
    """One KV operation of a ``/v1/txn`` transaction (``set``, ``cas``, ``delete``, ``delete-cas``...)."""
    op: dict[str, Any] = {"Verb": verb, "Key": key, "Index": index}
    if value is not None:
        raw = value.encode() if isinstance(value, str) else value
        op["Value"] = base64.b64encode(raw).decode("ascii")
    return {"KV": op}


async def kv_txn(client: consul.aio.Consul, ops: list[dict[str, Any]]) -> None:
    """Apply ``ops`` all or none (``PUT /v1/txn``). Raises TxnRolledBack when the catalog
    rolled them back; transport errors as they come."""
    try:
        result = await client.txn.put(ops)
    except ClientError as exc:  # py-consul raises "409 <body>" on a rolled-back txn
        if str(exc).startswith("409"):
            raise TxnRolledBack(_txn_errors(str(exc)[4:])) from None
        raise
    if isinstance(result, dict) and result.get("Errors"):
        raise TxnRolledBack(_txn_errors(json.dumps(result)))


def _txn_errors(body: str) -> str:
    try:
        errors = json.loads(body).get("Errors") or []
        return "; ".join(str(e.get("What", e)) for e in errors) or body
    except (ValueError, AttributeError):
        return body.strip()


# --------------------------------------------------------------------------- leader lock


class _Rejected(Exception):
    """The catalog answered session creation with an error: retrying will not help."""



class LeaderLock:
    """At most one holder of ``key`` at a time, through a Consul session.

    ``acquire()`` returns once held (waiting with blocking queries while another session
    holds the key). While held, the session is renewed every TTL/2 and the key is watched;
    ``lost`` is set when a renewal fails for longer than the TTL, the session disappears
    (destroyed, expired) or the key is taken away. ``release()`` releases the key and
    destroys the session (no lock-delay for the next holder); it is idempotent.

    Errors: catalog trouble while acquiring is retried (backoff, logged); the catalog
    rejecting the session itself (e.g. a TTL outside its bounds, 10s..24h on Consul)
    raises ``consul.ConsulException`` from ``acquire()``.
    """

    def __init__(self, client: consul.aio.Consul, key: str, *, ttl: str = "15s",
                 name: str = "meshlet-leader", value: bytes = b"", lock_delay: str = "15s",
                 wait: str = "30s", renew_every: float | None = None, lose_after: float | None = None) -> None:
        self.client, self.key, self.name, self.value, self.wait = client, key, name, value, wait
        self.ttl = parse_seconds(ttl)  # the catalog enforces its bounds (Consul: 10s..24h)
        self.lock_delay = parse_seconds(lock_delay)
        # Fencing: a holder cut off from the catalog must stop acting before another can
        # take the key. Consul may invalidate an unrenewed session any time after its TTL
        # (and a new holder then waits lock_delay), so giving up after ``lose_after`` < TTL
        # without a successful renewal keeps two holders from ever acting at once.
        self.renew_every = renew_every if renew_every is not None else self.ttl / 2
        self.lose_after = lose_after if lose_after is not None else self.ttl
        self.renewed_at = 0.0     # time.monotonic() when the last renewal (or creation) was sent
        self.lost = asyncio.Event()
        self.session: str | None = None
        self._held = False
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def held(self) -> bool:
        return self._held and not self.lost.is_set()

    async def acquire(self) -> None:
        """Return once held. Cancelling it leaves the session alive: call ``release()``."""
        if self.held:
            return
        backoff = Backoff()
        while True:
            try:
                if self.session is None:
                    sent = time.monotonic()
                    self.session = await self._create_session()
                    self.renewed_at = sent
                    self._tasks.append(asyncio.create_task(self._renew(self.session)))
                if await self.client.kv.put(self.key, self.value, acquire=self.session):
                    self._held = True
                    self.lost.clear()
                    self._tasks.append(asyncio.create_task(self._monitor(self.session)))
                    return
                index, entry = await self.client.kv.get(self.key)
                if entry is None or not entry.get("Session"):
                    # Free but refused: the lock-delay after the last holder's session was
                    # invalidated. Nothing to block on; back off and try again.
                    await asyncio.sleep(backoff.next())
                    continue
                while entry is not None and entry.get("Session") and self.session is not None:
                    returned, entry = await self.client.kv.get(self.key, index=index, wait=self.wait)
                    index = next_index(int(index), int(returned))
                backoff.reset()
            except asyncio.CancelledError:
                raise
            except _Rejected as exc:
                raise exc.__cause__ from None  # type: ignore[misc]
            except Exception as exc:  # noqa: BLE001 - catalog trouble or our session vanished
                log.warning("leader lock %s: %s; retrying", self.key, exc)
                await self._drop_session()
                await asyncio.sleep(backoff.next())

    async def _create_session(self) -> str:
        # py-consul's session.create only takes whole seconds >= 10; send the body ourselves
        # so a catalog with a lower minimum (tests) can use a shorter TTL.
        body = json.dumps({"Name": self.name, "TTL": f"{self.ttl:g}s", "Behavior": "release",
                           "LockDelay": f"{self.lock_delay:g}s"})
        try:
            return await self.client.http.put(CB.json(is_id=True), "/v1/session/create",
                                              headers=self.client.prepare_headers(), data=body)
        except consul.ConsulException as exc:
            if isinstance(exc, consul.Timeout):
                raise
            raise _Rejected(exc) from exc

    def fresh(self) -> bool:
        """Held, and renewed recently enough to act on (see ``lose_after``)."""
        return self.held and time.monotonic() - self.renewed_at < self.lose_after

    async def _renew(self, session: str) -> None:
        delay = self.renew_every
        while True:
            await asyncio.sleep(delay)
            sent = time.monotonic()
            try:
                await asyncio.wait_for(self.client.session.renew(session),
                                       max(0.5, self.lose_after - (sent - self.renewed_at)))
            except consul.NotFound:
                self._lose(session, "the session no longer exists")
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - retry until lose_after is spent
                if time.monotonic() - self.renewed_at > self.lose_after:
                    self._lose(session, f"cannot renew the session: {exc or type(exc).__name__}")
                    return
                delay = min(1.0, self.renew_every)
                continue
            self.renewed_at, delay = sent, self.renew_every

    async def _monitor(self, session: str) -> None:
        index = 0
        while True:
            try:
                returned, entry = await self.client.kv.get(self.key, index=index, wait=self.wait)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - renewal decides about outages
                await asyncio.sleep(1.0)
                continue
            if entry is None or entry.get("Session") != session:
                self._lose(session, "the key was taken away")
                return
            index = next_index(index, int(returned))

    def _lose(self, session: str, why: str) -> None:
        if self.session != session:
            return
        if self._held:
            log.warning("leader lock %s lost: %s", self.key, why)
            self.lost.set()
        self._held, self.session = False, None

    async def _drop_session(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._held, self.session = False, None

    async def release(self) -> None:
        session, held = self.session, self._held
        await self._drop_session()
        if session is None:
            return
        try:
            if held:
                await self.client.kv.put(self.key, self.value, release=session)
            await self.client.session.destroy(session)
        except Exception as exc:  # noqa: BLE001 - the TTL ends the session anyway
            log.warning("leader lock %s: release failed (%s); the session expires within %ds",
                        self.key, exc, 2 * self.ttl)

    close = release

    async def __aenter__(self) -> LeaderLock:
        await self.acquire()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.release()


# --------------------------------------------------------------------------- mirror


class Mirror:
    """The catalog as an immutable View, kept current with blocking queries.

    ``start()`` returns the first complete View (service list, every listed service's
    instances, the KV service documents and the node list). After that every change builds a
    new View (``index`` increasing), published as ``view``, passed to ``on_change`` (called
    synchronously in the loop; exceptions are logged) and to every ``changes()`` iterator.
    Changes arriving in one loop turn are coalesced into one View. While the catalog is
    unreachable the last good View stays; an invalid KV document is logged and the service
    keeps its last good one. A service with a document but no instances is still listed.
    """

    def __init__(self, url: str | CatalogAccess, *, token: str | None = None, wait: str = "30s",
                 kv_prefix: str = config.SERVICES_PREFIX, on_change: Callable[[View], None] | None = None,
                 on_reachability: Callable[[bool], None] | None = None) -> None:
        self.access = url if isinstance(url, CatalogAccess) else CatalogAccess(url, token)
        self.url, self.wait, self.kv_prefix, self.on_change = self.access.url, wait, kv_prefix, on_change
        self._view = View()
        self._client: consul.aio.Consul | None = None
        self._outage = _Outage(f"catalog mirror of {self.url}", on_reachability)
        self._tasks: dict[str, asyncio.Task[None]] = {}  # "services", "kv", "nodes", "health:<name>"
        self._listed: dict[str, tuple[str, ...]] = {}
        self._instances: dict[str, tuple[Instance, ...]] = {}
        self._docs: dict[str, tuple[config.ServiceSpec, str | None, str]] = {}
        self._bad_docs: dict[str, bytes] = {}  # last invalid value per service (logged once)
        self._raw: dict[str, bytes] = {}  # last accepted value per service (parsed once)
        self._nodes: Mapping[str, Node] = MappingProxyType({})
        self._built: dict[str, ServiceView] = {}
        self._dirty: set[str] = set()
        self._nodes_dirty = False
        self._pending: set[str] | None = {"services", "kv", "nodes"}  # None once complete
        self._complete = asyncio.Event()
        self._rebuild_scheduled = False
        self._wakeup = asyncio.Event()
        self._closed = False

    @property
    def view(self) -> View:
        return self._view

    def catalog_state(self) -> dict[str, Any]:
        """What the data plane reports about the catalog (its /ready, its metrics):
        ``reachable``; while not, ``unreachable_since`` (Unix time) and ``last_error``.
        The View keeps serving meanwhile: the last known state."""
        out: dict[str, Any] = {"url": self.url, "reachable": self._outage.reachable}
        if not self._outage.reachable:
            out["unreachable_since"] = self._outage.since
            out["last_error"] = self._outage.last_error
        return out

    @property
    def catalog_reachable(self) -> bool:
        return self._outage.reachable

    async def start(self, timeout: float = 10.0) -> View:
        """The first complete View. MirrorError when none arrives within ``timeout``, and
        at once when the catalog refuses the token (403: retrying will not help)."""
        if self._client is not None:
            raise RuntimeError("Mirror.start() called twice")
        wait_s = parse_seconds(self.wait)
        # Each request may block for wait + wait/16 (server jitter); bound it to notice dead
        # connections. One connection per watch: lift aiohttp's default limit of 100.
        try:
            self._client = connect(self.access, timeout=wait_s * 17 / 16 + 10, connections_limit=1 << 16)
        except ValueError as exc:
            raise MirrorError(f"catalog at {self.url}: {exc}") from None
        self._spawn("services", self._run_services())
        self._spawn("kv", self._run_kv())
        self._spawn("nodes", self._run_nodes())
        refused = asyncio.Event()
        self._outage.on_refused = refused.set
        waits = [asyncio.ensure_future(self._complete.wait()), asyncio.ensure_future(refused.wait())]
        try:
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
            self._outage.on_refused = None
        if self._complete.is_set():
            return self._view
        if self._outage.refused is not None:
            problem = catalog_problem(self._outage.refused, self.access)
        else:
            problem = (f"catalog at {self.url} did not answer within {timeout:g}s "
                       f"({self._outage.last_error or 'no answer'})")
        await self.close()
        raise MirrorError(problem)

    def changes(self) -> AsyncIterator[View]:
        """Every View newer than the current one at the time of this call (a slow consumer
        gets the latest View, skipping intermediate ones). Ends when the Mirror closes."""
        return self._changes(self._view.index)

    async def _changes(self, since: int) -> AsyncIterator[View]:
        while not self._closed:
            view = self._view
            if view.index > since:
                since = view.index
                yield view
                continue
            await self._wakeup.wait()

    async def close(self) -> None:
        self._closed = True
        self._wakeup.set()
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._client is not None:
            await self._client.close()

    # -- watch tasks

    def _spawn(self, key: str, coro: Awaitable[None]) -> None:
        self._tasks[key] = asyncio.create_task(coro, name=f"mirror {key}")  # type: ignore[arg-type]

    async def _run_services(self) -> None:
        assert self._client is not None
        async for listed in watch_services(self._client, wait=self.wait, _outage=self._outage):
            for name in listed.keys() - self._listed.keys():
                if self._pending is not None:
                    self._pending.add("health:" + name)
                self._spawn("health:" + name, self._run_health(name))
            for name in self._listed.keys() - listed.keys():
                task = self._tasks.pop("health:" + name, None)
                if task is not None:
                    task.cancel()
                    self._outage.ok(("health", name))  # a watch cancelled mid-outage is not failing
                if self._pending is not None:
                    self._pending.discard("health:" + name)
                if self._instances.pop(name, None) is not None:
                    self._dirty.add(name)
            self._listed = listed
            self._loaded("services")

    async def _run_health(self, name: str) -> None:
        assert self._client is not None
        async for instances in watch_service(self._client, name, wait=self.wait, _outage=self._outage):
            self._instances[name] = instances
            self._dirty.add(name)
            self._loaded("health:" + name)

    async def _run_kv(self) -> None:
        assert self._client is not None
        prefix = self.kv_prefix
        async for entries in watch_kv_prefix(self._client, prefix, wait=self.wait, _outage=self._outage):
            seen = set()
            for key, raw in entries.items():
                name = key[len(prefix):]
                if not name or "/" in name:
                    continue
                seen.add(name)
                if self._bad_docs.get(name) == raw or self._raw.get(name) == raw:
                    continue
                try:
                    doc = read_service_document(name, raw)
                except ValueError as exc:
                    self._bad_docs[name] = raw
                    log.warning("KV %s: invalid service document: %s; keeping the last good one", key, exc)
                    continue
                self._bad_docs.pop(name, None)
                self._raw[name] = raw
                if self._docs.get(name) != doc:
                    self._docs[name] = doc
                    self._dirty.add(name)
            for name in self._docs.keys() - seen:
                del self._docs[name]
                self._raw.pop(name, None)
                self._dirty.add(name)
            for name in self._bad_docs.keys() - seen:
                del self._bad_docs[name]
            self._loaded("kv")

    async def _run_nodes(self) -> None:
        assert self._client is not None
        async for nodes in watch_nodes(self._client, wait=self.wait, _outage=self._outage):
            self._nodes = MappingProxyType(nodes)
            self._nodes_dirty = True
            self._loaded("nodes")

    # -- building Views

    def _loaded(self, part: str) -> None:
        if self._pending is not None:
            self._pending.discard(part)
            if self._pending:
                return
            self._pending = None
        if not self._rebuild_scheduled:
            self._rebuild_scheduled = True
            asyncio.get_running_loop().call_soon(self._rebuild)

    def _rebuild(self) -> None:
        self._rebuild_scheduled = False
        if self._closed or (self._complete.is_set() and not (self._dirty or self._nodes_dirty)):
            return
        for name in self._dirty:
            instances = self._instances.get(name)
            doc = self._docs.get(name)
            if instances is None and doc is None:
                self._built.pop(name, None)
                continue
            spec, vip, revision = doc if doc is not None else (None, None, None)
            self._built[name] = ServiceView(name, instances or (), spec, vip, revision)
        self._dirty.clear()
        self._nodes_dirty = False
        view = View(MappingProxyType(dict(sorted(self._built.items()))), self._nodes, self._view.index + 1)
        self._view = view
        if not self._complete.is_set():
            self._complete.set()
        wakeup, self._wakeup = self._wakeup, asyncio.Event()
        wakeup.set()
        if self.on_change is not None:
            try:
                self.on_change(view)
            except Exception:  # noqa: BLE001 - a consumer bug must not stop the mirror
                log.exception("Mirror on_change callback failed")
