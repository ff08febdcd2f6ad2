"""Where meshlet's catalog client finds the token and TLS files (access_for_mesh,
access_from_args): pure but for reading token files."""

from __future__ import annotations

import argparse

import pytest

import config
from discovery.consul import CatalogAccess, CatalogAccessError, access_for_mesh, access_from_args


def mesh(tmp_path, text: str = "") -> config.MeshSettings:
    return config.loads(f"mesh:\n  catalog_listen: 127.0.0.1:8500\n{text}", base_dir=str(tmp_path)).mesh


@pytest.fixture
def embedded_token(tmp_path):
    path = tmp_path / ".meshlet" / "catalog" / "management-token"
    path.parent.mkdir(parents=True)
    path.write_text("embedded-token\n")
    return path


@pytest.mark.parametrize("url, text, env, token, source", [
    pytest.param("http://127.0.0.1:8500", "", {"CONSUL_HTTP_TOKEN": "from-env"}, "embedded-token",
                 "the embedded catalog's token file", id="embedded-file-beats-env"),
    pytest.param("http://127.0.0.1:9999", "", {"CONSUL_HTTP_TOKEN": "from-env"}, "from-env", "$CONSUL_HTTP_TOKEN",
                 id="another-catalog-env"),
    pytest.param("http://127.0.0.1:9999", "", {}, None, "no token", id="another-catalog-none"),
    pytest.param("http://c:1", "  catalog: {url: 'http://c:1', token: from-file}\n",
                 {"CONSUL_HTTP_TOKEN": "from-env"}, "from-file", "mesh.catalog.token", id="config-beats-env"),
])
def test_token_precedence(tmp_path, embedded_token, url, text, env, token, source) -> None:
    access = access_for_mesh(url, mesh(tmp_path, text), env)
    assert access.token == token and access.token_source.startswith(source)
    assert "embedded-token" not in repr(access) and "from-" not in repr(access)


def test_token_file_env_and_missing_files(tmp_path) -> None:
    f = tmp_path / "t"
    f.write_text("  tok  \n")
    access = access_for_mesh("http://c:1", mesh(tmp_path), {"CONSUL_HTTP_TOKEN_FILE": str(f)})
    assert access.token == "tok" and access.token_source == f"$CONSUL_HTTP_TOKEN_FILE ({f})"
    with pytest.raises(CatalogAccessError, match=r"mesh.catalog.token_file: cannot read .*/nope: No such file"):
        access_for_mesh("http://c:1", mesh(tmp_path, "  catalog: {url: 'http://c:1', token_file: nope}\n"), {})
    f.write_text("\n")
    with pytest.raises(CatalogAccessError, match="is empty"):
        access_for_mesh("http://c:1", mesh(tmp_path), {"CONSUL_HTTP_TOKEN_FILE": str(f)})


def test_tls_files_need_https_and_travel_as_arguments(tmp_path) -> None:
    with pytest.raises(CatalogAccessError, match="needs an https:// catalog URL"):
        CatalogAccess("http://c:1", ca_file="ca.pem")
    access = access_for_mesh("https://c:1", mesh(tmp_path), {"CONSUL_CACERT": "/ca.pem", "CONSUL_HTTP_TOKEN": "t"})
    assert access.child_args() == ["--consul", "https://c:1", "--ca-file", "/ca.pem"]
    assert access.child_env({"CONSUL_HTTP_TOKEN_FILE": "/x", "PATH": "/bin"}) == {"PATH": "/bin",
                                                                                  "CONSUL_HTTP_TOKEN": "t"}


def test_component_flags_win_over_the_environment(tmp_path) -> None:
    p = argparse.ArgumentParser()
    config.add_catalog_arguments(p)
    f = tmp_path / "t"
    f.write_text("file-token")
    args = p.parse_args(["--consul", "https://c:1", "--token-file", str(f), "--ca-file", "/flag-ca.pem"])
    access = access_from_args(args, {"CONSUL_HTTP_TOKEN": "env-token", "CONSUL_CACERT": "/env-ca.pem"})
    assert (access.token, access.ca_file) == ("file-token", "/flag-ca.pem")
    assert access_from_args(p.parse_args(["--consul", "http://c:1"]), {"CONSUL_HTTP_TOKEN": "e"}).token == "e"
