"""Where rollouts live in the catalog KV, and what a replica's revision is. Pure.

The one contract between the supervisor (which drives rollouts) and the CLI (which shows
and steers them); both sides read and write only these keys, all JSON::

    meshlet/rollout/<service>/state     RolloutState.to_dict()        written by the supervisor
    meshlet/rollout/<service>/history   [history entry, ...]          written by the supervisor
    meshlet/rollout/<service>/control   {"paused": bool, "reason": str, "at": float}
                                                                      written by the CLI
    meshlet/rollout/<service>/restart   {"token": str, "at": float}   written by the CLI
    meshlet/rollout/<service>/crashes   {"revision": str, "crashes": {slot: n}, "refused": {slot: n},
                                         "counted": [instance id, ...]}
                                                                      written by the supervisor
                                        (exits and refused starts of the rollout's target, so a
                                        supervisor restart does not reset them; absent when no
                                        rollout runs or nothing crashed)

History entries are those of ``_rollout_history`` plus ``"restart_token": str | null``;
``spec`` is the service document's ``spec`` object. ``meshlet rollback [--to N]`` writes the
entry's spec into ``meshlet/services/<service>`` and sets (or deletes) the restart key to
the entry's token, in one transaction; the supervisor then sees an ordinary change of the
desired revision (history moves the entry to a new number, as ``kubectl rollout undo``).
A service's replicas run ``target_revision(spec, token)``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import config

from ._rollout_history import restart_revision

ROLLOUT_PREFIX = "meshlet/rollout/"


def state_key(service: str) -> str:
    return f"{ROLLOUT_PREFIX}{service}/state"


def history_key(service: str) -> str:
    return f"{ROLLOUT_PREFIX}{service}/history"


def restart_token(value: Any) -> str | None:
    """The token of a restart key's (JSON-decoded) value; None for anything else."""
    token = value.get("token") if isinstance(value, dict) else None
    return token if isinstance(token, str) and token else None


def crashes_key(service: str) -> str:
    return f"{ROLLOUT_PREFIX}{service}/crashes"


def control_key(service: str) -> str:
    return f"{ROLLOUT_PREFIX}{service}/control"


def restart_key(service: str) -> str:
    return f"{ROLLOUT_PREFIX}{service}/restart"


def template_revision(spec: config.ServiceSpec) -> str:
    """What a replica is compared by: the spec's revision without ``replicas`` (scaling
    keeps the running replicas, like Kubernetes' pod-template-hash)."""
    return config.service_revision(dataclasses.replace(spec, replicas=0))


def target_revision(spec: config.ServiceSpec, restart_token: str | None = None) -> str:
    """The revision the service's replicas should run: the template revision, changed by
    a rolling restart's token (``meshlet restart``) when there is one."""
    return restart_revision(template_revision(spec), restart_token)
