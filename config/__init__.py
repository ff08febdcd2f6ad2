"""meshlet's declarative model: meshlet.yaml -> validated frozen dataclasses -> KV JSON.

See config/README.md for the schema and the KV service document (the contract). This
package imports nothing else of meshlet; every other package imports it, so it is also the
one home of the facts they share: the KV keys (``_keys``), HOST:PORT text (``_address``),
and how meshlet's processes start and log (``_process``).
"""

from __future__ import annotations

from ._address import join_hostport, split_hostport
from ._document import (DOCUMENT_FORMAT, canonical_json, parse_service_document,
                        service_document, service_revision)
from ._errors import ConfigError, ConfigIssue
from ._frozen import FrozenDict
from ._keys import (BACKOFF_PREFIX, CONFIGS_PREFIX, EVENTS_PREFIX, LEADER_KEY, NODE_SIDES_PREFIX, NODES_PREFIX,
                    REBALANCE_KEY, ROLLOUT_KINDS, ROLLOUT_PREFIX, SECRETS_PREFIX, SERVICES_PREFIX, VIPS_PREFIX,
                    VOLUMES_PREFIX, backoff_key, config_key, events_key, key_name, node_key, rollout_key, secret_key,
                    service_key, split_backoff_key, split_events_key, split_rollout_key, split_version_key, vip_key,
                    volume_key)
from ._load import load, loads, locate, proxy_listener, proxy_listener_arg, upstream_tls, upstream_tls_arg
from ._model import (CATALOG_TOKEN_FILE, DEFAULT_CATALOG_URL, MESH_DEFAULTS, RUNTIME_NAMES, Backoff, CanaryStep,
                     CatalogSettings, ConfigMount, ConfigSpec, DnsOverride, DnsSettings, EngineTls, ExecProbe,
                     HashOn, HttpProbe, ListenerTls, MeshConfig, MeshSettings, NodeCapacity, NodeSpec, Outlier,
                     PathRoute, Placement, PortSpec, Probe, Probes, ProxyListener, ProxySettings, ResourceAmounts,
                     Resources, RestartPolicy, Retries, Routes, SecretMount, SecretSpec, SecretsSettings,
                     ServiceSpec, TcpProbe, Timeouts, TlsCertificate, UpdateStrategy, UpstreamTls, VolumeMount,
                     VolumeSpec, resolve_workers, volume_env_name)
from ._process import (CA_ENV, CERT_ENV, DEFAULT_DOCKER_ENGINE, KEY_ENV, LOG_FORMAT, TOKEN_ENV, TOKEN_FILE_ENV,
                       add_catalog_arguments, die_with_parent,
                       die_with_parent_preexec, module_argv, setup_logging)
from ._units import (UnitError, format_duration, parse_cpu, parse_duration,
                     parse_percent_or_count, parse_size)

__all__ = [
    # loading
    "load", "loads", "locate", "ConfigError", "ConfigIssue",
    # the proxy's command-line options (mesh.proxy items) and its worker count
    "proxy_listener", "upstream_tls", "proxy_listener_arg", "upstream_tls_arg", "resolve_workers",
    # the KV service document
    "DOCUMENT_FORMAT", "service_document", "parse_service_document", "service_revision",
    "canonical_json",
    # units
    "parse_duration", "parse_size", "parse_cpu", "parse_percent_or_count", "format_duration",
    "UnitError",
    # the model
    "MeshConfig", "MeshSettings", "DnsSettings", "ProxySettings", "ProxyListener", "ListenerTls",
    "TlsCertificate", "UpstreamTls", "NodeSpec", "NodeCapacity",
    "ServiceSpec", "Resources", "ResourceAmounts", "PortSpec", "Probes", "Probe", "HttpProbe", "TcpProbe",
    "ExecProbe", "RestartPolicy", "Backoff", "UpdateStrategy", "CanaryStep", "Routes",
    "PathRoute", "HashOn", "Retries", "Timeouts", "Outlier", "DnsOverride", "Placement",
    "VolumeMount", "EngineTls", "ConfigMount", "SecretMount", "VolumeSpec", "ConfigSpec", "SecretSpec", "SecretsSettings",
    "FrozenDict", "MESH_DEFAULTS", "DEFAULT_CATALOG_URL", "RUNTIME_NAMES", "volume_env_name", "CatalogSettings",
    "CATALOG_TOKEN_FILE",
    # KV keys (the catalog contract)
    "SERVICES_PREFIX", "VIPS_PREFIX", "VOLUMES_PREFIX", "volume_key", "BACKOFF_PREFIX", "ROLLOUT_PREFIX", "ROLLOUT_KINDS",
    "NODES_PREFIX", "NODE_SIDES_PREFIX", "LEADER_KEY", "REBALANCE_KEY", "node_key", "EVENTS_PREFIX", "events_key",
    "split_events_key",
    "SECRETS_PREFIX", "CONFIGS_PREFIX", "service_key", "vip_key", "backoff_key", "rollout_key", "key_name",
    "split_rollout_key", "split_backoff_key", "secret_key", "config_key", "split_version_key",
    # conventions every component shares
    "split_hostport", "join_hostport", "module_argv", "die_with_parent", "die_with_parent_preexec",
    "setup_logging", "LOG_FORMAT", "DEFAULT_DOCKER_ENGINE", "add_catalog_arguments", "TOKEN_ENV",
    "TOKEN_FILE_ENV", "CA_ENV", "CERT_ENV", "KEY_ENV",
]
