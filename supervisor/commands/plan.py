"""``meshlet plan -f FILE [--json]``: where every replica of the file's services would go.

The file's ``mesh.nodes`` with their declared capacities (less ``reserved``) and nothing
running on them: every replica of every service is placed at once by the supervisor's
own core (``core.placement.place``: largest first, binpack services packed). No engine and
no catalog is contacted, so it shows what the file asks for, not what runs now:

- a node that declares no cpu or memory capacity is unbounded in that resource here
  (the supervisor does not read capacity from an engine either); said on stderr;
- a file without ``mesh.nodes`` is planned on one unbounded node ``local``, docker when
  a service has an image, else process (``meshlet up`` picks docker when an engine
  answers); said on stderr.
- The supervisor places a service's missing replicas when it syncs that service, each
  service on the fleet as it is then; on an empty fleet this is the same set of rules,
  but it sees the services one at a time, so its packing can differ from the plan's.

Output: a table (placements by service and slot, then pending replicas with the reason,
then per node what the plan puts on it), or with ``--json`` exactly::

    {"placements": [{"service": "web", "slot": 0, "node": "a"}, ...],
     "pending": [{"service": "db", "slot": 2, "reason": "no node fits (...)"}]}

Exit: 0, also when replicas are pending (the plan shows them); 2 on an invalid file
(every problem printed as ``file:line field: message``).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Any, TextIO

import config

from ..core.placement import NodeInfo, Placement, Request, node_info, place

__all__ = ["add_subcommand", "run", "plan", "Plan"]

COMMAND = "plan"


def add_subcommand(sub: Any) -> None:
    p = sub.add_parser(COMMAND, help="show where apply would place every replica on the file's nodes "
                                     "(declared capacities, nothing running; contacts nothing)")
    p.add_argument("-f", "--file", required=True, help="the meshlet.yaml to plan")
    p.add_argument("--json", action="store_true", help='print {"placements": [...], "pending": [...]}')


@dataclass(frozen=True, slots=True)
class Plan:
    nodes: tuple[NodeInfo, ...]
    placement: Placement
    notes: tuple[str, ...]          # what the plan assumed, for stderr


def plan(cfg: config.MeshConfig) -> Plan:
    """Every replica of ``cfg``'s services placed on its nodes, with nothing running."""
    notes = []
    if cfg.mesh.nodes:
        nodes = tuple(node_info(n) for n in cfg.mesh.nodes)
    else:
        runtime = "docker" if any(s.image for s in cfg.services.values()) else "process"
        nodes = (NodeInfo("local", runtime),)
        notes.append(f'mesh.nodes is empty: planned on one node "local" ({runtime}, unbounded); '
                     "`meshlet up` runs on docker when an engine answers, else process")
    for n in cfg.mesh.nodes:
        missing = [r for r in ("cpu", "memory") if getattr(n.capacity, r) is None]
        if missing:
            notes.append(f"node {n.name} declares no {' or '.join(missing)} capacity: "
                         f"unbounded in this plan")
    requests = [Request(spec, slot) for _, spec in sorted(cfg.services.items())
                for slot in range(spec.replicas)]
    return Plan(nodes, place(requests, nodes, []), tuple(notes))


def as_document(p: Plan) -> dict[str, Any]:
    placements = sorted((r.spec.name, r.slot, node) for r, node in p.placement.placed)
    pending = sorted((r.spec.name, r.slot, reason) for r, reason in p.placement.failed)
    return {"placements": [{"service": s, "slot": i, "node": n} for s, i, n in placements],
            "pending": [{"service": s, "slot": i, "reason": why} for s, i, why in pending]}


def _table(rows: list[tuple[str, ...]], out: TextIO) -> None:
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    for r in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip(), file=out)


def _amount(used: float, room: float | None, unit: str) -> str:
    if unit == "memory":
        shown = f"{used / 2**20:g}Mi"
        return shown + (f" of {room / 2**20:g}Mi" if room is not None else " (unbounded)")
    return f"{used:g}" + (f" of {room:g}" if room is not None else " (unbounded)")


def print_plan(p: Plan, out: TextIO) -> None:
    doc = as_document(p)
    if doc["placements"]:
        _table([("SERVICE", "SLOT", "NODE")] + [(e["service"], str(e["slot"]), e["node"])
                                               for e in doc["placements"]], out)
    if doc["pending"]:
        print(f"\n{len(doc['pending'])} pending:", file=out)
        _table([("SERVICE", "SLOT", "REASON")] + [(e["service"], str(e["slot"]), e["reason"])
                                                 for e in doc["pending"]], out)
    rows = [("NODE", "REPLICAS", "CPU REQUESTED", "MEMORY REQUESTED")]
    for n in p.nodes:
        here = [r for r, node in p.placement.placed if node == n.name]
        cpu = sum(r.spec.resources.requests.cpu or 0.0 for r in here)
        mem = sum(r.spec.resources.requests.memory or 0 for r in here)
        rows.append((n.name, str(len(here)), _amount(cpu, n.room_cpu, "cpu"), _amount(mem, n.room_memory, "memory")))
    print("", file=out)
    _table(rows, out)


def run(path: str, as_json: bool, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """``meshlet plan``: 0 (pending replicas included), 2 invalid file."""
    from .apply import load_or_report   # reading and reporting a file is apply's, once
    cfg = load_or_report(path, COMMAND, err)
    if cfg is None:
        return 2
    p = plan(cfg)
    for note in p.notes:
        print(f"meshlet plan: {note}", file=err)
    if as_json:
        print(json.dumps(as_document(p), indent=2), file=out)
    else:
        print_plan(p, out)
    return 0
