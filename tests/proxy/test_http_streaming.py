"""Bodies stream through the proxy with backpressure both ways: a transfer far larger than
the proxy's memory bound passes while the receiver is slower than the sender, and the
proxy's peak resident memory (VmHWM of the real process) stays bounded."""

from __future__ import annotations

import asyncio
import hashlib

import aiohttp
import pytest

pytestmark = pytest.mark.slow   # real processes, sockets or engines (tests/conftest.py)

SIZE = 256 * 1024 * 1024          # bytes per transfer
BOUND_KIB = 200 * 1024            # the proxy's peak RSS must stay below 200 MiB


@pytest.fixture(scope="module")
def big(mesh_catalog, tmp_path_factory, px):
    name = px.unique("big")
    env = px.Env(mesh_catalog, tmp_path_factory.mktemp("big"), name, 1, None)
    yield env
    env.close()


async def test_download_with_slow_reader_in_bounded_memory(big):
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout) as s:
        async with s.get(big.url(f"/download?size={SIZE}&chunked=1"), headers={"Host": big.host}) as r:
            assert r.status == 200
            await asyncio.sleep(1.0)  # the backend runs ahead; the proxy must not buffer for us
            n = 0
            async for chunk in r.content.iter_chunked(1 << 20):
                n += len(chunk)
    assert n == SIZE
    peak = big.proxy.rss_kib("VmHWM")
    print(f"proxy peak RSS after {SIZE >> 20} MiB download: {peak >> 10} MiB")
    assert peak < BOUND_KIB


async def test_upload_to_slow_backend_in_bounded_memory(big):
    block = hashlib.sha256(b"seed").digest() * 2048  # 64 KiB
    digest = hashlib.sha256()

    async def body():
        for _ in range(SIZE // len(block)):
            digest.update(block)
            yield block

    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout) as s:
        async with s.post(big.url("/upload?pause=1"), data=body(), headers={"Host": big.host}) as r:
            assert r.status == 200
            info = await r.json()
    assert (info["body_len"], info["sha256"]) == (SIZE, digest.hexdigest())
    peak = big.proxy.rss_kib("VmHWM")
    print(f"proxy peak RSS after {SIZE >> 20} MiB upload: {peak >> 10} MiB")
    assert peak < BOUND_KIB


async def test_content_length_upload_and_download(big):
    n = 32 * 1024 * 1024
    data = b"y" * n
    async with aiohttp.ClientSession() as s:
        async with s.post(big.url("/upload"), data=data, headers={"Host": big.host}) as r:
            assert (await r.json())["body_len"] == n
        async with s.get(big.url(f"/download?size={n}"), headers={"Host": big.host}) as r:
            assert r.headers["Content-Length"] == str(n)
            assert len(await r.read()) == n
