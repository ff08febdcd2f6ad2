"""The status document: what ``GET /v1/status``, ``meshlet status`` and ``meshlet up``'s
progress lines show. Read-only over the supervisor's state.

    {"services": [{"name", "desired", "revision", "ready", "problem", "rollout",
                   "instances": [{"id", "slot", "node", "revision", "address", "state",
                                  "ready", "registered", "restarts", "age", "exit_code", "pid"}]}],
     "nodes": [{"name", "runtime", "address", "state" (ready | unreachable | lost), "since",
                "error", "cordoned", "draining", "labels", "capacity", "reserved", "room",
                "allocated"}],
     "events": [...the last 20...]}

``rollout`` is null or ``Rollouts.status`` (phase, revision, number, progress, reason,
reverted_from, summary, terminating); ``problem`` is why a slot cannot run, or a rollout
that needs a human (failed, paused, reverted). ``last_exits``: the last few exits of each
slot, newest last (``{"instance", "slot", "revision", "code", "at", "lines"}``: the last
lines the replica wrote); ``failing``: the slots with no ready replica now, each with its
newest exit (``{"slot", "instance", "code", "at", "line"}``), what a user looks at first.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..core.backoff import BackoffState
from ..core.reconcile import allocations

if TYPE_CHECKING:
    from .supervisor import Supervisor

__all__ = ["status_document"]


def status_document(sup: Supervisor, now: float) -> dict[str, Any]:
    observed = sup.observed()
    services = []
    for name in sorted(sup.service_names()):
        entry = sup.desired.get(name)
        tracked = sorted(sup.replicas.of(name), key=lambda t: (t.obs.slot, t.obs.instance_id))
        rows = []
        for t in tracked:
            o = t.obs
            node = sup.nodes.get(o.node)
            first = next(iter(o.ports.values()), None)
            state = "exited" if not o.is_running else t.health.describe()
            if o.instance_id in sup.replicas.terminating:
                state = "terminating"
            rows.append({
                "id": o.instance_id, "slot": o.slot, "node": o.node, "revision": o.revision,
                "address": f"{node.address if node else o.address}" + (f":{first}" if first else ""),
                "state": state, "ready": o.is_running and t.health.ready,
                "registered": o.instance_id in sup.registered,
                "restarts": sup.slots.backoff.get((name, o.slot), BackoffState()).restarts,
                "age": None if o.started_at is None else round(now - o.started_at, 1),
                "exit_code": o.exit_code, "pid": o.pid})
        rollout = sup.rollouts.status(name, sup.desired, observed, sup.slots.errors_of(name), now) \
            if entry else None
        exits = sorted((e for (svc, _), kept in sup.replicas.exits.items() if svc == name for e in kept),
                       key=lambda e: (e.at, e.instance_id))
        ready_slots = {r["slot"] for r in rows if r["ready"]}
        newest = {e.slot: e for e in exits}
        failing = [{"slot": slot, "instance": e.instance_id, "code": e.code, "at": e.at, "line": e.last_line}
                   for slot, e in sorted(newest.items()) if slot not in ready_slots
                   and (entry is None or slot < entry[0].replicas)]
        services.append({
            "name": name, "desired": entry[0].replicas if entry else 0,
            "revision": sup.doc_revision.get(name) if entry else None,
            "ready": sum(1 for r in rows if r["ready"]), "instances": rows,
            # a failed, paused or reverted rollout is the service's problem too, so the
            # status table shows it (what runs is not what was applied)
            "problem": sup.problems.get(name) or (sup.rollouts.attention(name, sup.desired) if entry else None)
            or sup.vip_problems.get(name),
            "rollout": rollout, "last_exits": [e.to_json() for e in exits], "failing": failing})
    return {"now": now, "services": services, "nodes": _nodes(sup, observed), "events": sup.events[-20:]}


def _nodes(sup: Supervisor, observed: Any) -> list[dict[str, Any]]:
    """Per node: what it offers (capacity less ``reserved``; null: unbounded) and what the
    running replicas have requested there (placement's view: ``meshlet node ls``)."""
    held = allocations(sup.rollouts.effective(sup.desired), observed.replicas, observed.starting)
    out = []
    for info in observed.nodes:
        here = [a for a in held if a.node == info.name]
        out.append({"name": info.name, "runtime": info.runtime, "address": info.address,
                    **sup.monitor.state(info.name), "labels": dict(info.labels),
                    "capacity": {"cpu": info.cpu, "memory": info.memory},
                    "reserved": {"cpu": info.reserved_cpu, "memory": info.reserved_memory},
                    "room": {"cpu": info.room_cpu, "memory": info.room_memory},
                    "allocated": {"cpu": round(sum(a.cpu for a in here), 6), "memory": sum(a.memory for a in here),
                                  "replicas": len(here)}})
    return out
