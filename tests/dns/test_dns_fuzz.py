"""Hostile input against the real server process: random and mutated packets over UDP,
garbage streams over TCP, connection limits and idle time-outs. Seeded, bounded."""

from __future__ import annotations

import random
import socket
import struct

import dns.message
import dns.rcode
import dns.rdatatype
import pytest

from _dnstest import put_document, rdata_texts, register
from _util import wait_for

pytestmark = pytest.mark.slow   # real processes, sockets or engines (tests/conftest.py)

SEED = 20261124


def _mutations(rng: random.Random, base: list[bytes], n: int) -> list[bytes]:
    out = []
    for _ in range(n):
        p = bytearray(rng.choice(base))
        for _ in range(rng.randint(1, 5)):
            op = rng.random()
            if op < 0.4 and p:
                p[rng.randrange(len(p))] = rng.randrange(256)        # flip a byte
            elif op < 0.55:
                del p[rng.randrange(len(p) + 1):]                    # truncate
            elif op < 0.7:
                p[4:12] = struct.pack("!HHHH", *(rng.choice([0, 1, 2, 0xFFFF]) for _ in range(4)))  # counts
            elif op < 0.8:
                p[12:12] = b"\xc0\x0c"                               # pointer to itself
            elif op < 0.9:
                p[12:12] = bytes([63]) + b"x" * 63 + bytes([rng.randrange(64, 256)])  # bad label type
            else:
                p += rng.randbytes(rng.randint(1, 40))               # trailing junk
        out.append(bytes(p))
    return out


@pytest.mark.parametrize("udp_io", ["auto", "plain"])  # batched recvmmsg/sendmmsg, and recvfrom/sendto
def test_fuzzed_packets_never_stop_the_server(catalog, dns_server, udp_io: str) -> None:
    c = catalog.client()
    put_document(c, "web", "127.10.0.2")
    register(c, "web", "web-1", address="127.0.0.1")
    s = dns_server("--udp-io", udp_io)
    rng = random.Random(SEED)
    base = [dns.message.make_query(n, t, use_edns=e).to_wire()
            for n in ("web.service.meshlet", "_web._tcp.service.meshlet", "meshlet", "outside.example")
            for t in ("A", "SRV", "ANY") for e in (None, 0)]
    packets = [rng.randbytes(rng.randint(0, 600)) for _ in range(2000)] + _mutations(rng, base, 4000)
    packets += [struct.pack("!HH", rng.randrange(65536), op << 11) + b"\x00\x01\x00\x00\x00\x00\x00\x00" + base[0][12:]
                for op in range(1, 16)]                                    # every other opcode
    packets += [base[0][:2] + b"\x81\x00" + base[0][4:]]                   # QR set: a "response"

    answered = 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect((s.host, s.port))
        sock.settimeout(0)
        for i, p in enumerate(packets):
            sock.send(p)
            if i % 64 == 63:  # drain what came back so far; keeps the exchange bounded
                try:
                    while True:
                        reply = sock.recv(65535)
                        answered += 1
                        assert len(reply) >= 12
                except BlockingIOError:
                    pass
    assert answered > 0

    # TCP: garbage frames, a zero-length frame, a length prefix promising more than comes
    for junk in (b"\x00\x00", b"\x00\x05hello", b"\xff\xff" + b"a" * 100, rng.randbytes(3000),
                 struct.pack("!H", len(base[0])) + base[0] + b"\x00\x03\x00"):
        with socket.create_connection((s.host, s.port), timeout=2) as t:
            t.sendall(junk)
            t.shutdown(socket.SHUT_WR)
            try:
                while t.recv(65535):
                    pass
            except (ConnectionResetError, socket.timeout):
                pass

    assert s.proc.poll() is None, "the server died"
    assert rdata_texts(s.query("web.service.meshlet")) == ["127.10.0.2"]
    assert rdata_texts(s.query("web.service.meshlet", tcp=True)) == ["127.10.0.2"]
    # FORMERR / NOTIMP come back for what has a header
    notimp = bytearray(base[0])
    notimp[2] |= 0x28  # opcode UPDATE (5)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(2)
        sock.sendto(bytes(notimp), (s.host, s.port))
        assert sock.recv(512)[3] & 0x0F == dns.rcode.NOTIMP
        sock.sendto(base[0][:12] + b"\x05abc", (s.host, s.port))
        assert sock.recv(512)[3] & 0x0F == dns.rcode.FORMERR


def _read_frame(sock: socket.socket) -> dns.message.Message:
    buf = b""
    while len(buf) < 2:
        buf += sock.recv(2 - len(buf))
    (n,) = struct.unpack("!H", buf)
    body = b""
    while len(body) < n:
        chunk = sock.recv(n - len(body))
        assert chunk
        body += chunk
    return dns.message.from_wire(body)


def test_tcp_pipelining_and_idle_timeout(catalog, dns_server) -> None:
    s = dns_server("--tcp-idle-timeout", "500ms")
    qs = [dns.message.make_query("meshlet", "SOA"), dns.message.make_query("nope.service.meshlet", "A"),
          dns.message.make_query("meshlet", "SOA")]
    with socket.create_connection((s.host, s.port), timeout=3) as t:
        t.sendall(b"".join(struct.pack("!H", len(w)) + w for w in (q.to_wire() for q in qs)))
        replies = [_read_frame(t) for _ in qs]
        assert [r.id for r in replies] == [q.id for q in qs]
        assert replies[0].answer[0].rdtype == dns.rdatatype.SOA
        assert replies[1].rcode() == dns.rcode.NXDOMAIN
        # idle: the server closes the connection after ~0.5 s without a message
        t.settimeout(5)
        assert t.recv(1) == b""


def test_tcp_connection_cap(catalog, dns_server) -> None:
    s = dns_server("--max-tcp-connections", "3")  # idle time-out stays 10 s

    def closed_at_once() -> bool:
        with socket.create_connection((s.host, s.port), timeout=3) as extra:
            extra.settimeout(1)
            try:
                return extra.recv(1) == b""
            except ConnectionResetError:
                return True
            except socket.timeout:
                return False  # accepted and kept open

    held = [socket.create_connection((s.host, s.port), timeout=3) for _ in range(3)]
    try:
        wait_for(closed_at_once, timeout=5, what="a 4th connection closed at once")
        assert rdata_texts(s.query("meshlet", "SOA")) != []  # UDP unaffected
    finally:
        for h in held:
            h.close()
    wait_for(lambda: rdata_texts(s.query("meshlet", "SOA", tcp=True)) != [], timeout=5, what="TCP served again")
