"""What revision a replica runs, and the restart token that changes it. Pure.

Replicas are compared by ``target_revision(spec, token)``: the spec's revision without
``replicas`` (scaling keeps the running replicas, like Kubernetes' pod-template-hash),
changed by the token of a rolling restart (``meshlet restart`` writes a new one to
``meshlet/rollout/<service>/restart``). A token is minted by ``new_restart_token`` (the
CLI) and read back by ``read_restart_token`` (the supervisor, the CLI, apply).

The rollout keys themselves (``config.rollout_key``) and what each holds are the catalog
contract in config/README.md.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import config

from .rollout_history import restart_revision

__all__ = ["template_revision", "target_revision", "read_restart_token", "new_restart_token"]


def read_restart_token(value: Any) -> str | None:
    """The token of a restart key's (JSON-decoded) value ``{"token": str, "at": float}``;
    None for anything else."""
    token = value.get("token") if isinstance(value, dict) else None
    return token if isinstance(token, str) and token else None


def new_restart_token(now: float) -> str:
    """A fresh, readable restart token: the UTC time of the request to the microsecond."""
    seconds, micros = divmod(round(now * 1_000_000), 1_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{micros:06d}Z"


def template_revision(spec: config.ServiceSpec) -> str:
    """What a replica is compared by: the spec's revision without ``replicas``."""
    return config.service_revision(dataclasses.replace(spec, replicas=0))


def target_revision(spec: config.ServiceSpec, restart_token: str | None = None) -> str:
    """The revision the service's replicas should run: the template revision, changed by
    a rolling restart's token (``meshlet restart``) when there is one."""
    return restart_revision(template_revision(spec), restart_token)
