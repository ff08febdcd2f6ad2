"""Forwarding names outside the domain to the configured recursors.

The query is relayed byte for byte (same ID, flags, EDNS), so the recursor's reply can be
relayed as it is. Recursors are tried in order, each with its own time-out
(``--recursor-timeout``, default 2 s as in Consul); the first reply whose rcode is
NOERROR or NXDOMAIN wins. A recursor that times out, refuses the connection or answers
SERVFAIL/REFUSED passes the question to the next one; when none is left the caller
answers SERVFAIL. UDP uses a fresh socket per try (a random source port, so replies
cannot be spoofed by guessing one), TCP a fresh connection (when the client came over
TCP, e.g. after a truncated answer). At most ``max_inflight`` forwards run at once;
past that the caller answers SERVFAIL at once rather than queueing without bound.
"""

from __future__ import annotations

import asyncio
import logging
import struct

__all__ = ["Forwarder"]

log = logging.getLogger(__name__)

_ACCEPT = (0, 3)  # NOERROR, NXDOMAIN


class _Reply(asyncio.DatagramProtocol):
    def __init__(self, waiter: asyncio.Future[bytes], qid: bytes) -> None:
        self.waiter = waiter
        self.qid = qid

    def datagram_received(self, data: bytes, addr: object) -> None:
        # A reply: same ID, QR set. Anything else on this socket is ignored.
        if len(data) >= 12 and data[:2] == self.qid and data[2] & 0x80 and not self.waiter.done():
            self.waiter.set_result(data)

    def error_received(self, exc: Exception) -> None:
        if not self.waiter.done():
            self.waiter.set_exception(exc)  # e.g. ICMP port unreachable: next recursor at once

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.waiter.done():
            self.waiter.set_exception(exc or ConnectionError("socket closed"))


class Forwarder:
    def __init__(self, recursors: list[tuple[str, int]], timeout: float = 2.0, max_inflight: int = 1024) -> None:
        self.recursors = list(recursors)
        self.timeout = timeout
        self.max_inflight = max_inflight
        self.inflight = 0

    @property
    def is_full(self) -> bool:
        return self.inflight >= self.max_inflight

    async def resolve(self, data: bytes, tcp: bool) -> bytes | None:
        """The first acceptable reply from the recursors, or None when all failed."""
        self.inflight += 1
        try:
            for host, port in self.recursors:
                try:
                    reply = await asyncio.wait_for(
                        self._tcp(host, port, data) if tcp else self._udp(host, port, data), self.timeout)
                except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError) as exc:
                    log.debug("recursor %s:%d failed: %s", host, port, exc or type(exc).__name__)
                    continue
                rcode = reply[3] & 0x0F
                if rcode in _ACCEPT:
                    return reply
                log.debug("recursor %s:%d answered rcode %d; trying the next", host, port, rcode)
            return None
        finally:
            self.inflight -= 1

    async def _udp(self, host: str, port: int, data: bytes) -> bytes:
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[bytes] = loop.create_future()
        transport, _ = await loop.create_datagram_endpoint(lambda: _Reply(waiter, data[:2]),
                                                           remote_addr=(host, port))
        try:
            transport.sendto(data)
            return await waiter
        finally:
            transport.close()

    async def _tcp(self, host: str, port: int, data: bytes) -> bytes:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(struct.pack("!H", len(data)) + data)
            await writer.drain()
            (n,) = struct.unpack("!H", await reader.readexactly(2))
            reply = await reader.readexactly(n)
            if len(reply) < 12 or reply[:2] != data[:2]:
                raise ConnectionError("reply does not match the query")
            return reply
        finally:
            writer.close()
