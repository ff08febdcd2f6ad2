"""Plain data shared by the zone (what to answer) and the wire layer (how to encode it).

Records are small tuples, not dnslib objects, so the zone stays pure and cheap to build and
compare; ``_wire`` turns them into bytes.
"""

from __future__ import annotations

from typing import NamedTuple, Union

__all__ = [
    "A", "NS", "SOA", "PTR", "TXT", "AAAA", "SRV", "OPT", "IXFR", "AXFR", "ANY",
    "CLASS_IN", "CLASS_ANY",
    "NOERROR", "FORMERR", "SERVFAIL", "NXDOMAIN", "NOTIMP", "REFUSED", "BADVERS",
    "RR", "Answer", "SrvData", "SoaData", "TYPE_NAMES",
]

# Record types (RFC 1035, 3596, 2782, 6891, 1995).
A = 1
NS = 2
SOA = 6
PTR = 12
TXT = 16
AAAA = 28
SRV = 33
OPT = 41
IXFR = 251
AXFR = 252
ANY = 255

TYPE_NAMES = {A: "A", NS: "NS", SOA: "SOA", PTR: "PTR", TXT: "TXT", AAAA: "AAAA", SRV: "SRV", ANY: "ANY"}

CLASS_IN = 1
CLASS_ANY = 255

# Response codes; BADVERS (16) only fits in the EDNS extended rcode.
NOERROR = 0
FORMERR = 1
SERVFAIL = 2
NXDOMAIN = 3
NOTIMP = 4
REFUSED = 5
BADVERS = 16


class SrvData(NamedTuple):
    priority: int
    weight: int
    port: int
    target: str  # absolute name without the trailing dot


class SoaData(NamedTuple):
    mname: str
    rname: str
    serial: int
    refresh: int
    retry: int
    expire: int
    minimum: int


# A/AAAA: the address as text; NS/PTR: a name; TXT: strings; SRV/SOA: the tuples above.
RData = Union[str, SrvData, SoaData, tuple[str, ...]]


class RR(NamedTuple):
    """One resource record. ``name`` is absolute, without the trailing dot; the empty
    string means "the name asked" (the owner is filled in by ``answer``)."""

    name: str
    rtype: int
    ttl: int
    rdata: RData


class Answer(NamedTuple):
    """What to send back for one question, before encoding.

    ``forward`` means the name is not ours: send it to the recursors (the server turns it
    into REFUSED when there are none). ``authoritative`` is the AA bit.
    """

    rcode: int
    answers: tuple[RR, ...] = ()
    authority: tuple[RR, ...] = ()
    additional: tuple[RR, ...] = ()
    authoritative: bool = True
    forward: bool = False
