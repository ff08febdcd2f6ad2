"""Volumes: what a replica mounts, which engine volume that is, and where it lives. Pure.

Vocabulary
    volume      a top-level ``volumes:`` entry (``config.VolumeSpec``); a service's mount
                carries the definition its revision runs with (``VolumeMount.volume``).
    engine name the volume as the node knows it: a named volume's ``source`` (default its
                name); a per-replica volume's ``<service>-<volume>-<slot>`` (StatefulSet's
                ``<claim>-<set>-<ordinal>``, ordered as meshlet names replicas); a host
                volume's directory; a tmpfs has none (it lives and dies with its replica).
    home        the node a node-local volume lives on, recorded in the catalog when a
                replica first uses it (KV ``meshlet/volumes/<kind>/<key>``, ``home_key``),
                so a restarted supervisor keeps it.
    node-local  a host directory, or a named volume of the ``local`` driver without a
                network filesystem in ``driver_opts.type`` (``NETWORK_TYPES``). A network
                volume (another driver: a plugin; or ``local`` with type nfs/cifs/...) is
                reachable from every node and pins nothing.

Placement: a replica whose node-local volumes have a home is pinned to it
(``placement.Request.pinned_to``); if the volumes' homes disagree, or the home is no node
of the fleet, the replica stays pending with that reason: it is never started elsewhere
on an empty volume. A process node has no volume driver: it holds local named volumes as
directories, and a service with a driver volume needs a docker node (``runtime_reason``).

One writer per slot (``one_writer``): a service with a per-replica volume never runs two
replicas of one slot at once: rollouts go slot by slot, the old replica stopped before its
replacement starts (``rollout_types.Strategy.one_writer``), and reconcile starts nothing in
a slot whose previous replica is still stopping (``reconcile``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import config

__all__ = ["NETWORK_TYPES", "Home", "engine_name", "is_node_local", "one_writer", "home_key", "split_home_key",
           "mounted", "needs_engine", "records", "with_definitions", "conflicts", "homes_of", "pin", "runtime_reason", "uses"]

# Filesystem types of Docker's local driver (``driver_opts.type``) that mount a network
# share: the same data is reachable from every node, so such a volume pins nothing.
NETWORK_TYPES = frozenset({"nfs", "nfs4", "cifs", "smb3", "smbfs", "glusterfs", "ceph", "9p"})


@dataclass(frozen=True, slots=True)
class Home:
    """Where a node-local volume lives (the catalog's record of it)."""

    key: str                 # ``home_key``: named/<engine name> or host/<volume name>
    node: str
    volume: str              # the meshlet volume's name
    kind: str                # host | named
    service: str | None = None
    slot: int | None = None  # per-replica volumes: the slot it belongs to


def engine_name(vol: config.VolumeSpec, service: str, slot: int) -> str | None:
    """The name the node knows the volume by (None: a tmpfs, which has none)."""
    if vol.type == "tmpfs":
        return None
    if vol.type == "host":
        return vol.source
    if vol.per_replica:
        return f"{service}-{vol.name}-{slot}"
    return vol.source or vol.name


def is_node_local(vol: config.VolumeSpec) -> bool:
    """Does the volume's data live on one node (see the module)?"""
    if vol.type == "host":
        return True
    if vol.type == "tmpfs":
        return False
    return (vol.driver or "local") == "local" and vol.driver_opts.get("type", "").lower() not in NETWORK_TYPES


def needs_engine(vol: config.VolumeSpec) -> bool:
    """A named volume only a Docker engine can make: a driver other than local, or driver
    options (a mount the engine performs)."""
    return vol.type == "named" and ((vol.driver or "local") != "local" or bool(vol.driver_opts))


def home_key(vol: config.VolumeSpec, service: str, slot: int) -> str | None:
    """The record key of the volume's home (None: not node-local)."""
    if not is_node_local(vol):
        return None
    if vol.type == "host":
        return f"host/{vol.name}"
    return f"named/{engine_name(vol, service, slot)}"


def split_home_key(key: str) -> tuple[str, str] | None:
    kind, sep, name = key.partition("/")
    return (kind, name) if sep and kind in ("host", "named") and name and "/" not in name else None


def mounted(spec: config.ServiceSpec) -> list[tuple[config.VolumeMount, config.VolumeSpec]]:
    """The service's mounts with their definitions (mounts applied before volumes had one
    are skipped: nothing is known of them)."""
    return [(m, m.volume) for m in spec.volumes if m.volume is not None]


def one_writer(spec: config.ServiceSpec) -> bool:
    """Does the service mount a per-replica volume (one writer per slot)?"""
    return any(v.per_replica for _, v in mounted(spec))


def homes_of(spec: config.ServiceSpec, slot: int) -> list[tuple[str, config.VolumeSpec]]:
    """(home key, volume) of every node-local volume a replica of ``slot`` mounts."""
    out = []
    for _, vol in mounted(spec):
        key = home_key(vol, spec.name, slot)
        if key is not None:
            out.append((key, vol))
    return out


def _describe(key: str, vol: config.VolumeSpec) -> str:
    kind, name = split_home_key(key) or ("", key)
    return f"host volume {vol.name} ({vol.source})" if kind == "host" else f"volume {name}"


def pin(spec: config.ServiceSpec, slot: int, homes: Mapping[str, str]) -> tuple[str | None, str]:
    """(node, why) a replica of ``slot`` must run on: the home of its node-local volumes
    (``homes``: key -> node). (None, "") when none has a home yet. When two homes
    disagree the node is "" (no node can hold it) and ``why`` says which."""
    found = [(homes[key], key, vol) for key, vol in homes_of(spec, slot) if key in homes]
    if not found:
        return None, ""
    node, key, vol = found[0]
    for other, key2, vol2 in found[1:]:
        if other != node:
            return "", (f"{_describe(key, vol)} lives on node {node} and {_describe(key2, vol2)} on node "
                        f"{other}: no node has both")
    return node, f"{_describe(key, vol)} lives on node {node}"


def runtime_reason(spec: config.ServiceSpec, runtime: str) -> str | None:
    """Why a node of ``runtime`` cannot hold the service's volumes (None: it can)."""
    if runtime != "process":
        return None
    for _, vol in mounted(spec):
        if needs_engine(vol):
            what = f"driver {vol.driver}" if (vol.driver or "local") != "local" else "driver_opts"
            return f"process node, volume {vol.name} needs a Docker engine ({what})"
    return None


def uses(spec: config.ServiceSpec, slot: int) -> list[str]:
    """The record keys and engine names a replica of ``slot`` mounts, for ``volume ls``."""
    out = []
    for _, vol in mounted(spec):
        name = engine_name(vol, spec.name, slot)
        if name is not None:
            out.append(name)
    return out


def records(entries: Iterable[tuple[str, dict]]) -> dict[str, Home]:
    """Homes from the catalog's records ((key below the prefix, JSON object)); malformed
    ones are skipped."""
    out = {}
    for key, doc in entries:
        if split_home_key(key) is None or not isinstance(doc, dict) or not isinstance(doc.get("node"), str):
            continue
        slot = doc.get("slot")
        out[key] = Home(key, doc["node"], str(doc.get("volume") or key), str(doc.get("kind") or key.split("/")[0]),
                        doc.get("service") if isinstance(doc.get("service"), str) else None,
                        slot if isinstance(slot, int) else None)
    return out


def with_definitions(spec: config.ServiceSpec, volumes: Mapping[str, config.VolumeSpec]) -> config.ServiceSpec:
    """``spec`` with each mount carrying its volume's definition (what ``meshlet apply``
    stores, so the revision covers it and the supervisor needs nothing else)."""
    mounts = tuple(dataclasses.replace(m, volume=volumes.get(m.name, m.volume)) for m in spec.volumes)
    return spec if mounts == spec.volumes else dataclasses.replace(spec, volumes=mounts)


def conflicts(desired: Mapping[str, config.ServiceSpec], stored: Mapping[str, config.ServiceSpec]) -> list[tuple[str, str]]:
    """(volume name, why) for each volume the applied services mount with another
    ``per_replica`` (or kind, or engine volume) than a service already in the mesh that this
    apply leaves as it is: one name would mean two different things on the nodes."""
    theirs: dict[str, tuple[str, config.VolumeSpec]] = {}
    for name, spec in sorted(stored.items()):
        if name in desired:
            continue
        for _, vol in mounted(spec):
            theirs.setdefault(vol.name, (name, vol))
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    for spec in desired.values():
        for _, vol in mounted(spec):
            other = theirs.get(vol.name)
            if other is None or vol.name in seen:
                continue
            service, old = other
            if old.per_replica != vol.per_replica:
                seen.add(vol.name)
                out.append((vol.name, f"per_replica is {str(vol.per_replica).lower()} here, but service {service} "
                                      f"(already in the mesh) mounts volume {vol.name} with per_replica "
                                      f"{str(old.per_replica).lower()}: one volume name cannot be both; rename one"))
            elif (old.type, old.source) != (vol.type, vol.source):
                seen.add(vol.name)
                out.append((vol.name, f"service {service} (already in the mesh) mounts volume {vol.name} as "
                                      f"{old.type} {old.source or vol.name}, this file as {vol.type} "
                                      f"{vol.source or vol.name}: rename one"))
    return out
