"""The data plane keeps serving while the catalog is down: the proxy and DNS answer from
the last known state under load, say so (``/ready``, ``*_catalog_up 0``), and when the
catalog is back resume their watches and pick up a change made after its return."""

from __future__ import annotations

import json
import time
import sys
import urllib.request

import consul
import dns.message
import dns.query
import dns.rdatatype
import pytest
from prometheus_client.parser import text_string_to_metric_families

from _util import REPO, start_server, stop_process, wait_for

pytestmark = pytest.mark.slow   # real processes, sockets or engines (tests/conftest.py)

HOST = "web.service.meshlet"
DOWN_FOR = 30.0     # seconds the catalog stays down (the operating requirement)


def _get(url: str, **headers: str) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers=headers)
    with urllib.request.urlopen(req, timeout=5) as r:
        return r.status, r.read()


def _gauge(url: str, name: str) -> float:
    _, body = _get(url + "/metrics")
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.name == name:
                return sample.value
    raise AssertionError(f"{name} not in /metrics")


def _ready(url: str) -> dict:
    status, body = _get(url + "/ready?format=json")
    assert status == 200
    return json.loads(body)


def _register(c: consul.Consul, iid: str, port: int) -> None:
    assert c.agent.service.register("web", service_id=iid, address="127.0.0.1", port=port,
                                    check=consul.Check.ttl("1h"))
    c.agent.check.ttl_pass(f"service:{iid}")


def test_proxy_and_dns_serve_the_last_state_while_the_catalog_is_down_and_resume(catalog, px) -> None:
    one, two = px.Backend("web-b0"), px.Backend("web-b1")
    _register(catalog.client(), "web-0", one.port)
    env = catalog.env()
    proxy, proxy_ready = start_server([sys.executable, "-m", "proxy", "--consul", catalog.url, "--listen",
                                       "127.0.0.1:0", "--admin", "127.0.0.1:0"], cwd=str(REPO), env=env, timeout=30)
    dns_proc, dns_ready = start_server([sys.executable, "-m", "discovery.dns", "--listen", "127.0.0.1:0", "--consul",
                                        catalog.url, "--mode", "endpoints", "--metrics", "127.0.0.1:0"],
                                       cwd=str(REPO), env=env, timeout=30)
    admin, metrics = f"http://{proxy_ready['admin']}", f"http://{dns_ready['metrics']}"
    entry = f"http://{proxy_ready['http'][0]}/"
    dns_host, dns_port = dns_ready["udp"].rsplit(":", 1)
    served = {"proxy": 0, "dns": 0}

    def addresses() -> list[str]:
        r = dns.query.udp(dns.message.make_query(HOST, dns.rdatatype.SRV), dns_host, port=int(dns_port), timeout=2)
        return sorted(str(a.port) for rr in r.answer for a in rr)

    def load() -> None:
        """One request through the proxy and one DNS question; both must be answered."""
        status, body = _get(entry, Host=HOST)
        assert status == 200 and body, body
        served["proxy"] += 1
        assert addresses() == [str(one.port)]
        served["dns"] += 1

    try:
        wait_for(lambda: _get(entry, Host=HOST)[0] == 200, timeout=15, what="proxy routes web")
        assert addresses() == [str(one.port)]
        assert _gauge(admin, "meshlet_proxy_catalog_up") == 1 and _gauge(metrics, "meshlet_dns_catalog_up") == 1
        assert _ready(admin)["catalog"]["reachable"] is True

        catalog.kill()                                  # SIGKILL: no goodbye to the watchers
        down_at = time.monotonic()

        def both_report_it() -> bool:
            load()
            return (not _ready(admin)["catalog"]["reachable"] and not _ready(metrics)["catalog"]["reachable"]
                    and _gauge(admin, "meshlet_proxy_catalog_up") == 0
                    and _gauge(metrics, "meshlet_dns_catalog_up") == 0)
        wait_for(both_report_it, timeout=20, interval=0.05, what="proxy and DNS report the catalog down")
        state = _ready(admin)["catalog"]
        assert state["unreachable_since"] > 0 and state["last_error"]
        _, text = _get(admin + "/ready")
        assert text == b"ready; catalog unreachable, routing from the last known state\n"
        # 30 s down under load: every request and question still answered from the last
        # known state (the load itself paces this loop; load() fails the test on a miss)
        before = dict(served)
        while time.monotonic() - down_at < DOWN_FOR:
            load()
        assert served["proxy"] - before["proxy"] >= 100, served

        catalog.restart()                               # same port and data dir
        wait_for(lambda: _ready(admin)["catalog"]["reachable"] and _ready(metrics)["catalog"]["reachable"],
                 timeout=20, what="both see the catalog again")
        assert _gauge(admin, "meshlet_proxy_catalog_up") == 1 and _gauge(metrics, "meshlet_dns_catalog_up") == 1

        _register(catalog.client(), "web-1", two.port)  # a change made after the catalog came back
        wait_for(lambda: addresses() == sorted([str(one.port), str(two.port)]), timeout=15,
                 what="DNS answers the new instance")

        def proxy_reaches_both() -> bool:
            seen = {_get(entry, Host=HOST)[1] for _ in range(8)}
            return len(seen) >= 2
        wait_for(proxy_reaches_both, timeout=15, what="the proxy routes to the new instance")
    finally:
        assert stop_process(proxy) == 0
        assert stop_process(dns_proc) == 0
        one.stop()
        two.stop()
