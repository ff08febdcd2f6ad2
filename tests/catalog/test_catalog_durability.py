"""Acknowledged writes survive kill -9; CAS is linearisable under concurrent writers."""

from __future__ import annotations

import pytest

import threading

import requests

from _util import wait_for

pytestmark = pytest.mark.slow   # real processes, sockets or engines (tests/conftest.py)


def _writer(url: str, name: str, acked: list[tuple[str, str]], stop: threading.Event, token: str) -> None:
    s = requests.Session()
    s.headers["X-Consul-Token"] = token
    i = 0
    while not stop.is_set():
        key, value = f"dur/{name}/{i}", f"{name}-{i}"
        try:
            r = s.put(f"{url}/v1/kv/{key}", data=value, timeout=5)
        except requests.RequestException:
            return  # the catalog is gone: this write was never acknowledged
        if r.status_code == 200 and r.json() is True:
            acked.append((key, value))
        i += 1


def test_kill_9_mid_stream_loses_no_acknowledged_write(catalog) -> None:
    acked: list[tuple[str, str]] = []
    stop = threading.Event()
    threads = [threading.Thread(target=_writer, args=(catalog.url, f"w{n}", acked, stop, catalog.token)) for n in range(6)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: len(acked) >= 300, timeout=30, what="300 acknowledged writes")
        index_before = int(catalog.http.get(catalog.url + "/v1/kv/dur/w0/0").headers["X-Consul-Index"])
        seen_index = max(index_before, int(catalog.http.get(catalog.url + "/v1/kv/dur/?recurse").headers["X-Consul-Index"]))
        catalog.kill()  # SIGKILL while the writers are still writing
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    snapshot = list(acked)
    catalog.restart()
    c = catalog.client()
    index, entries = c.kv.get("dur/", recurse=True)
    stored = {e["Key"]: e["Value"] for e in entries}
    missing = [k for k, v in snapshot if stored.get(k) != v.encode()]
    assert not missing, f"{len(missing)} acknowledged writes lost, e.g. {missing[:5]}"
    assert int(index) >= seen_index
    # the index keeps growing from where it was
    c.kv.put("after", "restart")
    assert int(c.kv.get("after")[0]) > int(index)


def test_restart_keeps_kv_flags_and_index(catalog) -> None:
    c = catalog.client()
    c.kv.put("a", "1", flags=7)
    index, before = c.kv.get("a")
    assert catalog.stop() == 0  # SIGTERM is a clean exit
    catalog.restart()
    c = catalog.client()
    index2, after = c.kv.get("a")
    assert after == before
    assert index2 == index


def test_concurrent_cas_increments_are_linearisable(catalog) -> None:
    c = catalog.client()
    c.kv.put("counter", "0")
    successes = [0] * 8

    def worker(n: int) -> None:
        cc = catalog.client()
        for _ in range(25):
            _, data = cc.kv.get("counter")
            value = int(data["Value"])
            if cc.kv.put("counter", str(value + 1), cas=data["ModifyIndex"]):
                successes[n] += 1

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    final = int(c.kv.get("counter")[1]["Value"])
    assert final == sum(successes)
    assert final > 0


def _registrar(url: str, name: str, acked: list[str], stop: threading.Event, token: str) -> None:
    s = requests.Session()
    s.headers["X-Consul-Token"] = token
    i = 0
    while not stop.is_set():
        sid = f"{name}-{i}"
        body = {"Name": name, "ID": sid, "Port": 1000 + i, "Check": {"TTL": "60s", "Status": "passing"}}
        try:
            r = s.put(f"{url}/v1/agent/service/register", json=body, timeout=5)
        except requests.RequestException:
            return
        if r.status_code == 200:
            acked.append(sid)
        i += 1


def test_kill_9_mid_registrations_loses_no_acknowledged_instance(catalog) -> None:
    acked: list[str] = []
    stop = threading.Event()
    threads = [threading.Thread(target=_registrar, args=(catalog.url, f"svc{n}", acked, stop, catalog.token)) for n in range(4)]
    threads.append(threading.Thread(target=_writer, args=(catalog.url, "kv", [], stop, catalog.token)))
    for t in threads:
        t.start()
    try:
        wait_for(lambda: len(acked) >= 200, timeout=30, what="200 acknowledged registrations")
        catalog.kill()
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    snapshot = set(acked)
    catalog.restart()
    c = catalog.client()
    services = c.agent.services()
    assert snapshot <= set(services)
    checks = c.agent.checks()
    assert all(checks[f"service:{sid}"]["Status"] == "passing" for sid in snapshot)
    for n in range(4):
        _, nodes = c.health.service(f"svc{n}", passing=True)
        assert {x["Service"]["ID"] for x in nodes} >= {s for s in snapshot if s.startswith(f"svc{n}-")}
