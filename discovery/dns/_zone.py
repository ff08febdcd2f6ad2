"""The DNS zone as pure data: ``build_zone(view, settings)`` and ``answer(zone, qname, qtype)``.

Vocabulary
----------
Settings
    Mesh-wide DNS options (domain, mode, TTLs, readiness, whether recursors exist).
Zone
    Every name meshlet answers for, built once per catalog View and never mutated: a map
    from lower-case absolute name to its record sets (type -> RRSet). Names that only exist
    because something lives below them (``service.meshlet``) map to an empty dict
    (empty non-terminals: NODATA, not NXDOMAIN, RFC 8020).
RRSet
    The records of one (name, type) plus the Additional records that go with them (the
    A/AAAA of SRV targets).

Names (``<d>`` is the domain, ``meshlet`` by default; all case-insensitive)::

    <d>                                   SOA, NS
    ns.<d>                                A/AAAA of the server when it listens on a fixed IP
    <svc>.service.<d>                     A/AAAA (VIP or ready endpoints), SRV (ready endpoints)
    <tag>.<svc>.service.<d>               A/AAAA, SRV of the ready endpoints with that tag
    _<svc>._tcp[.service].<d>             same as <svc>.service.<d> (RFC 2782)
    _<svc>._<tag>[.service].<d>           same as <tag>.<svc>.service.<d>
    <node>.node.<d>                       A/AAAA of the node, TXT of its meta
    <hex-ip>.addr.<d>                     A/AAAA of that address (SRV targets off-node)
    <reversed VIP>.in-addr.arpa           PTR -> <svc>.service.<d>

Decisions (and the Consul complaints they answer, reference/consul-api.md section 5):

- Ready means passing (``include_warning`` adds warning); an instance of weight 0 is
  draining and gets no new traffic, so DNS leaves it out too.
- A service with a VIP always has its name: in ``vip`` mode A answers the VIP even with no
  ready instance (the proxy answers 503 and recovers the moment one is ready), so a
  service that flaps never gets NXDOMAIN cached by clients (complaint 4). Without a VIP
  and with no ready instance the name does not exist: NXDOMAIN + SOA.
- Tag names answer the tagged instances themselves, also in ``vip`` mode: the VIP
  balances over every instance, so answering it for a tag would silently drop the filter.
- A name that exists but lacks the type asked gets NODATA (NOERROR, empty answer, SOA),
  never NXDOMAIN (complaint 3, RFC 2308).
- SRV weight is the instance's weight (complaint 5); order is varied by the wire layer.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Iterable, Mapping, NamedTuple

import config
from discovery.view import Instance, ServiceView, View

from ._records import (
    A, AAAA, ANY, AXFR, CLASS_ANY, CLASS_IN, IXFR, NOERROR, NOTIMP, NS, NXDOMAIN, PTR,
    REFUSED, RR, SOA, SRV, TXT, Answer, SoaData, SrvData,
)

__all__ = ["Settings", "Zone", "RRSet", "build_zone", "answer", "MODES"]

log = logging.getLogger(__name__)

MODES = ("vip", "endpoints")   # config.DnsSettings.mode's choices

# The defaults are config's (config.DnsSettings says why TTL 0 and negative TTL 5 s).
_DNS = config.MESH_DEFAULTS.dns
DEFAULT_TTL = int(_DNS.ttl)
DEFAULT_NEGATIVE_TTL = int(_DNS.negative_ttl)

_LABEL = re.compile(r"^[a-z0-9](?:[a-z0-9_-]{0,61}[a-z0-9])?$")
_REVERSE_SUFFIXES = (".in-addr.arpa", ".ip6.arpa")
_SRV_PRIORITY = 1


@dataclass(frozen=True, slots=True)
class Settings:
    domain: str = config.MESH_DEFAULTS.domain
    mode: str = _DNS.mode             # vip | endpoints (per-service spec dns.mode overrides)
    ttl: int = DEFAULT_TTL            # service and node records (spec dns.ttl overrides)
    negative_ttl: int = DEFAULT_NEGATIVE_TTL
    include_warning: bool = not _DNS.only_passing
    forwarding: bool = False          # recursors configured: RA=1, foreign names forwarded
    ns_addresses: tuple[str, ...] = ()  # glue for ns.<domain>, from the listen addresses

    def __post_init__(self) -> None:
        domain = self.domain.strip(".").lower()
        if not domain or not all(_LABEL.match(p) for p in domain.split(".")):
            raise ValueError(f"domain: expected a DNS name such as 'meshlet', got {self.domain!r}")
        object.__setattr__(self, "domain", domain)
        if self.mode not in MODES:
            raise ValueError(f"mode: expected one of {', '.join(MODES)}, got {self.mode!r}")
        if self.ttl < 0 or self.negative_ttl < 0:
            raise ValueError("ttl and negative_ttl must be >= 0")


class RRSet(NamedTuple):
    records: tuple[RR, ...]
    additional: tuple[RR, ...] = ()


_NO_SETS: Mapping[int, RRSet] = MappingProxyType({})
_NO_NODES: Mapping[str, Any] = MappingProxyType({})
_NO_PARTS: Mapping[str, Any] = MappingProxyType({})


Names = Mapping[str, Mapping[int, RRSet]]


@dataclass(frozen=True, slots=True)
class Zone:
    settings: Settings
    names: Names
    soa: RR
    index: int = 0
    services: tuple[str, ...] = field(default=())
    # What the next build may reuse: the nodes it was built with and, per service, the
    # ServiceView and the names it produced (None: the service has no name).
    nodes: Mapping[str, Any] = field(default_factory=lambda: _NO_NODES)
    parts: Mapping[str, tuple[ServiceView, Names | None]] = field(default_factory=lambda: _NO_PARTS)

    @property
    def domain(self) -> str:
        return self.settings.domain


# ---------------------------------------------------------------------------- building


def is_label(text: str) -> bool:
    return bool(_LABEL.match(text))


def _is_dns_name(text: str) -> bool:
    return bool(text) and len(text) <= 200 and all(_LABEL.match(p) for p in text.split("."))


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _addr_rr(name: str, ip: ipaddress.IPv4Address | ipaddress.IPv6Address, ttl: int) -> RR:
    return RR(name, A if ip.version == 4 else AAAA, ttl, str(ip))


def _hex_name(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, domain: str) -> str:
    return f"{ip.packed.hex()}.addr.{domain}"


def _service_dns(sv: ServiceView, settings: Settings) -> tuple[str, int]:
    """(mode, ttl) of one service: its spec's ``dns`` block over the mesh-wide settings."""
    mode, ttl = settings.mode, settings.ttl
    if sv.spec is not None:
        dns = sv.spec.dns
        if dns.mode is not None:
            mode = dns.mode
        if dns.ttl is not None:
            ttl = min(int(round(dns.ttl)), 2**31 - 1)
    return mode, ttl


def _instance_tags(inst: Instance, sv: ServiceView) -> frozenset[str]:
    """An instance's tags: its own, plus the spec's ``tags`` when it runs the applied
    revision (an instance of an older revision keeps only what it registered with, so a
    tag added by a rollout does not route to instances that do not have it yet)."""
    tags = {t.lower() for t in inst.tags}
    if sv.spec is not None and sv.spec.tags:
        revision = inst.meta.get("revision")
        if revision is None or revision == sv.revision:
            tags.update(sv.spec.tags)
    return frozenset(tags)


class _Builder:
    """Builds the names of one part of the zone (one service, or the apex and nodes)."""

    def __init__(self, nodes: Mapping[str, Any], settings: Settings) -> None:
        self.nodes = nodes
        self.s = settings
        self.d = settings.domain
        self.names: dict[str, dict[int, RRSet]] = {}

    def put(self, name: str, rtype: int, rrset: RRSet) -> None:
        if rrset.records:
            self.names.setdefault(name, {})[rtype] = rrset

    def target_of(self, inst: Instance, ttl: int) -> tuple[str, tuple[RR, ...]] | None:
        """SRV target of an instance and the records that resolve it: the node's name
        when the instance lives at its node's address, else ``<hex-ip>.addr.<d>``."""
        ip = _ip(inst.address)
        node = self.nodes.get(inst.node)
        if ip is None:
            host = inst.address.strip(".").lower()
            return (host, ()) if _is_dns_name(host) else None
        if node is not None and node.address == inst.address and _is_dns_name(node.name.lower()):
            name = f"{node.name.lower()}.node.{self.d}"
        else:
            name = _hex_name(ip, self.d)
        return name, (_addr_rr(name, ip, ttl),)

    def endpoint_sets(self, instances: Iterable[Instance], ttl: int) -> dict[int, RRSet]:
        addrs: dict[str, RR] = {}
        srvs: dict[tuple[str, int], RR] = {}
        extra: dict[str, RR] = {}
        for inst in instances:
            ip = _ip(inst.address)
            if ip is not None:
                addrs.setdefault(str(ip), _addr_rr("", ip, ttl))
            target = self.target_of(inst, ttl)
            if target is None or not (0 < inst.port < 65536):
                continue
            tname, trrs = target
            weight = max(0, min(int(inst.weight), 65535))
            srvs.setdefault((tname, inst.port), RR("", SRV, ttl, SrvData(_SRV_PRIORITY, weight, inst.port, tname)))
            for rr in trrs:
                extra.setdefault(rr.name + "/" + str(rr.rtype), rr)
        sets = {
            A: RRSet(tuple(r for r in addrs.values() if r.rtype == A)),
            AAAA: RRSet(tuple(r for r in addrs.values() if r.rtype == AAAA)),
            SRV: RRSet(tuple(srvs.values()), tuple(extra.values())),
        }
        return {t: s for t, s in sets.items() if s.records}

    def add_service(self, sv: ServiceView) -> bool:
        name = sv.name.lower()
        if not is_label(name):
            log.warning("service %r is not a valid DNS label; not discoverable via DNS", sv.name)
            return False
        mode, ttl = _service_dns(sv, self.s)
        ready = [i for i in sv.ready(self.s.include_warning) if i.weight > 0]
        vip = _ip(sv.vip) if sv.vip else None
        base = f"{name}.service.{self.d}"
        if not ready and vip is None:
            return False  # NXDOMAIN: nothing to send traffic to
        sets = self.endpoint_sets(ready, ttl)
        if mode == "vip" and vip is not None:
            sets.pop(A, None)
            sets.pop(AAAA, None)
            sets[A if vip.version == 4 else AAAA] = RRSet((_addr_rr("", vip, ttl),))
        if vip is not None:
            self.put(vip.reverse_pointer, PTR, RRSet((RR("", PTR, ttl, base),)))
        for alias in (base, f"_{name}._tcp.service.{self.d}", f"_{name}._tcp.{self.d}"):
            self.names.setdefault(alias, {}).update(sets)
        tags_of = {i.id: _instance_tags(i, sv) for i in ready}
        for tag in sorted(set().union(*tags_of.values())):
            if not is_label(tag):
                continue
            tagged = [i for i in ready if tag in tags_of[i.id]]
            tsets = self.endpoint_sets(tagged, ttl)
            aliases = [f"{tag}.{base}"]
            if tag != "tcp":  # _<svc>._tcp means "no tag filter" (RFC 2782, as in Consul)
                aliases += [f"_{name}._{tag}.service.{self.d}", f"_{name}._{tag}.{self.d}"]
            for alias in aliases:
                self.names.setdefault(alias, {}).update(tsets)
        return True

    def add_node(self, node_name: str, address: str, meta: Mapping[str, str]) -> None:
        lname = node_name.lower()
        if not _is_dns_name(lname):
            return
        name = f"{lname}.node.{self.d}"
        ttl = self.s.ttl
        ip = _ip(address)
        if ip is not None:
            rr = _addr_rr("", ip, ttl)
            self.put(name, rr.rtype, RRSet((rr,)))
        txt = tuple(f"{k}={v}" for k, v in sorted(meta.items()) if len(k) + len(str(v)) < 250)
        if txt:
            self.put(name, TXT, RRSet(tuple(RR("", TXT, ttl, (t,)) for t in txt)))
        self.names.setdefault(name, {})

    def frozen(self) -> Names:
        """The names built so far plus their empty non-terminals: every ancestor of an
        owned name exists (NODATA, not NXDOMAIN; RFC 8020)."""
        for name in list(self.names):
            if name.endswith(_REVERSE_SUFFIXES):
                continue
            while name != self.d and "." in name:
                name = name.split(".", 1)[1]
                self.names.setdefault(name, {})
        return {n: MappingProxyType(sets) if sets else _NO_SETS for n, sets in self.names.items()}

    def apex(self, serial: int) -> tuple[RR, Names]:
        d, s = self.d, self.s
        soa = RR(d, SOA, s.negative_ttl,
                 SoaData(f"ns.{d}", f"hostmaster.{d}", serial, 3600, 600, 86400, s.negative_ttl))
        ns_rrs = tuple(_addr_rr(f"ns.{d}", ip, s.ttl) for ip in map(_ip, s.ns_addresses) if ip is not None)
        self.put(d, SOA, RRSet((soa._replace(name=""),)))
        self.put(d, NS, RRSet((RR("", NS, s.ttl, f"ns.{d}"),), ns_rrs))
        sets = self.names.setdefault(f"ns.{d}", {})
        for rr in ns_rrs:
            prev = sets.get(rr.rtype, RRSet(()))
            sets[rr.rtype] = RRSet(prev.records + (rr._replace(name=""),))
        for node in sorted(self.nodes.values(), key=lambda n: n.name):
            self.add_node(node.name, node.address, node.meta)
        return soa, self.frozen()


def _service_part(sv: ServiceView, nodes: Mapping[str, Any], settings: Settings) -> Names | None:
    b = _Builder(nodes, settings)
    return b.frozen() if b.add_service(sv) else None


def build_zone(view: View, settings: Settings, previous: Zone | None = None) -> Zone:
    """Every name and record meshlet answers for at this View. Pure.

    With ``previous`` (the zone of the last View), the names of every service whose
    ServiceView is unchanged are reused, so a change to one service costs the rebuild of
    that service plus a merge, not a rebuild of the fleet (the Mirror keeps unchanged
    ServiceViews identical between Views)."""
    soa, apex = _Builder(view.nodes, settings).apex(view.index & 0xFFFFFFFF or 1)
    reusable = previous is not None and previous.settings == settings and (
        previous.nodes is view.nodes or previous.nodes == view.nodes)
    old_parts = previous.parts if previous is not None and reusable else _NO_PARTS
    parts: dict[str, tuple[ServiceView, Names | None]] = {}
    names: dict[str, Mapping[int, RRSet]] = dict(apex)
    services = []
    for sv in sorted(view.services.values(), key=lambda v: v.name):
        old = old_parts.get(sv.name)
        part = old[1] if old is not None and (old[0] is sv or old[0] == sv) else _service_part(sv, view.nodes, settings)
        parts[sv.name] = (sv, part)
        if part is None:
            continue
        base = f"{sv.name.lower()}.service.{settings.domain}"
        if names.get(base):
            log.warning("service %r collides with another service name; ignored", sv.name)
            continue
        services.append(sv.name)
        for name, sets in part.items():
            have = names.get(name)
            if not have:
                names[name] = sets
            elif sets:
                names[name] = MappingProxyType({**have, **sets})
    return Zone(settings, MappingProxyType(names), soa, view.index, tuple(services),
                view.nodes, MappingProxyType(parts))


# ---------------------------------------------------------------------------- answering


def _synth_addr(zone: Zone, name: str) -> Mapping[int, RRSet] | None:
    """``<hex-ip>.addr.<d>``: 8 hex digits are an IPv4 address, 32 an IPv6 address."""
    head = name[: -len(zone.domain) - 1]
    parts = head.split(".")
    if len(parts) != 2 or parts[1] != "addr" or len(parts[0]) not in (8, 32):
        return None
    try:
        packed = bytes.fromhex(parts[0])
    except ValueError:
        return None
    ip = ipaddress.ip_address(packed)
    return {A if ip.version == 4 else AAAA: RRSet((_addr_rr("", ip, zone.settings.ttl),))}


def _negative(zone: Zone, rcode: int) -> Answer:
    return Answer(rcode, authority=(zone.soa,))


def _owned(rrs: tuple[RR, ...], qname: str) -> tuple[RR, ...]:
    return tuple(r._replace(name=qname) if not r.name else r for r in rrs)


def answer(zone: Zone, qname: str, qtype: int, qclass: int = CLASS_IN) -> Answer:
    """The answer to one question, as records. ``qname`` is the name as asked (any case,
    with or without the trailing dot); answer records are owned by it verbatim so the
    response echoes the client's spelling (0x20 case randomisation keeps working)."""
    asked = qname.rstrip(".")
    name = asked.lower()
    d = zone.domain
    in_domain = name == d or name.endswith("." + d)
    if not in_domain:
        sets = zone.names.get(name) if name.endswith(_REVERSE_SUFFIXES) else None
        if sets is None:
            if zone.settings.forwarding:
                return Answer(NOERROR, authoritative=False, forward=True)
            if name.endswith(_REVERSE_SUFFIXES):
                return _negative(zone, NXDOMAIN)  # PTR miss: NXDOMAIN, not SERVFAIL (complaint 10)
            return Answer(REFUSED, authoritative=False)
    else:
        sets = zone.names.get(name)
        if sets is None:
            sets = _synth_addr(zone, name)
    if qclass not in (CLASS_IN, CLASS_ANY):
        return Answer(REFUSED, authoritative=False)
    if qtype in (AXFR, IXFR):
        return Answer(NOTIMP)
    if sets is None:
        return _negative(zone, NXDOMAIN)
    if qtype == ANY:
        chosen = [sets[t] for t in sorted(sets)]
    else:
        one = sets.get(qtype)
        chosen = [one] if one is not None else []
    if not chosen:
        return _negative(zone, NOERROR)  # NODATA
    records: tuple[RR, ...] = ()
    extra: dict[tuple[str, int, str], RR] = {}
    for rrset in chosen:
        records += _owned(rrset.records, asked)
        for rr in rrset.additional:
            extra.setdefault((rr.name, rr.rtype, str(rr.rdata)), rr)
    return Answer(NOERROR, answers=records, additional=tuple(extra.values()))
