"""Rolling updates end to end: the supervisor (process runtime, and a Docker engine) moves
3 replicas to a new revision while an aiohttp client sends steady load through the real
proxy (``python -m proxy``) to ``web.service.meshlet``; every non-200 counts as failed.

While a rollout runs, a sampler reads the catalog (``/v1/health/service``) and the running
replicas every few ms: never more than replicas + surge registered or running, never fewer
than replicas - unavailable passing (3 replicas, defaults 25%/25%: surge 1, unavailable 0).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest

import config
from _util import async_wait_for, cli_env, kill_leftovers, start_server, stop_process
from docker_env import TEST_IMAGE, build_test_images, docker_engine, docker_engines  # noqa: F401
from discovery.consul import instances_from_health
from supervisor.daemon.up import progress_lines

pytestmark = pytest.mark.slow   # real processes, sockets or engines (tests/conftest.py)

APPS = Path(__file__).resolve().parent / "apps"


REPLICAS = 3
READY = "{http: {path: /ready}, period: 0.1s, failure_threshold: 1}"


def web_yaml(mesh, *, env: dict[str, str] | None = None, command: list[str] | None = None,
             update: str = "", image: str | None = None, readiness: str = READY,
             grace: str = "2s", args: list[str] | None = None) -> str:
    env = {"MARKERS": str(mesh.markers), **(env or {})}
    if image:
        run = f"image: {image}" + (f"\n            args: {json.dumps(args)}" if args else "")
    else:
        run = f"command: {json.dumps(command or [sys.executable, str(APPS / 'flaky.py')])}"
    return textwrap.dedent(f"""\
        services:
          web:
            {run}
            replicas: {REPLICAS}
            ports: [{{name: http}}]
            env: {json.dumps(env)}
            update: {{drain_delay: 0s{update}}}
            stop_grace_period: {grace}
            restart: {{backoff: {{initial: 0.2s, max: 1s}}}}
            probes:
              readiness: {readiness}
        """)


# --------------------------------------------------------------------------- load and bounds


@dataclass
class Load:
    """Steady requests through the proxy from a few keep-alive workers."""
    port: int
    sent: int = 0
    failed: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    bodies: set[str] = field(default_factory=set)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task] = field(default_factory=list)

    async def _worker(self, session: aiohttp.ClientSession) -> None:
        url = f"http://127.0.0.1:{self.port}/"
        while not self._stop.is_set():
            self.sent += 1
            try:
                async with session.get(url, headers={"Host": "web.service.meshlet"}) as r:
                    body = await r.text()
                    if r.status != 200:
                        self._fail(f"HTTP {r.status}: {body[:80]!r}")
                    else:
                        self.bodies.add(body.strip())
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                self._fail(f"{type(exc).__name__}: {exc}"[:120])
            await asyncio.sleep(0.01)

    def _fail(self, why: str) -> None:
        self.failed += 1
        self.reasons[why] = self.reasons.get(why, 0) + 1

    async def __aenter__(self) -> Load:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
        self._tasks = [asyncio.create_task(self._worker(self._session)) for _ in range(4)]
        return self

    async def __aexit__(self, *exc) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._session.close()


@dataclass
class Bounds:
    """Samples the catalog during a rollout (registered and passing instances of web)."""
    client: object
    running: object              # () -> number of running replicas (runtime view)
    max_registered: int = 0
    max_running: int = 0
    min_passing: int = 10 ** 6
    samples: int = 0
    _stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def _run(self) -> None:
        while not self._stop.is_set():
            _, entries = await self.client.health.service("web")
            insts = instances_from_health(entries)
            self.max_registered = max(self.max_registered, len(insts))
            self.min_passing = min(self.min_passing, sum(i.status == "passing" for i in insts))
            self.max_running = max(self.max_running, self.running())
            self.samples += 1
            await asyncio.sleep(0.005)

    async def __aenter__(self) -> Bounds:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc) -> None:
        self._stop.set()
        await self._task


@pytest.fixture
def proxy(catalog):
    proc, ready = start_server([sys.executable, "-m", "proxy", "--consul", catalog.url,
                                "--listen", "127.0.0.1:0"], env=catalog.env())
    yield int(ready["http"][0].rpartition(":")[2])
    stop_process(proc)


@pytest.fixture
def proxy_admin(catalog):
    """(entry port, admin "host:port") of a proxy with its admin API (``/routes``)."""
    proc, ready = start_server([sys.executable, "-m", "proxy", "--consul", catalog.url,
                                "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"], env=catalog.env())
    yield int(ready["http"][0].rpartition(":")[2]), ready["admin"]
    stop_process(proc)


async def _serving(port: int, n: int, path: str = "/") -> bool:
    """n distinct instances answered through the proxy (the first line of the body names
    the instance: flaky.py's ``/``, the busybox image's ``/cgi-bin/env``)."""
    seen = set()
    async with aiohttp.ClientSession() as s:
        for _ in range(4 * n):
            async with s.get(f"http://127.0.0.1:{port}{path}", headers={"Host": "web.service.meshlet"}) as r:
                if r.status != 200:
                    return False
                seen.add((await r.text()).partition("\n")[0])
    return len(seen) >= n


def web_status(sup) -> dict:
    return next(s for s in sup.status()["services"] if s["name"] == "web")


async def _kv_json(mesh, key: str):
    _, entry = await mesh.client.kv.get(key)
    return json.loads(entry["Value"]) if entry else None


async def _up(mesh, proxy, text: str, sup=None, path: str = "/"):
    await mesh.apply(text)
    if sup is None:
        sup = await mesh.start()
    else:
        mesh.sup = sup
        await sup.start()
    await async_wait_for(lambda: _n_passing(mesh, REPLICAS), timeout=30)
    await async_wait_for(lambda: _serving(proxy, REPLICAS, path), timeout=15)
    await async_wait_for(lambda: "web" in sup.rollouts.states and _complete(mesh, sup), timeout=10)
    return sup


async def _complete(mesh, sup) -> bool:
    """The rollout is complete, and KV says so (state and history as the CLI reads them)."""
    state, history = sup.rollouts.states["web"], sup.rollouts.histories["web"]
    if state.phase != "complete":
        return False
    stored = (await _kv_json(mesh, config.rollout_key("web", "state")), await _kv_json(mesh, config.rollout_key("web", "history")))
    return list(stored) == json.loads(json.dumps([state.to_dict(), history]))


async def _n_passing(mesh, n):
    return len(await mesh.passing("web")) == n


def _revisions(mesh) -> list[str]:
    return sorted(o.revision for o in mesh.running("web").values())


# --------------------------------------------------------------------------- process runtime


@pytest.mark.parametrize("update, surge, unavailable", [
    pytest.param("", 1, 0, id="surge-first"),
    pytest.param(", max_surge: 0, max_unavailable: 1", 0, 1, id="kill-first"),
])
async def test_rollout_of_3_replicas_drops_nothing_and_keeps_the_bounds(mesh, proxy, update, surge,
                                                                        unavailable):
    drains = {"TERM_SERVE": "0.5"}     # the app serves on 0.5 s after SIGTERM, counting arrivals
    sup = await _up(mesh, proxy, web_yaml(mesh, env=drains, update=update))
    first = sup.rollouts.states["web"].revision
    old = set(mesh.running("web"))
    history = await _kv_json(mesh, config.rollout_key("web", "history"))
    assert [(e["number"], e["revision"], e["status"]) for e in history] == [(1, first, "complete")]
    async with Load(proxy) as load, Bounds(mesh.client, lambda: len(mesh.running("web"))) as bounds:
        await async_wait_for(lambda: load.sent > 20, timeout=10)
        await mesh.apply(web_yaml(mesh, env={"V": "2", **drains}, update=update))
        await async_wait_for(lambda: sup.rollouts.states["web"].revision != first, timeout=10)
        new = sup.rollouts.states["web"].revision
        status = web_status(sup)["rollout"]
        assert status["phase"] == "progressing" and status["revision"] == new and status["number"] == 2
        assert "updated" in status["progress"] and status["summary"].startswith("web: ")
        assert any("rollout progressing to #2: " in line for line in progress_lines(sup))   # meshlet up
        await async_wait_for(lambda: _complete(mesh, sup), timeout=60)
        await async_wait_for(lambda: _revisions(mesh) == [new] * REPLICAS, timeout=15)
        sent_at_end = load.sent
        await async_wait_for(lambda: load.sent > sent_at_end + 20, timeout=10)
    assert load.failed == 0, load.reasons
    assert load.sent > 100
    # no request reached an old replica after its SIGTERM: it had left the catalog and
    # the proxy before (deregistered first, then the drain delay)
    late = {iid: json.loads((mesh.markers / f"term-{iid}").read_text())["late"] for iid in old}
    assert late == {iid: 0 for iid in old}
    assert bounds.samples > 20
    assert bounds.max_running == REPLICAS + surge, bounds        # used, never exceeded
    assert bounds.max_registered <= REPLICAS + surge, bounds
    assert bounds.min_passing == REPLICAS - unavailable, bounds
    assert sorted(o.slot for o in mesh.running("web").values()) == [0, 1, 2]
    assert len(await mesh.passing("web")) == REPLICAS
    history = await _kv_json(mesh, config.rollout_key("web", "history"))
    assert [(e["revision"], e["status"]) for e in history] == [(first, "complete"), (new, "complete")]
    state = await _kv_json(mesh, config.rollout_key("web", "state"))
    assert (state["revision"], state["phase"]) == (new, "complete")
    assert web_status(sup)["rollout"]["progress"] == "3/3 updated"


async def test_a_revision_that_crashes_at_start_is_reverted_without_failures(mesh, proxy):
    sup = await _up(mesh, proxy, web_yaml(mesh))
    good = sup.rollouts.states["web"].revision
    before = set(mesh.running("web"))
    crash = [sys.executable, "-c", "import sys; sys.exit(3)"]
    async with Load(proxy) as load:
        await async_wait_for(lambda: load.sent > 20, timeout=10)
        await mesh.apply(web_yaml(mesh, command=crash))
        await async_wait_for(lambda: sup.rollouts.states["web"].revision != good, timeout=10)
        bad = sup.rollouts.states["web"].revision
        await async_wait_for(lambda: sup.rollouts.states["web"].revision == good
                             and _complete(mesh, sup), timeout=60)
        await async_wait_for(lambda: _revisions(mesh) == [good] * REPLICAS
                             and not sup.replicas.terminating, timeout=15)
    assert load.failed == 0, load.reasons
    assert set(mesh.running("web")) == before, "the old replicas never stopped"
    history = await _kv_json(mesh, config.rollout_key("web", "history"))
    assert [(e["number"], e["revision"], e["status"]) for e in history] == \
        [(2, bad, "failed"), (3, good, "complete")]
    state = sup.rollouts.states["web"]
    assert state.reverted_from == bad and ("exited" in state.reason or "restarted" in state.reason)
    assert "(last exit: code 3)" in state.reason, state.reason   # what the crashing command returned
    web = web_status(sup)
    assert f"reverted to {good}" in web["problem"] and bad in web["problem"], web["problem"]
    assert web["rollout"]["phase"] == "complete"
    # the document is still what was applied; a sync does not start the bad one again
    sup.enqueue("web")
    await async_wait_for(lambda: not sup.busy(), timeout=10)
    assert sup.rollouts.states["web"].revision == good


async def test_without_auto_revert_a_failed_rollout_stops_and_says_why(mesh, proxy):
    sup = await _up(mesh, proxy, web_yaml(mesh))
    good = sup.rollouts.states["web"].revision
    before = set(mesh.running("web"))
    crash = [sys.executable, "-c", "import sys; sys.exit(3)"]
    await mesh.apply(web_yaml(mesh, command=crash, update=", auto_revert: false"))
    await async_wait_for(lambda: sup.rollouts.states["web"].revision != good
                         and sup.rollouts.states["web"].phase == "failed", timeout=30)
    assert "auto_revert is off" in sup.rollouts.states["web"].reason
    assert "rollout failed" in web_status(sup)["problem"]
    # the old replicas keep serving, untouched; nothing else is retired
    await async_wait_for(lambda: _n_passing(mesh, REPLICAS), timeout=10)
    assert before <= set(mesh.running("web"))
    history = await _kv_json(mesh, config.rollout_key("web", "history"))
    assert [e["status"] for e in history] == ["complete", "failed"]


async def test_recreate_stops_the_old_revision_before_starting_the_new(mesh, proxy):
    sup = await _up(mesh, proxy, web_yaml(mesh, update=", strategy: recreate"))
    first = sup.rollouts.states["web"].revision
    mixed = []

    async def sample():
        while not done.is_set():
            revs = {o.revision for o in mesh.running("web").values()}
            mixed.append(len(revs) > 1 or len(mesh.running("web")) > REPLICAS)
            await asyncio.sleep(0.002)

    done = asyncio.Event()
    sampler = asyncio.create_task(sample())
    await mesh.apply(web_yaml(mesh, env={"V": "2"}, update=", strategy: recreate"))
    await async_wait_for(lambda: sup.rollouts.states["web"].revision != first
                         and _complete(mesh, sup), timeout=60)
    done.set()
    await sampler
    assert len(mixed) > 20 and not any(mixed), "never old and new side by side, never more than 3"
    assert set(_revisions(mesh)) == {sup.rollouts.states["web"].revision}


async def test_a_revision_never_ready_hits_the_progress_deadline_and_is_reverted(mesh, proxy):
    sup = await _up(mesh, proxy, web_yaml(mesh))
    good = sup.rollouts.states["web"].revision
    stuck = mesh.tmp / "stuck"
    stuck.mkdir()
    (stuck / "unready").touch()
    async with Load(proxy) as load:
        await async_wait_for(lambda: load.sent > 20, timeout=10)
        began = sup.clock()
        await mesh.apply(web_yaml(mesh, env={"MARKERS": str(stuck)}, update=", progress_deadline: 2s"))
        await async_wait_for(lambda: sup.rollouts.states["web"].revision != good, timeout=10)
        bad = sup.rollouts.states["web"].revision
        await async_wait_for(lambda: _complete(mesh, sup), timeout=30)
        await async_wait_for(lambda: _revisions(mesh) == [good] * REPLICAS
                             and not sup.replicas.terminating, timeout=15)
    assert sup.clock() - began >= 2.0
    assert load.failed == 0, load.reasons
    history = await _kv_json(mesh, config.rollout_key("web", "history"))
    assert (history[-2]["revision"], history[-2]["status"]) == (bad, "failed")
    assert (history[-1]["revision"], history[-1]["status"]) == (good, "complete")
    assert "progress_deadline" in sup.rollouts.states["web"].reason


async def test_pause_holds_a_rollout_and_resume_finishes_it(mesh, proxy):
    sup = await _up(mesh, proxy, web_yaml(mesh))
    first = sup.rollouts.states["web"].revision
    await mesh.apply(web_yaml(mesh, env={"V": "2"}, update=", min_ready: 1s"))
    await async_wait_for(lambda: sup.rollouts.states["web"].revision != first, timeout=10)
    await mesh.client.kv.put("meshlet/rollout/web/control",
                             json.dumps({"paused": True, "reason": "checking", "at": 1.0}))
    await async_wait_for(lambda: sup.rollouts.states["web"].phase == "paused", timeout=10)
    held = sorted(mesh.running("web"))
    await async_wait_for(lambda: not sup.busy(), timeout=10)
    assert "paused: checking" in web_status(sup)["problem"]
    await mesh.client.kv.put("meshlet/rollout/web/control",
                             json.dumps({"paused": False, "reason": "", "at": 2.0}))
    await async_wait_for(lambda: _complete(mesh, sup), timeout=60)
    assert sorted(mesh.running("web")) != held


async def test_a_restart_token_rolls_every_replica_without_a_spec_change(mesh, proxy):
    sup = await _up(mesh, proxy, web_yaml(mesh))
    first = sup.rollouts.states["web"].revision
    before = set(mesh.running("web"))
    await mesh.client.kv.put("meshlet/rollout/web/restart", json.dumps({"token": "t1", "at": 1.0}))
    await async_wait_for(lambda: sup.rollouts.states["web"].revision != first
                         and _complete(mesh, sup), timeout=60)
    await async_wait_for(lambda: not (set(mesh.running("web")) & before)
                         and len(mesh.running("web")) == REPLICAS, timeout=15)
    history = await _kv_json(mesh, config.rollout_key("web", "history"))
    assert history[-1]["restart_token"] == "t1" and history[-1]["status"] == "complete"


async def test_a_canary_step_weighs_the_old_replicas_then_promotes(mesh, proxy):
    sup = await _up(mesh, proxy, web_yaml(mesh))
    first = sup.rollouts.states["web"].revision
    seen: set[tuple[str, str]] = set()      # (Meta revision is first?, weight) during the rollout
    done = asyncio.Event()

    async def sample():
        while not done.is_set():
            _, entries = await mesh.client.health.service("web")
            for e in entries:
                seen.add((e["Service"]["Meta"]["revision"] == first, e["Service"]["Meta"]["weight"]))
            await asyncio.sleep(0.005)

    sampler = asyncio.create_task(sample())
    async with Load(proxy) as load:
        await mesh.apply(web_yaml(mesh, env={"V": "2"}, update=", canary: [{weight: 50, pause: 1s}]"))
        await async_wait_for(lambda: sup.rollouts.states["web"].revision != first
                             and _complete(mesh, sup), timeout=60)
    done.set()
    await sampler
    # 50% of 3 = 2 new replicas beside 1 old: each new one weight 1, the old one 2
    assert (True, "2") in seen and (False, "1") in seen, seen
    _, entries = await mesh.client.health.service("web")
    assert sorted(e["Service"]["Meta"]["weight"] for e in entries) == ["1"] * REPLICAS
    assert load.failed == 0, load.reasons


async def test_a_retired_replica_is_signalled_only_after_its_requests_in_flight_end(mesh, proxy_admin):
    port, admin = proxy_admin
    drains = {"TERM_SERVE": "0.2"}
    await mesh.apply(web_yaml(mesh, env=drains))
    sup = await mesh.start(proxy_admins=[admin])
    await async_wait_for(lambda: _n_passing(mesh, REPLICAS), timeout=30)
    await async_wait_for(lambda: _serving(port, REPLICAS), timeout=15)
    await async_wait_for(lambda: "web" in sup.rollouts.states and _complete(mesh, sup), timeout=10)
    first = sup.rollouts.states["web"].revision
    old = set(mesh.running("web"))

    # 1.5 s: under the proxy's hedging delay (2 s), so each request has one attempt
    async def slow(session):
        async with session.get(f"http://127.0.0.1:{port}/slow?1.5",
                               headers={"Host": "web.service.meshlet"}) as r:
            return r.status, (await r.text()).strip()

    async with aiohttp.ClientSession() as session:
        requests = [asyncio.create_task(slow(session)) for _ in range(6)]
        await mesh.apply(web_yaml(mesh, env={"V": "2", **drains}))
        await async_wait_for(lambda: sup.rollouts.states["web"].revision != first
                             and _complete(mesh, sup), timeout=60)
        answers = await asyncio.gather(*requests)
    assert all(status == 200 for status, _ in answers), answers
    assert {who for _, who in answers} <= old, "the slow requests went to the old replicas"
    reports = {iid: json.loads((mesh.markers / f"term-{iid}").read_text()) for iid in old}
    # the slow requests were running when their replicas were retired, and each replica
    # got SIGTERM only once none was left in flight
    assert sum(r["slow"] for r in reports.values()) == 6, reports
    assert {iid: (r["late"], r["in_flight"]) for iid, r in reports.items()} == {iid: (0, 0) for iid in old}


async def _in_flight(admin: str, n: int) -> bool:
    """The proxy has a request in flight on each of ``n`` endpoints of web."""
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://{admin}/routes") as r:
            doc = await r.json()
    endpoints = [e for c in doc["services"]["web"]["clusters"] for e in c["endpoints"]]
    return sum(1 for e in endpoints if e["active"] >= 1) >= n


async def test_a_scaled_down_replica_drains_like_a_retired_one(mesh, proxy_admin):
    """Scale-down stops replicas the one way a rollout does: out of the catalog, then
    SIGTERM only once the proxy has no request in flight on it; none fails."""
    port, admin = proxy_admin
    drains = {"TERM_SERVE": "0.2"}
    await mesh.apply(web_yaml(mesh, env=drains))
    sup = await mesh.start(proxy_admins=[admin])
    await async_wait_for(lambda: _n_passing(mesh, REPLICAS), timeout=30)
    await async_wait_for(lambda: _serving(port, REPLICAS), timeout=15)
    by_slot = {o.slot: iid for iid, o in mesh.running("web").items()}

    async def slow(session):
        async with session.get(f"http://127.0.0.1:{port}/slow?1.5",
                               headers={"Host": "web.service.meshlet"}) as r:
            return r.status, (await r.text()).strip()

    async with aiohttp.ClientSession() as session:
        requests = [asyncio.create_task(slow(session)) for _ in range(9)]
        await async_wait_for(lambda: _in_flight(admin, REPLICAS), timeout=5, what="slow requests at every replica")
        await mesh.apply(web_yaml(mesh, env=drains).replace(f"replicas: {REPLICAS}", "replicas: 1"))
        gone = {by_slot[1], by_slot[2]}
        # the sync that retires them does not wait for their drain
        await async_wait_for(lambda: gone <= sup.replicas.terminating, timeout=5)
        answers = await asyncio.gather(*requests)
        await async_wait_for(lambda: not (gone & set(sup.instances)), timeout=15)
    assert all(status == 200 for status, _ in answers), answers
    reports = {iid: json.loads((mesh.markers / f"term-{iid}").read_text()) for iid in gone}
    assert all(r["slow"] >= 1 for r in reports.values()), reports      # they had requests in flight
    assert {iid: (r["late"], r["in_flight"]) for iid, r in reports.items()} == {iid: (0, 0) for iid in gone}
    assert set(mesh.running("web")) == {by_slot[0]}


# --------------------------------------------------------------------------- kill -9 mid-rollout


async def test_a_supervisor_killed_mid_rollout_resumes_it_after_its_restart(mesh, proxy, tmp_path):
    text = web_yaml(mesh, update=", min_ready: 1.5s")
    await mesh.apply(text)
    argv = [sys.executable, "-m", "supervisor", "supervisor", "--consul", mesh.url, "--data-dir",
            str(mesh.data_dir), "--admin", "127.0.0.1:0", "--runtime", "process"]
    env = {**cli_env(), "MESHLET_LOG_LEVEL": "WARNING"}
    proc, ready = start_server(argv, env=env)
    try:
        await async_wait_for(lambda: _n_passing(mesh, REPLICAS), timeout=30)
        await async_wait_for(lambda: _kv_phase(mesh, "complete"), timeout=15)
        first = (await _kv_json(mesh, config.rollout_key("web", "state")))["revision"]
        async with Load(proxy) as load, Bounds(mesh.client, lambda: _running_pids(mesh)) as bounds:
            await mesh.apply(web_yaml(mesh, env={"V": "2"}, update=", min_ready: 1.5s"))
            # killed once the first new replica passes (a rollout half way)
            await async_wait_for(lambda: _new_ready(ready["admin"], first, 1), timeout=30)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
            state = await _kv_json(mesh, config.rollout_key("web", "state"))
            assert state["phase"] == "progressing" and state["revision"] != first
            proc, ready = start_server(argv, env=env)
            await async_wait_for(lambda: _kv_phase(mesh, "complete"), timeout=60)
        new = (await _kv_json(mesh, config.rollout_key("web", "state")))["revision"]
        assert new == state["revision"]
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://{ready['admin']}/v1/status") as r:
                web = next(x for x in (await r.json())["services"] if x["name"] == "web")
        running = [i for i in web["instances"] if i["state"] != "exited"]
        assert sorted(i["slot"] for i in running) == [0, 1, 2], running
        assert {i["revision"] for i in running} == {new}
        assert load.failed == 0, load.reasons
        assert bounds.max_running <= REPLICAS + 1 and bounds.max_registered <= REPLICAS + 1, bounds
        assert bounds.min_passing >= REPLICAS, bounds
        history = await _kv_json(mesh, config.rollout_key("web", "history"))
        assert [e["status"] for e in history] == ["complete", "complete"]
    finally:
        stop_process(proc, sig=signal.SIGTERM)
        kill_leftovers(mesh.data_dir)


# The new revision's first two starts crash, each when the test says so
# ($MARKERS/crash-<n>); later starts serve as flaky.py does.
CRASH_TWICE = """
import os, sys, time
m = os.environ["MARKERS"]
n = sum(f.startswith("started-") for f in os.listdir(m))
with open(os.path.join(m, "starting"), "w") as f:
    f.write(str(os.getpid()))
os.replace(os.path.join(m, "starting"), os.path.join(m, f"started-{n}"))  # whole, at once
if n >= 2:
    os.execv(sys.executable, [sys.executable, sys.argv[1]])
while not os.path.exists(os.path.join(m, f"crash-{n}")):
    time.sleep(0.02)
sys.exit(3)
"""


async def test_crashes_counted_before_a_supervisor_restart_still_fail_the_rollout(mesh):
    """crash_restarts (2) counts the target's crashes across supervisor restarts: one crash
    before SIGKILL and one while no supervisor runs fail the rollout and revert it, as two
    crashes under one supervisor would; the bad revision is not started a third time."""
    await mesh.apply(web_yaml(mesh))
    argv = [sys.executable, "-m", "supervisor", "supervisor", "--consul", mesh.url, "--data-dir",
            str(mesh.data_dir), "--admin", "127.0.0.1:0", "--runtime", "process"]
    env = {**cli_env(), "MESHLET_LOG_LEVEL": "WARNING"}
    proc, _ = start_server(argv, env=env)
    try:
        await async_wait_for(lambda: _kv_phase(mesh, "complete"), timeout=30)
        good = (await _kv_json(mesh, config.rollout_key("web", "state")))["revision"]
        started = [mesh.markers / f"started-{n}" for n in range(3)]
        await mesh.apply(web_yaml(mesh, command=[sys.executable, "-c", CRASH_TWICE, str(APPS / "flaky.py")]))
        await async_wait_for(started[0].exists, timeout=30)
        (mesh.markers / "crash-0").touch()
        # the first crash is stored with the rollout (and its replica restarted)

        async def one_crash_stored() -> bool:
            doc = await _kv_json(mesh, config.rollout_key("web", "crashes"))
            return doc is not None and sum(doc["crashes"].values()) == 1
        await async_wait_for(one_crash_stored, timeout=30)
        await async_wait_for(started[1].exists, timeout=30)
        bad = (await _kv_json(mesh, config.rollout_key("web", "state")))["revision"]
        assert bad != good
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        (mesh.markers / "crash-1").touch()      # the second crash: nobody watches
        pid = int(started[1].read_text())
        await async_wait_for(lambda: _exited(pid), timeout=10)
        proc, _ = start_server(argv, env=env)
        await async_wait_for(lambda: _kv_phase(mesh, "complete"), timeout=60)
        state = await _kv_json(mesh, config.rollout_key("web", "state"))
        assert (state["revision"], state["reverted_from"]) == (good, bad), state
        history = await _kv_json(mesh, config.rollout_key("web", "history"))
        assert [(e["revision"], e["status"]) for e in history][-2:] == [(bad, "failed"), (good, "complete")]
        assert not started[2].exists(), "the failed revision was started a third time"
        assert await _kv_json(mesh, config.rollout_key("web", "crashes")) is None   # no rollout: nothing kept
        await async_wait_for(lambda: _n_passing(mesh, REPLICAS), timeout=15)
    finally:
        stop_process(proc, sig=signal.SIGTERM)
        kill_leftovers(mesh.data_dir)


def _exited(pid: int) -> bool:
    """Gone, or a zombie (an orphan's exit is reaped by PID 1, if at all)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2] in "ZX"


async def _kv_phase(mesh, phase: str) -> bool:
    state = await _kv_json(mesh, config.rollout_key("web", "state"))
    return state is not None and state["phase"] == phase


async def _new_ready(admin: str, old: str, n: int) -> bool:
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://{admin}/v1/status") as r:
            web = next(x for x in (await r.json())["services"] if x["name"] == "web")
    return sum(i["ready"] and i["revision"] != old for i in web["instances"]) >= n


def _running_pids(mesh) -> int:
    """Running replicas as the process runtime's state files say (the supervisor is
    another process here)."""
    n = 0
    for path in mesh.data_dir.glob("nodes/*/instances/*.json"):
        try:
            record = json.loads(path.read_text())
            if not record.get("exited") and os.path.exists(f"/proc/{record['pid']}"):
                n += 1
        except (OSError, ValueError, KeyError):
            pass
    return n


# --------------------------------------------------------------------------- docker


@pytest.fixture
def engine(docker_engine):  # noqa: F811
    build_test_images(docker_engine)
    return docker_engine


def docker_supervisor(mesh, engine):
    from supervisor.daemon.supervisor import Supervisor
    node = config.NodeSpec(name="dock", runtime="docker", engine=engine.url)
    return Supervisor(mesh.access, [node], mesh.data_dir, resync=1.0)


DOCKER_READY = "{http: {path: /}, period: 0.1s, failure_threshold: 1}"


def docker_yaml(mesh, **kw) -> str:
    return web_yaml(mesh, image=TEST_IMAGE, readiness=DOCKER_READY, grace="1s", **kw)


async def test_docker_rollout_of_3_replicas_drops_nothing(mesh, proxy, engine):
    sup = await _up(mesh, proxy, docker_yaml(mesh), docker_supervisor(mesh, engine),
                    "/cgi-bin/env")
    first = sup.rollouts.states["web"].revision
    old = set(mesh.running("web"))
    async with Load(proxy) as load, Bounds(mesh.client, lambda: len(mesh.running("web"))) as bounds:
        await async_wait_for(lambda: load.sent > 20, timeout=10)
        await mesh.apply(docker_yaml(mesh, env={"V": "2"}))
        await async_wait_for(lambda: sup.rollouts.states["web"].revision != first, timeout=10)
        new = sup.rollouts.states["web"].revision
        await async_wait_for(lambda: _complete(mesh, sup), timeout=90)
        await async_wait_for(lambda: _revisions(mesh) == [new] * REPLICAS, timeout=30)
    assert load.failed == 0, load.reasons
    assert load.sent > 100
    assert not old & set(mesh.running("web"))
    assert bounds.max_running <= REPLICAS + 1 and bounds.max_registered <= REPLICAS + 1, bounds
    assert bounds.min_passing >= REPLICAS, bounds
    containers = engine.client().containers.list(filters={"label": "meshlet.service=web"})
    assert len(containers) == REPLICAS


async def test_docker_a_crashing_image_command_is_reverted_without_failures(mesh, proxy, engine):
    sup = await _up(mesh, proxy, docker_yaml(mesh), docker_supervisor(mesh, engine),
                    "/cgi-bin/env")
    good = sup.rollouts.states["web"].revision
    before = set(mesh.running("web"))
    async with Load(proxy) as load:
        await async_wait_for(lambda: load.sent > 20, timeout=10)
        await mesh.apply(docker_yaml(mesh, args=["sh", "-c", "exit 3"]))
        await async_wait_for(lambda: sup.rollouts.states["web"].revision != good, timeout=10)
        bad = sup.rollouts.states["web"].revision
        await async_wait_for(lambda: sup.rollouts.states["web"].revision == good
                             and _complete(mesh, sup), timeout=90)
        await async_wait_for(lambda: _revisions(mesh) == [good] * REPLICAS
                             and not sup.replicas.terminating, timeout=30)
    assert load.failed == 0, load.reasons
    assert set(mesh.running("web")) == before
    history = await _kv_json(mesh, config.rollout_key("web", "history"))
    assert [(e["revision"], e["status"]) for e in history[-2:]] == [(bad, "failed"), (good, "complete")]
    assert f"reverted to {good}" in web_status(sup)["problem"]
    assert "(last exit: code 3)" in sup.rollouts.states["web"].reason   # the engine's exit code


async def test_docker_a_missing_image_is_reverted_without_failures(mesh, proxy, engine):
    sup = await _up(mesh, proxy, docker_yaml(mesh), docker_supervisor(mesh, engine), "/cgi-bin/env")
    good = sup.rollouts.states["web"].revision
    before = set(mesh.running("web"))
    async with Load(proxy) as load:
        await async_wait_for(lambda: load.sent > 20, timeout=10)
        # no registry answers here: the pull fails at once and the engine refuses the start
        await mesh.apply(web_yaml(mesh, image="meshlet-test/missing:1", readiness=DOCKER_READY, grace="1s"))
        await async_wait_for(lambda: sup.rollouts.states["web"].revision != good, timeout=10)
        bad = sup.rollouts.states["web"].revision
        await async_wait_for(lambda: sup.rollouts.states["web"].revision == good
                             and _complete(mesh, sup), timeout=60)
    assert load.failed == 0, load.reasons
    assert set(mesh.running("web")) == before
    history = await _kv_json(mesh, config.rollout_key("web", "history"))
    assert [(e["revision"], e["status"]) for e in history[-2:]] == [(bad, "failed"), (good, "complete")]
    # the reason names what the engine said, not just that starts failed
    reason = sup.rollouts.states["web"].reason
    assert "could not be started (2 attempts)" in reason and "meshlet-test/missing:1" in reason, reason
