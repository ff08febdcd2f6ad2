"""Bytes in, bytes out: the query parser, the encoder's truncation and the Engine's
pre-encoded fast path, checked with dnspython's parser (an independent implementation)."""

from __future__ import annotations

import random
import struct

import dns.edns
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import pytest
from hypothesis import given, settings as hsettings, strategies as st

from discovery.dns import Settings
from discovery.dns._engine import Engine, Forward
from discovery.dns._wire import BadQuery, Drop, parse_query
from discovery.view import Instance, Node, ServiceView, View


def big_view(n: int = 50) -> View:
    insts = tuple(Instance(id=f"big-{i}", service="big", node="local", address=f"127.1.{i // 250}.{i % 250 + 1}",
                           port=30000 + i) for i in range(n))
    return View(services={
        "big": ServiceView("big", insts),
        "web": ServiceView("web", (Instance("web-1", "web", "local", "127.0.0.1", 8080),), vip="127.10.0.2"),
        "pair": ServiceView("pair", (Instance("p-1", "pair", "local", "127.0.0.21", 1),
                                     Instance("p-2", "pair", "local", "127.0.0.22", 2))),
    }, nodes={"local": Node("local", "127.0.0.1")}, index=3)


@pytest.fixture
def engine() -> Engine:
    return Engine(Settings(), big_view())


def ask(engine: Engine, name: str, rtype: str, *, tcp: bool = False, **kw) -> dns.message.Message:
    q = dns.message.make_query(name, rtype, **kw)
    out = engine.handle(q.to_wire(), tcp)
    assert isinstance(out, bytes)
    r = dns.message.from_wire(out)
    assert r.id == q.id
    return r


def records(r: dns.message.Message) -> list[str]:
    return [str(rd) for rrset in r.answer for rd in rrset]


def test_fifty_addresses_truncate_over_udp_and_fit_over_tcp(engine: Engine) -> None:
    udp = ask(engine, "big.service.meshlet", "A")
    assert udp.flags & dns.flags.TC
    assert 0 < len(records(udp)) < 50
    assert len(udp.to_wire()) <= 512
    tcp = ask(engine, "big.service.meshlet", "A", tcp=True)
    assert not tcp.flags & dns.flags.TC
    assert len(records(tcp)) == 50


def test_edns_size_is_honoured_and_opt_echoed(engine: Engine) -> None:
    r = ask(engine, "big.service.meshlet", "A", use_edns=0, payload=1232)
    assert r.edns == 0
    assert len(r.to_wire()) <= 1232
    assert not r.flags & dns.flags.TC or len(records(r)) < 50
    assert len(records(r)) > len(records(ask(engine, "big.service.meshlet", "A")))
    plain = ask(engine, "web.service.meshlet", "A")
    assert plain.edns == -1  # no OPT asked, none sent


def test_truncated_srv_keeps_glue_for_kept_targets(engine: Engine) -> None:
    r = ask(engine, "big.service.meshlet", "SRV")
    assert r.flags & dns.flags.TC
    targets = {str(rd.target) for rrset in r.answer for rd in rrset}
    glue = {str(rrset.name) for rrset in r.additional}
    assert glue <= targets and glue


def test_order_rotates_between_queries(engine: Engine) -> None:
    firsts = {records(ask(engine, "pair.service.meshlet", "A"))[0] for _ in range(4)}
    assert firsts == {"127.0.0.21", "127.0.0.22"}
    seen_first = {records(ask(engine, "big.service.meshlet", "A", tcp=True))[0] for _ in range(16)}
    assert len(seen_first) >= 4


def test_cache_hit_patches_id_and_new_view_invalidates(engine: Engine) -> None:
    q = dns.message.make_query("web.service.meshlet", "A")
    q.id = 1
    first = engine.handle(q.to_wire(), False)
    q.id = 2
    second = engine.handle(q.to_wire(), False)
    assert len(engine.udp_cache) == 1
    assert first[2:] == second[2:] and struct.unpack("!H", second[:2])[0] == 2
    engine.set_view(View(services={"web": ServiceView("web", (), vip="127.10.0.9")}, index=4))
    assert not engine.udp_cache
    assert records(ask(engine, "web.service.meshlet", "A")) == ["127.10.0.9"]


def _with(view: View, **services: ServiceView) -> View:
    return View(services={**view.services, **services}, nodes=view.nodes, index=view.index + 1)


def test_a_change_drops_only_the_answers_it_touches(engine: Engine) -> None:
    """A catalog change to one service re-encodes that service's answers only (and every
    negative answer, which carries the SOA serial); the rest stay cached and correct."""
    for name in ("web.service.meshlet", "pair.service.meshlet", "nope.service.meshlet"):
        ask(engine, name, "A")
    ask(engine, "pair.service.meshlet", "A", tcp=True)
    pair_key = dns.message.make_query("pair.service.meshlet", "A").to_wire()[2:]
    assert pair_key in engine.udp_cache and len(engine.udp_cache) == 3
    engine.set_view(_with(big_view(), web=ServiceView("web", (), vip="127.10.0.7")))
    assert set(engine.udp_cache) == {pair_key} and len(engine.tcp_cache) == 1
    assert records(ask(engine, "web.service.meshlet", "A")) == ["127.10.0.7"]
    assert sorted(records(ask(engine, "pair.service.meshlet", "A"))) == ["127.0.0.21", "127.0.0.22"]
    # a name that was NXDOMAIN exists after the next change
    assert ask(engine, "nope.service.meshlet", "A").rcode() == dns.rcode.NXDOMAIN
    nope = ServiceView("nope", (Instance("n-1", "nope", "local", "127.0.0.31", 1),))
    engine.set_view(_with(engine_view := big_view(), nope=nope))
    r = ask(engine, "nope.service.meshlet", "A")
    assert r.rcode() == dns.rcode.NOERROR and records(r) == ["127.0.0.31"]
    # the new SOA serial shows in negative answers after any change
    engine.set_view(_with(_with(engine_view, nope=nope), pair=ServiceView("pair", ())))
    soa = ask(engine, "gone.service.meshlet", "A").authority[0][0]
    assert soa.serial == engine.zone.index and ask(engine, "pair.service.meshlet", "A").rcode() == dns.rcode.NXDOMAIN


def test_a_change_drops_only_the_record_types_it_touches(engine: Engine) -> None:
    """A second instance of a service with a VIP changes its SRV records, not its A record
    (the VIP): the A answer stays pre-encoded, SRV and ANY are answered anew and right."""
    def key(name: str, rtype: str) -> bytes:
        return dns.message.make_query(name, rtype).to_wire()[2:]

    for name, rtype in (("web.service.meshlet", "A"), ("web.service.meshlet", "SRV"),
                        ("_web._tcp.service.meshlet", "SRV"), ("web.service.meshlet", "ANY")):
        ask(engine, name, rtype)
    a_answer = engine.udp_cache[key("web.service.meshlet", "A")]
    second = Instance("web-2", "web", "local", "127.0.0.2", 8081)
    engine.set_view(_with(big_view(), web=ServiceView("web", (*big_view().services["web"].instances, second),
                                                      vip="127.10.0.2")))
    assert engine.udp_cache.get(key("web.service.meshlet", "A")) is a_answer
    assert set(engine.udp_cache) == {key("web.service.meshlet", "A")}
    assert records(ask(engine, "web.service.meshlet", "A")) == ["127.10.0.2"]
    for name in ("web.service.meshlet", "_web._tcp.service.meshlet"):
        assert sorted(rd.port for rrset in ask(engine, name, "SRV").answer for rd in rrset) == [8080, 8081]
    assert any(rrset.rdtype == dns.rdatatype.SRV and len(rrset) == 2
               for rrset in ask(engine, "web.service.meshlet", "ANY").answer)


def test_the_cache_stays_bounded_with_its_index() -> None:
    engine = Engine(Settings(), big_view(), max_entries=4)
    for i in range(20):
        ask(engine, f"n{i}.service.meshlet", "A")
        ask(engine, "wEb.service.meshlet" if i % 2 else "web.service.meshlet", "A")
    index = engine._index[id(engine.udp_cache)]
    assert len(engine.udp_cache) == 4 and set(index.owner) == set(engine.udp_cache)
    assert sum(len(keys) for keys in index.keys.values()) == 4


def test_case_of_the_question_is_echoed(engine: Engine) -> None:
    r = ask(engine, "wEb.SeRvIcE.mEsHlEt", "A")
    assert str(r.question[0].name) == "wEb.SeRvIcE.mEsHlEt."
    assert records(r) == ["127.10.0.2"]


def test_outside_names_are_forwarded_only_with_recursors() -> None:
    plain = Engine(Settings(), big_view())
    q = dns.message.make_query("example.com", "A").to_wire()
    r = dns.message.from_wire(plain.handle(q, False))
    assert r.rcode() == dns.rcode.REFUSED and not r.flags & dns.flags.RA
    fwd = Engine(Settings(forwarding=True), big_view())
    assert isinstance(fwd.handle(q, False), Forward)
    assert not fwd.udp_cache  # forwarded answers are never cached


def test_badvers_for_edns_version_1(engine: Engine) -> None:
    r = ask(engine, "web.service.meshlet", "A", use_edns=1)
    assert r.rcode() == dns.rcode.BADVERS


def _header(flags: int = 0x0100, qd: int = 1, an: int = 0, ns: int = 0, ar: int = 0) -> bytes:
    return struct.pack("!HHHHHH", 0xBEEF, flags, qd, an, ns, ar)


QUESTION = b"\x03web\x07service\x07meshlet\x00\x00\x01\x00\x01"

MALFORMED = [
    pytest.param(_header(qd=0), "formerr", id="no-question"),
    pytest.param(_header(qd=2) + QUESTION, "formerr", id="count-says-two"),
    pytest.param(_header() + QUESTION[:10], "formerr", id="truncated-name"),
    pytest.param(_header() + QUESTION[:-2], "formerr", id="truncated-class"),
    pytest.param(_header() + b"\xc0\x0c\x00\x01\x00\x01", "formerr", id="compression-loop-in-question"),
    pytest.param(_header() + b"\x40" + b"a" * 64 + b"\x00\x00\x01\x00\x01", "formerr", id="label-type-0x40"),
    pytest.param(_header() + (b"\x3f" + b"a" * 63) * 5 + b"\x00\x00\x01\x00\x01", "formerr", id="name-over-255"),
    pytest.param(_header(ar=1) + QUESTION + b"\xc0\x0c", "formerr", id="record-truncated"),
    pytest.param(_header(an=1) + QUESTION + b"\x00\x00\x29\x10\x00\x00\x00\x00\x00\x00\x00", "formerr",
                 id="opt-in-answer-section"),
    pytest.param(_header(flags=0x2800) + QUESTION, "notimp", id="opcode-update"),
    pytest.param(_header(flags=0x1000) + QUESTION, "notimp", id="opcode-status"),
    pytest.param(_header(flags=0x8000) + QUESTION, "drop", id="qr-set"),
    pytest.param(b"\x01\x02\x03", "drop", id="shorter-than-header"),
]


@pytest.mark.parametrize("packet,outcome", MALFORMED)
def test_malformed_packets(engine: Engine, packet: bytes, outcome: str) -> None:
    if outcome == "drop":
        with pytest.raises(Drop):
            parse_query(packet)
        assert engine.handle(packet, False) is None
        return
    with pytest.raises(BadQuery):
        parse_query(packet)
    out = engine.handle(packet, False)
    assert out is not None and out[:2] == b"\xbe\xef"
    r = dns.message.from_wire(out, question_only=True)
    assert r.rcode() == (dns.rcode.FORMERR if outcome == "formerr" else dns.rcode.NOTIMP)
    assert r.flags & dns.flags.QR


def test_compression_pointers_in_other_sections_are_skipped_not_followed(engine: Engine) -> None:
    # an authority record whose name points at itself: would loop if followed
    packet = _header(ns=1) + QUESTION + b"\xc0\x21\x00\x01\x00\x01\x00\x00\x00\x00\x00\x00"
    out = engine.handle(packet, False)
    assert dns.message.from_wire(out).rcode() == dns.rcode.NOERROR


@hsettings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_get_an_answer_or_nothing_never_an_exception(packet: bytes) -> None:
    engine = Engine(Settings(), big_view())
    out = engine.handle(packet, False)
    if out is not None:
        assert out[:2] == packet[:2]
        assert len(out) <= 4096


def test_mutated_queries_never_raise() -> None:
    rng = random.Random(1234)
    engine = Engine(Settings(forwarding=True), big_view())
    base = [dns.message.make_query(n, t, use_edns=e).to_wire()
            for n in ("web.service.meshlet", "big.service.meshlet", "example.com") for t in ("A", "SRV")
            for e in (None, 0)]
    for _ in range(3000):
        p = bytearray(rng.choice(base))
        for _ in range(rng.randint(1, 4)):
            op = rng.random()
            if op < 0.5 and p:
                p[rng.randrange(len(p))] = rng.randrange(256)
            elif op < 0.75:
                del p[rng.randrange(len(p) + 1):]
            else:
                p += rng.randbytes(rng.randint(1, 20))
        engine.handle(bytes(p), rng.random() < 0.3)
    assert records(ask(engine, "web.service.meshlet", "A")) == ["127.10.0.2"]


def test_sockaddr_decoding_for_batched_io() -> None:
    import socket as s

    from discovery.dns._mmsg import decode_sockaddr

    v4 = struct.pack("=H", s.AF_INET) + struct.pack("!H", 5353) + s.inet_pton(s.AF_INET, "127.0.0.9") + bytes(8)
    assert decode_sockaddr(v4) == ("127.0.0.9", 5353)
    v6 = (struct.pack("=H", s.AF_INET6) + struct.pack("!H", 53) + struct.pack("!I", 0)
          + s.inet_pton(s.AF_INET6, "::1") + struct.pack("=I", 0))
    assert decode_sockaddr(v6) == ("::1", 53, 0, 0)
    assert decode_sockaddr(b"\x00" * 4) is None
