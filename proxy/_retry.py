"""Retry settings and Envoy's retry budget.

A retry budget caps retries *in flight* for a cluster at
``max(min_concurrent, budget_percent% of the requests in flight)``: with the defaults
(20 %, 3) a cluster serving 100 concurrent requests allows 20 concurrent retries, one
serving 5 allows 3. This bounds the extra load a failing cluster receives (a retry
storm) while small clusters can still retry. Envoy: ``circuit_breakers.thresholds.
retry_budget``; the budget is re-evaluated for every retry, so it follows the load.
"""

from __future__ import annotations

import config

__all__ = ["RetrySettings", "retry_limit", "retry_allowed"]


# The settings are ``config.Retries`` (``routes.retries``): attempts, per_try_timeout,
# budget_percent, min_concurrent. Re-exported under the proxy's name.
RetrySettings = config.Retries


def retry_limit(active: int, budget_percent: float, min_concurrent: int) -> int:
    """Retries that may be in flight with ``active`` requests in flight (Envoy truncates)."""
    return max(min_concurrent, int(active * budget_percent / 100.0))


def retry_allowed(retries_active: int, active: int, budget_percent: float, min_concurrent: int) -> bool:
    """May one more retry start? (after it starts, retries in flight <= the limit)"""
    return retries_active < retry_limit(active, budget_percent, min_concurrent)
