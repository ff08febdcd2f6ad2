"""The process runtime: instances are local process groups (like Nomad's raw_exec), for
machines without a Docker engine.

Layout under ``data_dir``::

    instances/<instance_id>.json   identity: spec, pid, pid start time, exit (see _proc.py);
                                   0600 (the spec holds the service's env); never a secret
    logs/<instance_id>.log         stdout and stderr of the workload, in arrival order

Secrets and configs (``spec.files``): a process has no mount namespace, so it finds them
in two directories on a tmpfs (``_files``), ``$MESHLET_SECRETS_DIR/<name>`` (0700, files
0400 unless the mount says otherwise) and ``$MESHLET_CONFIGS_DIR/<name>``; the targets are
for containers. Secrets delivered as variables (``spec.secret_env``) are in the process's
environment only (and so in ``/proc/<pid>/environ`` for its own user), never in the state
file: an exec probe of a process adopted after a supervisor restart runs without them.

Volumes (``spec.volumes``): no mount namespace either, so each volume is a directory
whose path is in ``$MESHLET_VOLUME_<NAME>``: a host volume's own directory (made with
``create``), ``<data_dir>/volumes/<engine name>/`` for a named one (a per-replica one's
name is ``<service>-<volume>-<slot>``; its labels in ``<data_dir>/volumes.meta/``), and
for a tmpfs a directory of the instance on the runtime's tmpfs (``_files``), removed with
the instance. Read-only, a tmpfs size and volume drivers cannot be enforced without
mounts and are refused (``validate_spec``). Named volumes are never removed but by
``remove_volume``, which refuses while an instance (running or exited) mounts one.

Each instance runs in a new session (so its own process group, pgid == pid) with
``PORT``/``PORT_<NAME>``, the spec's env and a few inherited variables (``INHERITED_ENV``:
never the supervisor's whole environment, which may hold credentials). stop() signals the
whole group; when the first process exits, what is left of its group is SIGKILLed, as the
kernel does to a container when its init exits.

Exits are noticed at once through a pidfd (``os.pidfd_open`` + ``loop.add_reader``) for
every instance, started or adopted: no polling. For its own children the runtime also reaps
them and reports the exit code (128+N for signal N, like Docker). For an adopted process
(started by an earlier supervisor, so not our child) the kernel reports the exit to its
parent only, so ``exit_code`` is None: unknown, never a guess.

Limits: ``memory`` is RLIMIT_AS set in the child before exec. It bounds *virtual* address
space, not resident memory: allocations beyond it fail (malloc returns NULL, the program
usually exits with an out-of-memory error) instead of an OOM kill, and runtimes that
reserve large address ranges up front (Go, the JVM, some allocators) may fail to start
with a limit that a container would allow. ``cpu`` is not enforced (it needs cgroups);
``dns`` is not applied (the workload uses the host's resolver). Both are for placement.

Resource handling: ``close()`` stops watching and leaves the processes running; a new
runtime over the same data dir adopts them in ``list()``. ``remove()`` deletes the state and
log files.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import resource
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._bridge import EventQueue
from ._files import FilesError, files_root, remove_files, write_files
from ._proc import Record, read_record, read_starttime, tail_offset, write_record
from .base import (EXEC_OUTPUT_LIMIT, Capacity, ExecTimeout, InstanceExists, InstanceNotFound,
                   InstanceNotRunning, InstanceSpec, InvalidSpec, Observed, RuntimeEvent,
                   StartFailed, VolumeInfo, VolumeInUse, WorkloadError, exit_code_from_returncode,
                   signal_number, is_instance_id, validate_spec, workload_env)
from config import volume_env_name

__all__ = ["ProcessRuntime", "INHERITED_ENV"]

log = logging.getLogger(__name__)

# Variables a workload inherits from the supervisor: enough to find programs and behave
# normally, nothing that may carry credentials.
INHERITED_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR")
# After SIGKILL, how long the group may take to be reported gone.
_KILL_WAIT = 10.0
# Follow-mode logs: how often a quiet log file is looked at again while the workload runs.
_FOLLOW_INTERVAL = 0.1


# Children of this OS process whose runtime object was closed while they ran (a restart
# of the supervisor inside one process, as in tests). Kept referenced so Popen does not
# warn, and reaped as they exit so they do not linger as zombies.
_detached: list[subprocess.Popen[bytes]] = []


def _files_root(data_dir: Path) -> Path:
    return files_root(str(data_dir.resolve()))


def _du(path: Path) -> int:
    """Bytes the files below ``path`` take (their sizes; links not followed)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def _reap_detached() -> None:
    _detached[:] = [p for p in _detached if p.poll() is None]


@dataclass(eq=False)
class _Live:
    """An instance this runtime object watches: started here or adopted."""

    record: Record
    proc: subprocess.Popen[bytes] | None          # our own child: reap it, know its code
    exited: asyncio.Event = field(default_factory=asyncio.Event)
    pidfd: int | None = None
    poller: asyncio.Task[None] | None = None      # only without pidfd support
    removed: bool = False


def _memory_limit(limit: int | None) -> Callable[[], None] | None:
    if limit is None:
        return None

    def apply() -> None:   # runs in the child between fork and exec: C calls only
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    return apply


def _spawn(argv: list[str], env: dict[str, str], cwd: str | None, log_path: Path,
           memory: int | None) -> subprocess.Popen[bytes]:
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
    try:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=fd,
                                stderr=subprocess.STDOUT, cwd=cwd, env=env,
                                start_new_session=True, close_fds=True,
                                preexec_fn=_memory_limit(memory))
    finally:
        os.close(fd)


class ProcessRuntime:
    """Local process groups of node ``node``, with state and logs under ``data_dir``."""

    name = "process"

    def __init__(self, data_dir: str | os.PathLike[str], *, node: str = "local",
                 address: str = "127.0.0.1") -> None:
        self.node = node
        self.address = address
        self.data_dir = Path(data_dir)
        self._state_dir = self.data_dir / "instances"
        self._log_dir = self.data_dir / "logs"
        self._volume_dir = self.data_dir / "volumes"
        self._volume_meta = self.data_dir / "volumes.meta"
        self._live: dict[str, _Live] = {}
        self._events = EventQueue(f"process runtime {node}")
        self._closed = False

    def __repr__(self) -> str:
        return f"<ProcessRuntime node={self.node} data_dir={self.data_dir}>"

    def _state_path(self, instance_id: str) -> Path:
        return self._state_dir / f"{instance_id}.json"

    def log_path(self, instance_id: str) -> Path:
        return self._log_dir / f"{instance_id}.log"

    @staticmethod
    def _base_env() -> dict[str, str]:
        return {k: os.environ[k] for k in INHERITED_ENV if k in os.environ}

    # --- volumes ----------------------------------------------------------------------------

    def _volume_path(self, spec: InstanceSpec, v: Any) -> Path:
        if v.kind == "host":
            return Path(v.source)
        if v.kind == "named":
            return self._volume_dir / v.source
        return _files_root(self.data_dir) / spec.instance_id / "volumes" / v.name

    def _env(self, spec: InstanceSpec) -> dict[str, str]:
        """The workload's environment, each volume's variable naming its directory."""
        env = workload_env(spec, self._base_env())
        for v in spec.volumes:
            env[volume_env_name(v.name)] = str(self._volume_path(spec, v))
        return env

    def _prepare_volumes(self, spec: InstanceSpec) -> None:
        """Every volume's directory, made where meshlet owns it (named, tmpfs) or asked to
        (host with ``create``); StartFailed naming the volume otherwise."""
        where = f"{spec.instance_id} on node {self.node}"
        for v in spec.volumes:
            try:
                path = self._volume_path(spec, v)
            except FilesError as exc:
                raise StartFailed(f"cannot start {where}: tmpfs volume {v.name}: {exc}") from exc
            if v.kind == "host" and not path.is_dir():
                if path.exists() or not v.create:
                    why = "is not a directory" if path.exists() else \
                        f"does not exist on node {self.node} (create it, or set create: true on the volume)"
                    raise StartFailed(f"cannot start {where}: host volume {v.name}: {path} {why}")
            try:
                if v.kind == "named" and not path.exists():
                    self._volume_meta.mkdir(parents=True, exist_ok=True)
                    labels = {"meshlet.volume": v.name, "meshlet.node": spec.node}
                    if v.per_replica:
                        labels.update({"meshlet.service": spec.service, "meshlet.slot": str(spec.slot)})
                    (self._volume_meta / f"{v.source}.json").write_text(json.dumps(
                        {"labels": labels, "created_at": time.time()}))
                path.mkdir(mode=0o700 if v.kind == "tmpfs" else 0o755, parents=True, exist_ok=True)
            except OSError as exc:
                raise StartFailed(f"cannot start {where}: volume {v.name}: cannot create {path}: "
                                  f"{exc.strerror or exc}") from exc

    def _volume_users(self, name: str) -> list[str]:
        users = []
        if self._state_dir.is_dir():
            for path in sorted(self._state_dir.glob("*.json")):
                live = self._live.get(path.stem) or self._adopt(path)
                if live is not None and not live.removed and any(
                        v.kind == "named" and v.source == name for v in live.record.spec.volumes):
                    users.append(live.record.spec.instance_id)
        return users

    async def volumes(self) -> list[VolumeInfo]:
        """The named volumes (directories) under the data dir, with bytes used and users."""
        if not self._volume_dir.is_dir():
            return []
        out = []
        for path in sorted(p for p in self._volume_dir.iterdir() if p.is_dir()):
            size = await asyncio.to_thread(_du, path)
            try:
                meta = json.loads((self._volume_meta / f"{path.name}.json").read_text())
            except (OSError, ValueError):
                meta = {}
            created = meta.get("created_at")
            out.append(VolumeInfo(path.name, self.node, "local", size, tuple(self._volume_users(path.name)),
                                  meta.get("labels") or {},
                                  time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(created)) if created else None))
        return out

    async def remove_volume(self, name: str) -> None:
        """Delete the named volume ``name`` (its directory); VolumeInUse while an instance
        (running or exited) mounts it."""
        path = self._volume_dir / name
        if not is_instance_id(name) or not path.is_dir():
            raise InstanceNotFound(f"no volume {name} on node {self.node}")
        users = self._volume_users(name)
        if users:
            raise VolumeInUse(f"volume {name} on node {self.node} is in use by {', '.join(users)}")
        await asyncio.to_thread(shutil.rmtree, path)
        (self._volume_meta / f"{name}.json").unlink(missing_ok=True)

    # --- start ----------------------------------------------------------------------------

    async def start(self, spec: InstanceSpec) -> Observed:
        validate_spec(spec, runtime="process")
        if spec.node != self.node:
            raise InvalidSpec(spec.instance_id, [f"node: {spec.node!r} is not this runtime's "
                                                 f"node {self.node!r}"])
        where = f"{spec.instance_id} on node {self.node}"
        state_path = self._state_path(spec.instance_id)
        if spec.instance_id in self._live or state_path.exists():
            raise InstanceExists(f"instance {where} already exists")
        self._state_dir.mkdir(parents=True, exist_ok=True)
        self._log_dir.mkdir(parents=True, exist_ok=True)
        argv = [*(spec.command or ()), *spec.args]
        log_path = self.log_path(spec.instance_id)
        self._prepare_volumes(spec)
        env = self._env(spec)
        if spec.files:
            try:
                written = write_files(files_root(str(self.data_dir.resolve())), spec.instance_id, spec.files)
            except FilesError as exc:
                raise StartFailed(f"cannot start {where}: {exc}") from exc
            for f, path in written.items():
                env["MESHLET_SECRETS_DIR" if f.kind == "secret" else "MESHLET_CONFIGS_DIR"] = str(path.parent)
        # In a thread: fork+exec must not stall the loop (with a memory limit it is a
        # full fork of the supervisor, not vfork).
        spawning = asyncio.ensure_future(asyncio.to_thread(_spawn, argv, env, spec.workdir,
                                                           log_path, spec.memory))
        try:
            proc = await asyncio.shield(spawning)
        except asyncio.CancelledError:
            # The fork goes on in its thread: never leave a process without a state file.
            try:
                orphan = await spawning
            except OSError:
                pass
            else:
                self._kill_group(orphan.pid, signal.SIGKILL)
                await asyncio.to_thread(orphan.wait)
            log_path.unlink(missing_ok=True)
            self._remove_files(spec)
            raise
        except OSError as exc:
            log_path.unlink(missing_ok=True)
            self._remove_files(spec)
            what = exc.filename if exc.filename is not None else argv[0]
            raise StartFailed(f"cannot start {where}: {what}: "
                              f"{exc.strerror or exc}") from exc
        record = Record(spec=spec, pid=proc.pid, starttime=read_starttime(proc.pid),
                        started_at=time.time())
        try:
            write_record(state_path, record, exclusive=True)
        except BaseException as exc:
            # Nothing half-created: no process without its state file.
            self._kill_group(proc.pid, signal.SIGKILL)
            await asyncio.to_thread(proc.wait)
            log_path.unlink(missing_ok=True)
            self._remove_files(spec)
            if isinstance(exc, FileExistsError):
                raise InstanceExists(f"instance {where} already exists") from exc
            if isinstance(exc, OSError):
                raise StartFailed(f"cannot start {where}: state file {state_path}: "
                                  f"{exc.strerror or exc}") from exc
            raise
        live = _Live(record, proc)
        self._live[spec.instance_id] = live
        self._watch(live)
        return self._observed(live)

    # --- exit detection -------------------------------------------------------------------

    def _watch(self, live: _Live) -> None:
        """Arm exit detection for a running instance (pidfd, else a 1 s poll)."""
        pid = live.record.pid
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            self._on_exit(live)
            return
        except (AttributeError, OSError):   # kernel < 5.3 or no pidfd in this sandbox
            live.poller = asyncio.get_running_loop().create_task(self._poll(live))
            return
        # The pidfd pins the process it was opened for; if the start time still matches
        # after opening, it is ours and not a pid reused since the state file was written.
        if live.proc is None and read_starttime(pid) != live.record.starttime:
            os.close(fd)
            self._on_exit(live)
            return
        live.pidfd = fd
        asyncio.get_running_loop().add_reader(fd, self._on_exit, live)

    async def _poll(self, live: _Live) -> None:
        while self._is_alive(live):
            await asyncio.sleep(1.0)
        self._on_exit(live)

    def _is_alive(self, live: _Live) -> bool:
        if live.proc is not None:
            return live.proc.poll() is None
        return live.record.starttime is not None and \
            read_starttime(live.record.pid) == live.record.starttime

    def _unwatch(self, live: _Live) -> None:
        if live.pidfd is not None:
            try:
                asyncio.get_running_loop().remove_reader(live.pidfd)
            except RuntimeError:
                pass
            os.close(live.pidfd)
            live.pidfd = None
        if live.poller is not None:
            live.poller.cancel()
            live.poller = None

    def _on_exit(self, live: _Live) -> None:
        if live.record.exited:
            return
        self._unwatch(live)
        _reap_detached()
        code: int | None = None
        if live.proc is not None:
            returncode = live.proc.poll()   # reaps our child
            if returncode is None:          # cannot happen after pidfd readiness; be safe
                returncode = live.proc.wait()
            code = exit_code_from_returncode(returncode)
        # Whatever is left of the group dies with its leader (container semantics).
        self._kill_group(live.record.pid, signal.SIGKILL)
        live.record = dataclasses.replace(live.record, exited=True, exit_code=code,
                                          finished_at=time.time())
        if not live.removed:
            try:
                write_record(self._state_path(live.record.spec.instance_id), live.record)
            except OSError:
                log.warning("cannot record the exit of %s", live.record.spec.instance_id,
                            exc_info=True)
        live.exited.set()
        observed = self._observed(live)
        self._events.put(RuntimeEvent("exit", observed.instance_id, observed,
                                      at=live.record.finished_at or time.time()))

    @staticmethod
    def _kill_group(pgid: int, sig: int) -> bool:
        try:
            os.killpg(pgid, sig)
            return True
        except (ProcessLookupError, PermissionError):
            return False

    # --- lookup ---------------------------------------------------------------------------

    def _find(self, instance_id: str) -> _Live | None:
        """A known instance, or one adopted from its state file; None if there is none."""
        live = self._live.get(instance_id)
        if live is not None:
            return live
        if not is_instance_id(instance_id):
            return None
        path = self._state_path(instance_id)
        if not path.exists():
            return None
        return self._adopt(path)

    def _adopt(self, path: Path) -> _Live | None:
        try:
            record = read_record(path)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring unreadable state file %s: %s", path, exc)
            return None
        if record.spec.node != self.node:
            return None
        live = _Live(record, None)
        self._live[record.spec.instance_id] = live
        if record.exited:
            live.exited.set()
        elif not self._is_alive(live):
            # Exited while nobody watched: no exit code, no event (list() shows it).
            live.record = dataclasses.replace(record, exited=True, finished_at=None)
            live.exited.set()
            try:
                write_record(path, live.record)
            except OSError:
                log.warning("cannot update state file %s", path, exc_info=True)
        else:
            self._watch(live)
        return live

    def _observed(self, live: _Live) -> Observed:
        r = live.record
        s = r.spec
        return Observed(
            instance_id=s.instance_id, service=s.service, slot=s.slot, revision=s.revision,
            node=s.node, state="exited" if r.exited else "running", exit_code=r.exit_code,
            started_at=r.started_at, finished_at=r.finished_at, pid=r.pid, ports=s.ports,
            address=self.address, labels=s.labels)

    async def list(self) -> list[Observed]:
        """Every instance with a state file under the data dir (adopting those this
        object has not seen yet: running ones are watched from now on)."""
        if not self._state_dir.is_dir():
            return []
        out = []
        for path in sorted(self._state_dir.glob("*.json")):
            live = self._live.get(path.stem) or self._adopt(path)
            if live is not None and not live.removed:
                out.append(self._observed(live))
        return out

    async def inspect(self, instance_id: str) -> Observed:
        live = self._find(instance_id)
        if live is None:
            raise InstanceNotFound(f"no instance {instance_id} on node {self.node}")
        return self._observed(live)

    def events(self) -> AsyncIterator[RuntimeEvent]:
        return self._events.stream()

    # --- stop / remove --------------------------------------------------------------------

    async def stop(self, instance_id: str, *, grace: float) -> None:
        """The stop signal to the process group, up to ``grace`` seconds, then SIGKILL.
        Idempotent: an unknown or exited instance is left as it is."""
        live = self._find(instance_id)
        if live is None or live.record.exited:
            return
        sig = signal_number(live.record.spec.stop_signal)
        if not self._signal(live, sig):
            return
        if grace > 0:
            try:
                await asyncio.wait_for(live.exited.wait(), grace)
                return
            except asyncio.TimeoutError:
                pass
        if self._signal(live, signal.SIGKILL):
            try:
                await asyncio.wait_for(live.exited.wait(), _KILL_WAIT)
            except asyncio.TimeoutError:
                raise WorkloadError(f"instance {instance_id} on node {self.node} did not "
                                    f"exit {_KILL_WAIT:g}s after SIGKILL") from None

    def _signal(self, live: _Live, sig: int) -> bool:
        if live.record.exited:
            return False
        if live.proc is None and not self._is_alive(live):
            return False   # never signal a pid that is no longer the one we started
        return self._kill_group(live.record.pid, sig)

    async def remove(self, instance_id: str) -> None:
        """Kill the instance if it still runs and forget it (state and log files)."""
        live = self._find(instance_id)
        if live is None:
            return
        if not live.record.exited:
            await self.stop(instance_id, grace=0)
        live.removed = True
        self._unwatch(live)
        self._live.pop(instance_id, None)
        self._state_path(instance_id).unlink(missing_ok=True)
        self.log_path(instance_id).unlink(missing_ok=True)
        self._remove_files(live.record.spec)

    def _remove_files(self, spec: InstanceSpec) -> None:
        remove_files(str(self.data_dir.resolve()), spec.instance_id)

    # --- logs / exec ----------------------------------------------------------------------

    async def logs(self, instance_id: str, *, follow: bool = False,
                   tail: int | None = None) -> AsyncIterator[bytes]:
        """The log file's content (the last ``tail`` lines); ``follow`` keeps reading
        until the instance has exited and everything it wrote was read."""
        live = self._find(instance_id)
        if live is None:
            raise InstanceNotFound(f"no instance {instance_id} on node {self.node}")
        try:
            f = open(self.log_path(instance_id), "rb")
        except FileNotFoundError:
            return
        with f:
            if tail is not None:
                f.seek(tail_offset(f, tail))
            while True:
                chunk = f.read(65536)
                if chunk:
                    yield chunk
                    continue
                if not follow:
                    return
                if live.exited.is_set():
                    # Its writes all happened before the exit was noticed: drain, then end.
                    while chunk := f.read(65536):
                        yield chunk
                    return
                try:
                    await asyncio.wait_for(live.exited.wait(), _FOLLOW_INTERVAL)
                except asyncio.TimeoutError:
                    pass

    async def exec(self, instance_id: str, argv: Sequence[str], *,
                   timeout: float) -> tuple[int, bytes]:
        """Run ``argv`` beside the instance (same env and workdir, its own process group);
        (exit code, stdout+stderr capped at EXEC_OUTPUT_LIMIT). 127 if not found."""
        if not argv:
            raise InvalidSpec(instance_id, ["exec: empty command"])
        live = self._find(instance_id)
        if live is None:
            raise InstanceNotFound(f"no instance {instance_id} on node {self.node}")
        if live.record.exited:
            raise InstanceNotRunning(f"instance {instance_id} on node {self.node} has "
                                     "exited, cannot exec")
        spec = live.record.spec
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, cwd=spec.workdir,
                env=self._env(spec), start_new_session=True)
        except OSError as exc:
            code = 127 if isinstance(exc, FileNotFoundError) else 126
            return code, f"exec {argv[0]}: {exc.strerror or exc}\n".encode()
        output = bytearray()

        async def collect() -> int:
            assert proc.stdout is not None
            while chunk := await proc.stdout.read(65536):
                room = EXEC_OUTPUT_LIMIT - len(output)
                if room > 0:
                    output.extend(chunk[:room])
            return await proc.wait()

        try:
            returncode = await asyncio.wait_for(collect(), timeout)
        except asyncio.TimeoutError:
            self._kill_group(proc.pid, signal.SIGKILL)
            await proc.wait()
            raise ExecTimeout(f"exec {list(argv)!r} in {instance_id} on node {self.node} "
                              f"did not finish in {timeout:g}s") from None
        except BaseException:
            self._kill_group(proc.pid, signal.SIGKILL)
            raise
        return exit_code_from_returncode(returncode), bytes(output)

    # --- lifecycle ------------------------------------------------------------------------

    async def health(self, *, timeout: float) -> Capacity:
        """This host's CPUs (those this process may run on) and memory: the process
        runtime is this host, so it answers while the supervisor does."""
        return host_capacity()

    async def close(self) -> None:
        """Stop watching; the processes keep running for a later runtime to adopt."""
        if self._closed:
            return
        self._closed = True
        for live in self._live.values():
            self._unwatch(live)
            if live.proc is not None and live.proc.poll() is None:
                _detached.append(live.proc)
        self._live.clear()
        self._events.close()


def host_capacity() -> Capacity:
    """The CPUs this process may use and the host's memory (/proc/meminfo MemTotal)."""
    try:
        cpu: float | None = float(len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        cpu = float(os.cpu_count() or 0) or None
    memory = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = int(line.split()[1]) * 1024
                break
    except (OSError, ValueError, IndexError):
        pass
    return Capacity(cpu, memory)
