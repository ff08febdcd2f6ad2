"""The test engines themselves: several private engines act as several nodes, and a
stopped engine leaves nothing behind."""

from __future__ import annotations

import os
import socket

import pytest

from _util import free_port
from _runtime_kit import HTTP_APP, http_get
from docker_env import TEST_IMAGE, EngineSet, _mounts_under, _pids_naming
from supervisor.runtime import DockerRuntime, InstanceSpec

pytestmark = pytest.mark.slow   # real processes, sockets or engines (tests/conftest.py)


def web(instance_id: str, node: str, port: int) -> InstanceSpec:
    return InstanceSpec(instance_id=instance_id, service="web", slot=0, revision="r1",
                        node=node, image=TEST_IMAGE, ports={"http": port},
                        command=("sh", "-c", HTTP_APP), env={"WWW": "/www"})


async def test_two_engines_are_two_nodes_and_stop_cleanly(docker_engines: EngineSet) -> None:
    one, two = docker_engines.get("node1"), docker_engines.get("node2")
    assert one.url != two.url and one.ping() and two.ping()
    for engine in (one, two):
        client = engine.client()
        assert {n.name for n in client.networks.list()} == {"host", "none"}   # --bridge=none
        assert client.info()["Driver"] in ("overlay2", "vfs")
        assert client.images.get(TEST_IMAGE)

    rt1, rt2 = DockerRuntime(one.url, node="n1"), DockerRuntime(two.url, node="n2")
    rt2_other = DockerRuntime(two.url, node="n3")   # same engine, another node's view
    try:
        port = free_port()
        await rt2.start(web("web-on-two", "n2", port))
        assert "meshlet test app" in await http_get(port, "/")
        assert [o.instance_id for o in await rt2.list()] == ["web-on-two"]
        assert await rt1.list() == [] and await rt2_other.list() == []
    finally:
        for rt in (rt1, rt2, rt2_other):
            await rt.close()

    # Stopping the engine with the container still running leaves no process, mount or
    # file of it behind.
    root = two.root
    docker_engines.stop("node2")
    assert not root.exists()
    assert _pids_naming(root) == [] and _mounts_under(root) == []
    with pytest.raises(ConnectionRefusedError):           # its container is gone too
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    assert one.ping()
    assert os.path.exists(one.socket_path)
