"""The data of the rollout engine (``core.rollout``): what the supervisor observes, the
resolved strategy, the stored state, and the actions. Plain frozen data.

Three vocabularies, three types (each a ``StrEnum``, stored as its string): a rollout's
``RolloutPhase``, a replica's ``ReplicaPhase`` as the engine sees it, and why a replica is
retired (``RetireReason``). History entry statuses are ``rollout_history.EntryStatus``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Union

from .rollout_history import RolloutError, resolve_fenceposts


class RolloutPhase(StrEnum):
    PROGRESSING = "progressing"
    PAUSED = "paused"
    COMPLETE = "complete"
    FAILED = "failed"
    REVERTING = "reverting"


class ReplicaPhase(StrEnum):
    """A replica as the engine sees it (``ObservedReplica.phase``)."""
    STARTING = "starting"          # running, not ready yet (or exited and being restarted)
    READY = "ready"                # passing its readiness probe since ready_since
    AVAILABLE = "available"        # ready for >= min_ready (the supervisor may leave this to us)
    TERMINATING = "terminating"    # retired: deregistered, draining or stopping
    EXITED = "exited"              # exited and not being restarted


class RetireReason(StrEnum):
    REPLACED = "replaced by the new revision"
    UNHEALTHY = "old replica not available; replaced first"
    RECREATE = "recreate: old revision stops before the new one starts"
    EXITED = "exited; cleaned up"
    SURPLUS = "surplus replica of the new revision"


PROGRESSING, PAUSED, COMPLETE, FAILED, REVERTING = tuple(RolloutPhase)
STARTING, READY, AVAILABLE, TERMINATING, EXITED = tuple(ReplicaPhase)
_PHASES = tuple(RolloutPhase)
_ALIVE = (STARTING, READY, AVAILABLE)
(RETIRE_REPLACED, RETIRE_UNHEALTHY, RETIRE_RECREATE, RETIRE_EXITED,
 RETIRE_SURPLUS) = tuple(RetireReason)


@dataclass(frozen=True, slots=True)
class ObservedReplica:
    instance_id: str
    slot: int
    revision: str
    phase: ReplicaPhase
    ready_since: float | None = None
    restarts: int = 0                   # restarts of this replica (runtime or supervisor)
    weight: int = 1                     # catalog Meta weight now
    last_exit: int | None = None        # exit code of the slot's last crash of this revision (128+N: signal N)
    last_output: str | None = None      # the last line that crash wrote


ObservedReplicas = Sequence[ObservedReplica]


@dataclass(frozen=True, slots=True)
class SlotRefusal:
    """The runtime refused to start the target revision in a slot (image missing, engine
    error): no replica exists there, so the engine learns of it from this instead.
    ``attempts``: refused starts in this rollout; ``problem``: the runtime's last reason."""
    attempts: int
    problem: str


SlotRefusals = Mapping[int, SlotRefusal]


@dataclass(frozen=True, slots=True)
class Strategy:
    """A service's update strategy resolved to numbers (``Strategy.from_spec``)."""
    replicas: int
    surge: int
    unavailable: int
    kind: str = "rolling"                         # rolling | recreate
    min_ready: float = 0.0
    progress_deadline: float = 600.0
    auto_revert: bool = True
    canary: tuple[tuple[int, float], ...] = ()    # (weight percent, pause seconds) per step
    crash_restarts: int = 2                       # restarts of a new replica that fail it
    # one writer per slot (a per-replica volume): no surge, and a slot's new replica starts
    # only once nothing of another revision runs or stops there (StatefulSet order)
    one_writer: bool = False

    @classmethod
    def from_spec(cls, replicas: int, update: Any, crash_restarts: int = 2, *,
                  one_writer: bool = False) -> Strategy:
        """From ``config.UpdateStrategy`` (``spec.update``) and ``spec.replicas``. With
        ``one_writer`` the surge is 0 whatever max_surge says (a surge replica would share
        its slot's volume), and so at least one replica may be unavailable."""
        surge, unavailable = resolve_fenceposts(replicas, 0 if one_writer else update.max_surge,
                                                update.max_unavailable)
        return cls(replicas, surge, unavailable, update.strategy, float(update.min_ready),
                   float(update.progress_deadline), bool(update.auto_revert),
                   tuple((int(c.weight), float(c.pause)) for c in update.canary), crash_restarts,
                   one_writer)


@dataclass(frozen=True, slots=True)
class RolloutState:
    """What the supervisor stores per service under rollout (``to_dict``/``from_dict``)."""
    service: str
    revision: str                         # the target: what new replicas run
    phase: RolloutPhase = RolloutPhase.PROGRESSING
    started_at: float = 0.0
    last_progress_at: float = 0.0
    canary_step: int = 0                  # index into strategy.canary; len() = canary done
    step_ready_at: float | None = None    # when the canary step's replicas were all available
    revert_to: str | None = None          # last complete revision (auto-revert target)
    reverted_from: str | None = None      # while reverting: the revision that failed
    paused_from: RolloutPhase | None = None   # phase to resume to
    restart_token: str | None = None      # set for a rolling restart (``restart_revision``)
    reason: str = ""                      # why it is failed/paused/complete, for humans
    marks: tuple[int, int, int] | None = None   # progress high-water marks (see _progress)

    def to_dict(self) -> dict[str, Any]:
        out = {f: getattr(self, f) for f in self.__slots__}
        out["phase"] = str(self.phase)
        out["paused_from"] = None if self.paused_from is None else str(self.paused_from)
        out["marks"] = None if self.marks is None else list(self.marks)
        return out

    @classmethod
    def from_dict(cls, data: Any) -> RolloutState:
        """From ``to_dict`` output read back from KV; RolloutError naming the bad field
        (unknown keys are ignored, so older supervisors read newer states)."""
        if not isinstance(data, dict):
            raise RolloutError(f"rollout state: expected an object, got {type(data).__name__}")
        known = {k: v for k, v in data.items() if k in cls.__slots__}

        def bad(key: str, want: str) -> RolloutError:
            return RolloutError(f"rollout state: {key}: expected {want}, got {known.get(key)!r:.60}")

        for key in ("service", "revision"):
            if not isinstance(known.get(key), str) or not known[key]:
                raise bad(key, "a non-empty string")
        if known.get("phase", PROGRESSING) not in _PHASES:
            raise bad("phase", " | ".join(_PHASES))
        for key in ("started_at", "last_progress_at", "step_ready_at"):
            value = known.get(key, 0.0)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise bad(key, "a number")
        if isinstance(known.get("canary_step", 0), bool) or not isinstance(known.get("canary_step", 0), int) \
                or known.get("canary_step", 0) < 0:
            raise bad("canary_step", "an integer >= 0")
        for key in ("revert_to", "reverted_from", "paused_from", "restart_token"):
            if known.get(key) is not None and not isinstance(known[key], str):
                raise bad(key, "a string or null")
        if not isinstance(known.get("reason", ""), str):
            raise bad("reason", "a string")
        marks = known.get("marks")
        if marks is not None:
            if not (isinstance(marks, (list, tuple)) and len(marks) == 3
                    and all(isinstance(m, int) and not isinstance(m, bool) for m in marks)):
                raise bad("marks", "three integers")
            known["marks"] = tuple(marks)
        known["phase"] = RolloutPhase(known.get("phase", PROGRESSING))
        if known.get("paused_from") is not None:
            if known["paused_from"] not in _PHASES:
                raise bad("paused_from", " | ".join(_PHASES))
            known["paused_from"] = RolloutPhase(known["paused_from"])
        return cls(**known)


@dataclass(frozen=True, slots=True)
class StartReplica:
    """Start a replica of ``revision`` in ``slot`` (placement is the supervisor's), and
    register it with Meta weight ``weight`` once it is ready (never before)."""
    slot: int
    revision: str
    weight: int = 1
    reason: str = "new revision"


@dataclass(frozen=True, slots=True)
class RetireReplica:
    """Deregister, wait drain_delay and in-flight requests, SIGTERM, grace, SIGKILL."""
    instance_id: str
    reason: RetireReason


@dataclass(frozen=True, slots=True)
class SetWeight:
    """Re-register the instance with Meta weight ``weight`` (the proxy's instance weight)."""
    instance_id: str
    weight: int
    reason: str = "canary step"


@dataclass(frozen=True, slots=True)
class MarkFailed:
    """Mark ``revision`` failed in the history (``mark_revision``) and tell the user why."""
    revision: str
    reason: str


@dataclass(frozen=True, slots=True)
class MarkComplete:
    """Mark ``revision`` complete in the history: a future auto-revert target."""
    revision: str


@dataclass(frozen=True, slots=True)
class Revert:
    """Make ``to_revision`` (its spec from the history) the service's desired revision:
    ``record_revision`` it (it gets a new number); the rollout continues as ``reverting``."""
    to_revision: str
    reason: str


Action = Union[StartReplica, RetireReplica, SetWeight, MarkFailed, MarkComplete, Revert]


@dataclass(frozen=True, slots=True)
class StepResult:
    actions: tuple[Action, ...]
    state: RolloutState
    followup_at: float | None = None      # look again at this time even if nothing changes

    def fields(self) -> dict[str, Any]:
        """Structured log fields: the phase and counts per action type."""
        out: dict[str, Any] = {"phase": self.state.phase}
        for a in self.actions:
            key = type(a).__name__.lower()
            out[key] = out.get(key, 0) + 1
        return out
