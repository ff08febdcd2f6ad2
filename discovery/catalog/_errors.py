"""The catalog's one exception tree; every error a client sees is one of these.

    CatalogError            -> 500, reason as plain text (Consul's RPC/state errors)
    ├── BadRequest          -> 400 (decode and validation errors)
    ├── Forbidden           -> 403 (no token or not the management token: _auth)
    ├── NotFound            -> 404
    ├── MethodNotAllowed    -> 405 with an Allow header
    └── TooLarge            -> 413

The reason is written as the response body, so it must never carry a secret (KV values,
tokens); it names the field or parameter that was wrong.
"""

from __future__ import annotations

__all__ = ["CatalogError", "BadRequest", "Forbidden", "NotFound", "MethodNotAllowed", "TooLarge"]


class CatalogError(Exception):
    status = 500

    def __init__(self, reason: str, status: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        if status is not None:
            self.status = status


class BadRequest(CatalogError):
    status = 400


class Forbidden(CatalogError):
    status = 403


class NotFound(CatalogError):
    status = 404


class MethodNotAllowed(CatalogError):
    status = 405

    def __init__(self, method: str, allowed: tuple[str, ...]) -> None:
        super().__init__(f"method {method} not allowed")
        self.allow = ",".join(("OPTIONS",) + tuple(allowed))


class TooLarge(CatalogError):
    status = 413
