"""Config files, PUT /v1/agent/reload (and SIGHUP), and GET /v1/agent/monitor."""

from __future__ import annotations

import json
import signal
import socket
import sys
from pathlib import Path

import consul
import pytest

from _util import ServerStartError, start_server, wait_for

pytestmark = pytest.mark.slow   # real processes, sockets (tests/conftest.py)

Check = consul.Check


def _write(path: Path, doc: dict) -> Path:
    path.write_text(json.dumps(doc))
    return path


def test_reload_rereads_services_and_checks_from_the_config_files(catalog_factory, tmp_path: Path) -> None:
    conf = _write(tmp_path / "services.json", {
        "services": [{"name": "web", "port": 80, "check": {"ttl": "30s"}},
                     {"name": "db", "id": "db-1", "port": 5432}],
        "check": {"name": "disk", "ttl": "30s"},
    })
    cat = catalog_factory("--config-file", str(conf))
    c = cat.client()
    assert set(c.agent.services()) == {"web", "db-1"}
    assert set(c.agent.checks()) == {"service:web", "disk"}
    c.agent.service.register("api", port=9000)  # registered over HTTP: reload leaves it alone
    c.agent.check.ttl_pass("service:web")
    _write(conf, {"service": {"name": "web", "port": 81, "checks": [{"ttl": "30s"}, {"ttl": "60s"}]}})
    assert c.agent.reload() is True
    assert set(c.agent.services()) == {"web", "api"}  # db-1 is no longer configured
    assert c.agent.services()["web"]["Port"] == 81
    assert set(c.agent.checks()) == {"service:web:1", "service:web:2"}  # checks replaced, disk gone


def test_reload_with_a_bad_file_changes_nothing(catalog_factory, tmp_path: Path) -> None:
    conf = _write(tmp_path / "c.json", {"service": {"name": "web"}})
    cat = catalog_factory("--config-file", str(conf))
    c = cat.client()
    for bad, reason in (("{not json", "not JSON"), (json.dumps({"servise": {}}), "unknown configuration key 'servise'"),
                        (json.dumps({"service": {"name": "x", "port": "80"}}), "cannot unmarshal")):
        conf.write_text(bad)
        r = cat.http.put(cat.url + "/v1/agent/reload", timeout=5)
        assert r.status_code == 500 and r.text.startswith("Failed to reload configs: ") and reason in r.text, r.text
        with pytest.raises(consul.ConsulException):
            c.agent.reload()
        assert set(c.agent.services()) == {"web"}
    r = cat.http.get(cat.url + "/v1/agent/reload", timeout=5)
    assert (r.status_code, r.headers["Allow"]) == (405, "OPTIONS,PUT")


def test_reload_without_config_files_is_ok(catalog) -> None:
    c = catalog.client()
    c.agent.service.register("web")
    assert c.agent.reload() is True
    assert set(c.agent.services()) == {"web"}


def test_sighup_reloads(catalog_factory, tmp_path: Path) -> None:
    conf = _write(tmp_path / "c.json", {"service": {"name": "one"}})
    cat = catalog_factory("--config-dir", str(tmp_path))
    c = cat.client()
    assert set(c.agent.services()) == {"one"}
    _write(tmp_path / "z.json", {"service": {"name": "two"}})
    conf.unlink()
    cat.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: set(c.agent.services()) == {"two"}, timeout=10, what="SIGHUP reload")


def test_local_script_checks_run_from_config_only(catalog_factory, tmp_path: Path) -> None:
    script = [sys.executable, "-c", "print('from config')"]
    conf = _write(tmp_path / "c.json", {"enable_local_script_checks": True,
                                        "check": {"name": "local-script", "args": script, "interval": "100ms"}})
    c = catalog_factory("--config-file", str(conf)).client()
    wait_for(lambda: c.agent.checks()["local-script"]["Output"] == "from config\n", timeout=15)
    assert c.agent.checks()["local-script"]["Status"] == "passing"
    with pytest.raises(consul.ConsulException, match="from remote calls"):
        c.agent.check.register("remote-script", Check.script(script, "10s"))


@pytest.mark.parametrize("doc, reason", [
    pytest.param({"check": {"name": "s", "args": ["/bin/true"], "interval": "10s"}}, "Scripts are disabled",
                 id="script-without-flags"),
    pytest.param({"log_level": "loud"}, "log_level", id="bad-log-level"),
])
def test_unusable_config_stops_the_start(tmp_path: Path, doc: dict, reason: str) -> None:
    conf = _write(tmp_path / "c.json", doc)
    argv = [sys.executable, "-m", "discovery.catalog", "--listen", "127.0.0.1:0", "--data-dir", str(tmp_path / "d"),
            "--config-file", str(conf)]
    with pytest.raises(ServerStartError):
        start_server(argv, timeout=20)


@pytest.mark.parametrize("level", ["nope", "err", "warning", ""])
def test_monitor_rejects_an_unknown_level(catalog, level: str) -> None:
    c = catalog.client()
    if level:
        with pytest.raises(consul.ConsulException) as err:  # py-consul: BadRequest
            c.agent.monitor(loglevel=level)
        assert str(err.value) == f"400 Unknown log level: {level}"
    r = catalog.http.get(catalog.url + "/v1/agent/monitor", params={"loglevel": " "}, timeout=5)
    assert (r.status_code, r.text) == (400, "Unknown log level:  ")


@pytest.mark.parametrize("query, expect", [
    pytest.param("loglevel=debug", lambda line: "[INFO]  discovery.catalog: Reloading configuration..." in line,
                 id="text"),
    pytest.param("loglevel=INFO&logjson", lambda line: line.startswith("{")
                 and json.loads(line)["@message"] == "Reloading configuration..."
                 and json.loads(line)["@level"] == "info", id="json"),
])
def test_monitor_streams_log_lines(catalog, query: str, expect) -> None:
    received = b""
    with socket.create_connection((catalog.host, catalog.port), timeout=10) as s:
        s.sendall(f"GET /v1/agent/monitor?{query} HTTP/1.1\r\nHost: x\r\n"
                  f"X-Consul-Token: {catalog.token}\r\n\r\n".encode())
        s.settimeout(0.2)

        def reload_and_read() -> bool:
            nonlocal received
            catalog.client().agent.reload()  # its log line may come before the stream is attached: again
            try:
                while chunk := s.recv(65536):
                    received += chunk
            except socket.timeout:
                pass
            return any(expect(line) for line in received.decode().splitlines())

        wait_for(reload_and_read, timeout=15, interval=0.05, what="the reload's log line")
    head = received.split(b"\r\n\r\n", 1)[0]
    assert head.startswith(b"HTTP/1.1 200 OK") and b"Transfer-Encoding: chunked" in head


def test_configured_sidecar_stays_across_reloads_and_goes_with_its_service(catalog_factory, tmp_path: Path) -> None:
    conf = _write(tmp_path / "c.json", {"services": [{"name": "web", "port": 80, "connect": {"sidecar_service": {}}},
                                                     {"name": "db", "port": 5432}]})
    c = catalog_factory("--config-file", str(conf)).client()
    assert set(c.agent.services()) == {"web", "web-sidecar-proxy", "db"}
    port = c.agent.services()["web-sidecar-proxy"]["Port"]
    assert c.agent.reload() is True
    assert set(c.agent.services()) == {"web", "web-sidecar-proxy", "db"}
    assert c.agent.services()["web-sidecar-proxy"]["Port"] == port
    _write(conf, {"service": {"name": "db", "port": 5432}})
    assert c.agent.reload() is True
    assert set(c.agent.services()) == {"db"}
    assert not [k for k, v in c.agent.checks().items() if v["ServiceID"].startswith("web")]
