"""Fixtures of the supervisor tests: a real catalog, `meshlet apply`'s own function, and a
Supervisor on the process runtime in the test's loop (``mesh``)."""

from __future__ import annotations

import os
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from _util import kill_leftovers

import config
from discovery.consul import connect, instances_from_health
from supervisor.daemon.supervisor import Supervisor
from supervisor.commands.apply import apply_to

# One private Docker engine for every module here that does not import its own (a module
# importing these fixtures gets a session engine of its own: another dockerd to start).
from docker_env import docker_engine, docker_engines  # noqa: E402,F401 (fixtures)

APPS = Path(__file__).resolve().parent / "apps"


class Mesh:
    def __init__(self, catalog, tmp_path: Path) -> None:
        self.catalog = catalog
        self.url = catalog.url
        self.access = catalog.access     # the URL with the catalog's token
        self.tmp = tmp_path
        self.markers = tmp_path / "markers"
        self.markers.mkdir()
        self.data_dir = tmp_path / "data"
        self.sup: Supervisor | None = None
        self.client = connect(self.access, timeout=10)

    def service_yaml(self, name: str = "web", replicas: int = 2, probes: str = "", extra: str = "") -> str:
        return textwrap.dedent(f"""\
            services:
              {name}:
                command: [{sys.executable}, {APPS / 'flaky.py'}]
                replicas: {replicas}
                ports: [{{name: http}}]
                env: {{MARKERS: {self.markers}}}
                update: {{drain_delay: 0s}}
                stop_grace_period: 5s
            """) + textwrap.indent(textwrap.dedent(probes), " " * 4) + textwrap.indent(
                textwrap.dedent(extra), " " * 4)

    async def apply(self, text: str) -> None:
        cfg = config.loads(text, filename="test.yaml", base_dir=str(self.tmp))
        changes = await apply_to(self.access, cfg.services, cfg.mesh.vip_range, prune=True)
        assert changes is not None

    async def start(self, **kw) -> Supervisor:
        self.sup = Supervisor(self.access, [config.NodeSpec(name="local", runtime="process")],
                              self.data_dir, resync=kw.pop("resync", 1.0), **kw)
        await self.sup.start()
        return self.sup

    async def health(self, service: str) -> dict[str, str]:
        _, entries = await self.client.health.service(service)
        return {i.id: i.status for i in instances_from_health(entries)}

    async def passing(self, service: str) -> list[str]:
        return sorted(i for i, s in (await self.health(service)).items() if s == "passing")

    def running(self, service: str) -> dict[str, object]:
        assert self.sup is not None
        return {i.obs.instance_id: i.obs for i in self.sup.instances.values()
                if i.obs.service == service and i.obs.is_running}

    async def close(self) -> None:
        try:
            if self.sup is not None:
                await self.sup.close(stop=True)
        finally:
            await self.client.close()
            kill_leftovers(self.data_dir)


@pytest.fixture
async def mesh(catalog, tmp_path: Path) -> AsyncIterator[Mesh]:
    m = Mesh(catalog, tmp_path)
    try:
        yield m
    finally:
        await m.close()


@pytest.fixture
async def short_session_mesh(catalog_factory, tmp_path: Path) -> AsyncIterator[Mesh]:
    """A Mesh on a catalog that accepts sessions from 1 s, as `meshlet up` starts it (the
    supervisors' leader lock uses a 5 s TTL)."""
    m = Mesh(catalog_factory("--session-ttl-min", "1s"), tmp_path)
    try:
        yield m
    finally:
        await m.close()


def kill9(pid: int) -> None:
    os.kill(pid, 9)

