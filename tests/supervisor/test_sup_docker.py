"""The Supervisor on a real Docker engine (tests/docker_env.py): the same promises as on
processes, with containers found again by their labels."""

from __future__ import annotations


import pytest

import config
from _util import async_wait_for
from docker_env import TEST_IMAGE, build_test_images, docker_engine, docker_engines  # noqa: F401
from supervisor.daemon.supervisor import Supervisor

pytestmark = pytest.mark.slow   # real processes, sockets or engines (tests/conftest.py)

SERVICE = f"""\
services:
  box:
    image: {TEST_IMAGE}
    replicas: 2
    ports: [{{name: http}}]
    stop_grace_period: 1s
    update: {{drain_delay: 0s}}
    probes:
      readiness: {{exec: {{command: [sh, -c, "test ! -f /tmp/unready"]}}, period: 0.2s, failure_threshold: 1}}
"""


@pytest.fixture
def engine(docker_engine):  # noqa: F811
    build_test_images(docker_engine)
    return docker_engine


def supervisor(mesh, engine) -> Supervisor:
    node = config.NodeSpec(name="dock", runtime="docker", engine=engine.url)
    return Supervisor(mesh.access, [node], mesh.data_dir, resync=1.0)


async def _passing(mesh, n):
    return len(await mesh.passing("box")) == n


async def test_docker_replicas_heal_probe_and_are_adopted(mesh, engine):
    await mesh.apply(SERVICE)
    sup = mesh.sup = supervisor(mesh, engine)
    await sup.start()
    await async_wait_for(lambda: _passing(mesh, 2), timeout=60)
    running = mesh.running("box")
    client = engine.client()

    # readiness (exec probe through the engine) -> critical, no restart, then back
    (iid, obs), other = sorted(running.items(), key=lambda kv: kv[1].slot)
    container = client.containers.get(obs.container_id)
    container.exec_run(["touch", "/tmp/unready"])
    await async_wait_for(lambda: _status(mesh, iid, "critical"), timeout=10)
    container.exec_run(["rm", "/tmp/unready"])
    await async_wait_for(lambda: _status(mesh, iid, "passing"), timeout=10)
    assert set(mesh.running("box")) == set(running)

    # a killed container is replaced and the replacement registered
    container.kill()
    await async_wait_for(lambda: iid not in mesh.running("box") and len(mesh.running("box")) == 2,
                         timeout=30)
    await async_wait_for(lambda: _passing(mesh, 2), timeout=30)
    assert iid not in await mesh.health("box")

    # a new supervisor over the same engine adopts the containers by their labels
    before = {i: o.container_id for i, o in mesh.running("box").items()}
    await sup.close(stop=False)
    sup = mesh.sup = supervisor(mesh, engine)
    await sup.start()
    await async_wait_for(lambda: _passing(mesh, 2), timeout=30)
    await async_wait_for(lambda: all(i.health.ready for i in sup.instances.values()
                                     if i.obs.is_running), timeout=10)
    assert {i: o.container_id for i, o in mesh.running("box").items()} == before


async def _status(mesh, iid, status):
    return (await mesh.health("box")).get(iid) == status


async def test_docker_failing_liveness_restarts_with_growing_backoff(mesh, engine):
    await mesh.apply(f"""\
services:
  box:
    image: {TEST_IMAGE}
    ports: [{{name: http}}]
    stop_grace_period: 0.5s
    update: {{drain_delay: 0s}}
    restart: {{backoff: {{initial: 0.4s, max: 5s}}}}
    probes:
      liveness: {{http: {{path: /missing}}, initial_delay: 0.3s, period: 0.1s, failure_threshold: 1}}
""")
    sup = mesh.sup = supervisor(mesh, engine)
    await sup.start()
    await async_wait_for(lambda: sum(kind == "started" for _, kind, _ in sup.history) >= 4, timeout=60)
    starts = [t for t, kind, _ in sup.history if kind == "started"]
    kills = [t for t, kind, _ in sup.history if kind == "killed"]
    gaps = [s - k for k, s in zip(kills, starts[1:])]
    assert gaps[1] >= 0.4 and gaps[2] >= 0.8 and gaps[2] > gaps[0]
    assert sup.backoff[("box", 0)].restarts >= 3
