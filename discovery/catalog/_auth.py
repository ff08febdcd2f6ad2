"""Token auth: Consul's ACLs with ``acl.default_policy = deny`` and one management token.

The catalog has exactly one token, the management token: made at the first start (a
random UUID, as Consul's SecretIDs are) in ``<data-dir>/management-token`` (mode 0600,
created with O_EXCL so two starts never make two) and read again on every later start.
meshlet's own components and commands send it; anything else gets 403.

A request names its token as Consul's ``parseTokenInternal`` reads it: ``?token=``, else
``X-Consul-Token``, else ``Authorization: Bearer``. The answers are Consul's:

- no token (Consul's anonymous token, which ``default_policy = deny`` allows nothing):
  403 ``Permission denied: token with AccessorID '00000000-0000-0000-0000-000000000002'
  lacks permission '<resource>:<read|write>'`` (`` on "<name>"`` when the request names one);
- a token that is not the management token: 403 ``ACL not found``.

Where we differ: Consul filters a list read (``/v1/catalog/services``, a health query) to
what the token may see and answers 200 with an empty list; here every read is refused. A
data plane with a wrong token then fails loudly instead of routing to an empty catalog.
Open without a token, as in Consul: ``/v1/status/leader``, ``/v1/status/peers`` and
``/v1/catalog/datacenters``.

Errors: ``load_or_create`` raises ``TokenFileError`` (the catalog does not start) when the
file cannot be read or made, is empty, or can be read by others than its owner. The token
is never logged and never part of an error text.
"""

from __future__ import annotations

import hmac
import os
import stat
import uuid

from ._errors import CatalogError, Forbidden
from ._wire import Request

__all__ = ["load_or_create", "request_token", "Gate", "TokenFileError", "ANONYMOUS_ACCESSOR", "OPEN_PATHS"]

ANONYMOUS_ACCESSOR = "00000000-0000-0000-0000-000000000002"
# Consul serves these without an ACL check.
OPEN_PATHS = frozenset(("/v1/status/leader", "/v1/status/peers", "/v1/catalog/datacenters"))

# The ACL resource a path belongs to (Consul's rule kinds), longest prefix first; for the
# error text only (the management token may do everything, no token nothing).
_RESOURCES = (
    ("/v1/kv/", "key", True), ("/v1/txn", "key", False),
    ("/v1/agent/service/", "service", False), ("/v1/agent/check/", "service", False),
    ("/v1/agent/health/service/", "service", False), ("/v1/agent/", "agent", False),
    ("/v1/catalog/service/", "service", True), ("/v1/catalog/connect/", "service", True),
    ("/v1/catalog/gateway-services/", "service", True),
    ("/v1/catalog/node-services/", "node", True), ("/v1/catalog/node/", "node", True),
    ("/v1/catalog/nodes", "node", False), ("/v1/catalog/", "service", False),
    ("/v1/health/service/", "service", True), ("/v1/health/connect/", "service", True),
    ("/v1/health/checks/", "service", True), ("/v1/health/node/", "node", True),
    ("/v1/health/", "service", False), ("/v1/session/", "session", False),
    ("/v1/acl/", "acl", False), ("/metrics", "agent", False),
)


class TokenFileError(CatalogError):
    """The management token file cannot be used; the catalog does not start."""


def load_or_create(path: str) -> str:
    """The management token in ``path``, made there (0600) if the file does not exist."""
    token = str(uuid.uuid4())
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _read(path)
    except OSError as exc:
        raise TokenFileError(f"cannot create the management token file {path}: {exc.strerror or exc}") from None
    try:
        os.write(fd, (token + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    return token


def _read(path: str) -> str:
    try:
        st = os.stat(path)
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise TokenFileError(f"the management token file {path} can be read by others "
                                 f"(mode {stat.S_IMODE(st.st_mode):04o}): chmod 600 {path}")
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
    except OSError as exc:
        raise TokenFileError(f"cannot read the management token file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise TokenFileError(f"the management token file {path} is not text") from None
    if not token:
        raise TokenFileError(f"the management token file {path} is empty (delete it to make a new token)")
    return token


def request_token(request: Request) -> str:
    """The token a request names ("" for none), in Consul's order."""
    query = request.query if request.raw_query else None
    if query is not None and query.get("token"):
        return query["token"]
    headers = request.headers
    token = headers.get("x-consul-token", "")
    if token:
        return token
    auth = headers.get("authorization", "")
    scheme, _, value = auth.partition(" ")
    if scheme.lower() == "bearer":
        return value.strip()
    return ""


class Gate:
    """Lets the management token through; refuses everything else with Consul's 403."""

    def __init__(self, token: str) -> None:
        self._token = token.encode()

    def check(self, request: Request, path: str) -> None:
        """Raise Forbidden unless ``request`` may be served."""
        if path in OPEN_PATHS:
            return
        given = request_token(request)
        if given and hmac.compare_digest(given.encode(), self._token):
            return
        if given:
            raise Forbidden("ACL not found")
        raise Forbidden(denied(path, request.method))


def denied(path: str, method: str) -> str:
    """Consul's text for the anonymous token on ``path``."""
    resource, named, name = "agent", False, ""
    for prefix, kind, has_name in _RESOURCES:
        if path.startswith(prefix):
            resource, named = kind, has_name
            if has_name:
                name = path[len(prefix):]
            break
    level = "read" if method in ("GET", "HEAD") else "write"
    text = f"Permission denied: token with AccessorID '{ANONYMOUS_ACCESSOR}' lacks permission '{resource}:{level}'"
    if named and name:
        text += f' on "{name}"'
    return text
