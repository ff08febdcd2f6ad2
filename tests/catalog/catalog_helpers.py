"""Small helpers for the catalog tests (raw HTTP next to the py-consul client)."""

from __future__ import annotations

from typing import Any

import requests


def metrics(url: str) -> dict[str, Any]:
    """The catalog's own gauges from /v1/agent/metrics, by name."""
    body = requests.get(url + "/v1/agent/metrics", timeout=5).json()
    return {g["Name"]: g["Value"] for g in body["Gauges"]}


def blocked(url: str) -> int:
    return metrics(url)["meshlet.catalog.blocked_queries"]


def wakeups(url: str) -> int:
    return metrics(url)["meshlet.catalog.watch_wakeups"]
