"""Token auth of the embedded catalog (Consul's ``acl.default_policy = deny`` with one
management token) and HTTPS, through py-consul and raw HTTP."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import consul
import pytest
import requests

from _util import REPO, TEST_TOKEN, CatalogProcess, ServerStartError, start_server, stop_process

pytestmark = pytest.mark.slow   # real processes, sockets or engines (tests/conftest.py)

ANONYMOUS = "Permission denied: token with AccessorID '00000000-0000-0000-0000-000000000002' lacks permission"


def test_first_start_makes_a_private_token_and_keeps_it(tmp_path) -> None:
    data = tmp_path / "fresh"
    argv = [sys.executable, "-m", "discovery.catalog", "--listen", "127.0.0.1:0", "--data-dir", str(data)]
    proc, ready = start_server(argv, cwd=str(REPO))
    try:
        path = data / "management-token"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        token = path.read_text().strip()
        assert len(token) == 36 and token != TEST_TOKEN      # a UUID, like Consul's SecretIDs
        r = requests.put(f"http://{ready['http']}/v1/kv/k", data="v", headers={"X-Consul-Token": token}, timeout=5)
        assert r.status_code == 200
    finally:
        assert stop_process(proc) == 0
    proc, ready = start_server(argv, cwd=str(REPO))
    try:
        assert path.read_text().strip() == token
        r = requests.get(f"http://{ready['http']}/v1/kv/k?raw", headers={"X-Consul-Token": token}, timeout=5)
        assert (r.status_code, r.text) == (200, "v")
    finally:
        assert stop_process(proc) == 0


@pytest.mark.parametrize("call, permission", [
    pytest.param(lambda c: c.kv.get("foo"), "'key:read' on \"foo\"", id="kv-read"),
    pytest.param(lambda c: c.kv.put("foo", "x"), "'key:write' on \"foo\"", id="kv-write"),
    pytest.param(lambda c: c.catalog.services(), "'service:read'", id="catalog-services"),
    pytest.param(lambda c: c.health.service("web"), "'service:read' on \"web\"", id="health"),
    pytest.param(lambda c: c.agent.service.register("web"), "'service:write'", id="register"),
    pytest.param(lambda c: c.session.create(), "'session:write'", id="session"),
])
def test_no_token_is_refused_with_consuls_403(catalog, call, permission: str) -> None:
    c = catalog.client(token=None)
    with pytest.raises(consul.ACLPermissionDenied) as info:
        call(c)
    assert str(info.value) == f"{ANONYMOUS} {permission}"


def test_a_wrong_token_is_acl_not_found(catalog) -> None:
    with pytest.raises(consul.ACLPermissionDenied) as info:
        catalog.client(token="00000000-1111-2222-3333-444444444444").kv.get("foo")
    assert str(info.value) == "ACL not found"
    assert catalog.client().kv.get("foo")[1] is None          # the management token still reads


def test_the_token_is_read_where_consul_reads_it(catalog) -> None:
    url, token = catalog.url + "/v1/kv/where", catalog.token
    assert catalog.http.put(url, data="x").status_code == 200
    ways = {
        "query": requests.get(url, params={"token": token}, timeout=5),
        "header": requests.get(url, headers={"X-Consul-Token": token}, timeout=5),
        "bearer": requests.get(url, headers={"Authorization": f"Bearer {token}"}, timeout=5),
        # ?token= first, as Consul's parseTokenInternal: a wrong header does not matter then
        "query-first": requests.get(url, params={"token": token}, headers={"X-Consul-Token": "nope"}, timeout=5),
    }
    assert {k: r.status_code for k, r in ways.items()} == dict.fromkeys(ways, 200)
    bad = requests.get(url, headers={"Authorization": "Bearer nope"}, timeout=5)
    assert (bad.status_code, bad.text) == (403, "ACL not found")


def test_status_and_datacenters_are_open_as_in_consul(catalog) -> None:
    c = catalog.client(token=None)
    assert c.status.leader() and c.catalog.datacenters() == ["dc1"]


def test_the_token_never_reaches_the_log_or_an_error_text(tmp_path) -> None:
    log_path = tmp_path / "catalog.log"
    with open(log_path, "w") as log:
        proc, ready = start_server([sys.executable, "-m", "discovery.catalog", "--listen", "127.0.0.1:0",
                                    "--data-dir", str(tmp_path / "d"), "--log-level", "debug"],
                                   cwd=str(REPO), stderr=log)
    try:
        token = (tmp_path / "d" / "management-token").read_text().strip()
        url = f"http://{ready['http']}"
        # an error text that echoes the query (Consul's "Conflicting flags") leaves the token out
        r = requests.get(url + "/v1/health/service/web", params={"token": token, "cached": "", "consistent": "",
                                                                  "stale": ""}, timeout=5)
        assert r.status_code == 400 and token not in r.text
        r = requests.get(url + "/v1/catalog/services", params={"token": token, "near": "_agent", "cached": "",
                                                                "consistent": ""}, timeout=5)
        assert token not in r.text
        requests.get(url + "/v1/kv/x", headers={"X-Consul-Token": token + "x"}, timeout=5)
    finally:
        assert stop_process(proc) == 0
    text = log_path.read_text()
    assert "catalog serving http" in text and token not in text


def test_a_token_file_others_can_read_stops_the_start(tmp_path) -> None:
    data = tmp_path / "d"
    data.mkdir()
    (data / "management-token").write_text("abc\n")
    os.chmod(data / "management-token", 0o644)
    done = subprocess.run([sys.executable, "-m", "discovery.catalog", "--listen", "127.0.0.1:0",
                           "--data-dir", str(data)], cwd=str(REPO), capture_output=True, text=True, timeout=30)
    assert done.returncode == 1
    assert f"can be read by others (mode 0644): chmod 600 {data / 'management-token'}" in done.stderr
    assert "abc" not in done.stderr


def test_token_file_option_names_where_the_token_lives(catalog_factory, tmp_path) -> None:
    path = tmp_path / "elsewhere.token"
    cat = catalog_factory("--token-file", str(path))
    assert cat.token_file == path and path.exists()
    assert not (cat.data_dir / "management-token").exists()
    assert cat.client().kv.put("k", "v") is True


# --------------------------------------------------------------------------- HTTPS


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    import trustme

    d = tmp_path_factory.mktemp("tls")
    ca, other_ca = trustme.CA(), trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("meshlet-client")
    files = {"ca": d / "ca.pem", "other_ca": d / "other-ca.pem", "cert": d / "server.pem",
             "client": d / "client.pem"}
    ca.cert_pem.write_to_path(str(files["ca"]))
    other_ca.cert_pem.write_to_path(str(files["other_ca"]))
    server.private_key_and_cert_chain_pem.write_to_path(str(files["cert"]))
    client.private_key_and_cert_chain_pem.write_to_path(str(files["client"]))
    return {k: str(v) for k, v in files.items()}


@pytest.fixture
def https_catalog(tmp_path, tls):
    cat = CatalogProcess(tmp_path / "tls-catalog", ("--tls-cert-file", tls["cert"], "--tls-key-file", tls["cert"]))
    cat.ca_file = tls["ca"]
    cat.start()
    yield cat
    cat.stop()


def test_https_with_the_ca_file(https_catalog, tls) -> None:
    assert https_catalog.url.startswith("https://")
    c = https_catalog.client()
    assert c.kv.put("k", "v") is True and c.kv.get("k")[1]["Value"] == b"v"
    with pytest.raises(requests.exceptions.SSLError):
        https_catalog.client(verify=tls["other_ca"]).kv.get("k")


def test_https_requiring_client_certificates(tmp_path, tls) -> None:
    cat = CatalogProcess(tmp_path / "mtls", ("--tls-cert-file", tls["cert"], "--tls-key-file", tls["cert"],
                                             "--tls-client-ca-file", tls["ca"]))
    cat.ca_file = tls["ca"]
    cat.start()
    try:
        assert cat.client(cert=(tls["client"], tls["client"])).kv.put("k", "v") is True
        with pytest.raises(requests.exceptions.RequestException):
            cat.client().kv.get("k")
    finally:
        cat.stop()


def test_tls_files_that_cannot_be_used_stop_the_start(tmp_path, tls) -> None:
    with pytest.raises(ServerStartError):
        start_server([sys.executable, "-m", "discovery.catalog", "--listen", "127.0.0.1:0", "--data-dir",
                      str(tmp_path / "d"), "--tls-cert-file", str(tmp_path / "missing.pem"),
                      "--tls-key-file", str(tmp_path / "missing.pem")], cwd=str(REPO))
    done = subprocess.run([sys.executable, "-m", "discovery.catalog", "--tls-cert-file", tls["cert"]],
                          cwd=str(REPO), capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "--tls-cert-file and --tls-key-file go together" in done.stderr
