"""Runtimes: how the supervisor runs instances on a node, behind one interface.

``RUNTIMES`` maps a node's ``runtime`` setting (config: ``mesh.nodes[].runtime``) to the
class implementing it; see base.py for the interface, the data types and the errors.

    docker   containers on a Docker engine (unix:// or tcp://), identity in labels
    process  local process groups, identity in state files under the data dir
"""

from __future__ import annotations

from .base import (Capacity, DeliveredFile, EngineUnavailable, ExecTimeout, ImageNotFound, InstanceExists,
                   InstanceNotFound, InstanceNotRunning, InstanceSpec, InvalidSpec, Observed,
                   Runtime, RuntimeEvent, StartFailed, VolumeAttachment, VolumeInfo, VolumeInUse,
                   WorkloadError, validate_spec, workload_env)
from .docker import DockerRuntime
from .process import ProcessRuntime

__all__ = [
    "RUNTIMES", "Runtime", "DockerRuntime", "ProcessRuntime", "Capacity",
    "InstanceSpec", "DeliveredFile", "Observed", "RuntimeEvent", "validate_spec", "workload_env",
    "WorkloadError", "InvalidSpec", "InstanceExists", "InstanceNotFound",
    "InstanceNotRunning", "ImageNotFound", "StartFailed", "ExecTimeout", "EngineUnavailable",
    "VolumeAttachment", "VolumeInfo", "VolumeInUse",
]

RUNTIMES: dict[str, type] = {
    "docker": DockerRuntime,
    "process": ProcessRuntime,
}
