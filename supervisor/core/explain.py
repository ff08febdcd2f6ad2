"""Why each replica of a service is (or would be) where it is: ``meshlet explain SERVICE``.

Pure: per slot, ``placement.explain`` of the slot's replica placed alone on the fleet as
it is now, less the slot's own replicas (what the slot holds is room it may take again),
with the node its newest replica failed on ranked below equals, as reconcile ranks it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import config

from .model import Observed
from .placement import explain
from .reconcile import allocations, pinned_request

__all__ = ["explain_service", "format_explanation"]


def explain_service(service: str, desired: Mapping[str, tuple[config.ServiceSpec, str]],
                    observed: Observed) -> dict[str, Any] | None:
    """``{"service", "replicas", "slots": [{"slot", "running_on", "failed_on", "chosen",
    "nodes": [{"node", "filtered", "score"}]}]}``; None when ``service`` is not desired.
    ``chosen``: the node placement would pick now (None: the replica stays pending, and
    every node says why); ``nodes``: the ones that can hold it best first, then the rest."""
    entry = desired.get(service)
    if entry is None:
        return None
    spec = entry[0]
    slots = []
    for slot in range(spec.replicas):
        mine = [r for r in observed.replicas if r.service == service and r.slot == slot]
        others = [r for r in observed.replicas if not (r.service == service and r.slot == slot)]
        exited = sorted((r for r in mine if not r.running and r.finished_at is not None),
                        key=lambda r: r.finished_at or 0.0)
        newest = exited[-1] if exited else None
        failed_on = newest.node if newest is not None and (newest.killed or newest.exit_code != 0) \
            and not any(r.running for r in mine) else None
        e = explain(pinned_request(spec, slot, observed.volume_homes, failed_on), observed.nodes, allocations(desired, others, observed.starting))
        slots.append({
            "slot": slot,
            "running_on": sorted({r.node for r in mine if r.running}),
            "failed_on": failed_on,
            "chosen": e.chosen,
            "nodes": [{"node": v.node, "filtered": v.reason,
                       "score": v.score.describe() if v.score is not None else None} for v in e.verdicts],
        })
    return {"service": service, "replicas": spec.replicas, "slots": slots}


def format_explanation(doc: Mapping[str, Any]) -> list[str]:
    """What ``meshlet explain`` prints: per slot where it runs and what placement would
    decide now, one line per node (``*`` the chosen one)."""
    out = [f"{doc['service']}: {doc['replicas']} replica{'s' if doc['replicas'] != 1 else ''}"]
    for s in doc["slots"]:
        where = ", ".join(s["running_on"]) or "not running"
        decision = f"placement now: {s['chosen']}" if s["chosen"] else "pending: no node can hold it"
        out.append(f"slot {s['slot']}: {where}; {decision}"
                   + (f" (failed on {s['failed_on']}, ranked below equals)" if s["failed_on"] else ""))
        for n in s["nodes"]:
            mark = "*" if n["node"] == s["chosen"] else " "
            out.append(f"  {mark} {n['node']}: " + (n["score"] if n["score"] is not None
                                                    else f"filtered out: {n['filtered']}"))
    return out
