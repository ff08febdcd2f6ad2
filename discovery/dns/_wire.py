"""DNS messages on the wire: a strict query parser and the response encoder.

Parsing is hand-written and bounded (a query is at most 65535 bytes, every read is
bounds-checked, names in the question may not use compression, names elsewhere are
skipped without following pointers, so loops cannot exist). Whatever is wrong comes back
as ``BadQuery(rcode, reason)`` (answer FORMERR/NOTIMP/BADVERS) or ``Drop`` (send nothing:
responses, fragments shorter than a header).

Encoding uses dnslib. ``encode`` fits the message to the size limit: first everything;
then the full answer without the Additional section (no TC: only optional data left out,
RFC 2181 9); then the largest prefix of the answer, with the Additional records of what
is kept, and TC set.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from dnslib import (
    AAAA as _AAAA, A as _A, CLASS, DNSHeader, DNSLabel, DNSQuestion, DNSRecord, EDNS0, NS as _NS,
    PTR as _PTR, RR as _RR, SOA as _SOA, SRV as _SRV, TXT as _TXT,
)

from ._records import (
    A, AAAA, BADVERS, FORMERR, NOTIMP, NS, OPT, PTR, RR, SERVFAIL, SOA, SRV, TXT, Answer,
)

__all__ = [
    "Query", "Edns", "BadQuery", "Drop", "parse_query", "encode", "error_response",
    "servfail", "udp_limit", "TCP_LIMIT", "SERVER_UDP_SIZE",
]

TCP_LIMIT = 65535
# Largest UDP payload we send even when a client advertises more: large enough for any
# sane answer, small enough to stay clear of pathological fragmentation.
SERVER_UDP_SIZE = 4096
_MAX_NAME = 255

_HEADER = struct.Struct("!HHHHHH")
_TYPE_CLASS = struct.Struct("!HH")
_RR_FIXED = struct.Struct("!HHIH")

_QR = 0x8000
_OPCODE = 0x7800
_AA = 0x0400
_TC = 0x0200
_RD = 0x0100
_RA = 0x0080
_CD = 0x0010


class Edns(NamedTuple):
    udp_size: int
    version: int
    do: bool
    has_options: bool


class Query(NamedTuple):
    id: int
    flags: int
    labels: tuple[bytes, ...]   # the question name as sent (case preserved)
    qtype: int
    qclass: int
    edns: Edns | None

    @property
    def qname(self) -> str:
        """The name as text; ``None``-safe for the zone: a label holding a dot or a byte
        outside printable ASCII cannot name anything of ours, so it becomes ``\\xNN``."""
        return ".".join(_label_text(lb) for lb in self.labels)


def _label_text(label: bytes) -> str:
    if all(0x21 <= c < 0x7F and c != 0x2E for c in label):
        return label.decode("ascii")
    return "".join(chr(c) if 0x21 <= c < 0x7F and c != 0x2E else f"\\x{c:02x}" for c in label)


class BadQuery(Exception):
    """The query is wrong; answer it with ``rcode`` (FORMERR, NOTIMP or BADVERS)."""

    def __init__(self, rcode: int, reason: str, query: Query | None = None) -> None:
        super().__init__(reason)
        self.rcode = rcode
        self.query = query  # the question, when it parsed before the error was found


class Drop(Exception):
    """Not something to answer (too short to carry an ID, or a response)."""


def _skip_name(data: bytes, pos: int) -> int:
    """Offset after a (possibly compressed) name. Pointers end a name, so nothing loops."""
    end = len(data)
    for _ in range(128):
        if pos >= end:
            raise BadQuery(FORMERR, "name runs past the end of the message")
        n = data[pos]
        if n == 0:
            return pos + 1
        if n & 0xC0 == 0xC0:
            if pos + 2 > end:
                raise BadQuery(FORMERR, "truncated compression pointer")
            return pos + 2
        if n & 0xC0:
            raise BadQuery(FORMERR, "unknown label type")
        pos += 1 + n
    raise BadQuery(FORMERR, "name has too many labels")


def parse_query(data: bytes) -> Query:
    """Parse one query message. Raises ``Drop`` or ``BadQuery``; never anything else."""
    if len(data) < 12:
        raise Drop("shorter than a DNS header")
    if type(data) is not bytes:
        data = bytes(data)
    qid, flags, qd, an, ns, ar = _HEADER.unpack_from(data)
    if flags & _QR:
        raise Drop("a response, not a query")
    if flags & _OPCODE:
        raise BadQuery(NOTIMP, f"opcode {(flags & _OPCODE) >> 11} not implemented")
    if qd != 1:
        raise BadQuery(FORMERR, f"expected 1 question, got {qd}")
    pos, end = 12, len(data)
    labels: list[bytes] = []
    wire_len = 1
    while True:
        if pos >= end:
            raise BadQuery(FORMERR, "question name runs past the end of the message")
        n = data[pos]
        if n == 0:
            pos += 1
            break
        if n & 0xC0:
            raise BadQuery(FORMERR, "compression or unknown label type in the question")
        wire_len += n + 1
        if wire_len > _MAX_NAME or pos + 1 + n > end:
            raise BadQuery(FORMERR, "question name too long or truncated")
        labels.append(data[pos + 1:pos + 1 + n])
        pos += 1 + n
    if pos + 4 > end:
        raise BadQuery(FORMERR, "question type/class truncated")
    qtype, qclass = _TYPE_CLASS.unpack_from(data, pos)
    pos += 4
    if qtype == OPT:
        raise BadQuery(FORMERR, "OPT is not a question type")
    edns: Edns | None = None
    try:
        edns = _parse_records(data, pos, an, ns, ar)
    except BadQuery as exc:
        exc.query = Query(qid, flags, tuple(labels), qtype, qclass, None)
        raise
    query = Query(qid, flags, tuple(labels), qtype, qclass, edns)
    if edns is not None and edns.version != 0:
        raise BadQuery(BADVERS, f"EDNS version {edns.version} not supported", query)
    return query


def _parse_records(data: bytes, pos: int, an: int, ns: int, ar: int) -> Edns | None:
    """Skip the answer and authority records and find the OPT among the additional ones."""
    end = len(data)
    edns: Edns | None = None
    for i in range(an + ns + ar):
        is_additional = i >= an + ns
        start = pos
        pos = _skip_name(data, pos)
        if pos + 10 > end:
            raise BadQuery(FORMERR, "record header truncated")
        rtype, rclass, ttl, rdlen = _RR_FIXED.unpack_from(data, pos)
        pos += 10
        if pos + rdlen > end:
            raise BadQuery(FORMERR, "record data truncated")
        if rtype == OPT:
            if not is_additional or edns is not None or data[start] != 0:
                raise BadQuery(FORMERR, "misplaced or repeated OPT record")
            edns = Edns(max(512, rclass), (ttl >> 16) & 0xFF, bool(ttl & 0x8000), rdlen > 0)
        pos += rdlen
    return edns


def udp_limit(query: Query) -> int:
    if query.edns is None:
        return 512
    return min(query.edns.udp_size, SERVER_UDP_SIZE)


# ---------------------------------------------------------------------------- encoding


def _label(name: str) -> DNSLabel:
    return DNSLabel(name.encode("ascii").split(b".") if name else [])


def _rdata(rr: RR):  # type: ignore[no-untyped-def]
    t, v = rr.rtype, rr.rdata
    if t == A:
        return _A(v)
    if t == AAAA:
        return _AAAA(v)
    if t == SRV:
        return _SRV(v.priority, v.weight, v.port, _label(v.target))  # type: ignore[union-attr]
    if t == SOA:
        return _SOA(_label(v.mname), _label(v.rname), v[2:])  # type: ignore[union-attr,index]
    if t == NS:
        return _NS(_label(v))  # type: ignore[arg-type]
    if t == PTR:
        return _PTR(_label(v))  # type: ignore[arg-type]
    if t == TXT:
        return _TXT(list(v))  # type: ignore[arg-type]
    raise ValueError(f"cannot encode record type {t}")


def _to_dnslib(rr: RR, owner: DNSLabel | None) -> _RR:
    name = owner if owner is not None and rr.name == "" else _label(rr.name)
    return _RR(name, rr.rtype, CLASS.IN, rr.ttl, _rdata(rr))


def _header(query: Query, rcode: int, aa: bool, tc: bool, ra: bool) -> DNSHeader:
    bits = _QR | (query.flags & (_RD | _CD))
    if aa:
        bits |= _AA
    if tc:
        bits |= _TC
    if ra:
        bits |= _RA
    return DNSHeader(id=query.id, bitmap=bits | (rcode & 0xF))


def _opt(query: Query, rcode: int) -> EDNS0 | None:
    if query.edns is None:
        return None
    return EDNS0(udp_len=SERVER_UDP_SIZE, ext_rcode=rcode >> 4, version=0,
                 flags="do" if query.edns.do else "")


def _pack(query: Query, ans: Answer, ra: bool, answers: tuple[RR, ...], additional: tuple[RR, ...],
          tc: bool) -> bytes:
    owner = DNSLabel(list(query.labels))
    msg = DNSRecord(_header(query, ans.rcode, ans.authoritative, tc, ra),
                    q=DNSQuestion(owner, query.qtype, query.qclass))
    msg.rr = [_to_dnslib(r, owner) for r in answers]
    msg.auth = [_to_dnslib(r, owner) for r in ans.authority]
    msg.ar = [_to_dnslib(r, owner) for r in additional]
    opt = _opt(query, ans.rcode)
    if opt is not None:
        msg.ar.append(opt)
    return bytes(msg.pack())


def _additional_for(answers: tuple[RR, ...], additional: tuple[RR, ...]) -> tuple[RR, ...]:
    targets = {r.rdata.target for r in answers if r.rtype == SRV}  # type: ignore[union-attr]
    return tuple(r for r in additional if r.name in targets)


def encode(query: Query, ans: Answer, limit: int, ra: bool, rotation: int = 0,
           guess: list[int] | None = None) -> bytes:
    """Encode ``ans`` for ``query``, answer records rotated left by ``rotation``, fitted to
    ``limit`` bytes. ``guess`` (a one-item list) carries the number of answer records that
    fitted last time between rotations of one answer, so a truncated answer usually costs
    two packs instead of a binary search."""
    answers = ans.answers
    if rotation and answers:
        k = rotation % len(answers)
        answers = answers[k:] + answers[:k]
    full = _pack(query, ans, ra, answers, ans.additional, False)
    if len(full) <= limit:
        return full
    bare = _pack(query, ans, ra, answers, (), False)
    if len(bare) <= limit:
        return bare

    def fits(n: int) -> bytes | None:
        kept = answers[:n]
        out = _pack(query, ans, ra, kept, _additional_for(kept, ans.additional), True)
        return out if len(out) <= limit else None

    lo, hi = 0, len(answers) - 1   # invariant: fits(lo) (or lo == 0), answer is in [lo, hi]
    best: bytes | None = None
    if guess and 0 < guess[0] <= hi:
        g = guess[0]
        best = fits(g)
        if best is not None:
            lo = g
            nxt = fits(g + 1) if g + 1 <= hi else None
            if nxt is None:
                return best
            best, lo = nxt, g + 1
        else:
            hi = g - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        out = fits(mid)
        if out is not None:
            best, lo = out, mid
        else:
            hi = mid - 1
    if best is None or lo == 0:
        best = fits(lo)
        if best is None:  # even the header and question exceed the limit
            best = _pack(query, Answer(ans.rcode, authoritative=ans.authoritative), ra, (), (), True)
    if guess is not None:
        if guess:
            guess[0] = lo
        else:
            guess.append(lo)
    return best


def error_response(data: bytes, rcode: int, query: Query | None = None, ra: bool = False) -> bytes | None:
    """A bare response with ``rcode`` for a message we will not answer normally: the
    question is echoed when it parsed, else header only. ``None`` if there is no ID."""
    if query is not None:
        return encode(query, Answer(rcode, authoritative=False), 512 if query.edns is None else udp_limit(query), ra)
    if len(data) < 12:
        return None
    qid, flags = struct.unpack_from("!HH", data)
    if flags & _QR:
        return None
    bits = _QR | (flags & (_OPCODE | _RD | _CD)) | (_RA if ra else 0)
    if rcode > 15:
        rcode = FORMERR  # BADVERS needs an OPT we could not parse
    return _HEADER.pack(qid, bits | rcode, 0, 0, 0, 0)


def servfail(query: Query, ra: bool) -> bytes:
    return encode(query, Answer(SERVFAIL, authoritative=False), udp_limit(query), ra)
