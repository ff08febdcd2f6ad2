"""What a replica is given of its secrets and configs: the versions its spec names, read
from the catalog and (secrets) opened with the mesh's key-encryption key, as files and
environment variables for the runtime (``runtime.DeliveredFile``, ``secret_env``).

The supervisor decrypts here and nowhere else, at the moment it starts a replica; the
values go to the runtime and are kept nowhere else (no cache, no log, no state file).
A secret or config that cannot be had (a version no longer in the mesh, no key or the
wrong key, a value that cannot go in a variable) is a ``DeliveryError``: the start is
refused with that reason, which ``meshlet status`` shows, and nothing runs with a wrong
or missing value. A key the keyring does not hold (a rotation under way) makes it read
its source again once.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import config
from discovery.consul import kv_get

from ..runtime import DeliveredFile, WorkloadError
from ..secrets import (KeyFileError, Keyring, KeySource, SecretError, config_data, load_keyring, read_versions,
                       unseal)

__all__ = ["Deliveries", "DeliveryError"]

log = logging.getLogger("supervisor.deliveries")


class DeliveryError(WorkloadError):
    """A replica's secret or config cannot be delivered; the text says which and why."""


class Deliveries:
    def __init__(self, kv: Any, key_source: KeySource | None) -> None:
        self.kv = kv                       # py-consul's aio client
        self.key_source = key_source
        self._keyring: Keyring | None = None

    def _load_keyring(self) -> Keyring:
        if self.key_source is None:
            raise DeliveryError("this supervisor has no key-encryption key (start it with --secrets-key-file "
                                "or --secrets-key-env)")
        try:
            keyring = load_keyring(self.key_source)
        except KeyFileError as exc:
            raise DeliveryError(f"no key-encryption key: {exc}") from None
        if keyring is None:
            raise DeliveryError(f"no key-encryption key: {self.key_source.describe()} does not exist "
                                "(meshlet apply makes it when it stores the first secret)")
        self._keyring = keyring
        return keyring

    async def _version(self, kind: str, name: str, version: int | None) -> tuple[int, Any]:
        """(version, stored document); the newest when the spec names none."""
        key_of = config.secret_key if kind == "secret" else config.config_key
        if version is None:
            _, entries = await self.kv.kv.get(key_of(name), recurse=True)
            found = read_versions(entries or (), kind).get(name)
            if found is None or found.latest is None:
                raise DeliveryError(f"{kind} {name} is not in the mesh (`meshlet {kind} ls`)")
            return found.latest, found.docs[found.latest]
        _, raw = await kv_get(self.kv, key_of(name, version))
        if raw is None:
            raise DeliveryError(f"{kind} {name} version {version} is no longer in the mesh (the newest "
                                f"versions are kept; apply the {kind} again)")
        try:
            return version, json.loads(raw)
        except ValueError:
            raise DeliveryError(f"{kind} {name} version {version}: unreadable in the catalog") from None

    async def _secret(self, name: str, version: int, doc: Any) -> bytes:
        keyring = self._keyring or await asyncio.to_thread(self._load_keyring)
        try:
            return unseal(keyring, name, version, doc)
        except SecretError as exc:
            if not (isinstance(doc, dict) and doc.get("key_id") not in keyring.ids):
                raise DeliveryError(str(exc)) from None
        keyring = await asyncio.to_thread(self._load_keyring)     # rotated meanwhile?
        try:
            return unseal(keyring, name, version, doc)
        except SecretError as exc:
            raise DeliveryError(str(exc)) from None

    async def resolve(self, spec: config.ServiceSpec) -> tuple[tuple[DeliveredFile, ...], dict[str, str]]:
        """The files and variables a replica of ``spec`` gets."""
        files: list[DeliveredFile] = []
        env: dict[str, str] = {}
        for m in spec.secrets:
            version, doc = await self._version("secret", m.name, m.version)
            value = await self._secret(m.name, version, doc)
            if m.target is not None:
                files.append(DeliveredFile("secret", m.name, m.target, value, m.mode, m.uid, m.gid))
            if m.env is not None:
                try:
                    text = value.decode("utf-8")
                except UnicodeDecodeError:
                    text = "\0"
                if "\0" in text:
                    raise DeliveryError(f"secret {m.name} cannot go in ${m.env}: it is not text (UTF-8 without "
                                        "NUL); deliver it as a file")
                env[m.env] = text
        for c in spec.configs:
            version, doc = await self._version("config", c.name, c.version)
            try:
                data = config_data(c.name, version, doc)
            except SecretError as exc:
                raise DeliveryError(str(exc)) from None
            files.append(DeliveredFile("config", c.name, c.target, data, c.mode))
        return tuple(files), env
