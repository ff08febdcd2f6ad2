"""Volumes in the shell: what a replica mounts (``attachments``), where node-local volumes
live (``VolumeHomes``, the catalog's ``meshlet/volumes/`` records), and ``volume ls`` /
``volume rm`` for the admin API (``list_volumes``, ``remove_volume``).

Homes: the first start of a replica with a node-local volume that has no home yet
records the node (a create-only CAS, so two supervisors or two syncs cannot record two
homes); from then on placement pins every replica mounting it there (core.volumes), across
supervisor restarts. A start the runtime refuses takes back a home it just recorded (no
volume was made, so nothing lives there). Only ``remove_volume`` deletes a record, with
the volume: never scale-down, ``apply --prune``, a removed service or a rollout.

Errors: a home taken meanwhile on another node, or a mount whose document has no volume
definition, is a ``WorkloadError`` (the start is refused with that reason); catalog
failures escape as they come (the sync logs them and tries again).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import config
from discovery.consul import kv_get

from ..core.volumes import Home, engine_name, homes_of, mounted, records, split_home_key
from ..runtime import InstanceNotFound, Runtime, VolumeAttachment, VolumeInUse, WorkloadError

__all__ = ["VolumeHomes", "attachments", "list_volumes", "remove_volume", "users_index", "VolumeError"]

log = logging.getLogger("supervisor.volumes")


class VolumeError(WorkloadError):
    """A volume request that cannot be done (unknown volume, in use)."""


def attachments(spec: config.ServiceSpec, slot: int) -> tuple[VolumeAttachment, ...]:
    """What a replica of ``slot`` mounts, each mount resolved to its engine volume name."""
    missing = [m.name for m in spec.volumes if m.volume is None]
    if missing:
        raise WorkloadError(f"the stored document of {spec.name} mounts {', '.join(missing)} without the "
                            "volume's definition (applied by an older meshlet): apply the file again")
    return tuple(VolumeAttachment(
        name=vol.name, kind=vol.type, target=m.target, source=engine_name(vol, spec.name, slot),  # type: ignore[arg-type]
        read_only=m.read_only, driver=vol.driver or "local", driver_opts=vol.driver_opts, size=vol.size,
        create=vol.create, per_replica=vol.per_replica) for m, vol in mounted(spec))


class VolumeHomes:
    """The homes of node-local volumes, as recorded in the catalog (see the module)."""

    def __init__(self, kv: Any, clock: Callable[[], float] = time.time) -> None:
        self.kv = kv                     # py-consul's aio client
        self.clock = clock
        self.homes: dict[str, Home] = {}
        self._lock = asyncio.Lock()

    async def load(self) -> None:
        _, entries = await self.kv.kv.get(config.VOLUMES_PREFIX, recurse=True)
        found = []
        for e in entries or ():
            try:
                found.append((e["Key"][len(config.VOLUMES_PREFIX):], json.loads(e.get("Value") or b"")))
            except ValueError:
                log.error("ignoring unreadable %s", e["Key"])
        self.homes = records(found)

    def nodes(self) -> dict[str, str]:
        """home key -> node: placement's input (``Observed.volume_homes``)."""
        return {k: h.node for k, h in self.homes.items()}

    async def claim(self, spec: config.ServiceSpec, slot: int, node: str) -> list[str]:
        """Record ``node`` as the home of every node-local volume of the replica that has
        none; the keys recorded now. WorkloadError when one lives elsewhere."""
        recorded: list[str] = []
        async with self._lock:
            for key, vol in homes_of(spec, slot):
                home = self.homes.get(key)
                if home is None:
                    doc = {"node": node, "volume": vol.name, "kind": vol.type, "service": spec.name,
                           "slot": slot if vol.per_replica else None, "per_replica": vol.per_replica,
                           "driver": vol.driver, "source": engine_name(vol, spec.name, slot),
                           "recorded_at": self.clock()}
                    if await self.kv.kv.put(config.volume_key(key), json.dumps(doc), cas=0):
                        self.homes.update(records([(key, doc)]))
                        recorded.append(key)
                        continue
                    _, raw = await kv_get(self.kv, config.volume_key(key))     # recorded meanwhile
                    try:
                        self.homes.update(records([(key, json.loads(raw or b""))]))
                    except ValueError:
                        pass
                    home = self.homes.get(key)
                if home is not None and home.node != node:
                    await self._release(recorded)
                    raise WorkloadError(f"volume {key.split('/', 1)[1]} lives on node {home.node}, not {node}")
        return recorded

    async def release(self, keys: Iterable[str]) -> None:
        """Take back homes ``claim`` just recorded (the start they were for was refused)."""
        async with self._lock:
            await self._release(list(keys))

    async def _release(self, keys: list[str]) -> None:
        for key in keys:
            try:
                await self.kv.kv.delete(config.volume_key(key))
            except Exception as exc:  # noqa: BLE001 - the home stays recorded: it only pins
                log.warning("cannot take back the home of %s: %s", key, exc)
                continue
            self.homes.pop(key, None)

    async def forget(self, key: str) -> None:
        async with self._lock:
            await self.kv.kv.delete(config.volume_key(key))
            self.homes.pop(key, None)


# --------------------------------------------------------------------------- volume ls / rm

async def list_volumes(runtimes: Mapping[str, Runtime], homes: VolumeHomes,
                       users_of: Callable[[str], list[str]]) -> list[dict[str, Any]]:
    """Every volume meshlet keeps: the nodes' named volumes (engine volumes / directories)
    and the host volumes with a home. ``users_of(name)``: the replicas the supervisor knows
    that mount ``name`` (engine name or host volume name)."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for node, rt in runtimes.items():
        lister = getattr(rt, "volumes", None)
        if lister is None:
            continue
        try:
            found = await lister()
        except WorkloadError as exc:
            log.warning("cannot list the volumes of node %s: %s", node, exc)
            continue
        for v in found:
            per_replica = "meshlet.service" in v.labels
            users = sorted(set(v.users) | set(users_of(v.name)))
            out[(v.name, node)] = {"name": v.name, "kind": "per-replica" if per_replica else "named",
                                   "volume": v.labels.get("meshlet.volume"), "driver": v.driver, "node": node,
                                   "size": v.size, "users": users, "created_at": v.created_at}
    for key, home in sorted(homes.homes.items()):
        kind, name = split_home_key(key) or ("", key)
        if kind == "host":
            doc = {"name": home.volume, "kind": "host", "volume": home.volume, "driver": None, "node": home.node,
                   "size": None, "users": sorted(users_of(home.volume)), "created_at": None}
            out[(home.volume, home.node)] = doc
        elif (name, home.node) not in out:
            # recorded, but its node does not list it: gone with its node, or never made
            out[(name, home.node)] = {"name": name, "kind": "per-replica" if home.slot is not None else "named",
                                      "volume": home.volume, "driver": None, "node": home.node, "size": None,
                                      "users": sorted(users_of(name)), "created_at": None,
                                      "missing": f"node {home.node} does not list it"}
    return [out[k] for k in sorted(out)]


async def remove_volume(name: str, runtimes: Mapping[str, Runtime], homes: VolumeHomes,
                        users_of: Callable[[str], list[str]]) -> dict[str, Any]:
    """Delete volume ``name`` (an engine volume name, or a host volume's name: its record
    only, the directory is the user's) on every node that has it. VolumeError when a
    replica mounts it or nothing is known by that name."""
    users = users_of(name)
    if users:
        raise VolumeInUse(f"volume {name} is in use by {', '.join(sorted(users))}: scale the service down "
                          "or remove it first")
    host_key, named_key = f"host/{name}", f"named/{name}"
    if host_key in homes.homes:
        await homes.forget(host_key)
        return {"removed": name, "kind": "host", "nodes": [],
                "note": "the host directory was kept: meshlet deletes only the volumes it made"}
    removed = []
    for node, rt in runtimes.items():
        remover = getattr(rt, "remove_volume", None)
        if remover is None:
            continue
        try:
            await remover(name)
        except InstanceNotFound:
            continue
        removed.append(node)
    if not removed and named_key not in homes.homes:
        raise VolumeError(f"no volume {name} (`meshlet volume ls` lists them)")
    if named_key in homes.homes:
        await homes.forget(named_key)
    return {"removed": name, "kind": "named", "nodes": removed}


def users_index(replicas: Iterable[tuple[str, config.ServiceSpec | None, int]]) -> dict[str, list[str]]:
    """volume name (engine name; host volume name) -> instance ids mounting it, from
    (instance id, its spec, its slot)."""
    out: dict[str, list[str]] = {}
    for iid, spec, slot in replicas:
        if spec is None:
            continue
        for _, vol in mounted(spec):
            if vol.type == "tmpfs":
                continue
            name = vol.name if vol.type == "host" else engine_name(vol, spec.name, slot)
            out.setdefault(name or "", []).append(iid)
    return out
