"""The KV service document (``meshlet/services/<name>``): build, fingerprint, read back.

Shape (format 2)::

    {"format": 2, "name": "web", "revision": "9f86d081884c", "vip": "127.10.0.2",
     "spec": ServiceSpec.to_dict()}

Format 2 holds ``resources`` as ``{requests, limits}`` and ``placement`` with ``strategy``
and ``spread_over``; format 1 held ``resources: {cpu, memory}`` and ``placement.spread``.
Both are read (``_forms`` reads the older shapes), so documents stored before an upgrade
still load; an older meshlet refuses format 2 by its number instead of by an unknown key.

The revision of a spec that format 1 could hold (requests equal to limits, no
``spread_over``) is computed over its format-1 shape (``_revision_view``), so upgrading
meshlet changes no revision and restarts no replica.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
from typing import Any

from ._errors import ConfigError, ConfigIssue
from ._load import service_from_plain
from ._model import ServiceSpec
from ._units import describe

__all__ = ["DOCUMENT_FORMAT", "READ_FORMATS", "service_revision", "service_document",
           "parse_service_document", "canonical_json"]

DOCUMENT_FORMAT = 2
READ_FORMATS = (1, 2)
_KEYS = ("format", "name", "revision", "vip", "spec")


def canonical_json(data: Any) -> str:
    """Sorted keys, no spaces: the bytes a revision is computed over."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False)


def _revision_view(spec: dict[str, Any]) -> dict[str, Any]:
    """``spec`` (``to_dict()``) in its format-1 shape where that shape can hold it. Two
    specs never share a view: one in the format-2 shape has keys format 1 never had."""
    view = dict(spec)
    resources, placement = spec["resources"], spec["placement"]
    if resources["requests"] == resources["limits"]:
        view["resources"] = dict(resources["requests"])
    if not placement["spread_over"]:
        view["placement"] = {"spread": placement["strategy"] == "spread",
                             "constraints": placement["constraints"]}
    return view


def service_revision(spec: ServiceSpec) -> str:
    """First 12 hex digits of SHA-256 over the canonical JSON of ``spec.to_dict()``
    (in its format-1 shape when it has one: see the module docstring)."""
    return hashlib.sha256(canonical_json(_revision_view(spec.to_dict())).encode()).hexdigest()[:12]


def service_document(spec: ServiceSpec, vip: str | None) -> dict[str, Any]:
    """The document ``meshlet apply`` stores; ``vip`` is None for a service without ports."""
    if vip is not None:
        ipaddress.IPv4Address(vip)  # ValueError on a caller's mistake
    return {"format": DOCUMENT_FORMAT, "name": spec.name, "revision": service_revision(spec),
            "vip": vip, "spec": spec.to_dict()}


def parse_service_document(data: bytes | str,
                           source: str = "<service document>") -> tuple[ServiceSpec, str | None, str]:
    """``(spec, vip, revision)`` from a stored document; ConfigError naming every problem.

    The stored revision is returned as written (it identifies what was applied, even if
    this version of meshlet would fingerprint the same spec differently).
    """
    def fail(message: str, path: str = "") -> ConfigError:
        return ConfigError([ConfigIssue(source, None, path, message)])

    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise fail(f"not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise fail(f"expected a JSON object, got {describe(doc)}")
    fmt = doc.get("format")
    if fmt not in READ_FORMATS or isinstance(fmt, bool):
        raise fail(f"unsupported document format {describe(fmt)} "
                   f"(this meshlet reads formats {' and '.join(map(str, READ_FORMATS))})", "format")
    issues: list[ConfigIssue] = []
    for key in doc:
        if key not in _KEYS:
            issues.append(ConfigIssue(source, None, key, "unknown key"))
    for key in _KEYS:
        if key not in doc:
            issues.append(ConfigIssue(source, None, "", f'missing required key "{key}"'))
    revision, vip, name = doc.get("revision"), doc.get("vip"), doc.get("name")
    if "revision" in doc and not (isinstance(revision, str) and len(revision) == 12
                                  and all(c in "0123456789abcdef" for c in revision)):
        issues.append(ConfigIssue(source, None, "revision",
                                  f"expected 12 hex digits, got {describe(revision)}"))
    if vip is not None:
        try:
            if not isinstance(vip, str):
                raise ValueError(vip)
            ipaddress.IPv4Address(vip)
        except ValueError:
            issues.append(ConfigIssue(source, None, "vip", f"expected an IPv4 address or null, "
                                                           f"got {describe(vip)}"))
    spec = None
    if "spec" in doc:
        try:
            spec = service_from_plain(doc["spec"], source, "spec")
        except ConfigError as exc:
            issues.extend(exc.issues)
    if spec is not None and name != spec.name:
        issues.append(ConfigIssue(source, None, "name",
                                  f'{describe(name)} does not match spec.name "{spec.name}"'))
    if issues or spec is None:
        raise ConfigError(issues)
    return spec, vip, revision
