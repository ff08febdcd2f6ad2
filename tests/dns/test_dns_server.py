"""A real ``python -m discovery.dns`` against a real catalog, asked by dnspython and dig."""

from __future__ import annotations

import os
import random
import signal
import socket
import sys
from pathlib import Path

import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest

from discovery.dns._builder import _can_leave_idle, run_delay_ns
from _dnstest import children, put_document, rdata_texts, register, set_status, srv_ports
from _util import pid_alive, start_server, wait_for

pytestmark = pytest.mark.slow   # real processes, sockets or engines (tests/conftest.py)


REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def populated(catalog):
    """web: VIP 127.10.0.2, instances on 127.0.0.1:8081 (v1) and 127.0.0.31:8082 (v2, canary);
    db: no document (no VIP), one instance 127.0.0.41:5432."""
    c = catalog.client()
    put_document(c, "web", "127.10.0.2")
    register(c, "web", "web-1", address="127.0.0.1", port=8081, tags=("v1",))
    register(c, "web", "web-2", address="127.0.0.31", port=8082, tags=("v2", "canary"))
    register(c, "db", "db-1", address="127.0.0.41", port=5432)
    return c


def node_name(c) -> str:
    return c.agent.self()["Config"]["NodeName"]


def test_every_name_form_and_record_type(populated, dns_server) -> None:
    s = dns_server()
    node = node_name(populated).lower()

    # A: the VIP; AAAA: NODATA; case-insensitive, question echoed as asked
    r = s.query("web.service.meshlet", "A")
    assert r.rcode() == dns.rcode.NOERROR and r.flags & dns.flags.AA
    assert rdata_texts(r) == ["127.10.0.2"]
    r = s.query("WeB.SeRvIcE.MeShLeT", "A")
    assert rdata_texts(r) == ["127.10.0.2"] and str(r.question[0].name) == "WeB.SeRvIcE.MeShLeT."
    r = s.query("web.service.meshlet", "AAAA")
    assert r.rcode() == dns.rcode.NOERROR and not r.answer
    assert r.authority and r.authority[0].rdtype == dns.rdatatype.SOA

    # SRV, the RFC 2782 forms (with and without .service), tags
    for name in ("web.service.meshlet", "_web._tcp.service.meshlet", "_web._tcp.meshlet"):
        r = s.query(name, "SRV")
        assert srv_ports(r) == [8081, 8082], name
        targets = {str(rd.target).rstrip(".") for rrset in r.answer for rd in rrset}
        glue = {str(rrset.name).rstrip("."): [rd.to_text() for rd in rrset] for rrset in r.additional}
        assert targets == set(glue)
        assert sorted(sum(glue.values(), [])) == ["127.0.0.1", "127.0.0.31"]
    assert srv_ports(s.query("v1.web.service.meshlet", "SRV")) == [8081]
    assert srv_ports(s.query("_web._canary.service.meshlet", "SRV")) == [8082]
    assert srv_ports(s.query("_web._v2.meshlet", "SRV")) == [8082]
    assert s.addresses("v2.web.service.meshlet") == ["127.0.0.31"]  # tags answer their instances
    assert s.query("v9.web.service.meshlet").rcode() == dns.rcode.NXDOMAIN

    # no VIP: the instance's address; its SRV target is an .addr. name resolving to it
    assert s.addresses("db.service.meshlet") == ["127.0.0.41"]
    srv = s.query("db.service.meshlet", "SRV")
    (target,) = {str(rd.target) for rrset in srv.answer for rd in rrset}
    assert target == "7f000029.addr.meshlet."
    assert s.addresses(target) == ["127.0.0.41"]

    # node, SOA, NS, ANY, PTR of the VIP
    assert s.addresses(f"{node}.node.meshlet") != []
    soa = s.query("meshlet", "SOA")
    assert soa.answer[0].rdtype == dns.rdatatype.SOA and soa.answer[0][0].minimum == 5
    ns = s.query("meshlet", "NS")
    assert rdata_texts(ns) == ["ns.meshlet."]
    assert [rd.to_text() for rrset in ns.additional for rd in rrset] == ["127.0.0.1"]  # glue = listen address
    any_ = s.query("web.service.meshlet", "ANY")
    assert {rrset.rdtype for rrset in any_.answer} == {dns.rdatatype.A, dns.rdatatype.SRV}
    ptr = s.query("2.0.10.127.in-addr.arpa", "PTR")
    assert rdata_texts(ptr) == ["web.service.meshlet."]

    # NXDOMAIN with the SOA (negative TTL 5 s) for unknown names; REFUSED outside, no recursors
    nx = s.query("nope.service.meshlet")
    assert nx.rcode() == dns.rcode.NXDOMAIN
    assert nx.authority[0].rdtype == dns.rdatatype.SOA and nx.authority[0].ttl == 5
    out = s.query("example.com")
    assert out.rcode() == dns.rcode.REFUSED and not out.flags & dns.flags.RA

    # the same through dig (EDNS + cookie on by default, so the slow path)
    assert s.dig("+short", "web.service.meshlet").split() == ["127.10.0.2"]
    assert "status: NXDOMAIN" in s.dig("nope.service.meshlet")
    assert s.dig("+short", "-x", "127.10.0.2").split() == ["web.service.meshlet."]
    assert sorted(s.dig("+short", "_web._tcp.service.meshlet", "SRV").splitlines()) == sorted(
        f"1 1 {rd.port} {rd.target}" for rrset in s.query("web.service.meshlet", "SRV").answer for rd in rrset)


def test_readiness_changes_show_in_answers(catalog, dns_server) -> None:
    c = catalog.client()
    register(c, "api", "api-1", address="127.0.0.51")
    register(c, "api", "api-2", address="127.0.0.52")
    s = dns_server()
    assert s.addresses("api.service.meshlet") == ["127.0.0.51", "127.0.0.52"]

    set_status(c, "api-2", "critical")
    wait_for(lambda: s.addresses("api.service.meshlet") == ["127.0.0.51"], timeout=3, what="api-2 gone")
    assert srv_ports(s.query("api.service.meshlet", "SRV")) == [8080]

    set_status(c, "api-1", "critical")  # nothing ready, no VIP: NXDOMAIN
    wait_for(lambda: s.query("api.service.meshlet").rcode() == dns.rcode.NXDOMAIN, timeout=3, what="NXDOMAIN")

    set_status(c, "api-1", "passing")
    set_status(c, "api-2", "warning")  # warning is not ready by default
    wait_for(lambda: s.addresses("api.service.meshlet") == ["127.0.0.51"], timeout=3, what="api-1 back")

    c.agent.service.deregister("api-1")
    register(c, "api", "api-3", address="127.0.0.53")
    wait_for(lambda: s.addresses("api.service.meshlet") == ["127.0.0.53"], timeout=3, what="api-3 in")


def test_include_warning_and_endpoints_mode(catalog, dns_server) -> None:
    c = catalog.client()
    put_document(c, "web", "127.10.0.7")
    register(c, "web", "w-1", address="127.0.0.61")
    register(c, "web", "w-2", address="127.0.0.62", status="warning")
    put_document(c, "api", "127.10.0.8", mode="endpoints", ttl=30)  # per-service override
    register(c, "api", "a-1", address="127.0.0.71")

    vip = dns_server()
    assert vip.addresses("web.service.meshlet") == ["127.10.0.7"]
    r = vip.query("api.service.meshlet")
    assert rdata_texts(r) == ["127.0.0.71"] and r.answer[0].ttl == 30

    endpoints = dns_server("--mode", "endpoints", "--include-warning", "--ttl", "3s", "--negative-ttl", "60s")
    r = endpoints.query("web.service.meshlet")
    assert sorted(rdata_texts(r)) == ["127.0.0.61", "127.0.0.62"] and r.answer[0].ttl == 3
    nx = endpoints.query("nope.service.meshlet")
    assert nx.authority[0].ttl == 60 and nx.authority[0][0].minimum == 60

    # a service with a VIP and nothing ready keeps its name (no NXDOMAIN to be cached)
    set_status(c, "w-1", "critical")
    wait_for(lambda: vip.query("web.service.meshlet", "SRV").rcode() == dns.rcode.NOERROR
             and not vip.query("web.service.meshlet", "SRV").answer, timeout=3, what="web SRV empty")
    assert vip.addresses("web.service.meshlet") == ["127.10.0.7"]


@pytest.mark.parametrize("udp_io", ["auto", "plain"])
def test_fifty_instances_truncate_over_udp_and_come_whole_over_tcp(catalog, dns_server, udp_io: str) -> None:
    c = catalog.client()
    for i in range(50):
        register(c, "big", f"big-{i}", address=f"127.2.0.{i + 1}", port=9000 + i)
    s = dns_server("--udp-io", udp_io)
    udp = s.query("big.service.meshlet")
    assert udp.flags & dns.flags.TC
    assert 0 < len(rdata_texts(udp)) < 50 and len(udp.to_wire()) <= 512
    tcp = s.query("big.service.meshlet", tcp=True)
    assert not tcp.flags & dns.flags.TC and len(rdata_texts(tcp)) == 50
    srv = s.query("big.service.meshlet", "SRV", tcp=True)
    assert srv_ports(srv) == list(range(9000, 9050))
    edns = s.query("big.service.meshlet", use_edns=0, payload=1232)
    assert edns.edns == 0 and len(edns.to_wire()) <= 1232 and len(rdata_texts(edns)) > len(rdata_texts(udp))
    # dig retries over TCP on TC and gets all 50
    assert len(s.dig("+short", "+noedns", "big.service.meshlet").split()) == 50
    assert "tc" in s.dig("+noedns", "+ignore", "big.service.meshlet").split("flags:")[1].split(";")[0]


def test_order_of_records_varies(catalog, dns_server) -> None:
    c = catalog.client()
    for i in range(4):
        register(c, "quad", f"q-{i}", address=f"127.0.3.{i + 1}", port=7000 + i)
    s = dns_server()
    firsts = {rdata_texts(s.query("quad.service.meshlet"))[0] for _ in range(12)}
    assert len(firsts) == 4
    srv_firsts = {s.query("quad.service.meshlet", "SRV").answer[0][0].port for _ in range(12)}
    assert len(srv_firsts) > 1


def test_changes_keep_coming_and_outage_keeps_last_answers(catalog, dns_server) -> None:
    c = catalog.client()
    register(c, "svc", "s-1", address="127.0.0.81")
    s = dns_server()
    for n in range(2, 6):  # several changes in a row, each seen
        register(c, "svc", f"s-{n}", address=f"127.0.0.8{n}")
        wait_for(lambda: len(s.addresses("svc.service.meshlet")) == n, timeout=3, what=f"{n} instances")
    catalog.stop()
    assert len(s.addresses("svc.service.meshlet")) == 5  # last good View while the catalog is away


def test_zone_builder_lost_keeps_answers_and_comes_back(catalog, dns_server) -> None:
    """The catalog watch runs in a child process; killed, the server answers from the last
    zone, starts a new one, and follows the catalog again."""
    c = catalog.client()
    register(c, "svc", "s-1", address="127.0.0.81")
    s = dns_server()
    (first,) = s.builder_pids()
    assert os.getpriority(os.PRIO_PROCESS, first) > os.getpriority(os.PRIO_PROCESS, s.proc.pid)
    idle_allowed = _can_leave_idle() and run_delay_ns() is not None   # the builder's own test
    assert os.sched_getscheduler(first) == (os.SCHED_IDLE if idle_allowed else os.SCHED_OTHER)
    os.kill(first, signal.SIGKILL)
    assert s.addresses("svc.service.meshlet") == ["127.0.0.81"]          # last zone, answered at once
    register(c, "svc", "s-2", address="127.0.0.82")
    wait_for(lambda: s.addresses("svc.service.meshlet") == ["127.0.0.81", "127.0.0.82"], timeout=15,
             what="the change after the builder's restart")
    assert s.builder_pids() not in ([], [first])
    set_status(c, "s-1", "critical")                                      # and the one after
    wait_for(lambda: s.addresses("svc.service.meshlet") == ["127.0.0.82"], timeout=3, what="s-1 gone")


def test_zone_builder_ends_with_the_server(catalog, dns_server) -> None:
    s = dns_server()
    (child,) = s.builder_pids()
    s.proc.send_signal(signal.SIGTERM)
    assert s.proc.wait(10) == 0
    wait_for(lambda: not pid_alive(child), timeout=5, what="builder gone after SIGTERM")

    # kill -9 of the server: the builder sees its socket close and exits too
    proc, _ready = start_server([sys.executable, "-m", "discovery.dns", "--listen", "127.0.0.1:0",
                                 "--consul", catalog.url], cwd=str(REPO), timeout=30, env=catalog.env())
    (child,) = children(proc.pid)
    proc.kill()
    proc.wait(10)
    wait_for(lambda: not pid_alive(child), timeout=5, what="builder gone after kill -9 of the server")


def test_ipv6_loopback_listener(catalog, dns_server) -> None:
    c = catalog.client()
    put_document(c, "web", "127.10.0.2")
    s = dns_server(listen="[::1]:0")
    assert s.ready["udp"].startswith("[::1]:")
    assert s.addresses("web.service.meshlet") == ["127.10.0.2"]              # fast path, v6 source
    assert s.addresses("web.service.meshlet", tcp=True) == ["127.10.0.2"]
    assert s.query("nope.service.meshlet").rcode() == dns.rcode.NXDOMAIN     # miss path
    assert s.dig("+short", "web.service.meshlet").split() == ["127.10.0.2"]


def test_listen_twice_and_sigterm(catalog, dns_server) -> None:
    s = dns_server("--listen", "127.0.0.2:0")
    assert set(s.ready) == {"udp", "tcp", "udp2", "tcp2"}
    assert s.ready["udp"] == s.ready["tcp"]
    host2, port2 = s.ready["udp2"].rsplit(":", 1)
    r = dns.query.udp(dns.message.make_query("meshlet", "SOA"), host2, port=int(port2), timeout=2)
    assert r.answer[0].rdtype == dns.rdatatype.SOA


def test_bad_flags_and_dead_catalog_fail_clearly(tmp_path) -> None:
    import subprocess
    import sys

    bad = subprocess.run([sys.executable, "-m", "discovery.dns", "--mode", "roundrobin"],
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = sock.getsockname()[1]  # bound, never listening: connection refused
        out = subprocess.run([sys.executable, "-m", "discovery.dns", "--listen", "127.0.0.1:0", "--consul",
                              f"http://127.0.0.1:{dead}", "--start-timeout", "1s"],
                             capture_output=True, text=True, timeout=30)
    assert out.returncode == 1 and "did not answer" in out.stderr and "Traceback" not in out.stderr
    assert not out.stdout.startswith("ready")


@pytest.mark.skipif(os.geteuid() != 0, reason="binding port 53 needs root")
def test_port_53_on_a_loopback_address(catalog, dns_server) -> None:
    host = f"127.53.{random.randint(1, 250)}.{random.randint(1, 250)}"
    s = dns_server(listen=f"{host}:53")
    assert s.ready["udp"] == f"{host}:53"
    r = dns.query.udp(dns.message.make_query("meshlet", "SOA"), host, port=53, timeout=2)
    assert r.answer[0].rdtype == dns.rdatatype.SOA
    ns = s.query("meshlet", "NS")
    assert [rd.to_text() for rrset in ns.additional for rd in rrset] == [host]  # glue: where we listen
    assert s.dig("+short", "meshlet", "SOA").startswith("ns.meshlet. hostmaster.meshlet.")
