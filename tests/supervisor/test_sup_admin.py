"""The admin API over a real supervisor: JSON status, logs, errors that say what was wrong."""

from __future__ import annotations

import aiohttp
import pytest

from _util import async_wait_for
from supervisor.daemon.admin import AdminServer

pytestmark = pytest.mark.slow   # real processes, sockets or engines (tests/conftest.py)


async def test_admin_api(mesh):
    await mesh.apply(mesh.service_yaml(replicas=2))
    sup = await mesh.start()
    downs = []
    server = AdminServer(sup, on_down=lambda: downs.append(1))
    bound = await server.start("127.0.0.1:0")
    base = f"http://{bound}"
    try:
        async with aiohttp.ClientSession() as http:
            async def ready_count():
                async with http.get(base + "/v1/status") as r:
                    data = await r.json()
                web = [s for s in data["services"] if s["name"] == "web"]
                return web and web[0]["ready"] == 2 and web[0]["desired"] == 2
            await async_wait_for(ready_count, timeout=15)

            await async_wait_for(lambda: all((mesh.data_dir / "nodes/local/logs" / f"{i}.log").stat().st_size
                                             for i in mesh.running("web")), timeout=10)
            async with http.get(base + "/v1/logs/web") as r:
                text = await r.text()
            assert r.status == 200
            for iid in mesh.running("web"):
                assert f"{iid} | {iid} listening on" in text   # prefixed: two instances

            async with http.get(base + "/v1/logs/nope") as r:
                assert r.status == 404 and "nope" in (await r.json())["error"]
            async with http.get(base + "/v1/logs/web?tail=-3") as r:
                assert r.status == 400 and "tail" in (await r.json())["error"]
            async with http.post(base + "/v1/down") as r:
                assert r.status == 200
            await async_wait_for(lambda: downs == [1], timeout=5)
    finally:
        await server.close()


async def test_admin_listens_on_loopback_only(mesh):
    sup = await mesh.start()
    with pytest.raises(ValueError, match="loopback"):
        await AdminServer(sup, on_down=lambda: None).start("0.0.0.0:0")
