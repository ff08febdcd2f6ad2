"""Where meshlet keeps its state in the catalog's KV store: every key and prefix, once.

The contract between ``meshlet apply`` / the CLI (writers of desired state and requests),
the supervisor (reader of those, writer of what it must not lose) and DNS and the proxy
(readers of the service documents). config/README.md, "KV keys", says what each holds::

    meshlet/services/<service>            the service document (config._document)
    meshlet/vips/<ip>                     the service a virtual IP belongs to
    meshlet/backoff/<service>/<slot>      a slot's restart back-off
    meshlet/rollout/<service>/<kind>      state | history | crashes   (the supervisor)
                                          control | restart           (the CLI)
    meshlet/secrets/<name>/<version>      a secret's version, encrypted (supervisor.secrets)
    meshlet/configs/<name>/<version>      a config's version (content, digest)
    meshlet/leader                        the supervisors' leader lock (a session holds it)
    meshlet/rebalance                     the moves `meshlet rebalance` started, until done
    meshlet/nodes/<node>                  an operator's cordon / drain of a node (the CLI)
    meshlet/node-sides/<host>             a host's `meshlet node` (its proxy's admin address)
    meshlet/volumes/<kind>/<name>         where a node-local volume lives (the supervisor):
                                          named/<engine volume name> or host/<volume name>
    meshlet/events/<chunk>                the supervisor's events, a chunk of them per key, the
                                          newest 10,000 kept (supervisor/core/events.py)
"""

from __future__ import annotations

__all__ = ["SERVICES_PREFIX", "VIPS_PREFIX", "BACKOFF_PREFIX", "ROLLOUT_PREFIX", "ROLLOUT_KINDS",
           "SECRETS_PREFIX", "CONFIGS_PREFIX", "NODES_PREFIX", "NODE_SIDES_PREFIX", "LEADER_KEY", "REBALANCE_KEY", "node_key",
           "VOLUMES_PREFIX", "volume_key", "EVENTS_PREFIX", "events_key", "split_events_key", "service_key", "vip_key",
           "backoff_key", "rollout_key",
           "key_name", "split_rollout_key", "split_backoff_key", "secret_key", "config_key", "split_version_key"]

SERVICES_PREFIX = "meshlet/services/"
VIPS_PREFIX = "meshlet/vips/"
BACKOFF_PREFIX = "meshlet/backoff/"
ROLLOUT_PREFIX = "meshlet/rollout/"
ROLLOUT_KINDS = ("state", "history", "crashes", "control", "restart")
SECRETS_PREFIX = "meshlet/secrets/"
CONFIGS_PREFIX = "meshlet/configs/"
VOLUMES_PREFIX = "meshlet/volumes/"
NODES_PREFIX = "meshlet/nodes/"
LEADER_KEY = "meshlet/leader"
REBALANCE_KEY = "meshlet/rebalance"
NODE_SIDES_PREFIX = "meshlet/node-sides/"
EVENTS_PREFIX = "meshlet/events/"


def node_key(node: str) -> str:
    return NODES_PREFIX + node


def service_key(service: str) -> str:
    return SERVICES_PREFIX + service


def vip_key(ip: str) -> str:
    return VIPS_PREFIX + ip


def backoff_key(service: str, slot: int | None = None) -> str:
    """A slot's back-off key; without ``slot`` the service's prefix (for a recursive delete)."""
    return f"{BACKOFF_PREFIX}{service}/" + ("" if slot is None else str(slot))


def rollout_key(service: str, kind: str | None = None) -> str:
    """``meshlet/rollout/<service>/<kind>``; without ``kind`` the service's prefix."""
    if kind is not None and kind not in ROLLOUT_KINDS:
        raise ValueError(f"unknown rollout key kind {kind!r}")
    return f"{ROLLOUT_PREFIX}{service}/" + (kind or "")


def key_name(key: str, prefix: str) -> str | None:
    """The name a one-level key under ``prefix`` stands for (``meshlet/services/web`` ->
    ``web``); None for the prefix itself or anything deeper or elsewhere."""
    if not key.startswith(prefix):
        return None
    name = key[len(prefix):]
    return name if name and "/" not in name else None


def split_rollout_key(key: str) -> tuple[str, str] | None:
    """``(service, kind)`` of a key under ``ROLLOUT_PREFIX``; None for anything else."""
    if not key.startswith(ROLLOUT_PREFIX):
        return None
    service, sep, kind = key[len(ROLLOUT_PREFIX):].rpartition("/")
    return (service, kind) if sep and service and kind in ROLLOUT_KINDS else None


def split_backoff_key(key: str) -> tuple[str, int] | None:
    """``(service, slot)`` of a key under ``BACKOFF_PREFIX``; None for anything else."""
    if not key.startswith(BACKOFF_PREFIX):
        return None
    service, sep, slot = key[len(BACKOFF_PREFIX):].rpartition("/")
    return (service, int(slot)) if sep and service and slot.isdigit() else None


def secret_key(name: str, version: int | None = None) -> str:
    """A secret's version; without ``version`` the prefix of all its versions."""
    return f"{SECRETS_PREFIX}{name}/" + ("" if version is None else str(version))


def config_key(name: str, version: int | None = None) -> str:
    """A config's version; without ``version`` the prefix of all its versions."""
    return f"{CONFIGS_PREFIX}{name}/" + ("" if version is None else str(version))


def split_version_key(key: str, prefix: str) -> tuple[str, int] | None:
    """``(name, version)`` of a key under ``SECRETS_PREFIX`` or ``CONFIGS_PREFIX``."""
    if not key.startswith(prefix):
        return None
    name, sep, version = key[len(prefix):].rpartition("/")
    return (name, int(version)) if sep and name and "/" not in name and version.isdigit() else None


def volume_key(home: str) -> str:
    """The record of a node-local volume's home; ``home``: ``named/<engine volume name>``
    or ``host/<volume name>`` (supervisor.core.volumes.home_key)."""
    return VOLUMES_PREFIX + home


def events_key(chunk: int) -> str:
    """The key of events chunk ``chunk`` (zero-padded, so keys sort as numbers do)."""
    if chunk < 0:
        raise ValueError(f"events chunk number must be >= 0, got {chunk}")
    return f"{EVENTS_PREFIX}{chunk:012d}"


def split_events_key(key: str) -> int | None:
    """The chunk number of a key under ``EVENTS_PREFIX``; None for anything else."""
    if not key.startswith(EVENTS_PREFIX):
        return None
    rest = key[len(EVENTS_PREFIX):]
    return int(rest) if rest.isdigit() else None
