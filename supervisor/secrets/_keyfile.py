"""Where the key-encryption keys (KEKs) come from: a key file or an environment variable.

    mesh.secrets.key_file: PATH     a file of ours (below), named in the config
    mesh.secrets.key_env: VAR       base64 of 32 bytes; several, comma-separated, during a
                                    rotation (the first seals new versions)
    neither                         <data_dir>/secrets.key, created by the first apply
                                    that stores a secret

The key file is JSON, mode 0600, written atomically (a temporary file renamed over it)::

    {"format": 1, "keys": [{"id": "9f86d081884c7d65", "key": "<base64>"}, ...]}

A key file that others can read (any group/other bit) is refused, as ssh refuses such a
private key. Errors: ``KeyFileError`` names the file or variable and what is wrong.
"""

from __future__ import annotations

import base64
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import config

from ._crypto import KEY_BYTES, Keyring, key_id, new_key

__all__ = ["KeySource", "KeyFileError", "key_source", "load_keyring", "write_keyring", "DEFAULT_NAME"]

DEFAULT_NAME = "secrets.key"
FORMAT = 1


class KeyFileError(Exception):
    """The key-encryption key cannot be had; the text says where it was looked for and why."""


@dataclass(frozen=True)
class KeySource:
    path: Path | None = None      # a key file
    env: str | None = None        # or an environment variable
    default: bool = False         # the data dir's own file: created on first use

    def describe(self) -> str:
        return f"${self.env}" if self.env else str(self.path)


def key_source(mesh: config.MeshSettings) -> KeySource:
    s = mesh.secrets
    if s.key_env:
        return KeySource(env=s.key_env)
    if s.key_file:
        return KeySource(path=Path(s.key_file))
    return KeySource(path=Path(mesh.data_dir) / DEFAULT_NAME, default=True)


def _decode(text: str, where: str) -> bytes:
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except ValueError:
        raise KeyFileError(f"{where}: a key is not base64") from None
    if len(key) != KEY_BYTES:
        raise KeyFileError(f"{where}: a key is {len(key)} bytes, expected {KEY_BYTES}")
    return key


def load_keyring(source: KeySource, *, create: bool = False) -> Keyring | None:
    """The keyring of ``source``; None when the (default) key file does not exist and
    ``create`` is false. With ``create`` a missing default file is made (0600, new key)."""
    if source.env is not None:
        text = os.environ.get(source.env)
        if not text:
            raise KeyFileError(f"${source.env} (mesh.secrets.key_env) is not set")
        return Keyring.of(_decode(part, f"${source.env}") for part in text.split(",") if part.strip())
    assert source.path is not None
    path = source.path
    try:
        st = path.stat()
    except FileNotFoundError:
        if not source.default:
            raise KeyFileError(f"key file {path} (mesh.secrets.key_file) does not exist") from None
        if not create:
            return None
        keyring = Keyring.of([new_key()])
        write_keyring(path, keyring, exclusive=True)
        return keyring
    except OSError as exc:
        raise KeyFileError(f"key file {path}: {exc.strerror or exc}") from None
    if st.st_mode & 0o077:
        raise KeyFileError(f"key file {path} can be read by others (mode {stat.S_IMODE(st.st_mode):04o}); "
                           "chmod 600 it")
    try:
        doc = json.loads(path.read_text())
        if not isinstance(doc, dict) or doc.get("format") != FORMAT or not doc.get("keys"):
            raise ValueError("not a meshlet key file")
        keys = [_decode(k["key"], str(path)) for k in doc["keys"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise KeyFileError(f"key file {path}: {exc}") from None
    return Keyring.of(keys)


def write_keyring(path: Path, keyring: Keyring, *, exclusive: bool = False) -> None:
    """Write ``keyring`` to ``path`` (0600, atomically; ``exclusive``: only if it does not
    exist yet, so two first applies cannot make two keys)."""
    doc = {"format": FORMAT, "keys": [{"id": key_id(k), "key": base64.b64encode(k).decode()}
                                      for k in keyring.keys]}
    data = (json.dumps(doc, indent=1) + "\n").encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        if exclusive:
            os.link(tmp, path)      # fails when another process made the file first
        else:
            os.replace(tmp, path)
    except FileExistsError:
        raise KeyFileError(f"key file {path} appeared meanwhile; run again") from None
    finally:
        tmp.unlink(missing_ok=True)
