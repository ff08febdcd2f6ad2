"""Fixtures of the runtime tests: every contract test runs on both runtimes (``kit``)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from _runtime_kit import Kit, remove_busybox_bin
from docker_env import docker_engine, docker_engines  # noqa: F401 (fixtures)
from supervisor.runtime import DockerRuntime, ProcessRuntime


@pytest.fixture(scope="session", autouse=True)
def _busybox_bin_cleanup() -> Iterator[None]:
    yield
    remove_busybox_bin()


@pytest.fixture(params=["process", "docker"])
async def kit(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Kit]:
    if request.param == "docker":
        engine = request.getfixturevalue("docker_engine")
        k = Kit("docker", lambda: DockerRuntime(engine.url, node="local"), "/tmp")
    else:
        data = tmp_path / "data"
        k = Kit("process", lambda: ProcessRuntime(data, node="local"), str(tmp_path))
    try:
        yield k
    finally:
        await k.cleanup()
