"""Secrets and configs: sealed at rest in the catalog, resolved to what a replica runs.

    _crypto.py    AES-256-GCM envelope encryption: a data key per secret version, wrapped
                  by the key-encryption key (KEK); keyed MACs to compare without decrypting
    _keyfile.py   where the KEK comes from (a 0600 key file, or an environment variable)
    _store.py     versions in KV (meshlet/secrets/<name>/<v>, meshlet/configs/<name>/<v>),
                  what an apply writes, and the versions pinned in each service's spec

Who decrypts: the supervisor, when it starts a replica (daemon/deliveries.py), and
``meshlet secret rotate-key``. ``meshlet apply`` and ``meshlet secret set`` seal and
compare MACs; nothing prints, logs or stores a value in plain text.
"""

from ._crypto import KEY_BYTES, MAX_VALUE, Keyring, SecretError, key_id, new_key, rewrap, seal, unseal, value_mac
from ._keyfile import DEFAULT_NAME, KeyFileError, KeySource, key_source, load_keyring, write_keyring
from ._store import (CONFIG, KEEP, SECRET, ObjectChange, ObjectPlan, PlanError, Versions, config_data,
                     config_doc, pin, plan_objects, read_versions, users)

__all__ = [
    "KEY_BYTES", "MAX_VALUE", "Keyring", "SecretError", "key_id", "new_key", "rewrap", "seal", "unseal",
    "value_mac", "DEFAULT_NAME", "KeyFileError", "KeySource", "key_source", "load_keyring", "write_keyring",
    "CONFIG", "KEEP", "SECRET", "ObjectChange", "ObjectPlan", "PlanError", "Versions", "config_data",
    "config_doc", "pin", "plan_objects", "read_versions", "users",
]
