"""Envelope encryption of secret values: AES-256-GCM, a data key per secret version,
wrapped by the mesh's key-encryption key (KEK). Pure: no files, no catalog.

A stored version (the value of ``meshlet/secrets/<name>/<version>``)::

    {"version": 3, "created_at": 1764000000.0, "source": "file" | "env" | "cli",
     "key_id": "9f86d081884c7d65",              the KEK that wraps its data key
     "dek": "<base64: nonce(12) + AES-GCM(KEK, data key)>",
     "value": "<base64: nonce(12) + AES-GCM(data key, value)>",
     "mac": "<hex: HMAC-SHA256(KEK, name, value)>"}     to tell "unchanged" without decrypting

Both AES-GCM operations authenticate the secret's name and version (the associated data),
so a version copied to another key or name fails to open instead of delivering the wrong
value; a wrong KEK fails to open too (GCM's tag), so no wrong plaintext ever comes out.
``key_id`` is an HMAC of a fixed label under the KEK: it names the key without revealing
anything about it. Errors: ``SecretError`` says which secret, which version and why, never
the value.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

__all__ = ["KEY_BYTES", "MAX_VALUE", "SecretError", "Keyring", "new_key", "key_id", "seal", "unseal",
           "value_mac", "rewrap"]

KEY_BYTES = 32                  # AES-256
NONCE_BYTES = 12
# Largest value of a secret or config: Consul's KV takes 512 KiB per value, and a version
# is stored base64-encoded with its metadata.
MAX_VALUE = 256 * 1024


class SecretError(Exception):
    """A secret version that cannot be sealed or opened; the text says why, never the value."""


def new_key() -> bytes:
    return os.urandom(KEY_BYTES)


def key_id(key: bytes) -> str:
    return hmac.new(key, b"meshlet key-encryption key id", hashlib.sha256).hexdigest()[:16]


@dataclass(frozen=True)
class Keyring:
    """The KEKs this process holds, the first the one new data keys are wrapped with (the
    others: the previous ones during a rotation)."""

    keys: tuple[bytes, ...]

    def __post_init__(self) -> None:
        if not self.keys:
            raise ValueError("a keyring holds at least one key")
        for k in self.keys:
            if len(k) != KEY_BYTES:
                raise ValueError(f"a key-encryption key is {KEY_BYTES} bytes, got {len(k)}")

    def __repr__(self) -> str:   # never the keys
        return f"Keyring({', '.join(self.ids)})"

    @property
    def primary(self) -> bytes:
        return self.keys[0]

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(key_id(k) for k in self.keys)

    def get(self, kid: str) -> bytes | None:
        return next((k for k in self.keys if key_id(k) == kid), None)

    @classmethod
    def of(cls, keys: Iterable[bytes]) -> Keyring:
        return cls(tuple(keys))


def _aad(name: str, version: int, part: str) -> bytes:
    return f"meshlet secret {name} v{version} {part}".encode()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: Any, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (ValueError, TypeError):
        raise SecretError(f"{what}: not base64") from None


def value_mac(key: bytes, name: str, value: bytes) -> str:
    return hmac.new(key, b"meshlet secret value\0" + name.encode() + b"\0" + value, hashlib.sha256).hexdigest()


def seal(kek: bytes, name: str, version: int, value: bytes, *, source: str, now: float) -> dict[str, Any]:
    """The stored form of ``value`` as version ``version`` of secret ``name``."""
    if not value:
        raise SecretError(f"secret {name}: the value is empty")
    if len(value) > MAX_VALUE:
        raise SecretError(f"secret {name}: {len(value)} bytes, more than the {MAX_VALUE // 1024} KiB a secret may hold")
    dek = AESGCM.generate_key(bit_length=256)
    n1, n2 = os.urandom(NONCE_BYTES), os.urandom(NONCE_BYTES)
    wrapped = AESGCM(kek).encrypt(n1, dek, _aad(name, version, "data key"))
    sealed = AESGCM(dek).encrypt(n2, value, _aad(name, version, "value"))
    return {"version": version, "created_at": now, "source": source, "key_id": key_id(kek),
            "dek": _b64(n1 + wrapped), "value": _b64(n2 + sealed), "mac": value_mac(kek, name, value)}


def _data_key(keyring: Keyring, name: str, version: int, doc: dict[str, Any]) -> bytes:
    kid = doc.get("key_id")
    kek = keyring.get(kid) if isinstance(kid, str) else None
    if kek is None:
        raise SecretError(f"secret {name} version {version} is sealed with key-encryption key {kid}, "
                          f"which is not the mesh's key here (have: {', '.join(keyring.ids)})")
    raw = _unb64(doc.get("dek"), f"secret {name} version {version}: dek")
    try:
        return AESGCM(kek).decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], _aad(name, version, "data key"))
    except (InvalidTag, ValueError):
        raise SecretError(f"secret {name} version {version}: its data key does not open with key "
                          f"{kid} (the stored version was altered, or belongs to another name)") from None


def unseal(keyring: Keyring, name: str, version: int, doc: Any) -> bytes:
    """The value of a stored version; SecretError when it cannot be opened."""
    if not isinstance(doc, dict) or doc.get("version") != version:
        raise SecretError(f"secret {name} version {version}: not a stored secret version")
    dek = _data_key(keyring, name, version, doc)
    raw = _unb64(doc.get("value"), f"secret {name} version {version}: value")
    try:
        return AESGCM(dek).decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], _aad(name, version, "value"))
    except (InvalidTag, ValueError):
        raise SecretError(f"secret {name} version {version}: the value does not open with its data key "
                          "(the stored version was altered)") from None


def rewrap(keyring: Keyring, kek: bytes, name: str, version: int, doc: dict[str, Any]) -> dict[str, Any]:
    """``doc`` with its data key wrapped by ``kek`` (and its MAC computed with it); the
    value's ciphertext is untouched. ``meshlet secret rotate-key``."""
    dek = _data_key(keyring, name, version, doc)
    value = unseal(keyring, name, version, doc)
    n1 = os.urandom(NONCE_BYTES)
    return {**doc, "key_id": key_id(kek), "dek": _b64(n1 + AESGCM(kek).encrypt(n1, dek, _aad(name, version, "data key"))),
            "mac": value_mac(kek, name, value)}
