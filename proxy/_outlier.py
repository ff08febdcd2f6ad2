"""Passive outlier detection with Envoy's semantics and defaults.

Vocabulary
----------
consecutive 5xx
    Responses >= 500 and local failures (connect failure, reset, time-out, which Envoy
    maps to 503/504) in a row from one endpoint; any response < 500 resets the count.
consecutive gateway failure
    502, 503, 504 and local failures in a row; any other response resets the count.
ejection
    Reaching either threshold (exactly, as Envoy: one attempt per streak) ejects the
    endpoint for ``base_ejection_time × times_ejected``, capped at ``max_ejection_time``
    (30 s, 60 s, 90 s … 300 s). ``times_ejected`` drops by one for every ``interval``
    the endpoint spends back in service, so a host that recovered for good starts
    again at 30 s. Both counters restart after an ejection attempt.
cap
    At most ``max_ejection_percent`` (10 %) of a cluster's endpoints are ejected at
    once, but one always may be (Envoy: ``ejected_percent <= max || ejected == 0``).
panic
    When fewer than ``PANIC_THRESHOLD`` (50 %) of the endpoints are healthy (not
    ejected), the balancer ignores ejections and spreads over all of them: a mostly
    broken cluster beats no cluster (Envoy's panic threshold).

Everything here is a pure function of an endpoint's counters and ``now`` (seconds on
a monotonic clock), so the rules are tested with a fake clock. The endpoint fields
used are ``c5xx``, ``cgw``, ``ejected_until`` (0.0 when in service), ``times_ejected``,
``returned_at`` and ``ejections``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

import config

if TYPE_CHECKING:  # pragma: no cover
    from ._balance import Endpoint

__all__ = [
    "OutlierSettings",
    "PANIC_THRESHOLD",
    "LOCAL_FAILURES",
    "record",
    "may_eject",
    "ejection_time",
    "eject",
    "is_ejected",
    "return_due",
    "is_panic",
]

PANIC_THRESHOLD = 50.0  # percent healthy below which the balancer ignores ejections
LOCAL_FAILURES = frozenset({"connect", "reset", "timeout"})
_GATEWAY_CODES = frozenset({502, 503, 504})


# The settings are ``config.Outlier`` (``routes.outlier``): consecutive_5xx and
# consecutive_gateway_failure (0 disables that detector), base_ejection_time,
# max_ejection_percent, interval, max_ejection_time. Re-exported under the proxy's name.
OutlierSettings = config.Outlier


def record(ep: Endpoint, status: int | None, failure: str | None, s: OutlierSettings) -> bool:
    """Count one finished attempt. True when a threshold has just been reached and the
    endpoint (not already ejected) should be ejected if the cap allows."""
    if failure is not None:
        if failure not in LOCAL_FAILURES:
            return False
        is_5xx = is_gateway = True
    elif status is None:
        return False  # nothing learnt (e.g. the client went away first)
    else:
        is_5xx = status >= 500
        is_gateway = status in _GATEWAY_CODES
    tripped = False
    if is_5xx:
        ep.c5xx += 1
        if ep.c5xx == s.consecutive_5xx:
            tripped = True
    else:
        ep.c5xx = 0
    if is_gateway:
        ep.cgw += 1
        if ep.cgw == s.consecutive_gateway_failure:
            tripped = True
    else:
        ep.cgw = 0
    if tripped:
        ep.c5xx = 0
        ep.cgw = 0
        return not ep.ejected_until
    return False


def may_eject(ejected: int, total: int, max_percent: float) -> bool:
    """Envoy's cap: eject one more if it keeps the ejected share within
    ``max_percent``, or if none is ejected yet (at least one host may always go)."""
    if total <= 0:
        return False
    return ejected == 0 or 100.0 * (ejected + 1) / total <= max_percent


def ejection_time(times_ejected: int, s: OutlierSettings) -> float:
    """``base × times``, capped at ``max_ejection_time`` (but never below base)."""
    return min(s.base_ejection_time * times_ejected, max(s.base_ejection_time, s.max_ejection_time))


def eject(ep: Endpoint, now: float, s: OutlierSettings) -> float:
    """Eject ``ep`` at ``now``; returns the time it comes back."""
    times = ep.times_ejected
    if times and s.interval > 0 and ep.returned_at:
        # One step back for every full interval spent healthy since the last return.
        times = max(0, times - int((now - ep.returned_at) // s.interval))
    ep.times_ejected = times + 1
    ep.ejections += 1
    ep.ejected_until = now + ejection_time(ep.times_ejected, s)
    return ep.ejected_until


def is_ejected(ep: Endpoint, now: float) -> bool:
    return bool(ep.ejected_until) and now < ep.ejected_until


def return_due(endpoints: Iterable[Endpoint], now: float) -> list[Endpoint]:
    """Put back every endpoint whose ejection has expired; returns them."""
    back = []
    for ep in endpoints:
        if ep.ejected_until and now >= ep.ejected_until:
            ep.ejected_until = 0.0
            ep.returned_at = now
            ep.c5xx = 0
            ep.cgw = 0
            back.append(ep)
    return back


def is_panic(healthy: int, total: int, threshold: float = PANIC_THRESHOLD) -> bool:
    """Fewer than ``threshold`` percent healthy (Envoy: 1 of 2 is not panic, 0 of 1 is)."""
    return total > 0 and 100.0 * healthy / total < threshold
