"""Small helpers for the catalog tests (raw HTTP next to the py-consul client).

``shared_catalog``: one catalog process per test module, for parametrized tests that only
read or are refused (headers, error texts); import it into the module to use it. Tests
that change state use the function-scoped ``catalog`` fixture.
"""

from __future__ import annotations

from typing import Any, Iterator

import pytest

from _util import CatalogProcess


@pytest.fixture(scope="module")
def shared_catalog(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CatalogProcess]:
    cat = CatalogProcess(tmp_path_factory.mktemp("shared-catalog")).start()
    yield cat
    cat.stop()


def metrics(catalog: CatalogProcess) -> dict[str, Any]:
    """The catalog's own gauges from /v1/agent/metrics, by name."""
    body = catalog.http.get(catalog.url + "/v1/agent/metrics", timeout=5).json()
    return {g["Name"]: g["Value"] for g in body["Gauges"]}


def blocked(catalog: CatalogProcess) -> int:
    return metrics(catalog)["meshlet.catalog.blocked_queries"]


def wakeups(catalog: CatalogProcess) -> int:
    return metrics(catalog)["meshlet.catalog.watch_wakeups"]


def encoded(catalog: CatalogProcess) -> int:
    return metrics(catalog)["meshlet.catalog.answers_encoded"]
