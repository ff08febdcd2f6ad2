"""The rollout cases that test_rollout_live.py has for one runtime only, on the other too,
each with steady load through the real proxy (every non-200 counts as failed):

- Docker: a revision that never becomes ready hits progress_deadline and is reverted;
- Docker: ``kill -9`` of the standalone supervisor (``meshlet supervisor --engine
  URL``) mid-rollout, and its restart completes the rollout without a duplicate;
- Docker and processes: ``meshlet rollback web --to N`` (the real CLI, a subprocess)
  after three complete revisions returns the replicas to revision N's spec.

Helpers and fixtures are test_rollout_live.py's (imported, not copied).
"""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

import aiohttp
import docker
import pytest

import config
from _util import cli_env, async_wait_for, start_server, stop_process

from test_rollout_live import (REPLICAS, Bounds, Load, _complete, _kv_json, _kv_phase, _n_passing, _new_ready,
                               _revisions, _up, docker_supervisor, docker_yaml, engine,  # noqa: F401
                               proxy, web_status, web_yaml)

pytestmark = pytest.mark.slow   # real processes, sockets or engines (tests/conftest.py)

VENV_BIN = Path(sys.executable).parent
DOCKER_PATH = "/cgi-bin/env"     # the test image's page that names the instance


def _web_containers(engine, *, all: bool = False) -> list:  # noqa: A002
    return engine.client().containers.list(all=all, filters={"label": "meshlet.service=web"})


@pytest.fixture
def clean_engine(engine):
    """The session's engine with no container of ``web`` left by an earlier test, before
    and after (the count of web containers is what some tests assert)."""
    def clear() -> None:
        for c in _web_containers(engine, all=True):
            try:
                c.remove(force=True)
            except docker.errors.NotFound:
                pass
    clear()
    yield engine
    clear()


class RunningMax:
    """The most containers of web running at once, sampled in a thread (the supervisor is
    another process; a Docker API call must not stall the load's event loop)."""

    def __init__(self, engine) -> None:
        self.client = docker.DockerClient(base_url=engine.url, version="auto", timeout=30)
        self.max = 0
        self._stop = asyncio.Event()

    def count(self) -> int:
        return len(self.client.containers.list(filters={"label": "meshlet.service=web"}))

    async def _run(self) -> None:
        while not self._stop.is_set():
            self.max = max(self.max, await asyncio.to_thread(self.count))
            await asyncio.sleep(0.01)

    async def __aenter__(self) -> RunningMax:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc) -> None:
        self._stop.set()
        await self._task
        self.client.close()


# --------------------------------------------------------------------------- progress deadline


async def test_docker_a_revision_never_ready_hits_the_progress_deadline_and_is_reverted(
        mesh, proxy, clean_engine):
    sup = await _up(mesh, proxy, docker_yaml(mesh), docker_supervisor(mesh, clean_engine), DOCKER_PATH)
    good = sup.rollouts.states["web"].revision
    before = set(mesh.running("web"))
    async with Load(proxy) as load:
        await async_wait_for(lambda: load.sent > 20, timeout=10)
        began = sup.clock()
        # runs, but serves nothing: its readiness probe never passes
        await mesh.apply(docker_yaml(mesh, args=["sleep", "3600"], update=", progress_deadline: 2s"))
        await async_wait_for(lambda: sup.rollouts.states["web"].revision != good, timeout=10)
        bad = sup.rollouts.states["web"].revision
        # the new revision's container does start (it is its readiness that never comes)
        await async_wait_for(lambda: any(o.revision == bad for o in mesh.running("web").values()),
                             timeout=10)
        await async_wait_for(lambda: sup.rollouts.states["web"].revision == good
                             and _complete(mesh, sup), timeout=60)
        await async_wait_for(lambda: _revisions(mesh) == [good] * REPLICAS
                             and not sup.replicas.terminating, timeout=30)
    assert sup.clock() - began >= 2.0
    assert load.failed == 0, load.reasons
    assert load.sent > 100
    assert set(mesh.running("web")) == before, "the old replicas kept serving"
    history = await _kv_json(mesh, config.rollout_key("web", "history"))
    assert [(e["revision"], e["status"]) for e in history[-2:]] == [(bad, "failed"), (good, "complete")]
    state = sup.rollouts.states["web"]
    assert state.reverted_from == bad and "progress_deadline" in state.reason, state
    assert f"reverted to {good}" in web_status(sup)["problem"]
    running = _web_containers(clean_engine)
    assert sorted(c.labels["meshlet.revision"] for c in running) == [good] * REPLICAS


# --------------------------------------------------------------------------- kill -9 mid-rollout


async def test_docker_a_supervisor_killed_mid_rollout_resumes_it_after_its_restart(
        mesh, proxy, clean_engine):
    update = ", min_ready: 1.5s"
    await mesh.apply(docker_yaml(mesh, update=update))
    argv = [sys.executable, "-m", "supervisor", "supervisor", "--consul", mesh.url, "--data-dir",
            str(mesh.data_dir), "--admin", "127.0.0.1:0", "--engine", clean_engine.url,
            "--stop-on-exit"]
    env = {**cli_env(), "MESHLET_LOG_LEVEL": "WARNING"}
    proc, ready = start_server(argv, env=env)
    try:
        await async_wait_for(lambda: _kv_phase(mesh, "complete"), timeout=60)
        await async_wait_for(lambda: _n_passing(mesh, REPLICAS), timeout=30)
        first = (await _kv_json(mesh, config.rollout_key("web", "state")))["revision"]
        assert sorted(c.labels["meshlet.node"] for c in _web_containers(clean_engine)) == ["local"] * 3
        async with Load(proxy) as load, RunningMax(clean_engine) as running, \
                Bounds(mesh.client, lambda: running.max) as bounds:
            await async_wait_for(lambda: load.sent > 20, timeout=10)
            await mesh.apply(docker_yaml(mesh, env={"V": "2"}, update=update))
            # killed once the first new replica passes (a rollout half way)
            await async_wait_for(lambda: _new_ready(ready["admin"], first, 1), timeout=60)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
            state = await _kv_json(mesh, config.rollout_key("web", "state"))
            assert state["phase"] == "progressing" and state["revision"] != first, state
            proc, ready = start_server(argv, env=env)
            await async_wait_for(lambda: _kv_phase(mesh, "complete"), timeout=90)
            new = (await _kv_json(mesh, config.rollout_key("web", "state")))["revision"]
            # the retired containers are gone from the engine, not only from the catalog
            await async_wait_for(lambda: len(_web_containers(clean_engine, all=True)) == REPLICAS,
                                 timeout=30)
            sent_at_end = load.sent
            await async_wait_for(lambda: load.sent > sent_at_end + 20, timeout=10)
        assert new == state["revision"]
        assert load.failed == 0, load.reasons
        assert load.sent > 100
        assert running.max == REPLICAS + 1, running.max     # the surge, used and never exceeded
        assert bounds.max_registered <= REPLICAS + 1, bounds
        assert bounds.min_passing >= REPLICAS, bounds
        containers = _web_containers(clean_engine, all=True)    # exited ones too: no duplicate
        assert len(containers) == REPLICAS, [(c.name, c.status) for c in containers]
        assert sorted((c.labels["meshlet.slot"], c.labels["meshlet.revision"]) for c in containers) == \
            [(str(slot), new) for slot in range(REPLICAS)]
        assert len(set(await mesh.passing("web"))) == REPLICAS
        history = await _kv_json(mesh, config.rollout_key("web", "history"))
        assert [(e["revision"], e["status"]) for e in history] == [(first, "complete"), (new, "complete")]
    finally:
        stop_process(proc, sig=signal.SIGTERM)   # --stop-on-exit: it stops its containers


# --------------------------------------------------------------------------- rollback --to N


@pytest.fixture(params=["process", "docker"])
def runtime(request, mesh):
    """(service yaml(**kw), a Supervisor to start or None for mesh.start(), path naming the
    instance) of one runtime."""
    if request.param == "process":
        return web_yaml, None, "/"
    eng = request.getfixturevalue("clean_engine")
    return docker_yaml, docker_supervisor(mesh, eng), DOCKER_PATH


async def meshlet(*args: str) -> tuple[int, str, str]:
    env = cli_env()
    proc = await asyncio.create_subprocess_exec(str(VENV_BIN / "meshlet"), *args, env=env,
                                                stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    return proc.returncode, out.decode(), err.decode()


async def test_rollback_to_an_older_revision_number_drops_nothing(mesh, proxy, runtime):
    yaml_of, sup, path = runtime
    sup = await _up(mesh, proxy, yaml_of(mesh, env={"V": "1"}), sup, path)
    revisions = [sup.rollouts.states["web"].revision]
    for version in ("2", "3"):
        await mesh.apply(yaml_of(mesh, env={"V": version}))
        await async_wait_for(lambda: sup.rollouts.states["web"].revision != revisions[-1]
                             and _complete(mesh, sup), timeout=60)
        revisions.append(sup.rollouts.states["web"].revision)
    await async_wait_for(lambda: _revisions(mesh) == [revisions[-1]] * REPLICAS
                         and not sup.replicas.terminating, timeout=30)
    history = await _kv_json(mesh, config.rollout_key("web", "history"))
    assert [(e["number"], e["revision"]) for e in history] == \
        [(1, revisions[0]), (2, revisions[1]), (3, revisions[2])], history
    v1 = history[0]["number"]
    async with Load(proxy) as load:
        await async_wait_for(lambda: load.sent > 20, timeout=10)
        code, out, err = await meshlet("rollback", "web", "--to", str(v1), "--consul", mesh.url)
        assert code == 0, (out, err)
        assert f"rolling back to revision {v1} " in out, out
        await async_wait_for(lambda: sup.rollouts.states["web"].revision == revisions[0]
                             and _complete(mesh, sup), timeout=60)
        await async_wait_for(lambda: _revisions(mesh) == [revisions[0]] * REPLICAS
                             and not sup.replicas.terminating, timeout=30)
        sent_at_end = load.sent
        await async_wait_for(lambda: load.sent > sent_at_end + 20, timeout=10)
    assert load.failed == 0, load.reasons
    assert load.sent > 100
    assert sorted(o.slot for o in mesh.running("web").values()) == [0, 1, 2]
    if path == DOCKER_PATH:     # the page prints the environment: v1's, not v3's
        async with aiohttp.ClientSession() as s:
            for _ in range(2 * REPLICAS):
                async with s.get(f"http://127.0.0.1:{proxy}{path}", headers={"Host": "web.service.meshlet"}) as r:
                    body = await r.text()
                    assert r.status == 200 and "V=1" in body.splitlines(), body
    code, out, err = await meshlet("rollout", "history", "web", "--consul", mesh.url)
    assert code == 0, err
    rows = [line.split() for line in out.splitlines()[1:]]
    assert rows[-1][:3] == ["4", revisions[0][:12], "complete"], out
    assert [row[1] for row in rows[:-1]] == [r[:12] for r in revisions[1:]], out
