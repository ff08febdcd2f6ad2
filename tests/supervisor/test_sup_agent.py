"""The Supervisor against a real catalog, running real processes (process runtime)."""

from __future__ import annotations

import pytest

import os
import signal

import aiohttp

from _util import async_wait_for

pytestmark = pytest.mark.slow   # real processes, sockets or engines (tests/conftest.py)


async def get(port: int, path: str = "/") -> tuple[int, str]:
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{port}{path}") as r:
            return r.status, await r.text()


READY = """\
probes:
  readiness: {http: {path: /ready}, period: 0.1s, failure_threshold: 1}
"""


async def test_replicas_come_up_registered_and_heal_after_kill9(mesh):
    await mesh.apply(mesh.service_yaml(replicas=2, probes=READY))
    sup = await mesh.start()
    await async_wait_for(lambda: _len_eq(mesh.passing("web"), 2), timeout=15)
    running = mesh.running("web")
    assert sorted(o.slot for o in running.values()) == [0, 1]
    for iid, o in running.items():
        status, body = await get(o.ports["http"])
        assert status == 200 and body.strip() == iid   # MESHLET_INSTANCE reached the app
    _, entries = await mesh.client.health.service("web")
    svc = entries[0]["Service"]
    assert svc["Meta"]["slot"] in ("0", "1") and svc["Meta"]["weight"] == "1"
    assert svc["Meta"]["port_http"] == str(svc["Port"])
    assert [c["CheckID"] for c in entries[0]["Checks"] if c["CheckID"].startswith("service:")] == \
        [f"service:{svc['ID']}"]

    victim_id, victim = sorted(running.items(), key=lambda kv: kv[1].slot)[0]
    os.kill(victim.pid, signal.SIGKILL)

    async def replaced():
        now = mesh.running("web")
        passing = await mesh.passing("web")
        return (len(now) == 2 and victim_id not in now and sorted(passing) == sorted(now)
                and sorted(o.slot for o in now.values()) == [0, 1])
    await async_wait_for(replaced, timeout=15)
    new_id = next(i for i, o in mesh.running("web").items() if o.slot == victim.slot)
    assert (await get(mesh.running("web")[new_id].ports["http"]))[1].strip() == new_id
    assert victim_id not in await mesh.health("web"), "the dead replica is deregistered"
    assert sup.backoff[("web", victim.slot)].restarts == 1


async def _len_eq(coro, n):
    return len(await coro) == n


async def test_failing_readiness_goes_critical_without_restart(mesh):
    await mesh.apply(mesh.service_yaml(replicas=1, probes=READY))
    await mesh.start()
    await async_wait_for(lambda: _len_eq(mesh.passing("web"), 1), timeout=15)
    (iid, obs), = mesh.running("web").items()
    (mesh.markers / "unready").touch()
    await async_wait_for(lambda: _status_is(mesh, iid, "critical"), timeout=5)
    (mesh.markers / "unready").unlink()
    await async_wait_for(lambda: _status_is(mesh, iid, "passing"), timeout=5)
    (iid2, obs2), = mesh.running("web").items()
    assert (iid2, obs2.pid) == (iid, obs.pid), "readiness never restarts"


async def _status_is(mesh, iid, status):
    return (await mesh.health("web")).get(iid) == status


async def test_failing_liveness_restarts_with_growing_backoff(mesh):
    probes = READY + ("  liveness: {http: {path: /live}, initial_delay: 0.5s, period: 0.1s, "
                       "failure_threshold: 1}\n")
    extra = "restart: {backoff: {initial: 0.4s, max: 1.6s}}\n"
    (mesh.markers / "dead").touch()
    await mesh.apply(mesh.service_yaml(replicas=1, probes=probes, extra=extra))
    sup = await mesh.start()
    await async_wait_for(lambda: sum(kind == "started" for _, kind, _ in sup.history) >= 4, timeout=20)
    starts = [t for t, kind, _ in sup.history if kind == "started"]
    kills = [t for t, kind, _ in sup.history if kind == "killed"]
    assert len(kills) >= 3 and len(starts) >= 4
    # the wait between a kill and the next start grows: 0, 0.4, 0.8 s (+ the stop itself)
    gaps = [s - k for k, s in zip(kills, starts[1:])]
    assert gaps[1] >= 0.4 and gaps[2] >= 0.8 and gaps[2] > gaps[0]
    (mesh.markers / "dead").unlink()
    await async_wait_for(lambda: _len_eq(mesh.passing("web"), 1), timeout=15)


async def test_scale_up_and_down_by_reapplying(mesh):
    await mesh.apply(mesh.service_yaml(replicas=1, probes=READY))
    await mesh.start()
    await async_wait_for(lambda: _len_eq(mesh.passing("web"), 1), timeout=15)
    first = set(mesh.running("web"))
    await mesh.apply(mesh.service_yaml(replicas=3, probes=READY))
    await async_wait_for(lambda: _len_eq(mesh.passing("web"), 3), timeout=15)
    assert first <= set(mesh.running("web")), "scaling up keeps the running replica"
    await mesh.apply(mesh.service_yaml(replicas=1, probes=READY))
    await async_wait_for(lambda: _len_eq(mesh.health("web"), 1), timeout=15)
    await async_wait_for(lambda: len(mesh.running("web")) == 1, timeout=15)
    assert {o.slot for o in mesh.running("web").values()} == {0}
    assert set(mesh.running("web")) == first, "scaling down stops the highest slots"


async def test_a_service_removed_from_the_file_is_stopped_and_deregistered(mesh):
    await mesh.apply(mesh.service_yaml(replicas=2, probes=READY))
    await mesh.start()
    await async_wait_for(lambda: _len_eq(mesh.passing("web"), 2), timeout=15)
    pids = [o.pid for o in mesh.running("web").values()]
    await mesh.apply(mesh.service_yaml(name="other", replicas=0))   # prune: web is gone
    await async_wait_for(lambda: not mesh.running("web"), timeout=15)
    assert await mesh.health("web") == {}
    for pid in pids:
        await async_wait_for(lambda: not os.path.exists(f"/proc/{pid}") or
                             open(f"/proc/{pid}/stat").read().rpartition(")")[2].split()[0] == "Z",
                             timeout=10)


async def test_a_registration_lost_by_the_catalog_comes_back(mesh):
    await mesh.apply(mesh.service_yaml(replicas=1, probes=READY))
    await mesh.start()
    await async_wait_for(lambda: _len_eq(mesh.passing("web"), 1), timeout=15)
    (iid, obs), = mesh.running("web").items()
    await mesh.client.agent.service.deregister(iid)
    assert await mesh.health("web") == {}
    await async_wait_for(lambda: _status_is(mesh, iid, "passing"), timeout=10)
    assert mesh.running("web")[iid].pid == obs.pid


async def test_an_unreadable_document_keeps_the_last_good_spec(mesh, caplog):
    await mesh.apply(mesh.service_yaml(replicas=1, probes=READY))
    await mesh.start()
    await async_wait_for(lambda: _len_eq(mesh.passing("web"), 1), timeout=15)
    before = set(mesh.running("web"))
    await mesh.client.kv.put("meshlet/services/web", b"{not json")
    await async_wait_for(lambda: "ignoring unreadable meshlet/services/web" in caplog.text, timeout=10)
    await async_wait_for(lambda: not mesh.sup.busy(), timeout=10)   # any sync it caused is over
    assert set(mesh.running("web")) == before
    assert await mesh.passing("web") == sorted(before)


async def test_replicas_spread_over_two_nodes(mesh):
    import config
    from supervisor.daemon.supervisor import Supervisor
    await mesh.apply(mesh.service_yaml(replicas=2, probes=READY))
    nodes = [config.NodeSpec(name="a", runtime="process"), config.NodeSpec(name="b", runtime="process")]
    mesh.sup = Supervisor(mesh.access, nodes, mesh.data_dir, resync=1.0)
    await mesh.sup.start()
    await async_wait_for(lambda: _len_eq(mesh.passing("web"), 2), timeout=15)
    assert sorted(o.node for o in mesh.running("web").values()) == ["a", "b"]
    _, entries = await mesh.client.health.service("web")
    assert sorted(e["Service"]["Meta"]["node"] for e in entries) == ["a", "b"]


async def test_closing_while_starting_leaves_nothing_running(mesh):
    await mesh.apply(mesh.service_yaml(replicas=4))
    sup = await mesh.start()
    # close as soon as the first replica runs: the sync is cut off among its starts
    await async_wait_for(lambda: len(sup.instances) >= 1, timeout=10, interval=0.001)
    await sup.close(stop=True)
    mesh.sup = None
    from supervisor.runtime import ProcessRuntime
    rt = ProcessRuntime(mesh.data_dir / "nodes" / "local", node="local")
    try:
        assert [o.instance_id for o in await rt.list() if o.is_running] == []
    finally:
        await rt.close()
    assert await mesh.health("web") == {}


async def test_startup_exec_probe_holds_readiness_off(mesh):
    probes = f"""\
        probes:
          startup: {{exec: {{command: [test, -f, {mesh.markers / 'started'}]}}, period: 0.1s, failure_threshold: 600}}
          readiness: {{http: {{path: /ready}}, period: 0.1s}}
        """
    await mesh.apply(mesh.service_yaml(replicas=1, probes=probes))
    sup = await mesh.start()
    await async_wait_for(lambda: len(mesh.running("web")) == 1, timeout=15)
    (iid, _), = mesh.running("web").items()
    await async_wait_for(lambda: _status_is(mesh, iid, "critical"), timeout=10)
    # the app answers /ready, but until the startup probe passes it is not ready
    await async_wait_for(lambda: sup.instances[iid].prober.last.get("startup", "").startswith("exec exit 1"),
                         timeout=10)
    assert await _status_is(mesh, iid, "critical")
    (mesh.markers / "started").touch()
    await async_wait_for(lambda: _status_is(mesh, iid, "passing"), timeout=10)


async def test_restart_policy_never_leaves_the_replica_exited(mesh):
    await mesh.apply(mesh.service_yaml(replicas=1, probes=READY, extra="restart: {policy: never}\n"))
    sup = await mesh.start()
    await async_wait_for(lambda: _len_eq(mesh.passing("web"), 1), timeout=15)
    (iid, obs), = mesh.running("web").items()
    os.kill(obs.pid, signal.SIGKILL)
    await async_wait_for(lambda: _len_eq(mesh.health("web"), 0), timeout=10)
    await async_wait_for(lambda: not mesh.sup.busy(), timeout=10)
    (row,) = [s for s in sup.status()["services"] if s["name"] == "web"][0]["instances"]
    assert (row["id"], row["state"], row["exit_code"]) == (iid, "exited", 137)
    assert mesh.running("web") == {}


async def test_a_refused_start_backs_off_says_why_and_a_fixed_spec_runs_at_once(mesh):
    bad = f"""\
services:
  web:
    command: [{mesh.tmp / 'no-such-program'}]
    ports: [{{name: http}}]
    restart: {{backoff: {{initial: 10s, max: 30s}}}}
"""
    await mesh.apply(bad)
    sup = await mesh.start()
    began = sup.clock()
    await async_wait_for(lambda: sup.backoff.get(("web", 0)) is not None
                         and sup.backoff[("web", 0)].failures >= 2, timeout=20)
    # the runtime's refusal is the service's problem and the loop runs on; the second try
    # came after at least 1 s (not one attempt per sync), the third waits the back-off
    (web,) = [s for s in sup.status()["services"] if s["name"] == "web"]
    assert web["ready"] == 0 and "no-such-program" in web["problem"]
    assert sup.clock() - began >= 1.0
    hold = sup.start_holds[("web", 0)]
    assert hold - sup.clock() > 5.0
    # a fixed spec is started at once, not after the hold
    await mesh.apply(mesh.service_yaml(replicas=1, probes=READY))
    await async_wait_for(lambda: _len_eq(mesh.passing("web"), 1), timeout=8)
    assert sup.clock() < hold
    (web,) = [s for s in sup.status()["services"] if s["name"] == "web"]
    assert web["problem"] is None


async def test_unreadable_rollout_keys_are_logged_and_replaced(mesh, caplog):
    import json
    await mesh.client.kv.put("meshlet/rollout/web/history", b'[{"x": 1}]')
    await mesh.client.kv.put("meshlet/rollout/web/state", b"{not json")
    await mesh.client.kv.put("meshlet/rollout/web/control", b"[]")
    await mesh.apply(mesh.service_yaml(replicas=1, probes=READY))
    sup = await mesh.start()
    await async_wait_for(lambda: _len_eq(mesh.passing("web"), 1), timeout=15)
    assert "ignoring unreadable meshlet/rollout/web/history" in caplog.text
    assert "ignoring unreadable meshlet/rollout/web/state" in caplog.text

    async def settled():
        _, entry = await mesh.client.kv.get("meshlet/rollout/web/history")
        return [(e["number"], e["status"]) for e in json.loads(entry["Value"])] == [(1, "complete")]
    await async_wait_for(settled, timeout=10)
    assert sup.rollouts.states["web"].phase == "complete"
