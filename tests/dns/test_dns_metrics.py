"""``--metrics``: the DNS server's Prometheus /metrics (parsed with the Prometheus
project's own parser) and /ready move with what the server does."""

from __future__ import annotations

import json
import urllib.request

import dns.rcode
import pytest
from prometheus_client.parser import text_string_to_metric_families

from _dnstest import put_document
from _util import wait_for

pytestmark = pytest.mark.slow   # real processes, sockets or engines (tests/conftest.py)


def scrape(server) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(f"http://{server.ready['metrics']}/metrics", timeout=5) as r:
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_count_queries_builds_hits_and_zones(catalog, dns_server) -> None:
    c = catalog.client()
    put_document(c, "web", "127.10.0.2")
    s = dns_server("--metrics", "127.0.0.1:0")
    wait_for(lambda: scrape(s)[("meshlet_dns_zone_build_seconds_count", ())] >= 1, timeout=10,
             what="the first zone's build counted")
    before = scrape(s)
    assert before[("meshlet_dns_catalog_up", ())] == 1
    assert s.addresses("web.service.meshlet") == ["127.10.0.2"]           # built: a miss
    assert s.addresses("web.service.meshlet") == ["127.10.0.2"]           # then a hit
    assert s.query("nope.service.meshlet").rcode() == dns.rcode.NXDOMAIN
    after = scrape(s)

    def moved(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)
    assert moved("meshlet_dns_queries_total", transport="udp") == 3
    assert moved("meshlet_dns_answers_built_total", qtype="A", rcode="NOERROR") == 1
    assert moved("meshlet_dns_answers_built_total", qtype="A", rcode="NXDOMAIN") == 1
    assert moved("meshlet_dns_cache_hits_total") == 1

    put_document(c, "api", "127.10.0.3")                                   # a new zone is built
    zones = before[("meshlet_dns_zone_build_seconds_count", ())]
    wait_for(lambda: scrape(s)[("meshlet_dns_zone_build_seconds_count", ())] > zones, timeout=10,
             what="a zone build counted")
    with urllib.request.urlopen(f"http://{s.ready['metrics']}/ready?format=json", timeout=5) as r:
        ready = json.load(r)
    assert ready["ready"] is True and ready["catalog"]["reachable"] is True
