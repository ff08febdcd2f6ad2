"""The supervisor's Prometheus metrics (``GET /metrics`` on the admin API).

Counters are plain dict increments where things happen (an event recorded, a probe
answered, a sync finished); gauges are read from the status document at scrape time, so
they can never drift from what ``meshlet status`` shows. Names follow Prometheus'
conventions: ``meshlet_supervisor_`` prefix, ``_total`` counters, base units (seconds,
ratios 0..1); state-sets (``..._phase``, ``node_state``) are 1 for the current state.

    meshlet_supervisor_replicas{service,state}             gauge  ready|not-ready|starting|failed|exited|terminating
    meshlet_supervisor_replicas_desired{service}           gauge
    meshlet_supervisor_replica_starts_total{service}       counter  every start (restarts too)
    meshlet_supervisor_restarts_total{service}             counter  starts after an exit, with back-off
    meshlet_supervisor_replica_exits_total{service,reason} counter  completed|crashed|killed|stopped
    meshlet_supervisor_start_failures_total{service}       counter  starts the runtime refused
    meshlet_supervisor_probe_results_total{service,probe,result}   counter  success|failure
    meshlet_supervisor_placement_failures_total{service}   counter  a replica no node could hold (per reason)
    meshlet_supervisor_rollout_progress_ratio{service}     gauge    updated / desired of the running rollout
    meshlet_supervisor_rollout_phase{service,phase}        gauge    1 for the phase now
    meshlet_supervisor_rollout_steps_total{service}        counter
    meshlet_supervisor_rollout_reverts_total{service}      counter
    meshlet_supervisor_sync_duration_seconds               histogram  one reconcile of one service
    meshlet_supervisor_node_state{node,state}              gauge    1 for ready|unreachable|lost
    meshlet_supervisor_node_cordoned{node}, ..._node_draining{node}   gauge 0/1
    meshlet_supervisor_node_allocated_cpu / _memory_bytes{node}, ..._node_room_cpu / _memory_bytes{node}
    meshlet_supervisor_events_total{kind}                  counter
    meshlet_supervisor_event_write_failures_total          counter  batches the catalog refused
    meshlet_supervisor_events_dropped_total                counter  lost before they were stored

Exposition: Prometheus text format 0.0.4.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Mapping
from typing import Any

from ..core.events import Event

__all__ = ["SupervisorMetrics", "CONTENT_TYPE", "SYNC_BUCKETS", "REPLICA_STATES", "NODE_STATES", "PHASES"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Seconds. A sync of a service is milliseconds unless it starts replicas (a docker start
# is 100 ms to seconds); 30 s covers a slow engine.
SYNC_BUCKETS: tuple[float, ...] = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
REPLICA_STATES = ("ready", "not-ready", "starting", "failed", "exited", "terminating")
NODE_STATES = ("ready", "unreachable", "lost")
PHASES = ("progressing", "paused", "complete", "failed", "reverting")


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _num(v: float) -> str:
    if v == float("inf"):
        return "+Inf"
    if isinstance(v, int) or float(v).is_integer():
        return str(int(v))
    return repr(float(v))


def _labels(**kv: Any) -> str:
    return "{" + ",".join(f'{k}="{_escape(str(v))}"' for k, v in kv.items()) + "}" if kv else ""


class SupervisorMetrics:
    """Counters of one supervisor (see the module); ``render(status)`` on scrape."""

    def __init__(self, buckets: tuple[float, ...] = SYNC_BUCKETS) -> None:
        self.buckets = tuple(buckets)
        self.events: dict[str, int] = {}
        self.starts: dict[str, int] = {}
        self.restarts: dict[str, int] = {}
        self.exits: dict[tuple[str, str], int] = {}
        self.start_failures: dict[str, int] = {}
        self.probes: dict[tuple[str, str, str], int] = {}
        self.placement_failures: dict[str, int] = {}
        self.rollout_steps: dict[str, int] = {}
        self.reverts: dict[str, int] = {}
        self.sync_counts = [0] * (len(self.buckets) + 1)   # per bucket; the last is +Inf
        self.sync_sum = 0.0
        self.sync_count = 0

    # --- recording (plain increments) ------------------------------------------------------

    def event(self, e: Event) -> None:
        """Count an event and what it stands for (starts, restarts, placements, reverts)."""
        self.events[e.kind] = self.events.get(e.kind, 0) + 1
        svc = e.service or ""
        bucket = {"started": self.starts, "restarted": self.restarts, "start-failed": self.start_failures,
                  "pending": self.placement_failures, "rollout": self.rollout_steps, "revert": self.reverts}.get(e.kind)
        if bucket is not None and e.service is not None:
            bucket[svc] = bucket.get(svc, 0) + 1
        if e.kind == "restarted" and e.service is not None:
            self.starts[svc] = self.starts.get(svc, 0) + 1

    def exit(self, service: str, reason: str) -> None:
        key = (service, reason)
        self.exits[key] = self.exits.get(key, 0) + 1

    def probe(self, service: str, probe: str, ok: bool) -> None:
        key = (service, probe, "success" if ok else "failure")
        self.probes[key] = self.probes.get(key, 0) + 1

    def sync_done(self, seconds: float) -> None:
        self.sync_counts[bisect_left(self.buckets, seconds)] += 1
        self.sync_sum += seconds
        self.sync_count += 1

    # --- scrape ----------------------------------------------------------------------------

    def render(self, status: Mapping[str, Any], *, event_write_failures: int = 0, events_dropped: int = 0) -> bytes:
        out: list[str] = []

        def family(name: str, kind: str, help_: str) -> None:
            out.append(f"# HELP {name} {help_}")
            out.append(f"# TYPE {name} {kind}")

        def counter(name: str, help_: str, values: Mapping[Any, int], *label_names: str) -> None:
            family(name, "counter", help_)
            for key, n in sorted(values.items()):
                key = key if isinstance(key, tuple) else (key,)
                out.append(f"{name}{_labels(**dict(zip(label_names, key)))} {n}")

        services = [s for s in status.get("services", ()) if isinstance(s, Mapping)]
        family("meshlet_supervisor_replicas", "gauge", "Replicas by service and state.")
        for s in services:
            counts = {st: 0 for st in REPLICA_STATES}
            for i in s.get("instances", ()):
                st = str(i.get("state"))
                counts[st] = counts.get(st, 0) + 1
            for st, n in counts.items():
                out.append(f"meshlet_supervisor_replicas{_labels(service=s['name'], state=st)} {n}")
        family("meshlet_supervisor_replicas_desired", "gauge", "Replicas the applied document asks for.")
        for s in services:
            out.append(f"meshlet_supervisor_replicas_desired{_labels(service=s['name'])} {int(s.get('desired') or 0)}")
        family("meshlet_supervisor_replicas_ready", "gauge", "Replicas ready (passing their readiness probe).")
        for s in services:
            out.append(f"meshlet_supervisor_replicas_ready{_labels(service=s['name'])} {int(s.get('ready') or 0)}")

        counter("meshlet_supervisor_replica_starts_total", "Replicas started, restarts included.",
                self.starts, "service")
        counter("meshlet_supervisor_restarts_total", "Replicas started again after an exit (with back-off).",
                self.restarts, "service")
        counter("meshlet_supervisor_replica_exits_total", "Replica exits by reason "
                "(completed: code 0; crashed: another code; killed: a failed probe; stopped: by the supervisor).",
                self.exits, "service", "reason")
        counter("meshlet_supervisor_start_failures_total", "Starts the runtime refused.", self.start_failures,
                "service")
        counter("meshlet_supervisor_probe_results_total", "Probe attempts by service, probe and result.",
                self.probes, "service", "probe", "result")
        counter("meshlet_supervisor_placement_failures_total",
                "Times a replica could not be placed on any node (once per new reason).",
                self.placement_failures, "service")

        family("meshlet_supervisor_rollout_progress_ratio", "gauge",
               "Updated replicas over desired ones of the service's rollout (1 when complete).")
        phases: list[str] = []
        for s in services:
            r = s.get("rollout")
            if not isinstance(r, Mapping) or "updated" not in r:
                continue
            want = r.get("replicas") or 0
            ratio = min(r["updated"], want) / want if want else 1.0
            out.append(f"meshlet_supervisor_rollout_progress_ratio{_labels(service=s['name'])} {_num(round(ratio, 6))}")
            for ph in PHASES:
                phases.append(f"meshlet_supervisor_rollout_phase{_labels(service=s['name'], phase=ph)} "
                              f"{1 if r.get('phase') == ph else 0}")
        family("meshlet_supervisor_rollout_phase", "gauge", "1 for the phase the service's rollout is in.")
        out += phases
        counter("meshlet_supervisor_rollout_steps_total", "Rollout steps and phase changes.", self.rollout_steps,
                "service")
        counter("meshlet_supervisor_rollout_reverts_total", "Rollouts reverted automatically.", self.reverts,
                "service")

        family("meshlet_supervisor_sync_duration_seconds", "histogram", "Time of one reconcile of one service.")
        acc = 0
        for le, c in zip(self.buckets, self.sync_counts):
            acc += c
            out.append(f'meshlet_supervisor_sync_duration_seconds_bucket{{le="{float(le)!r}"}} {acc}')
        out.append(f'meshlet_supervisor_sync_duration_seconds_bucket{{le="+Inf"}} {self.sync_count}')
        out.append(f"meshlet_supervisor_sync_duration_seconds_sum {_num(self.sync_sum)}")
        out.append(f"meshlet_supervisor_sync_duration_seconds_count {self.sync_count}")

        nodes = [n for n in status.get("nodes", ()) if isinstance(n, Mapping)]
        family("meshlet_supervisor_node_state", "gauge", "1 for the state each node is in.")
        for n in nodes:
            for st in NODE_STATES:
                out.append(f"meshlet_supervisor_node_state{_labels(node=n['name'], state=st)} "
                           f"{1 if n.get('state') == st else 0}")
        for flag in ("cordoned", "draining"):
            family(f"meshlet_supervisor_node_{flag}", "gauge", f"1 while the node is {flag}.")
            for n in nodes:
                out.append(f"meshlet_supervisor_node_{flag}{_labels(node=n['name'])} {1 if n.get(flag) else 0}")
        for what, help_ in (("allocated", "requested by the replicas placed there"),
                            ("room", "the node offers (capacity less its reserve; none: unbounded)")):
            family(f"meshlet_supervisor_node_{what}_cpu", "gauge", f"CPUs {help_}.")
            for n in nodes:
                v = (n.get(what) or {}).get("cpu")
                if isinstance(v, (int, float)):
                    out.append(f"meshlet_supervisor_node_{what}_cpu{_labels(node=n['name'])} {_num(v)}")
            family(f"meshlet_supervisor_node_{what}_memory_bytes", "gauge", f"Memory {help_}, in bytes.")
            for n in nodes:
                v = (n.get(what) or {}).get("memory")
                if isinstance(v, (int, float)):
                    out.append(f"meshlet_supervisor_node_{what}_memory_bytes{_labels(node=n['name'])} {_num(v)}")

        counter("meshlet_supervisor_events_total", "Events recorded, by kind.", self.events, "kind")
        family("meshlet_supervisor_event_write_failures_total", "counter",
               "Batches of events the catalog refused (written again later).")
        out.append(f"meshlet_supervisor_event_write_failures_total {event_write_failures}")
        family("meshlet_supervisor_events_dropped_total", "counter", "Events lost before they were stored.")
        out.append(f"meshlet_supervisor_events_dropped_total {events_dropped}")
        out.append("")
        return "\n".join(out).encode()
