"""Secret and config versions in the catalog's KV, and what an apply writes of them. Pure.

    meshlet/secrets/<name>/<version>   a sealed version (``_crypto``)
    meshlet/configs/<name>/<version>   {"version", "created_at", "digest": sha256 hex, "data": base64}

Versions only grow and are never rewritten (a rotation re-wraps data keys in place, the
value's ciphertext stays); the newest ``KEEP`` of each are kept, so a rollback to a recent
revision finds the version it ran. A service's stored spec names the version each of its
mounts runs (``SecretMount.version``, ``ConfigMount.version``): a new version is a new
revision, which rolls like any other change.

``plan_objects`` decides, from the values an apply read (or ``meshlet secret set`` got)
and what KV holds: a new version when the value differs from the newest (a secret is
compared by its keyed MAC, never decrypted here; a config by its digest), the writes
(create-only) and the old versions to drop; ``pin`` writes the versions into specs.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import config

from ._crypto import MAX_VALUE, Keyring, SecretError, seal, value_mac

__all__ = ["KEEP", "Versions", "ObjectChange", "ObjectPlan", "PlanError", "read_versions", "plan_objects",
           "pin", "config_doc", "config_data", "SECRET", "CONFIG", "users"]

KEEP = 10
SECRET, CONFIG = "secret", "config"
_PREFIX = {SECRET: config.SECRETS_PREFIX, CONFIG: config.CONFIGS_PREFIX}


class PlanError(Exception):
    """What an apply cannot write (an external secret that does not exist, a wrong key)."""


@dataclass(frozen=True)
class Versions:
    """What KV holds of one secret or config."""
    name: str
    docs: Mapping[int, dict[str, Any]] = field(default_factory=dict)   # version -> stored document
    index: Mapping[int, int] = field(default_factory=dict)             # version -> ModifyIndex

    @property
    def latest(self) -> int | None:
        return max(self.docs) if self.docs else None


def read_versions(entries: Iterable[Mapping[str, Any]], kind: str) -> dict[str, Versions]:
    """KV entries (``Key``, ``Value``, ``ModifyIndex``) under a kind's prefix, by name.
    Unreadable values are skipped (and never chosen as the newest)."""
    docs: dict[str, dict[int, dict[str, Any]]] = {}
    index: dict[str, dict[int, int]] = {}
    for e in entries:
        parts = config.split_version_key(e["Key"], _PREFIX[kind])
        if parts is None:
            continue
        name, version = parts
        try:
            doc = json.loads(e.get("Value") or b"")
        except ValueError:
            continue
        if isinstance(doc, dict) and doc.get("version") == version:
            docs.setdefault(name, {})[version] = doc
            index.setdefault(name, {})[version] = int(e.get("ModifyIndex", 0))
    return {n: Versions(n, docs[n], index[n]) for n in docs}


def config_doc(version: int, data: bytes, now: float) -> dict[str, Any]:
    if len(data) > MAX_VALUE:
        raise PlanError(f"{len(data)} bytes, more than the {MAX_VALUE // 1024} KiB a config may hold")
    return {"version": version, "created_at": now, "digest": hashlib.sha256(data).hexdigest(),
            "data": base64.b64encode(data).decode("ascii")}


def config_data(name: str, version: int, doc: Any) -> bytes:
    if not isinstance(doc, dict) or doc.get("version") != version:
        raise SecretError(f"config {name} version {version}: not a stored config version")
    try:
        data = base64.b64decode(doc["data"], validate=True)
    except (KeyError, ValueError, TypeError):
        raise SecretError(f"config {name} version {version}: unreadable data") from None
    if hashlib.sha256(data).hexdigest() != doc.get("digest"):
        raise SecretError(f"config {name} version {version}: the data does not match its digest")
    return data


@dataclass(frozen=True)
class ObjectChange:
    kind: str            # SECRET | CONFIG
    name: str
    action: str          # created | changed | unchanged
    version: int

    def line(self, dry_run: bool = False) -> str:
        verb = {"created": "would create", "changed": "would change"}.get(self.action, self.action) \
            if dry_run else self.action
        return f"{self.kind} {self.name}: {verb} (version {self.version})"


@dataclass(frozen=True)
class ObjectPlan:
    changes: tuple[ObjectChange, ...] = ()
    writes: tuple[tuple[str, bytes], ...] = ()         # key -> document (create-only)
    deletes: tuple[tuple[str, int], ...] = ()          # key, ModifyIndex: versions beyond KEEP
    versions: Mapping[tuple[str, str], int] = field(default_factory=dict)   # (kind, name) -> version to run


def _same(kind: str, name: str, value: bytes, doc: dict[str, Any], keyring: Keyring | None) -> bool:
    if kind == CONFIG:
        return doc.get("digest") == hashlib.sha256(value).hexdigest()
    kid = doc.get("key_id")
    key = keyring.get(kid) if keyring is not None and isinstance(kid, str) else None
    if key is None:
        held = ", ".join(keyring.ids) if keyring is not None else "none"
        raise PlanError(f"secret {name}: the mesh's version {doc.get('version')} is sealed with key-encryption "
                        f"key {kid}, and the key here is another ({held}); use the mesh's key")
    return doc.get("mac") == value_mac(key, name, value)


def plan_objects(kind: str, values: Mapping[str, tuple[bytes, str]], external: Iterable[str],
                 stored: Mapping[str, Versions], keyring: Keyring | None, now: float) -> ObjectPlan:
    """What to write for ``values`` (name -> (value, source)) and the ``external`` names
    (those must exist already). Secrets need ``keyring`` (its primary key seals)."""
    changes: list[ObjectChange] = []
    writes: list[tuple[str, bytes]] = []
    deletes: list[tuple[str, int]] = []
    versions: dict[tuple[str, str], int] = {}
    for name in sorted(external):
        have = stored.get(name)
        if have is None or have.latest is None:
            raise PlanError(f"{kind} {name} is external, but the mesh holds no {kind} {name}: "
                            f"set it first with `meshlet {kind} set {name}`")
        versions[(kind, name)] = have.latest
        changes.append(ObjectChange(kind, name, "unchanged", have.latest))
    for name in sorted(values):
        value, source = values[name]
        have = stored.get(name) or Versions(name)
        latest = have.latest
        if latest is not None and _same(kind, name, value, have.docs[latest], keyring):
            versions[(kind, name)] = latest
            changes.append(ObjectChange(kind, name, "unchanged", latest))
            continue
        version = (latest or 0) + 1
        if kind == SECRET:
            if keyring is None:
                raise PlanError(f"secret {name}: no key-encryption key to seal it with")
            try:
                doc = seal(keyring.primary, name, version, value, source=source, now=now)
            except SecretError as exc:
                raise PlanError(str(exc)) from None
        else:
            try:
                doc = config_doc(version, value, now)
            except PlanError as exc:
                raise PlanError(f"config {name}: {exc}") from None
        key = (config.secret_key if kind == SECRET else config.config_key)(name, version)
        writes.append((key, config.canonical_json(doc).encode()))
        versions[(kind, name)] = version
        changes.append(ObjectChange(kind, name, "created" if latest is None else "changed", version))
        for old in sorted(have.docs)[:max(0, len(have.docs) + 1 - KEEP)]:
            deletes.append(((config.secret_key if kind == SECRET else config.config_key)(name, old),
                            have.index[old]))
    return ObjectPlan(tuple(changes), tuple(writes), tuple(deletes), versions)


def pin(spec: config.ServiceSpec, versions: Mapping[tuple[str, str], int]) -> config.ServiceSpec:
    """``spec`` with each secret and config mount naming the version to run."""
    secrets = tuple(dataclasses.replace(m, version=versions.get((SECRET, m.name), m.version)) for m in spec.secrets)
    configs = tuple(dataclasses.replace(m, version=versions.get((CONFIG, m.name), m.version)) for m in spec.configs)
    if secrets == spec.secrets and configs == spec.configs:
        return spec
    return dataclasses.replace(spec, secrets=secrets, configs=configs)


def users(kind: str, name: str, specs: Iterable[config.ServiceSpec]) -> list[str]:
    """The services whose spec mounts the secret or config ``name``."""
    field_ = "secrets" if kind == SECRET else "configs"
    return sorted(s.name for s in specs if any(m.name == name for m in getattr(s, field_)))

