"""Helpers of the runtime tests: the Kit (one runtime under test and how to run busybox on
it), waiting, HTTP and log helpers. Fixtures are in conftest.py."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from _util import async_wait_for
from docker_env import TEST_IMAGE, static_busybox
from supervisor.runtime import InstanceSpec, Runtime, RuntimeEvent

_ROOT = Path(__file__).resolve().parents[2]
WWW = _ROOT / "tests" / "images" / "busybox" / "www"
# The test app, identical on both runtimes: httpd on 127.0.0.1:$PORT serving $WWW.
HTTP_APP = 'exec httpd -f -p 127.0.0.1:$PORT -h "$WWW"'


async def http_get(port: int, path: str = "/", timeout: float = 10.0) -> str:
    async def get() -> str | None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as s:
            async with s.get(f"http://127.0.0.1:{port}{path}") as r:
                return await r.text() if r.status == 200 else None
    return await async_wait_for(get, timeout, interval=0.05, what=f"HTTP 200 from 127.0.0.1:{port}{path}")


async def next_exit(events: AsyncIterator[RuntimeEvent], instance_id: str,
                    timeout: float = 15.0) -> RuntimeEvent:
    async def find() -> RuntimeEvent:
        async for event in events:
            if event.kind == "exit" and event.instance_id == instance_id:
                return event
        raise AssertionError("event stream ended")
    return await asyncio.wait_for(find(), timeout)


async def read_logs(runtime: Runtime, instance_id: str, **kw: Any) -> str:
    return b"".join([c async for c in runtime.logs(instance_id, **kw)]).decode()


@dataclass
class Kit:
    """One runtime under test plus what differs between runtimes (how to run busybox)."""

    kind: str
    make: Callable[[], Runtime]
    scratch: str              # a writable directory the workload and exec see
    runtime: Runtime = field(init=False)
    _made: list[Runtime] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.runtime = self.fresh()

    def fresh(self) -> Runtime:
        """A new runtime object over the same node: a supervisor after a restart."""
        rt = self.make()
        self._made.append(rt)
        return rt

    def spec(self, script: str | None = None, *, ports: Mapping[str, int] | None = None,
             env: Mapping[str, str] | None = None, **kw: Any) -> InstanceSpec:
        """A spec running ``script`` with busybox sh (None: the HTTP app)."""
        env = dict(env or {})
        if self.kind == "docker":
            env.setdefault("WWW", "/www")
            command = ("/bin/sh", "-c", script) if script else None
            kw.setdefault("image", TEST_IMAGE)
        else:
            env.setdefault("WWW", str(WWW))
            env["PATH"] = str(_busybox_bin())
            command = (str(static_busybox()), "sh", "-c", script or HTTP_APP)
        kw.setdefault("instance_id", f"web-{uuid.uuid4().hex[:10]}")
        kw.setdefault("service", "web")
        kw.setdefault("slot", 0)
        kw.setdefault("revision", "rev1")
        kw.setdefault("node", "local")
        return InstanceSpec(command=kw.pop("command", command), env=env, ports=ports or {}, **kw)

    async def cleanup(self) -> None:
        rt = self._made[-1]
        for obs in await rt.list():
            await rt.remove(obs.instance_id)
        for made in self._made:
            await made.close()


_BIN: Path | None = None


def _busybox_bin() -> Path:
    """A directory of busybox applet symlinks: the same commands the image has."""
    global _BIN
    if _BIN is None:
        path = Path(f"/tmp/mlt-busybox-bin-{os.getpid()}")
        if not path.exists():
            tmp = path.with_name(path.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            busybox = static_busybox()
            for applet in subprocess.run([str(busybox), "--list"], capture_output=True,
                                         text=True, check=True).stdout.split():
                if "/" not in applet:
                    (tmp / applet).symlink_to(busybox)
            tmp.rename(path)
        _BIN = path
    return _BIN


def remove_busybox_bin() -> None:
    if _BIN is not None:
        shutil.rmtree(_BIN, ignore_errors=True)
