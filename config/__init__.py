"""meshlet's declarative model: meshlet.yaml -> validated frozen dataclasses -> KV JSON.

See config/README.md for the schema and the KV service document (the contract). This
package imports nothing else of meshlet.
"""

from __future__ import annotations

from ._document import (DOCUMENT_FORMAT, canonical_json, parse_service_document,
                        service_document, service_revision)
from ._errors import ConfigError, ConfigIssue
from ._frozen import FrozenDict
from ._load import load, loads
from ._model import (Backoff, CanaryStep, ConfigMount, ConfigSpec, DnsOverride, DnsSettings,
                     ExecProbe, HashOn, HttpProbe, MeshConfig, MeshSettings, NodeCapacity,
                     NodeSpec, Outlier, PathRoute, Placement, PortSpec, Probe, Probes,
                     ProxySettings, Resources, RestartPolicy, Retries, Routes, SecretMount,
                     SecretSpec, ServiceSpec, TcpProbe, Timeouts, UpdateStrategy, VolumeMount,
                     VolumeSpec)
from ._units import (UnitError, format_duration, parse_cpu, parse_duration,
                     parse_percent_or_count, parse_size)

__all__ = [
    # loading
    "load", "loads", "ConfigError", "ConfigIssue",
    # the KV service document
    "DOCUMENT_FORMAT", "service_document", "parse_service_document", "service_revision",
    "canonical_json",
    # units
    "parse_duration", "parse_size", "parse_cpu", "parse_percent_or_count", "format_duration",
    "UnitError",
    # the model
    "MeshConfig", "MeshSettings", "DnsSettings", "ProxySettings", "NodeSpec", "NodeCapacity",
    "ServiceSpec", "Resources", "PortSpec", "Probes", "Probe", "HttpProbe", "TcpProbe",
    "ExecProbe", "RestartPolicy", "Backoff", "UpdateStrategy", "CanaryStep", "Routes",
    "PathRoute", "HashOn", "Retries", "Timeouts", "Outlier", "DnsOverride", "Placement",
    "VolumeMount", "ConfigMount", "SecretMount", "VolumeSpec", "ConfigSpec", "SecretSpec",
    "FrozenDict",
]
