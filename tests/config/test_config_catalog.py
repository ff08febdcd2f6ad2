"""mesh.catalog: the short form, the mapping, and what is refused (with the line and path,
and never the token's value)."""

from __future__ import annotations

import pytest

import config


def test_short_form_and_mapping_read_alike() -> None:
    short = config.loads("mesh: {catalog: http://127.0.0.1:8500}\n").mesh.catalog
    full = config.loads("mesh: {catalog: {url: http://127.0.0.1:8500}}\n").mesh.catalog
    assert short == full and short.url == "http://127.0.0.1:8500" and not short.embedded
    assert config.loads("").mesh.catalog.embedded


def test_paths_are_the_files_and_the_token_never_shows(tmp_path) -> None:
    mesh = config.loads("mesh:\n  catalog: {url: https://c:8501, token: s3cret-t0ken, ca_file: ca.pem,"
                        " cert_file: c.pem, key_file: k.pem}\n", base_dir=str(tmp_path)).mesh
    cat = mesh.catalog
    assert cat.token == "s3cret-t0ken" and cat.ca_file == str(tmp_path / "ca.pem")
    assert "s3cret" not in repr(cat) + repr(mesh) and "token" not in config._model.to_plain(cat)
    assert mesh.catalog_token_file is None


def test_embedded_token_file_default_and_override(tmp_path) -> None:
    mesh = config.loads("mesh: {data_dir: st}\n", base_dir=str(tmp_path)).mesh
    assert mesh.catalog_token_file == str(tmp_path / "st" / "catalog" / "management-token")
    mesh = config.loads("mesh: {catalog: {token_file: t}}\n", base_dir=str(tmp_path)).mesh
    assert mesh.catalog_token_file == str(tmp_path / "t")


@pytest.mark.parametrize("text, message", [
    pytest.param("{token: a, token_file: b}", "<string>:1 mesh.catalog: give token or token_file, not both",
                 id="token-and-file"),
    pytest.param("{url: 'https://c:1', cert_file: c}",
                 "<string>:1 mesh.catalog.cert_file: needs key_file too (a client certificate is both)", id="cert-alone"),
    pytest.param("{url: 'http://c:1', ca_file: ca}", "<string>:1 mesh.catalog.ca_file: needs an https:// url "
                 "(url is http://c:1)", id="tls-on-http"),
    pytest.param("{ca_file: ca}", "<string>:1 mesh.catalog.ca_file: the embedded catalog serves plain HTTP on "
                 "catalog_listen; TLS options need url: https://...", id="tls-on-embedded"),
    pytest.param("{token: abc}", "<string>:1 mesh.catalog.token: the embedded catalog makes its own management "
                 "token; token_file may name where it keeps it", id="token-on-embedded"),
    pytest.param("{url: 'http://c:1', token: 123456}", "<string>:1 mesh.catalog.token: expected the token as a "
                 "non-empty string (the value is not shown)", id="token-not-text"),
    pytest.param("{url: 'ftp://c'}", "<string>:1 mesh.catalog.url: expected embedded or a Consul URL like "
                 "http://127.0.0.1:8500", id="bad-url"),
    pytest.param("{urll: 'http://c:1'}", '<string>:1 mesh.catalog.urll: unknown key (did you mean "url"?)',
                 id="typo"),
])
def test_refused(text: str, message: str) -> None:
    with pytest.raises(config.ConfigError) as info:
        config.loads(f"mesh: {{catalog: {text}}}\n")
    got = [str(i) for i in info.value.issues]
    assert any(g.startswith(message) for g in got), got
    assert "123456" not in " ".join(got)
