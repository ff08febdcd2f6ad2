"""Helpers of the DNS tests: a handle on the server process, queries, catalog population.

The catalog is populated with the real py-consul client, the way the supervisor does it:
one agent service per instance with a TTL check (``service:<id>``) that the test passes
or fails, and the KV service document ``meshlet/services/<name>`` (format 1) carrying the
VIP and the spec's ``dns``/``ports``/``tags``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import config
import consul
import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype


@dataclass
class DnsProcess:
    proc: subprocess.Popen
    ready: dict[str, str]

    @property
    def host(self) -> str:
        return self.ready["udp"].rsplit(":", 1)[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.ready["udp"].rsplit(":", 1)[1])

    def query(self, name: str, rtype: str = "A", *, tcp: bool = False, timeout: float = 2.0,
              **make_kw: Any) -> dns.message.Message:
        q = dns.message.make_query(name, rtype, **make_kw)
        if tcp:
            return dns.query.tcp(q, self.host, port=self.port, timeout=timeout)
        return dns.query.udp(q, self.host, port=self.port, timeout=timeout, ignore_trailing=False)

    def addresses(self, name: str, rtype: str = "A", **kw: Any) -> list[str]:
        """Sorted A/AAAA data of the answer; [] for NXDOMAIN/NODATA."""
        return sorted(rdata_texts(self.query(name, rtype, **kw), rtype))

    def builder_pids(self) -> list[int]:
        """The zone builder: the server's child processes (Linux /proc)."""
        return children(self.proc.pid)

    def dig(self, *args: str) -> str:
        assert shutil.which("dig"), "dig missing: apt-get install bind9-dnsutils"
        out = subprocess.run(["dig", f"@{self.host}", "-p", str(self.port), "+time=2", "+tries=1", *args],
                             capture_output=True, text=True, timeout=15)
        return out.stdout


def rdata_texts(msg: dns.message.Message, rtype: str | None = None) -> list[str]:
    want = dns.rdatatype.from_text(rtype) if rtype and rtype != "ANY" else None
    return [rd.to_text() for rrset in msg.answer for rd in rrset if want is None or rrset.rdtype == want]


def srv_ports(msg: dns.message.Message) -> list[int]:
    return sorted(rd.port for rrset in msg.answer if rrset.rdtype == dns.rdatatype.SRV for rd in rrset)


def register(c: consul.Consul, name: str, sid: str, *, address: str = "127.0.0.1", port: int = 8080,
             tags: tuple[str, ...] = (), status: str = "passing", meta: dict[str, str] | None = None) -> None:
    assert c.agent.service.register(name, service_id=sid, address=address, port=port, tags=list(tags),
                                    meta=meta, check=consul.Check.ttl("1h"))
    set_status(c, sid, status)


def set_status(c: consul.Consul, sid: str, status: str) -> None:
    check = f"service:{sid}"
    {"passing": c.agent.check.ttl_pass, "warning": c.agent.check.ttl_warn,
     "critical": c.agent.check.ttl_fail}[status](check)


def put_document(c: consul.Consul, name: str, vip: str | None, *, mode: str | None = None,
                 ttl: float | None = None, tags: tuple[str, ...] = ()) -> None:
    """A valid KV service document (config/README.md, "The KV service document"), built
    by the config package as ``meshlet apply`` builds it."""
    spec = config.ServiceSpec.from_dict({
        "name": name, "command": ["true"], "tags": list(tags), "dns": {"mode": mode, "ttl": ttl},
        "ports": [{"name": "http", "port": 0, "vip_port": 80, "protocol": "http"}] if vip else []})
    assert c.kv.put(f"meshlet/services/{name}", json.dumps(config.service_document(spec, vip)))


def children(pid: int) -> list[int]:
    """The live child processes of ``pid`` (from /proc/<pid>/task/*/children)."""
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        try:
            out += [int(x) for x in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
        except OSError:
            continue
    return out

