"""Events over a real supervisor and catalog: structured, served by the admin API (long
poll), printed by `meshlet events` (-f in a real process), stored in the catalog in
batches and read back by the next supervisor; no secret in any of them. And /metrics,
read with the Prometheus project's parser."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

import config
from _util import REPO, async_wait_for
from supervisor.cli import main as meshlet_main
from supervisor.daemon.admin import AdminServer

pytestmark = pytest.mark.slow   # real processes, sockets or engines (tests/conftest.py)

SECRET = "hunter2-very-secret"
READY = "probes: {readiness: {http: {path: /ready}, period: 0.1s}}\n"


async def _events(http: aiohttp.ClientSession, base: str, **query: str) -> dict:
    async with http.get(base + "/v1/events", params=query) as r:
        assert r.status == 200, await r.text()
        return await r.json()


def _cli(*argv: str) -> tuple[int, str, str]:
    import io
    out, err = io.StringIO(), io.StringIO()
    code = meshlet_main(list(argv), out=out, err=err)
    return code, out.getvalue(), err.getvalue()


async def test_events_are_structured_followed_and_survive_a_restart(mesh):
    await mesh.apply(mesh.service_yaml(replicas=1, probes=READY,
                                       extra="restart: {backoff: {initial: 0.2s, max: 1s}}\n").replace(
        f"env: {{MARKERS: {mesh.markers}}}", f"env: {{MARKERS: {mesh.markers}, DB_PASSWORD: {SECRET}}}"))
    sup = await mesh.start()
    server = AdminServer(sup, on_down=lambda: None)
    bound = await server.start("127.0.0.1:0")
    base = f"http://{bound}"
    follower = None
    try:
        async with aiohttp.ClientSession() as http:
            async def ready_event():
                doc = await _events(http, base, service="web")
                return [e for e in doc["events"] if e["kind"] == "ready"]
            ready = (await async_wait_for(ready_event, timeout=20))[0]
            iid = ready["instance"]
            assert ready["service"] == "web" and ready["node"] == "local" and iid.startswith("web-0-")
            started = [e for e in (await _events(http, base, service="web"))["events"] if e["kind"] == "started"]
            assert started and started[0]["instance"] == iid and "new replica" in started[0]["text"]

            # `meshlet events -f` in its own process, then a crash: exit, restart (back-off), ready
            follower = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "supervisor", "events", "-f", "--service", "web", "--json",
                "--admin", bound, cwd=str(REPO), stdout=asyncio.subprocess.PIPE)
            seen: list[dict] = []

            async def read_until(pred, timeout):
                async def step():
                    while not any(pred(e) for e in seen):
                        line = await follower.stdout.readline()
                        assert line, "meshlet events -f ended"
                        seen.append(json.loads(line))
                    return True
                await asyncio.wait_for(step(), timeout)
            await read_until(lambda e: e["kind"] == "ready" and e["instance"] == iid, 15)   # the kept ones first
            os.kill(mesh.running("web")[iid].pid, signal.SIGKILL)
            await read_until(lambda e: e["kind"] == "exited" and e["instance"] == iid, 15)
            await read_until(lambda e: e["kind"] == "restarted", 15)
            await read_until(lambda e: e["kind"] == "ready" and e["instance"] != iid, 15)
            exited = next(e for e in seen if e["kind"] == "exited")
            assert "crashed" in exited["text"]
            restarted = next(e for e in seen if e["kind"] == "restarted")
            assert "restart #1" in restarted["text"] and "back-off" in restarted["text"]
            assert all(e["service"] == "web" for e in seen)

            # the printed table, and bad input named
            code, out, err = await asyncio.to_thread(_cli, "events", "--admin", bound, "--service", "web",
                                                     "--kind", "exited")
            assert code == 0, err
            assert len(out.splitlines()) == 1 and "  exited  " in out and f"  {iid}  " in out, out
            async with http.get(base + "/v1/events", params={"since": "soon"}) as r:
                assert r.status == 400 and "since" in (await r.json())["error"]
            async with http.get(base + "/v1/events", params={"wait": "forever"}) as r:
                assert r.status == 400 and "wait" in (await r.json())["error"]

            # a long poll answers when an event comes, and only with the newer ones
            last = (await _events(http, base))["last"]
            poll = asyncio.create_task(_events(http, base, since=str(last), wait="20s"))
            await asyncio.sleep(0.2)
            assert not poll.done()
            sup.note("node local cordoned", kind="node", node="local")
            got = await asyncio.wait_for(poll, 5)
            assert [e["text"] for e in got["events"]] == ["node local cordoned"]

            # metrics
            async with http.get(base + "/metrics") as r:
                assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
                fams = {f.name: f for f in text_string_to_metric_families(await r.text())}

            def sample(name, **labels):
                return next(s.value for f in fams.values() for s in f.samples
                            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))
            assert sample("meshlet_supervisor_replicas", service="web", state="ready") == 1
            assert sample("meshlet_supervisor_restarts_total", service="web") == 1
            assert sample("meshlet_supervisor_replica_exits_total", service="web", reason="crashed") == 1
            assert sample("meshlet_supervisor_probe_results_total", service="web", probe="readiness",
                          result="success") >= 2
            assert sample("meshlet_supervisor_sync_duration_seconds_count") >= 1
            assert sample("meshlet_supervisor_node_state", node="local", state="ready") == 1

        # batches: a burst of 450 events is a few writes, not 450
        flushes = []
        original = sup.event_log.flush

        async def counting():
            flushes.append(1)
            return await original()
        sup.event_log.flush = counting
        for i in range(450):
            sup.note(f"rollout web: burst {i}", kind="rollout", service="web")
        await async_wait_for(lambda: sup.event_log.stored_seq == sup.event_log.last_seq, timeout=10)
        assert len(flushes) <= 3, flushes
        last = sup.event_log.last_seq
    finally:
        if follower is not None and follower.returncode is None:
            follower.kill()
            await follower.wait()
        await server.close()

    # stored in the catalog, no secret anywhere, and read back after a restart
    await sup.close(stop=False)
    _, entries = await mesh.client.kv.get(config.EVENTS_PREFIX, recurse=True)
    assert entries and all(config.split_events_key(e["Key"]) is not None for e in entries)
    stored = b"".join(e["Value"] for e in entries)
    assert SECRET.encode() not in stored
    assert len(entries) == last // 200 + 1

    sup2 = await mesh.start()
    assert sup2.event_log.last_seq >= last
    assert [e.seq for e in sup2.event_log.select(since=last - 3)][:3] == [last - 2, last - 1, last]
    assert any(e.kind == "exited" for e in sup2.event_log.events)
    server = AdminServer(sup2, on_down=lambda: None)
    bound = await server.start("127.0.0.1:0")
    try:
        code, out, _ = await asyncio.to_thread(_cli, "events", "--admin", bound, "--tail", "3", "--json")
        assert code == 0
        seqs = [json.loads(line)["seq"] for line in out.splitlines()]
        assert len(seqs) == 3 and seqs == sorted(seqs) and seqs[-1] == sup2.event_log.last_seq
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://{bound}/v1/events", params={"limit": "10000"}) as r:
                assert SECRET not in await r.text()
    finally:
        await server.close()
