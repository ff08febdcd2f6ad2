"""The declarative model: frozen dataclasses for meshlet.yaml and the KV service document.

Every field names the converter that reads it (``opt(default, conv)``/``req(conv)``);
cross-field rules live in ``_checks``. Defaults are those of config/README.md; where the
README is silent, the source of a default is named beside it. All instances are
immutable and hashable; lists are tuples and mappings are ``FrozenDict``.
"""

from __future__ import annotations

import dataclasses
import os
import signal
from dataclasses import dataclass
from typing import Any

from ._convert import (DNS_LABEL, DNS_LABEL_HINT, INVALID, boolean, choice, cpu, describe_node, duration, file_mode,
                       integer, listof, mapof, named_map, opt, percent_or_count, read_plain, req, set_by_apply,
                       size, struct, text, word, words)
from . import _forms as forms
from ._frozen import FrozenDict

__all__ = [
    "DnsSettings", "ProxySettings", "ProxyListener", "ListenerTls", "TlsCertificate", "UpstreamTls",
    "resolve_workers", "NodeCapacity", "NodeSpec", "MeshSettings", "ResourceAmounts",
    "Resources", "PortSpec", "HttpProbe", "TcpProbe", "ExecProbe", "Probe", "Probes",
    "Backoff", "RestartPolicy", "CanaryStep", "UpdateStrategy", "PathRoute", "HashOn",
    "Retries", "Timeouts", "Outlier", "Routes", "DnsOverride", "Placement", "VolumeMount", "EngineTls",
    "ConfigMount", "SecretMount", "ServiceSpec", "VolumeSpec", "ConfigSpec", "SecretSpec", "SecretsSettings",
    "CatalogSettings", "MeshConfig", "to_plain", "MESH_DEFAULTS", "DEFAULT_CATALOG_URL", "CATALOG_TOKEN_FILE",
    "RUNTIME_NAMES", "volume_env_name",
]

_EMPTY: FrozenDict[str, str] = FrozenDict()
model = dataclass(frozen=True, slots=True, kw_only=True)

# --- field vocabularies -----------------------------------------------------------------
_HOSTPORT_TEXT = text(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):\d{1,5}", "host:port like 127.0.0.1:8600")


def HOSTPORT(n: Any, cx: Any, path: str) -> Any:
    """``host:port`` or ``[v6]:port``; port 0 means "any free port" (tests bind that)."""
    value = _HOSTPORT_TEXT(n, cx, path)
    if isinstance(value, str) and int(value.rsplit(":", 1)[1]) > 65535:
        return cx.error(n.line, path, f"port must be at most 65535, got {describe_node(n)}")
    return value


def SIGNAL(n: Any, cx: Any, path: str) -> Any:
    """A signal name, ``SIGTERM`` or ``TERM``, normalised to ``SIGTERM``."""
    value = text(None, "a signal name like SIGTERM")(n, cx, path)
    if not isinstance(value, str):
        return value
    name = value.upper() if value.upper().startswith("SIG") else "SIG" + value.upper()
    if name not in signal.Signals.__members__:
        return cx.error(n.line, path, f"expected a signal name like SIGTERM, got {describe_node(n)}")
    return name
PORT_NAME = text(r"[a-z][a-z0-9-]{0,62}", 'a port name ([a-z][a-z0-9-]*)')
ENV_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
LABEL_KEY = r"[A-Za-z0-9]([A-Za-z0-9_./-]*[A-Za-z0-9])?"
OBJECT_NAME = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}"
OBJECT_HINT = 'a name of letters, digits, "_", "." and "-"'
OBJECT_REF = text(OBJECT_NAME, OBJECT_HINT)
ABS_PATH = text(r"/\S*", "an absolute path like /data")
LOCAL_PATH = text(None, "a path")
HOSTNAME = text(r"(\*\.)?[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*",
                "a lowercase host name like www.example.test")


_PORT_NUMBER = integer(1, 65535)


def PORT_REF(n: Any, cx: Any, path: str) -> Any:
    """A probe's port: a declared port's name, or a port number."""
    if isinstance(n.value, int) and not isinstance(n.value, bool):
        return _PORT_NUMBER(n, cx, path)
    if isinstance(n.value, str):
        return PORT_NAME(n, cx, path)
    return cx.error(n.line, path, f"expected a port name or number, got {describe_node(n)}")


# --- mesh ---------------------------------------------------------------------------------

# How a node runs replicas (supervisor.runtime.RUNTIMES implements exactly these).
RUNTIME_NAMES = ("docker", "process")


@model
class DnsSettings:
    listen: tuple[str, ...] = opt(("127.0.0.1:8600",), listof(HOSTPORT, unique=True))
    mode: str = opt("vip", choice("vip", "endpoints"))
    # Record TTL 0: a readiness change must reach clients at once (the catalog change shows
    # in answers within 100 ms; any positive TTL lets resolvers keep sending traffic to an
    # instance that just failed).
    ttl: float = opt(0.0, duration())
    # Negative TTL 5 s (SOA minimum and the SOA record's TTL). Consul's 0 makes resolvers
    # that treat 0 as "unknown" fall back to their own default (Windows: 15 min), which
    # turns a short outage into a long one. 5 s is honoured everywhere, bounds how long a
    # service that comes back still looks missing, and damps NXDOMAIN storms.
    negative_ttl: float = opt(5.0, duration())
    only_passing: bool = opt(True, boolean)
    recursors: tuple[str, ...] = opt((), listof(HOSTPORT, unique=True))


@model
class TlsCertificate:
    """A certificate for the clients that ask (SNI) for one of ``hosts`` (written like
    ``routes.hosts``: exact names, or ``*.example.test`` for any name under it)."""

    hosts: tuple[str, ...] = req(listof(HOSTNAME, unique=True))
    cert_file: str = req(LOCAL_PATH)      # PEM: the certificate, then its chain; relative: to the config file
    key_file: str = req(LOCAL_PATH)       # PEM: its private key, not encrypted


@model
class ListenerTls:
    """TLS termination on a proxy listener (TLS 1.2 and 1.3 only). ``cert_file`` and
    ``key_file`` are the default certificate: for a client that asks for no name, or for a
    name that no entry of ``certificates`` lists. Files are re-read when they change."""

    cert_file: str = req(LOCAL_PATH)
    key_file: str = req(LOCAL_PATH)
    certificates: tuple[TlsCertificate, ...] = opt((), listof(struct(TlsCertificate)))


@model
class ProxyListener:
    """An entry listener of the proxy: ``"HOST:PORT"``, or ``{address: HOST:PORT, tls: {...}}``."""

    address: str = req(HOSTPORT)
    tls: ListenerTls | None = opt(None, struct(ListenerTls))


_LISTENER = struct(ProxyListener)


def LISTENER(n: Any, cx: Any, path: str) -> Any:
    """A proxy listener: its address alone (plain HTTP), or the mapping."""
    if isinstance(n.value, str):
        address = HOSTPORT(n, cx, path)
        return address if address is INVALID else ProxyListener(address=address)
    return _LISTENER(n, cx, path)


@model
class UpstreamTls:
    """TLS from the proxy to a service's instances, verified against ``ca_file`` (PEM, one
    or more CA certificates). The instance's certificate must name ``server_name``
    (default: ``<service>.service.<domain>``), which is also sent as SNI."""

    service: str = req(text(DNS_LABEL, DNS_LABEL_HINT))
    ca_file: str = req(LOCAL_PATH)
    server_name: str | None = opt(None, HOSTNAME)


def WORKERS(n: Any, cx: Any, path: str) -> Any:
    """``auto`` (one per CPU this process may run on) or a count, 1 to 64."""
    if n.value == "auto":
        return "auto"
    if isinstance(n.value, str):
        return cx.error(n.line, path, f"expected auto or an integer from 1 to 64, got {describe_node(n)}")
    return _WORKER_COUNT(n, cx, path)


_WORKER_COUNT = integer(1, 64)


@model
class ProxySettings:
    listen: tuple[ProxyListener, ...] = opt((ProxyListener(address="127.0.0.1:8080"),), listof(LISTENER))
    admin_listen: str = opt("127.0.0.1:9901", HOSTPORT)
    # auto: one per core (resolve_workers); `meshlet proxy` run alone defaults to 1
    workers: int | str = opt("auto", WORKERS)
    upstream_tls: tuple[UpstreamTls, ...] = opt((), listof(struct(UpstreamTls)))


def resolve_workers(value: int | str) -> int:
    """The number of proxy worker processes for ``mesh.proxy.workers`` / ``--workers``:
    ``auto`` is one per CPU this process may run on (its affinity mask, so a container's
    or ``taskset``'s limit counts; os.cpu_count() where there is none), at most 64."""
    if value != "auto":
        return int(value)
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, 64))


@model
class NodeCapacity:
    """What a node offers for placement; None: what its engine reports (Docker's NCPU and
    MemTotal; the host's CPUs and memory for the process runtime). ``meshlet plan``, which
    asks no engine, counts an undeclared resource as unbounded."""

    cpu: float | None = opt(None, cpu(positive=True))
    memory: int | None = opt(None, size(positive=True))


@model
class ResourceAmounts:
    """An amount of cpu and memory: a replica's requests or limits, a node's reserved
    share; None: none given."""

    cpu: float | None = opt(None, cpu(positive=True))
    memory: int | None = opt(None, size(positive=True))


@model
class EngineTls:
    """A ``tcp://`` engine's TLS (Docker's ``--tlsverify``): the CA that signed the
    engine's certificate, and the client certificate and key it accepts."""

    ca_file: str = req(LOCAL_PATH)         # relative: to the config file's directory
    cert_file: str = req(LOCAL_PATH)
    key_file: str = req(LOCAL_PATH)


@model
class NodeSpec:
    name: str = req(text(DNS_LABEL, DNS_LABEL_HINT))
    # None in YAML: docker when `engine` is given, else process (resolved by the loader)
    runtime: str | None = opt(None, choice(*RUNTIME_NAMES))
    address: str = opt("127.0.0.1", text(None, "an address"))
    # docker only; default unix:///var/run/docker.sock (Docker's own default)
    engine: str | None = opt(None, text(r"(unix|tcp|ssh|npipe)://\S+",
                                        "a Docker engine URL like unix:///var/run/docker.sock"))
    tls: EngineTls | None = opt(None, struct(EngineTls))    # tcp:// engines only
    capacity: NodeCapacity = opt(NodeCapacity(), struct(NodeCapacity))
    # kept back for the host itself (its OS, meshlet, Docker) and never offered to replicas:
    # Nomad's client `reserved`, Kubernetes' system-reserved; taken off the declared
    # capacity, or off what the engine reports
    reserved: ResourceAmounts = opt(ResourceAmounts(), struct(ResourceAmounts))
    labels: FrozenDict[str, str] = opt(_EMPTY, mapof(LABEL_KEY, "a label name", word))


@model
class SecretsSettings:
    """Where the key-encryption key (KEK) of the mesh's secrets comes from. Neither set:
    ``<data_dir>/secrets.key``, created (0600) by the first apply that stores a secret.
    With a real Consul cluster every supervisor and ``meshlet apply`` need the same key:
    name a file, or an environment variable holding it (base64 of 32 bytes)."""

    key_file: str | None = opt(None, LOCAL_PATH)       # relative: to the config file's directory
    key_env: str | None = opt(None, text(r"[A-Za-z_][A-Za-z0-9_]*", "an environment variable name"))


def SECRET_TEXT(n: Any, cx: Any, path: str) -> Any:
    """A secret string (a token): an error never repeats the value, whatever it is."""
    if not isinstance(n.value, str) or n.kind != "scalar" or not n.value.strip():
        return cx.error(n.line, path, "expected the token as a non-empty string (the value is not shown)")
    return n.value.strip()


@model
class CatalogSettings:
    """How every meshlet component reaches the catalog (Nomad's ``consul`` block). ``url``
    is ``embedded`` (the catalog ``meshlet up`` runs on ``catalog_listen``) or a Consul URL.
    The ACL token: ``token``, or ``token_file`` (a file holding it; with ``embedded``, where
    the embedded catalog keeps its management token, default
    ``<data_dir>/catalog/management-token``). ``ca_file`` (the CA that signed the catalog's
    certificate), ``cert_file`` and ``key_file`` (a client certificate) need an https URL.
    Short form: ``catalog: embedded`` or ``catalog: https://...`` (``_forms.catalog``).
    The token never shows in a repr, an error message or ``to_plain``."""

    url: str = opt("embedded", text(r"embedded|https?://\S+", "embedded or a Consul URL like http://127.0.0.1:8500"))
    token: str | None = dataclasses.field(default=None, repr=False, metadata={"conv": SECRET_TEXT, "secret": True})
    token_file: str | None = opt(None, LOCAL_PATH)     # relative: to the config file's directory
    ca_file: str | None = opt(None, LOCAL_PATH)
    cert_file: str | None = opt(None, LOCAL_PATH)
    key_file: str | None = opt(None, LOCAL_PATH)

    @property
    def embedded(self) -> bool:
        return self.url == "embedded"


@model
class MeshSettings:
    domain: str = opt("meshlet", text(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*",
                                      "a lowercase DNS domain like meshlet"))
    catalog: CatalogSettings = opt(CatalogSettings(), forms.catalog(CatalogSettings))
    catalog_listen: str = opt("127.0.0.1:8500", HOSTPORT)
    data_dir: str = opt(".meshlet", LOCAL_PATH)        # relative: to the config file's directory
    vip_range: str = opt("127.10.0.0/16", text(None, "a network like 127.10.0.0/16"))
    admin_listen: str = opt("127.0.0.1:9900", HOSTPORT)
    dns: DnsSettings = opt(DnsSettings(), struct(DnsSettings))
    proxy: ProxySettings = opt(ProxySettings(), struct(ProxySettings))
    nodes: tuple[NodeSpec, ...] = opt((), listof(struct(NodeSpec)))  # (): one node "local"
    secrets: SecretsSettings = opt(SecretsSettings(), struct(SecretsSettings))
    # how long a node's engine may not answer before its replicas are placed elsewhere
    node_grace: float = opt(30.0, duration(positive=True))

    @property
    def catalog_data_dir(self) -> str:
        """Where ``meshlet up`` keeps the embedded catalog's state."""
        return os.path.join(self.data_dir, "catalog")

    @property
    def catalog_token_file(self) -> str | None:
        """The file holding the catalog's token: ``catalog.token_file``, else for the
        embedded catalog its management token file; None: a literal token or none."""
        if self.catalog.token_file is not None:
            return self.catalog.token_file
        if self.catalog.embedded:
            return os.path.join(self.catalog_data_dir, CATALOG_TOKEN_FILE)
        return None


# The file in the embedded catalog's data dir holding its management token (0600), made
# at its first start: what meshlet's own components and commands send (discovery.catalog).
CATALOG_TOKEN_FILE = "management-token"

# The mesh defaults as one value: the command-line defaults of components run alone
# (``meshlet dns``, ``meshlet proxy``) are these, not copies.
MESH_DEFAULTS = MeshSettings()
DEFAULT_CATALOG_URL = "http://" + MESH_DEFAULTS.catalog_listen


# --- service parts ----------------------------------------------------------------------

@model
class Resources:
    """Kubernetes' two amounts: ``requests`` is what placement reserves on a node (a
    replica goes only where its requests fit), ``limits`` what the runtime enforces. Per
    resource, an unset limit is the request and an unset request the limit (the loader
    fills them in; Kubernetes does the same); neither: no limit, reserves 0 (a Kubernetes
    BestEffort pod). The short form ``{cpu, memory}`` sets both (``_forms.resources``)."""

    requests: ResourceAmounts = opt(ResourceAmounts(), struct(ResourceAmounts))
    limits: ResourceAmounts = opt(ResourceAmounts(), struct(ResourceAmounts))


@model
class PortSpec:
    name: str = opt(None, PORT_NAME)                   # None in YAML: the protocol ("http"/"tcp")
    port: int = opt(0, integer(0, 65535))              # 0: assigned from a range at start
    vip_port: int = opt(None, integer(1, 65535))       # None in YAML: port if fixed, else 80 (http)
    protocol: str = opt("http", choice("http", "tcp"))


@model
class HttpProbe:
    path: str = opt("/", text(r"/\S*", "a path starting with /"))
    port: str | int = opt(None, PORT_REF)              # None in YAML: the service's first port
    headers: FrozenDict[str, str] = opt(_EMPTY, mapof(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", "a header name", word))


@model
class TcpProbe:
    port: str | int = opt(None, PORT_REF)              # None in YAML: the service's first port


@model
class ExecProbe:
    command: tuple[str, ...] = req(words)


@model
class Probe:
    """Exactly one of http/tcp/exec; timings are Kubernetes' defaults."""

    http: HttpProbe | None = opt(None, struct(HttpProbe))
    tcp: TcpProbe | None = opt(None, struct(TcpProbe))
    exec: ExecProbe | None = opt(None, struct(ExecProbe))
    initial_delay: float = opt(0.0, duration())
    period: float = opt(10.0, duration(positive=True))
    timeout: float = opt(1.0, duration(positive=True))
    success_threshold: int = opt(1, integer(1))
    failure_threshold: int = opt(3, integer(1))


@model
class Probes:
    liveness: Probe | None = opt(None, struct(Probe))
    readiness: Probe | None = opt(None, struct(Probe))
    startup: Probe | None = opt(None, struct(Probe))


@model
class Backoff:
    initial: float = opt(1.0, duration(positive=True))
    max: float = opt(300.0, duration(positive=True))
    reset_after: float = opt(600.0, duration())        # a clean run this long resets the delay


@model
class RestartPolicy:
    policy: str = opt("always", choice("always", "on-failure", "never"))
    backoff: Backoff = opt(Backoff(), struct(Backoff))


@model
class CanaryStep:
    weight: int = req(integer(1, 100))                 # percent of traffic to the new revision
    pause: float = opt(0.0, duration())                # after the step's instances are ready


@model
class UpdateStrategy:
    strategy: str = opt("rolling", choice("rolling", "recreate"))
    max_surge: int | str = opt("25%", percent_or_count)
    max_unavailable: int | str = opt("25%", percent_or_count)
    min_ready: float = opt(0.0, duration())
    progress_deadline: float = opt(600.0, duration(positive=True))
    auto_revert: bool = opt(True, boolean)
    drain_delay: float = opt(1.0, duration())
    history: int = opt(10, integer(0))
    canary: tuple[CanaryStep, ...] = opt((), listof(struct(CanaryStep)))


@model
class PathRoute:
    prefix: str = opt("/", text(r"/\S*", "a path prefix starting with /"))
    strip_prefix: bool = opt(False, boolean)


@model
class HashOn:
    """Exactly one: a request header, a cookie, or the client address (``source_ip: true``)."""

    header: str | None = opt(None, text(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", "a header name"))
    cookie: str | None = opt(None, text(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", "a cookie name"))
    source_ip: bool = opt(False, boolean)


@model
class Retries:
    attempts: int = opt(2, integer(0))
    per_try_timeout: float = opt(0.0, duration())      # 0: no cut-off; a safe request is hedged after 2s
    budget_percent: int = opt(20, integer(0, 100))     # Envoy retry budget
    min_concurrent: int = opt(3, integer(0))


@model
class Timeouts:
    connect: float = opt(1.0, duration(positive=True))
    request: float = opt(15.0, duration())             # 0: none; Envoy's route default 15s
    idle: float = opt(60.0, duration())


@model
class Outlier:
    """Passive ejection, Envoy's outlier detection defaults."""

    consecutive_5xx: int = opt(5, integer(0))
    consecutive_gateway_failure: int = opt(5, integer(0))
    base_ejection_time: float = opt(30.0, duration())
    max_ejection_percent: int = opt(10, integer(0, 100))
    interval: float = opt(10.0, duration(positive=True))
    max_ejection_time: float = opt(300.0, duration())  # Envoy default; caps base * count


@model
class Routes:
    hosts: tuple[str, ...] = opt((), listof(HOSTNAME, unique=True))
    paths: tuple[PathRoute, ...] = opt((PathRoute(),), listof(struct(PathRoute)))
    policy: str = opt("least_request", choice("least_request", "round_robin", "random",
                                              "ring_hash", "peak_ewma"))
    hash_on: HashOn | None = opt(None, struct(HashOn))
    retries: Retries = opt(Retries(), struct(Retries))
    timeouts: Timeouts = opt(Timeouts(), struct(Timeouts))
    outlier: Outlier = opt(Outlier(), struct(Outlier))
    max_pending: int = opt(1024, integer(0))


@model
class DnsOverride:
    mode: str | None = opt(None, choice("vip", "endpoints"))
    ttl: float | None = opt(None, duration())


@model
class Placement:
    """How the scheduler chooses among the nodes that can hold a replica (see
    supervisor/core/placement.py). ``spread: true/false``, the older form of ``strategy``,
    is read by ``_forms.placement``."""

    # spread: fewest replicas of the service, then least allocated (Kubernetes' default);
    # binpack: most allocated first (Nomad's default), leaving whole nodes free
    strategy: str = opt("spread", choice("spread", "binpack"))
    # node labels to spread the replicas over, softly, in order: fewest replicas of the
    # service among the nodes with the same value first (Swarm's placement preferences)
    spread_over: tuple[str, ...] = opt((), listof(text(LABEL_KEY, "a label name"), unique=True))
    # "node.name == a", "node.runtime != docker", "node.labels.disk == ssd"
    constraints: tuple[str, ...] = opt((), listof(text(
        r"(node\.(name|runtime|address)|node\.labels\.[A-Za-z0-9_./-]+)\s*(==|!=)\s*\S+",
        'a constraint like "node.labels.disk == ssd"'), unique=True))


def volume_env_name(volume: str) -> str:
    """Where a replica finds a volume: ``$MESHLET_VOLUME_<NAME>``, the volume's name
    upper-cased with ``-`` and ``.`` as ``_`` (``shop-data`` -> ``MESHLET_VOLUME_SHOP_DATA``)."""
    return "MESHLET_VOLUME_" + volume.upper().replace("-", "_").replace(".", "_")


# A volume driver: "local" or a plugin reference like "rexray/ebs:latest".
VOLUME_DRIVER = text(r"[A-Za-z0-9][A-Za-z0-9_.:/-]{0,127}", 'a volume driver like local or vieux/sshfs:latest')
# Docker's volume-name alphabet (an engine volume's name; also a process node's directory).
ENGINE_VOLUME = text(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}", 'an engine volume name of letters, digits, "_", "." and "-"')


@model
class VolumeSpec:
    """A top-level volume (config/README.md, "Volumes"). Kinds: ``host`` a directory of
    the node; ``named`` an engine volume (``driver``/``driver_opts`` passed to the engine
    unchanged; ``per_replica``: one per slot of each service, ``<service>-<name>-<slot>``);
    ``tmpfs`` memory-backed scratch of ``size`` that lives as long as its replica."""

    name: str = req(OBJECT_REF)
    type: str = opt("named", choice("host", "tmpfs", "named"))   # Compose's default kind
    # host: a directory of the node; named: the engine volume's name (None: the volume's name)
    source: str | None = opt(None, LOCAL_PATH)
    size: int | None = opt(None, size(positive=True))  # tmpfs only
    driver: str | None = opt(None, VOLUME_DRIVER)      # named only; None in YAML: local
    driver_opts: FrozenDict[str, str] = opt(_EMPTY, mapof(r"[A-Za-z0-9_.-]+", "a driver option name", word))
    per_replica: bool = opt(False, boolean)            # named only
    create: bool = opt(False, boolean)                 # host only: make the directory if missing


@model
class VolumeMount:
    name: str = req(OBJECT_REF)
    target: str = req(ABS_PATH)
    read_only: bool = opt(False, boolean)
    # the volume's definition this revision runs with (``meshlet apply`` copies it from the
    # top-level ``volumes:``, so a changed definition rolls the services that mount it)
    volume: VolumeSpec | None = opt(None, set_by_apply(struct(VolumeSpec)))


@model
class ConfigMount:
    name: str = req(OBJECT_REF)
    target: str = req(ABS_PATH)                        # docker: mounted read-only here
    mode: int = opt(0o444, file_mode)                  # Docker Swarm's config default
    version: int | None = opt(None, set_by_apply(integer(1)))   # the config's version this revision runs


@model
class SecretMount:
    name: str = req(OBJECT_REF)
    target: str | None = opt(None, ABS_PATH)           # None in YAML: /run/secrets/<name> unless env
    env: str | None = opt(None, text(ENV_NAME, "an environment variable name"))
    mode: int = opt(0o400, file_mode)                  # readable by its owner only
    uid: int | None = opt(None, integer(0, 2**31 - 1))  # owner of the file; None: the supervisor's user
    gid: int | None = opt(None, integer(0, 2**31 - 1))
    version: int | None = opt(None, set_by_apply(integer(1)))   # the secret's version this revision runs


@model
class ServiceSpec:
    name: str = req(text(DNS_LABEL, DNS_LABEL_HINT))
    image: str | None = opt(None, text(r"\S+", "an image reference"))
    command: tuple[str, ...] | None = opt(None, words)
    args: tuple[str, ...] = opt((), listof(word))
    workdir: str | None = opt(None, LOCAL_PATH)
    replicas: int = opt(1, integer(0))                 # Kubernetes default
    resources: Resources = opt(Resources(), forms.resources(Resources, ResourceAmounts))
    ports: tuple[PortSpec, ...] = opt((), listof(struct(PortSpec)))
    env: FrozenDict[str, str] = opt(_EMPTY, mapof(ENV_NAME, "an environment variable name", word))
    tags: tuple[str, ...] = opt((), listof(text(DNS_LABEL, DNS_LABEL_HINT), unique=True))
    probes: Probes = opt(Probes(), struct(Probes))
    restart: RestartPolicy = opt(RestartPolicy(), struct(RestartPolicy))
    stop_signal: str = opt("SIGTERM", SIGNAL)      # SIGKILL follows after stop_grace_period
    stop_grace_period: float = opt(10.0, duration())
    update: UpdateStrategy = opt(UpdateStrategy(), struct(UpdateStrategy))
    routes: Routes = opt(Routes(), struct(Routes))
    dns: DnsOverride = opt(DnsOverride(), struct(DnsOverride))
    placement: Placement = opt(Placement(), forms.placement(Placement))
    volumes: tuple[VolumeMount, ...] = opt((), listof(struct(VolumeMount)))
    configs: tuple[ConfigMount, ...] = opt((), listof(struct(ConfigMount)))
    secrets: tuple[SecretMount, ...] = opt((), listof(struct(SecretMount)))

    def to_dict(self) -> dict[str, Any]:
        """The normalised, JSON-serialisable form: every field present, units converted."""
        return to_plain(self)

    @classmethod
    def from_dict(cls, data: Any, source: str = "<service spec>") -> "ServiceSpec":
        """Read back ``to_dict()`` output; raises ConfigError naming every bad field."""
        return read_plain(cls, data, source)

    def port(self, name: str) -> PortSpec | None:
        """The declared port called ``name``."""
        return next((p for p in self.ports if p.name == name), None)


# --- top level ----------------------------------------------------------------------------

@model
class ConfigSpec:
    name: str = req(OBJECT_REF)
    data: str | None = opt(None, text(None, "a string", nonempty=False))
    file: str | None = opt(None, LOCAL_PATH)


@model
class SecretSpec:
    """Where `meshlet apply` reads the value; the value itself never enters the model.
    ``external``: the secret lives only in the mesh (``meshlet secret set``), as Compose's
    ``external: true``."""

    name: str = req(OBJECT_REF)
    file: str | None = opt(None, LOCAL_PATH)
    env: str | None = opt(None, text(ENV_NAME, "an environment variable name"))
    external: bool = opt(False, boolean)


@model
class MeshConfig:
    mesh: MeshSettings = opt(MeshSettings(), struct(MeshSettings))
    services: FrozenDict[str, ServiceSpec] = opt(FrozenDict(), named_map(ServiceSpec, DNS_LABEL, DNS_LABEL_HINT, "service"))
    volumes: FrozenDict[str, VolumeSpec] = opt(FrozenDict(), named_map(VolumeSpec, OBJECT_NAME, OBJECT_HINT, "volume"))
    configs: FrozenDict[str, ConfigSpec] = opt(FrozenDict(), named_map(ConfigSpec, OBJECT_NAME, OBJECT_HINT, "config"))
    secrets: FrozenDict[str, SecretSpec] = opt(FrozenDict(), named_map(SecretSpec, OBJECT_NAME, OBJECT_HINT, "secret"))

    def to_dict(self) -> dict[str, Any]:
        """The whole configuration as plain JSON-ready data (normalised like ServiceSpec)."""
        return to_plain(self)


def to_plain(obj: Any) -> Any:
    """A model object as plain JSON-ready data (dicts, lists, str, int, float, bool, None)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                if not f.metadata.get("secret")}
    if isinstance(obj, (tuple, list)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    return obj
