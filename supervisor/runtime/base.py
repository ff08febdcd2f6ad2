"""The runtime interface: what the supervisor asks of a node, and the plain data it gets back.

Vocabulary
    instance   one replica of a service on one node: a container or a process group.
               Named by ``instance_id`` (unique across the mesh; two revisions of one slot
               coexist during a rollout), which is also the container name / state file name.
    spec       ``InstanceSpec``: everything a runtime needs to start an instance, plain data.
    observed   ``Observed``: what a runtime reports about one instance it owns.
    event      ``RuntimeEvent``: an exit noticed at once, or a hint to re-list ("resync").

Flow
    supervisor --InstanceSpec--> runtime.start() --Observed-->
    runtime.events() ----exit----> supervisor (reconcile decides restart/backoff)
    runtime.list()  ----Observed*--> supervisor (full view; adoption after a restart)

Ownership: a runtime owns only instances it can prove are meshlet's (docker: the
``meshlet.owner=meshlet`` label; process: a state file under its data dir whose pid still
has the recorded start time). Everything else on the node is left alone.

Errors (everything a runtime raises on purpose is a ``WorkloadError``)::

    WorkloadError
    ├── InvalidSpec          bad input: nothing was created
    ├── InstanceExists       start() of an instance_id the node already has
    ├── InstanceNotFound     no meshlet instance by that id on this node
    ├── InstanceNotRunning   exec() on an instance that has exited
    ├── ImageNotFound        image missing on the node and the pull failed
    ├── StartFailed          the engine/OS refused to start it: nothing left half-created
    ├── ExecTimeout          exec() did not finish in time (also a TimeoutError)
    ├── VolumeInUse          remove_volume() of a volume an instance mounts
    └── EngineUnavailable    the node's engine does not answer

Everything here is pure: validation, the workload environment, exit-code conventions and
the JSON form of a spec (process state files) are functions over plain data.
"""

from __future__ import annotations

import ipaddress
import re
import signal
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from config import FrozenDict, volume_env_name

__all__ = [
    "InstanceSpec", "DeliveredFile", "VolumeAttachment", "VolumeInfo", "VolumeInUse", "Observed", "RuntimeEvent", "Runtime", "State",
    "WorkloadError", "InvalidSpec", "InstanceExists", "InstanceNotFound", "InstanceNotRunning",
    "ImageNotFound", "StartFailed", "ExecTimeout", "EngineUnavailable",
    "Capacity", "validate_spec", "is_instance_id", "workload_env", "port_env_name", "exit_code_from_returncode",
    "signal_number", "spec_to_dict", "spec_from_dict", "EXEC_OUTPUT_LIMIT", "VOLUME_KINDS",
]

State = Literal["starting", "running", "exited"]

# exec() keeps at most this much output (stdout+stderr, in arrival order): a probe reads a
# verdict, not a transcript. Docker's HEALTHCHECK keeps 4096 bytes; we keep more for debugging.
EXEC_OUTPUT_LIMIT = 64 * 1024

# Instance ids become container names and file names: Docker's container-name alphabet,
# bounded so "<data_dir>/instances/<id>.json" stays well under NAME_MAX (255).
_INSTANCE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_PORT_NAME = re.compile(r"[a-z][a-z0-9-]{0,62}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")   # config's secret/config names
# Labels under this prefix are meshlet's identity; a spec may not set them itself.
RESERVED_LABEL_PREFIX = "meshlet."


def _frozen(mapping: Mapping[str, Any] | None) -> FrozenDict[str, Any]:
    return mapping if isinstance(mapping, FrozenDict) else FrozenDict(mapping or {})


@dataclass(frozen=True)
class DeliveredFile:
    """A secret or config the replica gets as a file: on a tmpfs of the runtime's, mounted
    read-only at ``target`` in a container; a process finds it as
    ``$MESHLET_SECRETS_DIR/<name>`` or ``$MESHLET_CONFIGS_DIR/<name>``. ``data`` is never
    shown (repr) and never stored by a runtime anywhere but that tmpfs."""

    kind: Literal["secret", "config"]
    name: str
    target: str | None
    data: bytes = field(repr=False)
    mode: int = 0o400
    uid: int | None = None            # owner; None: the runtime's own user
    gid: int | None = None


VOLUME_KINDS = ("host", "named", "tmpfs")
_ENGINE_VOLUME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


@dataclass(frozen=True)
class VolumeAttachment:
    """A volume an instance mounts at ``target``, resolved by the supervisor: ``source`` is
    a host directory (``host``) or the engine volume's name (``named``; a per-replica one's
    ``<service>-<volume>-<slot>``); a ``tmpfs`` has none and lives as long as the instance.

    docker: a bind, volume or tmpfs mount (``size`` enforced by the tmpfs); a named volume
    is created with ``driver``/``driver_opts`` on first use, and one that exists with
    another driver or options is refused, not reused. process: a directory, found through
    ``$MESHLET_VOLUME_<NAME>`` (``name``: the mesh's volume name): the host directory, a
    directory per named volume under the data dir, a directory on a tmpfs per instance;
    no driver, no size, no read-only (nothing could enforce them: refused)."""

    name: str
    kind: Literal["host", "named", "tmpfs"]
    target: str
    source: str | None = None
    read_only: bool = False
    driver: str = "local"
    driver_opts: Mapping[str, str] = field(default_factory=FrozenDict)
    size: int | None = None               # tmpfs: bytes
    create: bool = False                  # host: make the directory when missing
    per_replica: bool = False             # named: belongs to (service, slot) of the instance

    def __post_init__(self) -> None:
        object.__setattr__(self, "driver_opts", _frozen(self.driver_opts))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "target": self.target, "source": self.source,
                "read_only": self.read_only, "driver": self.driver, "driver_opts": dict(self.driver_opts),
                "size": self.size, "create": self.create, "per_replica": self.per_replica}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "VolumeAttachment":
        return cls(**{k: data[k] for k in ("name", "kind", "target", "source", "read_only", "driver",
                                            "driver_opts", "size", "create", "per_replica") if k in data})


@dataclass(frozen=True)
class VolumeInfo:
    """A volume a runtime holds for meshlet (``volumes()``): a named volume's engine volume
    or directory. ``size``: bytes used (None: the driver cannot tell); ``users``: the
    instances that mount it (running or exited)."""

    name: str
    node: str
    driver: str
    size: int | None
    users: tuple[str, ...] = ()
    labels: Mapping[str, str] = field(default_factory=FrozenDict)
    created_at: str | None = None


@dataclass(frozen=True)
class InstanceSpec:
    """What to run for one replica. Plain data; hashable (mappings are frozen).

    ``files`` and ``secret_env`` (secrets delivered as environment variables) are never
    part of ``spec_to_dict``, labels or reprs: a runtime keeps them out of anything it
    writes to disk or shows."""

    instance_id: str
    service: str
    slot: int
    revision: str
    node: str
    image: str | None = None                 # docker: required
    command: tuple[str, ...] | None = None   # process: required; docker: overrides ENTRYPOINT
    args: tuple[str, ...] = ()               # docker: overrides CMD (Kubernetes semantics)
    workdir: str | None = None
    env: Mapping[str, str] = field(default_factory=FrozenDict)
    ports: Mapping[str, int] = field(default_factory=FrozenDict)  # name -> host port; first is PORT
    cpu: float | None = None                 # cores
    memory: int | None = None                # bytes
    stop_signal: str = "SIGTERM"
    stop_grace_period: float = 10.0
    dns: str | None = None                   # resolver address for the workload (port 53)
    labels: Mapping[str, str] = field(default_factory=FrozenDict)
    files: tuple[DeliveredFile, ...] = field(default=(), repr=False)
    secret_env: Mapping[str, str] = field(default_factory=FrozenDict, repr=False)
    volumes: tuple[VolumeAttachment, ...] = ()

    def __post_init__(self) -> None:
        # Accept lists and dicts from callers; store tuples and FrozenDicts.
        if self.command is not None and not isinstance(self.command, tuple):
            object.__setattr__(self, "command", tuple(self.command))
        if not isinstance(self.volumes, tuple):
            object.__setattr__(self, "volumes", tuple(self.volumes))
        if not isinstance(self.args, tuple):
            object.__setattr__(self, "args", tuple(self.args))
        if not isinstance(self.files, tuple):
            object.__setattr__(self, "files", tuple(self.files))
        for name in ("env", "ports", "labels", "secret_env"):
            object.__setattr__(self, name, _frozen(getattr(self, name)))


@dataclass(frozen=True)
class Observed:
    """What a runtime reports about one instance it owns."""

    instance_id: str
    service: str
    slot: int
    revision: str
    node: str
    state: State
    exit_code: int | None = None      # None while running, or when the exit was not witnessed
    started_at: float | None = None   # epoch seconds
    finished_at: float | None = None
    pid: int | None = None            # host pid of the workload's first process (if known)
    container_id: str | None = None   # docker only
    ports: Mapping[str, int] = field(default_factory=FrozenDict)
    address: str = "127.0.0.1"        # where the node's workloads are reached
    oom_killed: bool = False
    labels: Mapping[str, str] = field(default_factory=FrozenDict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "ports", _frozen(self.ports))
        object.__setattr__(self, "labels", _frozen(self.labels))

    @property
    def is_running(self) -> bool:
        return self.state == "running"


@dataclass(frozen=True)
class RuntimeEvent:
    """``exit``: an instance stopped (for any reason: crash, kill, stop(), OOM);
    ``resync``: the runtime may have missed events (engine reconnect): list() again."""

    kind: Literal["exit", "resync"]
    instance_id: str | None = None
    observed: Observed | None = None
    at: float = 0.0


@runtime_checkable
class Runtime(Protocol):
    """One node's way of running instances. Every method is safe to call from the event
    loop (blocking work runs in threads); ``close()`` detaches and leaves workloads running.

    ``events()`` has one consumer; subscribe before the first ``list()`` so no exit falls
    between them (the docker runtime also replays engine events since its creation)."""

    name: str
    node: str

    async def start(self, spec: InstanceSpec) -> Observed: ...

    async def stop(self, instance_id: str, *, grace: float) -> None: ...

    async def remove(self, instance_id: str) -> None: ...

    async def list(self) -> list[Observed]: ...

    def events(self) -> AsyncIterator[RuntimeEvent]: ...

    def logs(self, instance_id: str, *, follow: bool = False,
             tail: int | None = None) -> AsyncIterator[bytes]: ...

    async def exec(self, instance_id: str, argv: Sequence[str], *,
                   timeout: float) -> tuple[int, bytes]: ...

    async def close(self) -> None: ...

    async def health(self, *, timeout: float) -> Capacity:
        """What the node offers, asked of its engine within ``timeout`` seconds; raises
        ``EngineUnavailable`` (saying why) when the engine does not answer or its event
        stream is broken: the node's health check."""
        ...


@dataclass(frozen=True)
class Capacity:
    """What a node's engine reports: CPUs and memory in bytes (None: not reported)."""

    cpu: float | None = None
    memory: int | None = None


# --- errors -------------------------------------------------------------------------------

class WorkloadError(Exception):
    """Base of everything a runtime raises on purpose; the message says what and where."""


class InvalidSpec(WorkloadError, ValueError):
    def __init__(self, instance_id: str, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__(f"invalid instance spec {instance_id!r}: " + "; ".join(self.problems))


class InstanceExists(WorkloadError):
    pass


class InstanceNotFound(WorkloadError, LookupError):
    pass


class InstanceNotRunning(WorkloadError):
    pass


class ImageNotFound(WorkloadError, LookupError):
    pass


class StartFailed(WorkloadError):
    pass


class ExecTimeout(WorkloadError, TimeoutError):
    pass


class EngineUnavailable(WorkloadError, ConnectionError):
    pass


class VolumeInUse(WorkloadError):
    """``remove_volume`` of a volume an instance still mounts."""


# --- pure helpers -------------------------------------------------------------------------

def signal_number(name: str) -> int:
    """``"SIGTERM"``/``"TERM"``/``"15"`` -> 15; ValueError for anything else."""
    text = name.strip().upper()
    if text.isdigit():
        return signal.Signals(int(text)).value
    if not text.startswith("SIG"):
        text = "SIG" + text
    try:
        return signal.Signals[text].value
    except KeyError:
        raise ValueError(f"unknown signal {name!r}") from None


def is_instance_id(value: object) -> bool:
    """Usable as a container name and a file name (no '/', no leading '.')."""
    return isinstance(value, str) and _INSTANCE_ID.fullmatch(value) is not None


def port_env_name(port_name: str) -> str:
    """``"http"`` -> ``"PORT_HTTP"``, ``"admin-api"`` -> ``"PORT_ADMIN_API"``."""
    return "PORT_" + port_name.upper().replace("-", "_")


def validate_spec(spec: InstanceSpec, *, runtime: str) -> None:
    """Raise InvalidSpec naming every problem; runtime is "docker" or "process"."""
    problems: list[str] = []
    if not is_instance_id(spec.instance_id):
        problems.append(f"instance_id {spec.instance_id!r}: expected letters, digits, "
                        "'_', '.', '-' (starting with a letter or digit, at most 128)")
    if not spec.service:
        problems.append("service: empty")
    if not isinstance(spec.slot, int) or spec.slot < 0:
        problems.append(f"slot: expected an integer >= 0, got {spec.slot!r}")
    if not spec.node:
        problems.append("node: empty")
    if runtime == "docker" and not spec.image:
        problems.append("image: required on a docker node")
    if runtime == "process" and not spec.command:
        problems.append("command: required on a process node"
                        + (f" (the service has only image {spec.image})" if spec.image else ""))
    if spec.command is not None and (not spec.command or not all(spec.command)):
        problems.append(f"command: expected non-empty words, got {list(spec.command)!r}")
    for key, value in spec.env.items():
        if not isinstance(key, str) or not _ENV_NAME.fullmatch(key):
            problems.append(f"env {key!r}: not an environment variable name")
        elif not isinstance(value, str) or "\0" in value:
            problems.append(f"env {key}: expected a string without NUL")
    seen_ports: set[int] = set()
    for pname, port in spec.ports.items():
        if not isinstance(pname, str) or not _PORT_NAME.fullmatch(pname):
            problems.append(f"ports {pname!r}: expected a port name ([a-z][a-z0-9-]*)")
        if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
            problems.append(f"ports {pname}: expected an assigned host port 1-65535, got {port!r}")
        elif port in seen_ports:
            problems.append(f"ports {pname}: port {port} assigned twice")
        else:
            seen_ports.add(port)
    if spec.cpu is not None and not spec.cpu > 0:
        problems.append(f"cpu: expected > 0 cores, got {spec.cpu!r}")
    if spec.memory is not None and not (isinstance(spec.memory, int) and spec.memory > 0):
        problems.append(f"memory: expected > 0 bytes, got {spec.memory!r}")
    try:
        signal_number(spec.stop_signal)
    except ValueError:
        problems.append(f"stop_signal: unknown signal {spec.stop_signal!r}")
    if not spec.stop_grace_period >= 0:
        problems.append(f"stop_grace_period: expected >= 0 seconds, got {spec.stop_grace_period!r}")
    if spec.dns is not None:
        try:
            ipaddress.ip_address(spec.dns)
        except ValueError:
            problems.append(f"dns: expected an IP address, got {spec.dns!r}")
    for key, value in spec.secret_env.items():
        if not isinstance(key, str) or not _ENV_NAME.fullmatch(key):
            problems.append(f"secret env {key!r}: not an environment variable name")
        elif not isinstance(value, str) or "\0" in value:
            problems.append(f"secret env {key}: expected text without NUL")
    seen_files: set[tuple[str, str]] = set()
    for f in spec.files:
        if f.kind not in ("secret", "config") or not _FILE_NAME.fullmatch(f.name or ""):
            problems.append(f"files {f.kind} {f.name!r}: expected a secret or config with a file name")
        elif (f.kind, f.name) in seen_files:
            problems.append(f"files {f.kind} {f.name}: given twice")
        seen_files.add((f.kind, f.name))
        if f.target is not None and not f.target.startswith("/"):
            problems.append(f"files {f.kind} {f.name}: target {f.target!r} is not an absolute path")
        if not isinstance(f.mode, int) or not 0 <= f.mode <= 0o777:
            problems.append(f"files {f.kind} {f.name}: mode {f.mode!r} is not permission bits")
    problems += _volume_problems(spec, runtime)
    for key in spec.labels:
        if key.startswith(RESERVED_LABEL_PREFIX):
            problems.append(f"labels {key}: the {RESERVED_LABEL_PREFIX}* prefix is meshlet's own")
    if problems:
        raise InvalidSpec(str(spec.instance_id), problems)


def _volume_problems(spec: InstanceSpec, runtime: str) -> list[str]:
    problems: list[str] = []
    names: set[str] = set()
    targets: set[str] = set()
    for v in spec.volumes:
        what = f"volumes {v.name}"
        if v.kind not in VOLUME_KINDS:
            problems.append(f"{what}: kind {v.kind!r} is not one of {', '.join(VOLUME_KINDS)}")
            continue
        if volume_env_name(v.name) in names:
            problems.append(f"{what}: given twice (or another volume has its variable {volume_env_name(v.name)})")
        names.add(volume_env_name(v.name))
        if not v.target.startswith("/") or v.target in targets:
            problems.append(f"{what}: target {v.target!r} is not an absolute path, or is used twice")
        targets.add(v.target)
        if v.kind == "host" and not (v.source or "").startswith("/"):
            problems.append(f"{what}: a host volume needs an absolute source directory, got {v.source!r}")
        if v.kind == "named" and not _ENGINE_VOLUME.fullmatch(v.source or ""):
            problems.append(f"{what}: expected an engine volume name, got {v.source!r}")
        if v.size is not None and (v.kind != "tmpfs" or not isinstance(v.size, int) or v.size <= 0):
            problems.append(f"{what}: size is for tmpfs volumes, in bytes > 0")
        if runtime == "process":
            # no mount namespace: nothing could enforce these, and ignoring them would lie
            if v.read_only:
                problems.append(f"{what}: read_only cannot be enforced for a process (no mount namespace); "
                                "run the service from an image")
            if v.size is not None:
                problems.append(f"{what}: a process's tmpfs volume is a directory on the host's shared tmpfs, "
                                "where size cannot be enforced; run the service from an image")
            if v.kind == "named" and (v.driver != "local" or v.driver_opts):
                problems.append(f"{what}: driver {v.driver} with options {dict(v.driver_opts)} needs a Docker "
                                "engine; a process node holds local named volumes as directories only")
    return problems


def workload_env(spec: InstanceSpec, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The workload's environment: ``base`` < ``spec.env`` < secrets delivered as variables
    (``spec.secret_env``) < meshlet's own variables.

    meshlet's variables win because the runtime assigned them: ``PORT`` (the first port),
    ``PORT_<NAME>`` for each port, the instance identity ``MESHLET_INSTANCE``,
    ``MESHLET_SERVICE``, ``MESHLET_SLOT``, ``MESHLET_REVISION``, ``MESHLET_NODE``, and
    ``MESHLET_VOLUME_<NAME>`` for each volume: its target (a process runtime replaces it
    with the directory it gives the volume).
    """
    env = dict(base or {})
    env.update(spec.env)
    env.update(spec.secret_env)
    for i, (pname, port) in enumerate(spec.ports.items()):
        if i == 0:
            env["PORT"] = str(port)
        env[port_env_name(pname)] = str(port)
    env.update({
        "MESHLET_INSTANCE": spec.instance_id,
        "MESHLET_SERVICE": spec.service,
        "MESHLET_SLOT": str(spec.slot),
        "MESHLET_REVISION": spec.revision,
        "MESHLET_NODE": spec.node,
    })
    for v in spec.volumes:
        env[volume_env_name(v.name)] = v.target
    return env


def exit_code_from_returncode(returncode: int) -> int:
    """Python's returncode (-N: killed by signal N) in the shell/Docker convention (128+N),
    so both runtimes report SIGKILL as 137."""
    return 128 - returncode if returncode < 0 else returncode


_SPEC_FIELDS = ("instance_id", "service", "slot", "revision", "node", "image", "command",
                "args", "workdir", "env", "ports", "cpu", "memory", "stop_signal",
                "stop_grace_period", "dns", "labels")


def spec_to_dict(spec: InstanceSpec) -> dict[str, Any]:
    """JSON-ready form (mapping order kept: the first port is PORT)."""
    out: dict[str, Any] = {"volumes": [v.to_dict() for v in spec.volumes]}
    for name in _SPEC_FIELDS:
        value = getattr(spec, name)
        if isinstance(value, Mapping):
            value = dict(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[name] = value
    return out


def spec_from_dict(data: Mapping[str, Any]) -> InstanceSpec:
    """Inverse of spec_to_dict; unknown keys are ignored (newer writers), missing optional
    keys take defaults. KeyError/TypeError for a document that is not a spec."""
    kwargs = {name: data[name] for name in _SPEC_FIELDS if name in data}
    if kwargs.get("command") is not None:
        kwargs["command"] = tuple(kwargs["command"])
    if "args" in kwargs:
        kwargs["args"] = tuple(kwargs["args"])
    kwargs["volumes"] = tuple(VolumeAttachment.from_dict(v) for v in data.get("volumes") or ())
    return InstanceSpec(**kwargs)
