"""What is never printed: values of ``env`` and ``headers`` keys that look secret. Pure.

Secrets proper (``secrets:``) never enter a spec; but users put passwords in ``env``
anyway, and probe headers carry credentials. Wherever meshlet prints a spec or a change
of one (``meshlet apply --dry-run``, ``rollout history``), a value whose key matches
``SECRET_NAME`` is shown as ``<masked>``, and a change of it as changed, never as what
it was or became.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

__all__ = ["SECRET_NAME", "MASK", "masked", "looks_secret", "is_secret_path"]

SECRET_NAME = re.compile(r"PASS|SECRET|TOKEN|CREDENTIAL|PRIVATE|AUTH|COOKIE|SESSION|(^|_)KEY($|_)"
                         r"|APIKEY|ACCESSKEY|SIGNATURE|CERT", re.I)
MASK = "<masked>"
_HIDDEN_IN = ("env", "headers")


def looks_secret(key: str) -> bool:
    return bool(SECRET_NAME.search(key))


def masked(value: Any, parent: str = "") -> Any:
    """``value`` with the values of secret-looking keys of ``env``/``headers`` mappings
    replaced by ``<masked>`` (recursively; the input is not changed)."""
    if isinstance(value, Mapping):
        hide = parent in _HIDDEN_IN
        return {k: (MASK if hide and looks_secret(str(k)) and v is not None else masked(v, str(k)))
                for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [masked(v, parent) for v in value]
    return value


def is_secret_path(path: str) -> bool:
    """A flattened field path (``env.DB_PASSWORD``, ``probes.readiness.http.headers.Authorization``)
    whose value is not to be shown."""
    head, _, key = path.rpartition(".")
    return head.rpartition(".")[2] in _HIDDEN_IN and looks_secret(key)
