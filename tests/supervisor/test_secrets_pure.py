"""The pure parts of secrets and configs: envelope encryption, what an apply writes of
them, the versions pinned in specs, and that nothing shows a value."""

from __future__ import annotations

import base64
import json
import os

import pytest

import config
from supervisor.runtime import DeliveredFile, InstanceSpec
from supervisor.runtime.base import spec_to_dict
from supervisor.secrets import (CONFIG, KEEP, SECRET, KeyFileError, Keyring, KeySource, PlanError, SecretError,
                                Versions, config_data, config_doc, key_id, load_keyring, new_key, pin,
                                plan_objects, rewrap, seal, unseal, write_keyring)

NOW = 1000.0
K1 = Keyring.of([new_key()])


def stored(kind: str, name: str, docs: dict[int, dict]) -> dict[str, Versions]:
    return {name: Versions(name, docs, {v: 10 + v for v in docs})}


# ---------------------------------------------------------------- envelope

def test_seal_and_unseal_round_trip_and_hide_the_value() -> None:
    doc = seal(K1.primary, "tok", 3, b"hunter2", source="file", now=NOW)
    assert unseal(K1, "tok", 3, doc) == b"hunter2"
    text = json.dumps(doc).encode()
    assert b"hunter2" not in text and base64.b64encode(b"hunter2") not in text
    assert doc["key_id"] == key_id(K1.primary) and doc["version"] == 3


@pytest.mark.parametrize("change, message", [
    pytest.param(lambda d: {**d, "key_id": "0" * 16}, "is sealed with key-encryption key 0000", id="unknown-key"),
    pytest.param(lambda d: {**d, "value": base64.b64encode(b"x" * 40).decode()}, "does not open with its data key",
                 id="value-altered"),
    pytest.param(lambda d: {**d, "dek": d["value"]}, "its data key does not open", id="dek-altered"),
    pytest.param(lambda d: {**d, "version": 4}, "not a stored secret version", id="other-version"),
    pytest.param(lambda d: {**d, "value": "%%"}, "not base64", id="garbage"),
])
def test_an_altered_version_never_opens(change, message) -> None:
    doc = seal(K1.primary, "tok", 3, b"hunter2", source="file", now=NOW)
    with pytest.raises(SecretError, match=message) as info:
        unseal(K1, "tok", 3, change(doc))
    assert "hunter2" not in str(info.value)


def test_a_version_is_bound_to_its_name_and_its_key() -> None:
    doc = seal(K1.primary, "tok", 1, b"hunter2", source="file", now=NOW)
    with pytest.raises(SecretError, match="belongs to another name"):
        unseal(K1, "other", 1, doc)
    with pytest.raises(SecretError, match="not the mesh's key here"):
        unseal(Keyring.of([new_key()]), "tok", 1, doc)


def test_rewrap_moves_the_data_key_to_a_new_kek_and_keeps_the_ciphertext() -> None:
    doc = seal(K1.primary, "tok", 1, b"hunter2", source="file", now=NOW)
    fresh = new_key()
    new = rewrap(Keyring.of([fresh, K1.primary]), fresh, "tok", 1, doc)
    assert new["value"] == doc["value"] and new["key_id"] == key_id(fresh)
    assert unseal(Keyring.of([fresh]), "tok", 1, new) == b"hunter2"


def test_keyring_repr_shows_ids_only() -> None:
    assert repr(K1) == f"Keyring({K1.ids[0]})"


# ---------------------------------------------------------------- what an apply writes

# "-" is outside base64: a value found in a sealed document can only be the plain text
@pytest.mark.parametrize("have, value, action, version, writes", [
    pytest.param({}, b"plain-v1", "created", 1, 1, id="new"),
    pytest.param({1: "plain-v1"}, b"plain-v1", "unchanged", 1, 0, id="same-value"),
    pytest.param({1: "plain-v1"}, b"plain-v2", "changed", 2, 1, id="new-value"),
    pytest.param({1: "plain-v1", 2: "plain-v2"}, b"plain-v1", "changed", 3, 1, id="back-to-an-old-value-is-a-new-version"),
])
@pytest.mark.parametrize("kind", [SECRET, CONFIG])
def test_plan_versions(kind, have, value, action, version, writes) -> None:
    docs = {v: (seal(K1.primary, "x", v, val.encode(), source="file", now=NOW) if kind == SECRET
                else config_doc(v, val.encode(), NOW)) for v, val in have.items()}
    plan = plan_objects(kind, {"x": (value, "file")}, (), stored(kind, "x", docs), K1 if kind == SECRET else None, NOW)
    (change,) = plan.changes
    assert (change.action, change.version, len(plan.writes)) == (action, version, writes)
    assert plan.versions == {(kind, "x"): version}
    for key, doc in plan.writes:
        assert key == f"meshlet/{kind}s/x/{version}" and value not in doc or kind == CONFIG


def test_only_the_newest_versions_are_kept() -> None:
    docs = {v: config_doc(v, str(v).encode(), NOW) for v in range(1, KEEP + 1)}
    plan = plan_objects(CONFIG, {"x": (b"new", "file")}, (), stored(CONFIG, "x", docs), None, NOW)
    assert [k for k, _ in plan.deletes] == ["meshlet/configs/x/1"] and plan.changes[0].version == KEEP + 1


def test_an_external_secret_must_exist_and_a_foreign_key_is_refused() -> None:
    with pytest.raises(PlanError, match="secret api is external, but the mesh holds no secret api"):
        plan_objects(SECRET, {}, ["api"], {}, K1, NOW)
    plan = plan_objects(SECRET, {}, ["api"], stored(SECRET, "api", {
        2: seal(K1.primary, "api", 2, b"k", source="cli", now=NOW)}), K1, NOW)
    assert plan.versions == {(SECRET, "api"): 2} and not plan.writes
    other = Keyring.of([new_key()])
    with pytest.raises(PlanError, match="the key here is another"):
        plan_objects(SECRET, {"api": (b"k2", "file")}, (), stored(SECRET, "api", {
            2: seal(K1.primary, "api", 2, b"k", source="cli", now=NOW)}), other, NOW)


def test_sizes_are_bounded_with_a_clear_error() -> None:
    with pytest.raises(PlanError, match="more than the 256 KiB a secret may hold"):
        plan_objects(SECRET, {"big": (b"x" * (256 * 1024 + 1), "file")}, (), {}, K1, NOW)
    with pytest.raises(PlanError, match="config big: 262145 bytes"):
        plan_objects(CONFIG, {"big": (b"x" * (256 * 1024 + 1), "file")}, (), {}, None, NOW)


def test_config_data_checks_its_digest() -> None:
    doc = config_doc(1, b"listen 80\n", NOW)
    assert config_data("site", 1, doc) == b"listen 80\n"
    with pytest.raises(SecretError, match="does not match its digest"):
        config_data("site", 1, {**doc, "data": base64.b64encode(b"listen 81\n").decode()})


def test_pin_names_the_versions_in_the_spec_and_so_in_the_revision() -> None:
    spec = config.loads("""
secrets: {t: {env: X}}
configs: {c: {data: "y"}}
services: {web: {command: [a], secrets: [{name: t}], configs: [{name: c, target: /c}]}}
""", base_dir="/").services["web"]
    one = pin(spec, {(SECRET, "t"): 1, (CONFIG, "c"): 1})
    two = pin(spec, {(SECRET, "t"): 2, (CONFIG, "c"): 1})
    assert one.secrets[0].version == 1 and one.configs[0].version == 1
    assert config.service_revision(one) != config.service_revision(two)
    assert pin(one, {}) is one
    # a version read back from the stored document
    doc = config.service_document(two, None)
    assert config.parse_service_document(json.dumps(doc))[0].secrets[0].version == 2


# ---------------------------------------------------------------- the key file

def test_key_file_made_private_and_refused_when_others_can_read_it(tmp_path) -> None:
    source = KeySource(path=tmp_path / "k", default=True)
    assert load_keyring(source) is None                      # not made unless asked
    made = load_keyring(source, create=True)
    assert os.stat(tmp_path / "k").st_mode & 0o777 == 0o600
    assert load_keyring(source).ids == made.ids
    os.chmod(tmp_path / "k", 0o644)
    with pytest.raises(KeyFileError, match="can be read by others"):
        load_keyring(source)
    with pytest.raises(KeyFileError, match="does not exist"):
        load_keyring(KeySource(path=tmp_path / "none"))       # a named file is never made


def test_key_from_an_environment_variable(monkeypatch) -> None:
    keys = [new_key(), new_key()]
    monkeypatch.setenv("K", ",".join(base64.b64encode(k).decode() for k in keys))
    assert load_keyring(KeySource(env="K")).keys == tuple(keys)
    monkeypatch.setenv("K", "bm90IDMyIGJ5dGVz")
    with pytest.raises(KeyFileError, match="expected 32"):
        load_keyring(KeySource(env="K"))
    monkeypatch.delenv("K")
    with pytest.raises(KeyFileError, match=r"\$K .* is not set"):
        load_keyring(KeySource(env="K"))


def test_write_keyring_exclusive_makes_one_key_only(tmp_path) -> None:
    write_keyring(tmp_path / "k", K1, exclusive=True)
    with pytest.raises(KeyFileError, match="appeared meanwhile"):
        write_keyring(tmp_path / "k", Keyring.of([new_key()]), exclusive=True)
    assert load_keyring(KeySource(path=tmp_path / "k")).ids == K1.ids


# ---------------------------------------------------------------- what a runtime is given

def test_a_delivered_value_never_shows_in_a_spec_repr_or_its_stored_form() -> None:
    spec = InstanceSpec("web-0-a", "web", 0, "r", "local", command=("app",), env={"PLAIN": "ok"},
                        files=(DeliveredFile("secret", "tok", "/run/secrets/tok", b"hunter2"),),
                        secret_env={"DB_PASSWORD": "pa55"})
    for shown in (repr(spec), json.dumps(spec_to_dict(spec)), repr(spec.files[0])):
        assert "hunter2" not in shown and "pa55" not in shown
    assert "PLAIN" in json.dumps(spec_to_dict(spec))
