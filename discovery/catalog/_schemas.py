"""The request bodies the catalog decodes, as Consul's Go structs declare them.

Field names are canonical (Consul's JSON names); ``aliases`` are the extra snake_case or
legacy names Consul's custom ``UnmarshalJSON`` methods accept. Matching ignores case and
underscores (``_decode.norm_key``), so ``deregister_critical_service_after`` and
``DeregisterCriticalServiceAfter`` are the same field.
"""

from __future__ import annotations

from ._decode import (
    ANY, BOOL, DURATION, HEADERS, INT, STR, STRLIST, STRMAP, STRUCT, STRUCTLIST, STRUCTMAP, UINT, Field, Schema,
)

__all__ = [
    "CHECK_TYPE",
    "PROXY",
    "SERVICE_DEFINITION",
    "SIDECAR_SERVICE",
    "CATALOG_REGISTER",
    "CATALOG_DEREGISTER",
    "SESSION",
    "CHECK_UPDATE",
    "TXN_KV",
    "TXN_OP",
]

# structs.CheckType / structs.CheckDefinition (agent/structs/check_type.go, check_definition.go)
CHECK_TYPE = Schema("structs.CheckDefinition", (
    Field("ID", STR, aliases=("CheckID",)),
    Field("Name", STR),
    Field("Notes", STR),
    Field("ServiceID", STR),
    Field("Token", STR),
    Field("Status", STR),
    Field("ScriptArgs", STRLIST, aliases=("args",)),
    Field("HTTP", STR),
    Field("H2PING", STR),
    Field("H2PingUseTLS", BOOL),
    Field("Header", HEADERS),
    Field("Method", STR),
    Field("Body", STR),
    Field("DisableRedirects", BOOL),
    Field("TCP", STR),
    Field("TCPUseTLS", BOOL),
    Field("UDP", STR),
    Field("OSService", STR),
    Field("Interval", DURATION),
    Field("DockerContainerID", STR),
    Field("Shell", STR),
    Field("GRPC", STR),
    Field("GRPCUseTLS", BOOL),
    Field("TLSServerName", STR),
    Field("TLSSkipVerify", BOOL),
    Field("AliasNode", STR),
    Field("AliasService", STR),
    Field("Timeout", DURATION),
    Field("TTL", DURATION),
    Field("SuccessBeforePassing", INT),
    Field("FailuresBeforeWarning", INT),
    Field("FailuresBeforeCritical", INT),
    Field("DeregisterCriticalServiceAfter", DURATION),
    Field("OutputMaxSize", INT),
    Field("Namespace", STR),
    Field("Partition", STR),
))

_SERVICE_ADDRESS = Schema("structs.ServiceAddress", (Field("Address", STR), Field("Port", INT)))
_WEIGHTS = Schema("structs.Weights", (Field("Passing", INT), Field("Warning", INT)))

# structs.ConnectProxyConfig: the fields a sidecar's defaults are computed from are typed,
# the rest (upstreams, config ...) are kept as sent.
PROXY = Schema("structs.ConnectProxyConfig", (
    Field("DestinationServiceName", STR),
    Field("DestinationServiceID", STR),
    Field("LocalServiceAddress", STR),
    Field("LocalServicePort", INT),
    Field("LocalServiceSocketPath", STR),
    Field("Mode", STR),
    Field("TransparentProxy", ANY),
    Field("Config", ANY),
    Field("Upstreams", ANY),
    Field("MeshGateway", ANY),
    Field("Expose", ANY),
    Field("AccessLogs", ANY),
    Field("EnvoyExtensions", ANY),
    Field("MutualTLSMode", STR),
))

_SERVICE_FIELDS = (
    Field("Kind", STR),
    Field("ID", STR),
    Field("Name", STR),
    Field("Tags", STRLIST),
    Field("Address", STR),
    Field("TaggedAddresses", STRUCTMAP, _SERVICE_ADDRESS),
    Field("Meta", STRMAP),
    Field("Port", INT),
    Field("SocketPath", STR),
    Field("Check", STRUCT, CHECK_TYPE),
    Field("Checks", STRUCTLIST, CHECK_TYPE),
    Field("Weights", STRUCT, _WEIGHTS),
    Field("Token", STR),
    Field("EnableTagOverride", BOOL),
    Field("Proxy", STRUCT, PROXY),
    Field("Locality", ANY),
    Field("Namespace", STR),
    Field("Partition", STR),
)

# A sidecar_service is a ServiceDefinition without a sidecar of its own.
SIDECAR_SERVICE = Schema("structs.ServiceDefinition", _SERVICE_FIELDS + (
    Field("Connect", STRUCT, Schema("structs.ServiceConnect", (Field("Native", BOOL),))),
))
_CONNECT = Schema("structs.ServiceConnect", (
    Field("Native", BOOL),
    Field("SidecarService", STRUCT, SIDECAR_SERVICE),
))

# structs.ServiceDefinition (agent/structs/service_definition.go)
SERVICE_DEFINITION = Schema("structs.ServiceDefinition", _SERVICE_FIELDS + (Field("Connect", STRUCT, _CONNECT),))

# structs.NodeService as sent to /v1/catalog/register ("Service" is the name).
_NODE_SERVICE = Schema("structs.NodeService", (
    Field("Kind", STR),
    Field("ID", STR),
    Field("Service", STR),
    Field("Tags", STRLIST),
    Field("Address", STR),
    Field("TaggedAddresses", STRUCTMAP, _SERVICE_ADDRESS),
    Field("Meta", STRMAP),
    Field("Port", INT),
    Field("SocketPath", STR),
    Field("Weights", STRUCT, _WEIGHTS),
    Field("EnableTagOverride", BOOL),
    Field("Proxy", ANY),
    Field("Connect", ANY),
    Field("Locality", ANY),
    Field("PeerName", STR),
    Field("Namespace", STR),
    Field("Partition", STR),
    Field("CreateIndex", UINT),
    Field("ModifyIndex", UINT),
))

# structs.HealthCheck as sent to /v1/catalog/register.
_HEALTH_CHECK = Schema("structs.HealthCheck", (
    Field("Node", STR),
    Field("CheckID", STR, aliases=("ID",)),
    Field("Name", STR),
    Field("Status", STR),
    Field("Notes", STR),
    Field("Output", STR),
    Field("ServiceID", STR),
    Field("ServiceName", STR),
    Field("ServiceTags", STRLIST),
    Field("Type", STR),
    Field("Interval", STR),
    Field("Timeout", STR),
    Field("ExposedPort", INT),
    Field("Definition", ANY),
    Field("PeerName", STR),
    Field("Namespace", STR),
    Field("Partition", STR),
    Field("CreateIndex", UINT),
    Field("ModifyIndex", UINT),
))

# structs.RegisterRequest (/v1/catalog/register)
CATALOG_REGISTER = Schema("structs.RegisterRequest", (
    Field("Datacenter", STR),
    Field("ID", STR),
    Field("Node", STR),
    Field("Address", STR),
    Field("TaggedAddresses", STRMAP),
    Field("NodeMeta", STRMAP),
    Field("Service", STRUCT, _NODE_SERVICE),
    Field("Check", STRUCT, _HEALTH_CHECK),
    Field("Checks", STRUCTLIST, _HEALTH_CHECK),
    Field("SkipNodeUpdate", BOOL),
    Field("Locality", ANY),
    Field("PeerName", STR),
    Field("WriteRequest", ANY),
    Field("Token", STR),
    Field("Namespace", STR),
    Field("Partition", STR),
))

# structs.DeregisterRequest (/v1/catalog/deregister)
CATALOG_DEREGISTER = Schema("structs.DeregisterRequest", (
    Field("Datacenter", STR),
    Field("Node", STR),
    Field("ServiceID", STR),
    Field("CheckID", STR),
    Field("PeerName", STR),
    Field("WriteRequest", ANY),
    Field("Token", STR),
    Field("Namespace", STR),
    Field("Partition", STR),
))

_SERVICE_CHECK = Schema("structs.ServiceCheck", (Field("ID", STR), Field("Namespace", STR)))

# structs.Session (/v1/session/create)
SESSION = Schema("structs.Session", (
    Field("ID", STR),
    Field("Name", STR),
    Field("Node", STR),
    Field("LockDelay", DURATION),
    Field("Checks", STRLIST),
    Field("NodeChecks", STRLIST),
    Field("ServiceChecks", STRUCTLIST, _SERVICE_CHECK),
    Field("Behavior", STR),
    Field("TTL", STR),
    Field("Namespace", STR),
    Field("Partition", STR),
))

# structs.checkUpdate (/v1/agent/check/update/<id>)
CHECK_UPDATE = Schema("structs.checkUpdate", (Field("Status", STR), Field("Output", STR)))

# api.KVTxnOp inside /v1/txn
TXN_KV = Schema("api.KVTxnOp", (
    Field("Verb", STR),
    Field("Key", STR),
    Field("Value", STR),
    Field("Flags", UINT),
    Field("Index", UINT),
    Field("Session", STR),
    Field("Namespace", STR),
    Field("Partition", STR),
))

TXN_OP = Schema("api.TxnOp", (
    Field("KV", STRUCT, TXN_KV),
    Field("Node", ANY),
    Field("Service", ANY),
    Field("Check", ANY),
    Field("Session", ANY),
))
