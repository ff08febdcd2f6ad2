"""Names outside the domain go to the recursors: a real dnsmasq on another loopback port
(Debian's dnsmasq-base), a silent one, and none."""

from __future__ import annotations

import shutil
import socket
import subprocess
from pathlib import Path
from typing import Iterator

import dns.flags
import dns.message
import dns.query
import dns.rcode
import pytest

from _dnstest import rdata_texts
from _util import free_port, stop_process, wait_for

pytestmark = pytest.mark.slow   # real processes, sockets or engines (tests/conftest.py)

DNSMASQ = shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"


@pytest.fixture
def dnsmasq(tmp_path: Path) -> Iterator[str]:
    """dnsmasq answering outside.example (127.0.0.77) and NXDOMAIN for the rest of
    example; nothing upstream. Yields "127.0.0.1:PORT"."""
    if not Path(DNSMASQ).exists():
        pytest.fail("dnsmasq missing: apt-get install dnsmasq-base")
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.77 outside.example\n")
    for _ in range(10):
        port = free_port()
        conf = tmp_path / "dnsmasq.conf"
        conf.write_text(f"port={port}\nlisten-address=127.0.0.1\nbind-interfaces\nno-resolv\nno-hosts\n"
                        f"no-poll\naddn-hosts={hosts}\nlocal=/example/\npid-file=\nuser=root\n")
        proc = subprocess.Popen([DNSMASQ, f"--conf-file={conf}", "--keep-in-foreground", "--log-facility=-"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

        def answers() -> bool:
            if proc.poll() is not None:
                return True
            r = dns.query.udp(dns.message.make_query("outside.example", "A"), "127.0.0.1", port=port, timeout=0.5)
            return bool(r.answer)

        wait_for(answers, timeout=10, what="dnsmasq up")
        if proc.poll() is None:
            break
    else:
        pytest.fail("dnsmasq did not start: " + proc.stderr.read().decode(errors="replace"))
    yield f"127.0.0.1:{port}"
    stop_process(proc)


@pytest.fixture
def silent() -> Iterator[str]:
    """A recursor that never answers: a UDP socket nobody reads, TCP bound but not listening."""
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    yield f"127.0.0.1:{udp.getsockname()[1]}"
    udp.close()


@pytest.mark.parametrize("udp_io", ["auto", "plain"])
def test_forwards_to_dnsmasq_over_udp_and_tcp(dnsmasq, dns_server, udp_io: str) -> None:
    s = dns_server("--recursor", dnsmasq, "--udp-io", udp_io)
    r = s.query("outside.example")
    assert rdata_texts(r) == ["127.0.0.77"]
    assert r.flags & dns.flags.RA
    assert rdata_texts(s.query("outside.example", tcp=True)) == ["127.0.0.77"]
    assert s.query("missing.example").rcode() == dns.rcode.NXDOMAIN  # relayed as is
    assert s.dig("+short", "outside.example").split() == ["127.0.0.77"]
    # our own domain never leaves, even with recursors
    nx = s.query("nope.service.meshlet")
    assert nx.rcode() == dns.rcode.NXDOMAIN and "meshlet" in str(nx.authority[0].name)


def test_dead_recursor_times_out_and_the_next_answers(silent, dnsmasq, dns_server) -> None:
    s = dns_server("--recursor", silent, "--recursor", dnsmasq, "--recursor-timeout", "300ms")
    assert rdata_texts(s.query("outside.example", timeout=5)) == ["127.0.0.77"]
    assert rdata_texts(s.query("outside.example", tcp=True, timeout=5)) == ["127.0.0.77"]


def test_servfail_when_every_recursor_fails(silent, dns_server) -> None:
    with socket.socket() as refusing:  # TCP bound, not listening: refused at once
        refusing.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{refusing.getsockname()[1]}"
        s = dns_server("--recursor", silent, "--recursor", closed, "--recursor-timeout", "200ms")
        r = s.query("outside.example", timeout=5)
        assert r.rcode() == dns.rcode.SERVFAIL and r.flags & dns.flags.RA
        assert s.query("outside.example", tcp=True, timeout=5).rcode() == dns.rcode.SERVFAIL
        # the zone still answers while forwards fail
        assert s.query("meshlet", "SOA").answer


def test_refused_without_recursors(dns_server) -> None:
    s = dns_server()
    r = s.query("outside.example")
    assert r.rcode() == dns.rcode.REFUSED and not r.answer
    assert "status: REFUSED" in s.dig("outside.example")
