"""Restart decisions for one replica slot: the restart policy and exponential back-off.

Pure: time is an input, the state is plain data, nothing sleeps here. The agent keeps one
:class:`BackoffState` per (service, slot) and asks :func:`decide` when the slot's instance
has exited; the answer says whether to restart and *when* ("look again at T").

Back-off (spec ``restart.backoff``; defaults from config: initial 1s, max 5m, reset_after 10m)
follows kubelet's CrashLoopBackOff shape: the first failure restarts at once, every further
consecutive failure doubles the wait up to ``max``; a run that lasted at least
``reset_after`` counts as healthy and starts the series again. With the defaults the delays
before the 1st, 2nd, ... restart are::

    0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, ... seconds

Policies (Kubernetes ``restartPolicy``): ``always`` restarts after any exit, ``on-failure``
after a non-zero or unknown exit code (an adopted process whose code nobody witnessed, or a
replica killed for a failed liveness probe, counts as failed), ``never`` leaves it exited.
"""

from __future__ import annotations

from dataclasses import dataclass

import config

__all__ = ["BackoffState", "RestartDecision", "decide", "delay_for", "should_restart"]

ALWAYS, ON_FAILURE, NEVER = "always", "on-failure", "never"


@dataclass(frozen=True, slots=True)
class BackoffState:
    """One slot's history: consecutive failures (drives the delay) and restarts done."""

    failures: int = 0
    restarts: int = 0


@dataclass(frozen=True, slots=True)
class RestartDecision:
    restart: bool
    at: float                    # earliest time to start the replacement (when restart)
    state: BackoffState          # the slot's state once the replacement is started
    reason: str


def delay_for(backoff: config.Backoff, failures: int) -> float:
    """The wait before restarting after the ``failures``-th consecutive failure (1-based)."""
    if failures <= 1:
        return 0.0
    # 2 ** n overflows floats for absurd counts; the cap is reached long before.
    exponent = min(failures - 2, 64)
    return min(backoff.initial * (2 ** exponent), backoff.max)


def should_restart(policy: str, exit_code: int | None, *, failed: bool = False) -> bool:
    if policy == NEVER:
        return False
    if policy == ON_FAILURE:
        return failed or exit_code is None or exit_code != 0
    return True


def decide(restart: config.RestartPolicy, state: BackoffState, *, exit_code: int | None,
           started_at: float | None, finished_at: float, failed: bool = False) -> RestartDecision:
    """Should the exited replica of a slot be restarted, and not before when?

    ``failed`` marks an exit meshlet caused for a failed probe. ``started_at`` None (not
    known) counts as a short run."""
    code = "unknown" if exit_code is None else str(exit_code)
    if not should_restart(restart.policy, exit_code, failed=failed):
        return RestartDecision(False, finished_at, state,
                               f"exited (code {code}); restart policy {restart.policy}")
    ran_for = finished_at - started_at if started_at is not None else 0.0
    failures = state.failures
    if ran_for >= restart.backoff.reset_after:
        failures = 0
    failures += 1
    delay = delay_for(restart.backoff, failures)
    nxt = BackoffState(failures=failures, restarts=state.restarts + 1)
    why = "liveness/startup probe failed" if failed else f"exited (code {code})"
    return RestartDecision(True, finished_at + delay, nxt,
                           f"{why}; restart #{nxt.restarts} after {delay:g}s back-off")
