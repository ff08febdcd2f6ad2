"""Events and the supervisor's metrics without sockets: redaction, the chunked layout in
the catalog (which chunks a flush writes and deletes), selection, the in-memory log, and
the Prometheus text checked by the Prometheus project's own parser."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client.parser import text_string_to_metric_families

import config
from supervisor.core.events import (MAX_TEXT, Event, format_event, plan_flush, read_chunk, redact,
                                    select)
from supervisor.daemon.events import EventLog
from supervisor.daemon.metrics import SupervisorMetrics


@pytest.mark.parametrize("text, secrets, want", [
    pytest.param("web-0 exited with code 1 (crashed)", (), "web-0 exited with code 1 (crashed)", id="plain"),
    pytest.param("cannot start: env DB_PASSWORD=hunter2 HOST=x", (), "cannot start: env DB_PASSWORD=<masked> HOST=x",
                 id="assignment"),
    pytest.param('spec {"API_KEY": "abc123", "PORT": "80"}', (), 'spec {"API_KEY": "<masked>", "PORT": "80"}',
                 id="json"),
    pytest.param("header Authorization: Bearer eyJhbGciOi.x.y", (), "header Authorization: <masked>",
                 id="bearer"),
    pytest.param("token: s3cr3t-value here", (), "token: <masked> here", id="colon"),
    pytest.param("failed: value hunter22 echoed", ("hunter22",), "failed: value <masked> echoed", id="known-value"),
    pytest.param("short abc stays", ("abc",), "short abc stays", id="too-short-to-mask"),
    pytest.param("keyboard=yes monkey=1", (), "keyboard=yes monkey=1", id="not-secret-names"),
])
def test_redact(text, secrets, want):
    assert redact(text, secrets) == want


def test_redact_cuts_long_text():
    out = redact("x" * (MAX_TEXT * 2))
    assert len(out) == MAX_TEXT and out.endswith("…")


def ev(seq: int, service: str = "web", kind: str = "started") -> Event:
    return Event(seq, 1000.0 + seq, kind, f"event {seq}", service, f"{service}-0", "local")


# chunk 3, keep 2 chunks: events 0-2 chunk 0, 3-5 chunk 1, 6-8 chunk 2 ...
@pytest.mark.parametrize("held, stored_seq, stored_chunks, writes, deletes", [
    pytest.param(range(0, 2), -1, (), {0: [0, 1]}, (), id="first-flush"),
    pytest.param(range(0, 3), 1, (0,), {0: [0, 1, 2]}, (), id="chunk-rewritten-whole"),
    pytest.param(range(0, 5), 2, (0,), {1: [3, 4]}, (), id="next-chunk-only"),
    pytest.param(range(0, 7), 5, (0, 1), {2: [6]}, (0,), id="oldest-falls-off"),
    pytest.param(range(0, 12), -1, (), {2: [6, 7, 8], 3: [9, 10, 11]}, (), id="outage-writes-only-kept-chunks"),
    pytest.param(range(3, 9), 8, (1, 2), {}, (), id="nothing-new"),
    pytest.param(range(10, 16), 14, (0, 1, 2, 3, 4), {5: [15]}, (0, 1, 2, 3), id="many-old-chunks-deleted"),
])
def test_plan_flush(held, stored_seq, stored_chunks, writes, deletes):
    plan = plan_flush([ev(i) for i in held], stored_seq, stored_chunks, chunk=3, keep_chunks=2)
    assert {c: [e.seq for e in evs] for c, evs in plan.writes.items()} == writes
    assert plan.deletes == deletes


def test_plan_flush_worked_example():
    events = [ev(i) for i in range(9_990, 10_005)]
    plan = plan_flush(events, 9_999, range(50))
    assert list(plan.writes) == [50] and [e.seq for e in plan.writes[50]] == list(range(10_000, 10_005))
    assert plan.deletes == (0,)


def test_events_round_trip_and_bad_chunks():
    e = ev(7)
    assert Event.from_json(e.to_json()) == e
    raw = ("[" + ",".join(['{"seq": 1, "at": 2, "kind": "node", "text": "node a lost", "node": "a"}',
                           '{"seq": -1, "at": 2, "kind": "x", "text": "y"}', '"nonsense"']) + "]").encode()
    got, problems = read_chunk("meshlet/events/000000000000", raw)
    assert [g.seq for g in got] == [1] and got[0].node == "a" and got[0].service is None
    assert len(problems) == 2 and "seq" in problems[0] and "[2]" in problems[1]
    assert read_chunk("k", b"{")[1][0].startswith("k: not JSON")
    assert "expected a list" in read_chunk("k", b"{}")[1][0]


def test_keys():
    assert config.events_key(12) == "meshlet/events/000000000012"
    assert config.split_events_key(config.events_key(12)) == 12
    assert config.split_events_key("meshlet/events/x") is None
    assert config.split_events_key("meshlet/services/web") is None


def test_select_and_format():
    events = [ev(0, "web"), ev(1, "db", "exited"), ev(2, "web", "ready"), ev(3, "web", "exited")]
    assert [e.seq for e in select(events, service="web")] == [0, 2, 3]
    assert [e.seq for e in select(events, since=1)] == [2, 3]
    assert [e.seq for e in select(events, kinds=["exited"])] == [1, 3]
    assert [e.seq for e in select(events, limit=2)] == [2, 3]
    line = format_event(Event(0, 0.0, "node", "node a lost", node="a").to_json(), utc=True)
    assert line == "1970-01-01 00:00:00  node         node/a  node a lost"
    assert "service/web" in format_event(Event(1, 0.0, "pending", "p", service="web").to_json())


def test_event_log_in_memory_is_bounded_and_wakes_waiters():
    async def main() -> None:
        now = [100.0]
        log = EventLog(None, clock=lambda: now[0], keep=5, chunk=5)
        await log.load()
        for i in range(7):
            log.add("started", f"started web-{i} with PASSWORD=x1", service="web", instance=f"web-{i}")
        assert [e.seq for e in log.events] == [2, 3, 4, 5, 6] and log.last_seq == 6
        assert all("x1" not in e.text for e in log.events)
        assert log.dropped == 2            # never stored (no catalog): lost when they fell off
        assert not await log.wait(6, 0.01)
        waiter = asyncio.create_task(log.wait(6, 5.0))
        await asyncio.sleep(0)
        log.add("node", "node a lost", node="a")
        assert await waiter
        assert log.recent_lines(1)[0].endswith(" node a lost")
    asyncio.run(main())


def test_metrics_render_parses():
    m = SupervisorMetrics()
    for kind, svc in (("started", "web"), ("started", "web"), ("restarted", "web"), ("pending", "db"),
                      ("revert", "web"), ("node", None)):
        m.event(Event(0, 0.0, kind, "x", svc))
    m.exit("web", "crashed")
    m.probe("web", "readiness", True)
    m.probe("web", "readiness", False)
    for s in (0.0005, 0.003, 0.2, 100.0):
        m.sync_done(s)
    status = {
        "services": [{"name": "web", "desired": 3, "ready": 1,
                      "instances": [{"state": "ready"}, {"state": "starting"}, {"state": "terminating"}],
                      "rollout": {"phase": "progressing", "updated": 1, "replicas": 3}},
                     {"name": 'we"ird', "desired": 0, "ready": 0, "instances": [], "rollout": None}],
        "nodes": [{"name": "a", "state": "lost", "cordoned": True, "draining": False,
                   "allocated": {"cpu": 0.5, "memory": 2**20}, "room": {"cpu": None, "memory": None}}],
    }
    text = m.render(status, event_write_failures=2, events_dropped=1).decode()
    fams = {f.name: f for f in text_string_to_metric_families(text)}

    def value(name: str, **labels: str) -> float:
        family = next(f for f in fams.values() if any(s.name == name for s in f.samples))
        return next(s.value for s in family.samples if s.name == name and all(s.labels.get(k) == v
                                                                               for k, v in labels.items()))
    assert fams["meshlet_supervisor_replicas"].type == "gauge"
    assert value("meshlet_supervisor_replicas", service="web", state="ready") == 1
    assert value("meshlet_supervisor_replicas", service="web", state="exited") == 0
    assert value("meshlet_supervisor_replicas_desired", service='we"ird') == 0
    assert value("meshlet_supervisor_replica_starts_total", service="web") == 3     # restarts too
    assert value("meshlet_supervisor_restarts_total", service="web") == 1
    assert value("meshlet_supervisor_replica_exits_total", service="web", reason="crashed") == 1
    assert value("meshlet_supervisor_probe_results_total", service="web", probe="readiness", result="failure") == 1
    assert value("meshlet_supervisor_placement_failures_total", service="db") == 1
    assert value("meshlet_supervisor_rollout_reverts_total", service="web") == 1
    assert abs(value("meshlet_supervisor_rollout_progress_ratio", service="web") - 1 / 3) < 1e-6
    assert value("meshlet_supervisor_rollout_phase", service="web", phase="progressing") == 1
    assert value("meshlet_supervisor_rollout_phase", service="web", phase="complete") == 0
    assert fams["meshlet_supervisor_sync_duration_seconds"].type == "histogram"
    assert value("meshlet_supervisor_sync_duration_seconds_count") == 4
    assert value("meshlet_supervisor_sync_duration_seconds_bucket", le="0.001") == 1
    assert value("meshlet_supervisor_sync_duration_seconds_bucket", le="+Inf") == 4
    assert value("meshlet_supervisor_node_state", node="a", state="lost") == 1
    assert value("meshlet_supervisor_node_state", node="a", state="ready") == 0
    assert value("meshlet_supervisor_node_cordoned", node="a") == 1
    assert value("meshlet_supervisor_node_allocated_memory_bytes", node="a") == 2**20
    assert not any(s.name == "meshlet_supervisor_node_room_cpu" for f in fams.values() for s in f.samples)
    assert value("meshlet_supervisor_events_total", kind="node") == 1
    assert value("meshlet_supervisor_event_write_failures_total") == 2
    # conventions: counters end in _total, units are base units
    for f in fams.values():
        if f.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in f.samples), f.name
        assert f.name.startswith("meshlet_supervisor_")
