"""Pure translation between InstanceSpec/Observed and the Docker Engine API's shapes.

Identity lives in container labels (so a restarted supervisor finds its containers by
asking the engine, not its memory)::

    meshlet.owner=meshlet   what makes a container meshlet's (everything else is left alone)
    meshlet.instance        instance id (also the container name)
    meshlet.service / meshlet.slot / meshlet.revision / meshlet.node
    meshlet.ports           JSON object port name -> host port, in order (first = PORT)
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

from docker.types import Mount

from .base import InstanceSpec, InvalidSpec, Observed, State, VolumeAttachment, workload_env

__all__ = ["OWNER_LABEL", "identity_labels", "create_kwargs", "observed_from_attrs",
           "parse_docker_time", "docker_state", "LOG_OPTIONS", "mounts", "volume_labels"]

OWNER_LABEL = "meshlet.owner"
OWNER_VALUE = "meshlet"
# Bound what the json-file driver keeps per container (its default is unbounded).
LOG_OPTIONS = {"max-size": "10m", "max-file": "3"}


def identity_labels(spec: InstanceSpec) -> dict[str, str]:
    return {
        OWNER_LABEL: OWNER_VALUE,
        "meshlet.instance": spec.instance_id,
        "meshlet.service": spec.service,
        "meshlet.slot": str(spec.slot),
        "meshlet.revision": spec.revision,
        "meshlet.node": spec.node,
        "meshlet.ports": json.dumps(dict(spec.ports), separators=(",", ":")),
    }


def mounts(volumes: tuple[VolumeAttachment, ...]) -> list[Mount]:
    """The engine's Mounts of an instance's volumes: bind (host), volume (named, created
    beforehand with its driver: ``DockerRuntime._ensure_volume``), tmpfs (with its size,
    which the kernel enforces: writes past it fail with ENOSPC)."""
    out = []
    for v in volumes:
        if v.kind == "tmpfs":
            out.append(Mount(v.target, None, type="tmpfs", read_only=v.read_only, tmpfs_size=v.size))
        else:
            out.append(Mount(v.target, v.source, type="bind" if v.kind == "host" else "volume",
                             read_only=v.read_only))
    return out


def volume_labels(v: VolumeAttachment, spec: InstanceSpec) -> dict[str, str]:
    """Labels of an engine volume meshlet creates: meshlet's own (``volume ls``/``rm`` list
    only these), the mesh's volume name, and for a per-replica one its service and slot."""
    labels = {OWNER_LABEL: OWNER_VALUE, "meshlet.volume": v.name, "meshlet.node": spec.node}
    if v.per_replica:
        labels.update({"meshlet.service": spec.service, "meshlet.slot": str(spec.slot)})
    return labels


def resolv_conf(dns: str) -> str:
    """The resolv.conf of a workload whose resolver is meshlet's DNS at ``dns`` (port 53)."""
    return ("# written by meshlet: the mesh's DNS answers <service>.service names\n"
            f"nameserver {dns}\n")


def create_kwargs(spec: InstanceSpec, resolv_conf_path: str | None = None,
                  file_paths: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Keyword arguments for the SDK's low-level ``api.create_container``, with
    ``host_config`` as the keyword arguments of ``api.create_host_config`` (minus
    log_config).

    - ``command`` replaces the image's ENTRYPOINT and ``args`` its CMD (Kubernetes'
      meaning of the two words); with neither, the image's own defaults run.
    - host networking: the workload binds its PORT on the node's addresses.
    - no restart policy: meshlet decides restarts (Docker's would fight the reconciler).
    - ``stop_timeout``: stops the engine starts itself (daemon shutdown, ``docker stop``)
      give the same grace as meshlet's (whole seconds: the API's unit).
    - memswap == memory: no swap on top of the limit, so exceeding it is an OOM kill.
    - ``dns``: with ``resolv_conf_path`` (a file on the engine's host holding
      ``resolv_conf(dns)``), that file is bind-mounted read-only on /etc/resolv.conf;
      without it the engine writes "nameserver <dns>" itself (Docker accepts ``dns`` with
      host networking), which also works on a remote engine but stays writable.
    - ``volumes``: Mounts (``mounts``); named volumes must exist by then.
    - ``file_paths``: target in the container -> the host file (on a tmpfs) holding a
      secret or config, bind-mounted read-only there. The values themselves never go into
      the container's config (what ``docker inspect`` shows). A secret as a variable
      would be there in ``Env``: refused (InvalidSpec; config refuses ``env:`` on an image
      service's secret first).
    """
    if spec.secret_env:
        raise InvalidSpec(spec.instance_id, ["secret_env: a container's variables are shown by docker "
                                             "inspect; secrets are delivered to containers as files only"])
    host: dict[str, Any] = {"network_mode": "host"}
    if spec.cpu is not None:
        host["nano_cpus"] = int(round(spec.cpu * 1e9))
    if spec.memory is not None:
        host["mem_limit"] = spec.memory
        host["memswap_limit"] = spec.memory
    binds: dict[str, dict[str, str]] = {}
    if spec.dns and resolv_conf_path:
        binds[resolv_conf_path] = {"bind": "/etc/resolv.conf", "mode": "ro"}
    elif spec.dns:
        host["dns"] = [spec.dns]
    for target, source in (file_paths or {}).items():
        binds[source] = {"bind": target, "mode": "ro"}
    if binds:
        host["binds"] = binds
    if spec.volumes:
        host["mounts"] = mounts(spec.volumes)
    kwargs: dict[str, Any] = {
        "image": spec.image,
        "name": spec.instance_id,
        "environment": workload_env(spec),
        "labels": {**spec.labels, **identity_labels(spec)},
        "stop_signal": spec.stop_signal,
        "stop_timeout": math.ceil(spec.stop_grace_period),
        "detach": True,
        "host_config": host,
    }
    if spec.command:
        kwargs["entrypoint"] = list(spec.command)
        kwargs["command"] = list(spec.args)
    elif spec.args:
        kwargs["command"] = list(spec.args)
    if spec.workdir:
        kwargs["working_dir"] = spec.workdir
    return kwargs


def parse_docker_time(value: str | None) -> float | None:
    """RFC 3339 with nanoseconds ("2024-05-01T10:00:00.123456789Z") -> epoch seconds;
    Docker's zero time ("0001-01-01T00:00:00Z") and empty -> None."""
    if not value or value.startswith("0001-01-01"):
        return None
    text = value.strip()
    if text.endswith("Z"):
        text = text[:-1] + "+00:00"
    # Cut the fraction to microseconds: fromisoformat takes at most 6 digits.
    if "." in text:
        head, rest = text.split(".", 1)
        digits = 0
        while digits < len(rest) and rest[digits].isdigit():
            digits += 1
        text = head + "." + rest[:min(digits, 6)].ljust(6, "0") + rest[digits:]
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


def docker_state(status: str) -> State:
    """Docker's container status in meshlet's three states."""
    if status in ("running", "paused"):
        return "running"
    if status in ("created", "restarting"):
        return "starting"
    return "exited"   # exited, dead, removing


def _ports(labels: Mapping[str, str]) -> dict[str, int]:
    try:
        raw = json.loads(labels.get("meshlet.ports", "{}"))
        return {str(k): int(v) for k, v in raw.items()}
    except (ValueError, TypeError, AttributeError):
        return {}


def _slot(labels: Mapping[str, str]) -> int:
    try:
        return int(labels.get("meshlet.slot", "-1"))
    except ValueError:
        return -1


def observed_from_attrs(attrs: Mapping[str, Any], address: str) -> Observed:
    """An inspected container (``container.attrs``) as Observed."""
    labels = (attrs.get("Config") or {}).get("Labels") or {}
    st = attrs.get("State") or {}
    state = docker_state(st.get("Status", "exited"))
    name = (attrs.get("Name") or "").lstrip("/")
    return Observed(
        instance_id=labels.get("meshlet.instance", name),
        service=labels.get("meshlet.service", ""),
        slot=_slot(labels),
        revision=labels.get("meshlet.revision", ""),
        node=labels.get("meshlet.node", ""),
        state=state,
        exit_code=st.get("ExitCode") if state == "exited" else None,
        started_at=parse_docker_time(st.get("StartedAt")),
        finished_at=parse_docker_time(st.get("FinishedAt")) if state == "exited" else None,
        pid=st.get("Pid") or None,
        container_id=attrs.get("Id"),
        ports=_ports(labels),
        address=address,
        oom_killed=bool(st.get("OOMKilled")),
        labels={k: v for k, v in labels.items() if not k.startswith("meshlet.")},
    )


def observed_from_event(event: Mapping[str, Any], address: str) -> Observed:
    """A ``die`` event as Observed, for when the container is gone before we inspect it."""
    attrs = (event.get("Actor") or {}).get("Attributes") or {}
    try:
        code: int | None = int(attrs.get("exitCode", ""))
    except ValueError:
        code = None
    when = event.get("timeNano")
    return Observed(
        instance_id=attrs.get("meshlet.instance", attrs.get("name", "")),
        service=attrs.get("meshlet.service", ""),
        slot=_slot(attrs),
        revision=attrs.get("meshlet.revision", ""),
        node=attrs.get("meshlet.node", ""),
        state="exited",
        exit_code=code,
        finished_at=when / 1e9 if isinstance(when, int) else None,
        container_id=(event.get("Actor") or {}).get("ID") or event.get("id"),
        ports=_ports(attrs),
        address=address,
    )
