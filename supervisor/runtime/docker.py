"""The docker runtime: instances are containers on one node's Docker engine.

The Docker SDK is blocking, so every call runs in this runtime's thread pool and the event
loop never waits on the engine. Long streams get threads of their own: the event watcher
(one per runtime, for its lifetime), and one per ``logs()``/``exec()`` in progress.

Exits are noticed from the engine's event stream (``die`` events of containers labelled
``meshlet.owner=meshlet`` on this node), replayed from the runtime's creation time, so an
exit between creation and the first ``events()`` is not lost; when the stream breaks, the
watcher reconnects with ``since=<last event>`` and emits ``resync``.

Resource handling: ``close()`` stops the watcher and the pool and leaves containers
running (a restarted supervisor adopts them via ``list()``).

Error handling: engine errors become ``WorkloadError`` subclasses naming the instance and
node; an unreachable engine is ``EngineUnavailable``.
"""

from __future__ import annotations

import asyncio
import builtins
import functools
import logging
import os
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import docker
import docker.errors
import requests.exceptions
from docker.types import LogConfig
from docker.utils import parse_repository_tag

import config

from ._bridge import EventQueue, iterate_in_thread
from ._files import FilesError, files_root, remove_files, write_files
from ._docker_model import (LOG_OPTIONS, OWNER_LABEL, OWNER_VALUE, create_kwargs,
                            observed_from_attrs, observed_from_event, resolv_conf, volume_labels)
from .base import (EXEC_OUTPUT_LIMIT, Capacity, EngineUnavailable, ExecTimeout, ImageNotFound,
                   InstanceExists, InstanceNotFound, InstanceNotRunning, InstanceSpec, InvalidSpec,
                   Observed, RuntimeEvent, StartFailed, VolumeAttachment, VolumeInfo, VolumeInUse,
                   WorkloadError, validate_spec)

__all__ = ["DockerRuntime", "engine_tls", "open_api", "open_client"]

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_ENGINE = config.DEFAULT_DOCKER_ENGINE
# Reconnect delays of the event watcher: 0.1 s doubling to 5 s.
_WATCH_BACKOFF = (0.1, 5.0)
# After SIGKILL, how long to wait for the engine to report the exit.
_KILL_WAIT = 30.0


def _explain(exc: BaseException) -> str:
    if isinstance(exc, docker.errors.APIError):
        return str(exc.explanation or exc)
    return str(exc) or type(exc).__name__


def open_api(engine: str, *, timeout: float | None, tls: Any = None, version: str | None = None) -> Any:
    """An SDK ``APIClient`` for ``engine`` that ignores requests' environment: with it,
    REQUESTS_CA_BUNDLE (set system-wide on many machines) replaces the engine's CA and
    every TLS engine fails verification, and HTTP(S)_PROXY sends engine calls through a
    web proxy. ``version`` None: the engine's own, asked (as the SDK's "auto" does, but
    after the environment is switched off)."""
    # ssh://: the system's ssh client runs `docker system dial-stdio` on the node, with the
    # user's keys, known_hosts and ssh config (strict host key checking is ssh's to do)
    api = docker.APIClient(base_url=engine, version=version or docker.constants.MINIMUM_DOCKER_API_VERSION,
                           timeout=timeout, tls=tls or False, use_ssh_client=engine.startswith("ssh://"))
    api.trust_env = False
    if version is None:
        try:
            api._version = api._retrieve_server_version()   # the SDK's own "auto" step
        except BaseException:
            api.close()
            raise
    return api


def open_client(engine: str, *, timeout: float | None, tls: Any = None) -> docker.DockerClient:
    """``open_api`` as the SDK's high-level client."""
    client = docker.DockerClient.__new__(docker.DockerClient)
    client.api = open_api(engine, timeout=timeout, tls=tls)
    return client


def engine_tls(ca_file: str, cert_file: str, key_file: str) -> Any:
    """The SDK's TLS settings for a ``tcp://`` engine run with ``--tlsverify``: the
    engine's certificate checked against ``ca_file``, ours sent. Raises
    EngineUnavailable naming the file that is missing or unreadable."""
    import docker.tls
    for what, path in (("ca_file", ca_file), ("cert_file", cert_file), ("key_file", key_file)):
        try:
            with open(path, "rb") as f:
                f.read(1)
        except OSError as exc:
            raise EngineUnavailable(f"engine tls.{what} {path}: {exc.strerror or exc}") from None
    try:
        return docker.tls.TLSConfig(client_cert=(cert_file, key_file), ca_cert=ca_file, verify=True)
    except docker.errors.TLSParameterError as exc:
        raise EngineUnavailable(f"engine tls: {exc}") from None


class DockerRuntime:
    """Containers on the Docker engine at ``engine`` (``unix://...`` or ``tcp://...``),
    acting as node ``node`` whose workloads are reached at ``address``.

    ``data_dir``: a directory on the engine's host (so: for a local engine); the
    resolv.conf of workloads with ``dns`` is written there and mounted read-only. Without
    it the engine generates the file (works with remote engines; writable inside).

    Secrets and configs delivered as files (``spec.files``) are written to a tmpfs of
    this host (``_files``) and bind-mounted read-only: so they need a local engine (a
    ``data_dir``); on a remote engine such a start is refused, saying why."""

    name = "docker"

    def __init__(self, engine: str = DEFAULT_ENGINE, *, node: str = "local",
                 address: str = "127.0.0.1", data_dir: str | os.PathLike[str] | None = None,
                 timeout: float = 60.0, max_workers: int = 4, tls: Any = None) -> None:
        self.engine = engine
        self._tls = tls      # engine_tls(...) for a tcp:// engine with --tlsverify
        self._resolv_dir = Path(data_dir) / "resolv" if data_dir is not None else None
        self._files_ident = str(Path(data_dir).resolve()) if data_dir is not None else None
        self.node = node
        self.address = address
        self._timeout = timeout
        self._pool = ThreadPoolExecutor(max_workers, thread_name_prefix=f"docker-{node}")
        self._client: docker.DockerClient | None = None
        self._stream_api: docker.APIClient | None = None
        self._probe_api: docker.APIClient | None = None
        self._probe_pool = ThreadPoolExecutor(1, thread_name_prefix=f"docker-health-{node}")
        self._probing: asyncio.Future[Any] | None = None
        self._events_ok = threading.Event()    # the event stream is connected
        self._client_lock = threading.Lock()
        self._since = time.time()
        self._events = EventQueue(f"docker runtime {node}")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watcher: threading.Thread | None = None
        self._watch_stream: Any = None
        self._closing = threading.Event()

    def __repr__(self) -> str:
        return f"<DockerRuntime node={self.node} engine={self.engine}>"

    # --- plumbing -----------------------------------------------------------------------

    def _docker(self) -> docker.DockerClient:
        """The SDK client, created on first use in a worker thread ("auto" asks the
        engine for its API version, which is I/O)."""
        with self._client_lock:
            if self._client is None:
                try:
                    self._client = open_client(self.engine, timeout=int(self._timeout), tls=self._tls)
                except docker.errors.DockerException as exc:
                    raise EngineUnavailable(
                        f"docker engine {self.engine} of node {self.node} does not answer: "
                        f"{_explain(exc)}") from exc
            return self._client

    def _streaming_api(self) -> docker.APIClient:
        """A client without a read timeout for ``logs(follow=True)``: the SDK applies the
        client timeout to stream reads, which would end a quiet follow after 60 s."""
        with self._client_lock:
            client = self._client
        if client is None:
            client = self._docker()
        with self._client_lock:
            if self._stream_api is None:
                self._stream_api = open_api(self.engine, version=client.api.api_version, timeout=None,
                                            tls=self._tls)
            return self._stream_api

    def _ensure_watcher(self) -> None:
        """Start the event watcher on first use of the runtime (not first use of
        events()): exits are queued from then on, even across an engine restart that
        happens before anyone iterates events()."""
        if self._watcher is None and not self._closing.is_set():
            self._loop = asyncio.get_running_loop()
            self._watcher = threading.Thread(target=self._watch, daemon=True,
                                             name=f"docker-events-{self.node}")
            self._watcher.start()

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        self._ensure_watcher()
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._pool, functools.partial(fn, *args))
        except requests.exceptions.ConnectionError as exc:
            raise EngineUnavailable(f"docker engine {self.engine} of node {self.node} "
                                    f"does not answer: {exc}") from exc

    def _owned(self, instance_id: str) -> Any | None:
        """The container of instance ``instance_id`` if it is meshlet's on this node."""
        try:
            container = self._docker().containers.get(instance_id)
        except docker.errors.NotFound:
            return None
        labels = container.labels or {}
        if labels.get(OWNER_LABEL) != OWNER_VALUE or labels.get("meshlet.node") != self.node:
            return None
        return container

    def _filters(self) -> dict[str, Any]:
        return {"label": [f"{OWNER_LABEL}={OWNER_VALUE}", f"meshlet.node={self.node}"]}

    # --- start ----------------------------------------------------------------------------

    async def start(self, spec: InstanceSpec) -> Observed:
        validate_spec(spec, runtime="docker")
        if spec.node != self.node:
            raise InvalidSpec(spec.instance_id, [f"node: {spec.node!r} is not this runtime's "
                                                 f"node {self.node!r}"])
        return await self._run(self._start_sync, spec)

    def _start_sync(self, spec: InstanceSpec) -> Observed:
        client = self._docker()
        where = f"{spec.instance_id} on node {self.node}"
        try:
            existing = client.containers.get(spec.instance_id)
        except docker.errors.NotFound:
            existing = None
        if existing is not None:
            owner = "" if (existing.labels or {}).get(OWNER_LABEL) == OWNER_VALUE else \
                " (a container not created by meshlet has that name)"
            raise InstanceExists(f"instance {where} already exists{owner}")
        self._ensure_image(client, spec.image or "")
        created = self._prepare_volumes(client, spec)
        try:
            file_paths = self._write_files(spec)
            try:
                return self._create_and_start(client, spec, file_paths)
            except BaseException:
                remove_files(self._files_ident, spec.instance_id)   # nothing half-created
                raise
        except BaseException:
            for volume in created:      # made for this start, never used: nothing half-created
                try:
                    volume.remove()
                except docker.errors.APIError:
                    log.warning("could not remove volume %s after a failed start", volume.name, exc_info=True)
            raise

    # --- volumes ----------------------------------------------------------------------------

    def _prepare_volumes(self, client: docker.DockerClient, spec: InstanceSpec) -> builtins.list[Any]:
        """Host directories checked (made with ``create``), named volumes made on first use;
        the engine volumes created here (removed again if the start fails)."""
        created = []
        try:
            for v in spec.volumes:
                if v.kind == "host":
                    self._check_host_dir(spec, v)
                elif v.kind == "named":
                    volume = self._ensure_volume(client, spec, v)
                    if volume is not None:
                        created.append(volume)
        except BaseException:
            for volume in created:
                try:
                    volume.remove()
                except docker.errors.APIError:
                    pass
            raise
        return created

    def _check_host_dir(self, spec: InstanceSpec, v: VolumeAttachment) -> None:
        where = f"{spec.instance_id} on node {self.node}"
        path = Path(v.source or "")
        if self._files_ident is None:
            if v.create:
                raise StartFailed(f"cannot start {where}: host volume {v.name} has create: true, and node "
                                  f"{self.node}'s engine ({self.engine}) is not on this host to make {path}")
            return      # the engine says whether it exists
        if path.is_dir():
            return
        if path.exists():
            raise StartFailed(f"cannot start {where}: host volume {v.name}: {path} is not a directory")
        if not v.create:
            raise StartFailed(f"cannot start {where}: host volume {v.name}: {path} does not exist on node "
                              f"{self.node} (create it, or set create: true on the volume)")
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StartFailed(f"cannot start {where}: host volume {v.name}: cannot create {path}: "
                              f"{exc.strerror or exc}") from exc

    def _ensure_volume(self, client: docker.DockerClient, spec: InstanceSpec, v: VolumeAttachment) -> Any | None:
        """The engine volume of ``v``, created when missing (returned then, else None). One
        that exists with another driver or options is refused: reusing it would silently
        run on different storage than the spec says."""
        where = f"{spec.instance_id} on node {self.node}"
        name = v.source or v.name
        try:
            existing = client.volumes.get(name)
        except docker.errors.NotFound:
            existing = None
        except docker.errors.APIError as exc:
            raise StartFailed(f"cannot start {where}: volume {name}: {_explain(exc)}") from exc
        if existing is not None:
            driver = existing.attrs.get("Driver") or "local"
            options = existing.attrs.get("Options") or {}
            if driver != v.driver or dict(options) != dict(v.driver_opts):
                raise StartFailed(
                    f"cannot start {where}: volume {name} exists with driver {driver} and options "
                    f"{dict(options)}, the spec asks for driver {v.driver} and options {dict(v.driver_opts)}; "
                    f"meshlet never changes or deletes a volume's data by itself (`meshlet volume rm {name}` "
                    "to start over)")
            return None
        try:
            return client.volumes.create(name=name, driver=v.driver, driver_opts=dict(v.driver_opts),
                                         labels=volume_labels(v, spec))
        except docker.errors.APIError as exc:
            raise StartFailed(f"cannot start {where}: the engine refused to create volume {name} "
                              f"(driver {v.driver}): {_explain(exc)}") from exc

    async def volumes(self) -> builtins.list[VolumeInfo]:
        """meshlet's engine volumes on this node (labelled ``meshlet.owner``), with their
        size (the engine's disk-usage data; None when the driver cannot tell) and users."""
        return await self._run(self._volumes_sync)

    def _volumes_sync(self) -> builtins.list[VolumeInfo]:
        client = self._docker()
        found = client.volumes.list(filters={"label": [f"{OWNER_LABEL}={OWNER_VALUE}", f"meshlet.node={self.node}"]})
        if not found:
            return []
        sizes = {}
        for d in client.df().get("Volumes") or ():
            size = (d.get("UsageData") or {}).get("Size", -1)
            sizes[d.get("Name")] = size if isinstance(size, int) and size >= 0 else None
        out = []
        for volume in found:
            users = client.containers.list(all=True, filters={"volume": volume.name}, ignore_removed=True)
            out.append(VolumeInfo(volume.name, self.node, volume.attrs.get("Driver") or "local",
                                  sizes.get(volume.name), tuple(sorted(c.name for c in users)),
                                  dict(volume.attrs.get("Labels") or {}), volume.attrs.get("CreatedAt")))
        return out

    async def remove_volume(self, name: str) -> None:
        """Delete meshlet's engine volume ``name`` and its data; VolumeInUse while any
        container (running or exited) mounts it. A volume meshlet did not create is left
        alone (InvalidSpec)."""
        await self._run(self._remove_volume_sync, name)

    def _remove_volume_sync(self, name: str) -> None:
        client = self._docker()
        try:
            volume = client.volumes.get(name)
        except docker.errors.NotFound:
            raise InstanceNotFound(f"no volume {name} on node {self.node}") from None
        labels = volume.attrs.get("Labels") or {}
        if labels.get(OWNER_LABEL) != OWNER_VALUE or labels.get("meshlet.node") != self.node:
            raise InvalidSpec(name, [f"volume {name} on node {self.node} was not created by meshlet; "
                                     "remove it with docker volume rm"])
        users = client.containers.list(all=True, filters={"volume": name}, ignore_removed=True)
        if users:
            raise VolumeInUse(f"volume {name} on node {self.node} is in use by "
                              f"{', '.join(sorted(c.name for c in users))}")
        try:
            volume.remove()
        except docker.errors.APIError as exc:
            if exc.status_code == 409:
                raise VolumeInUse(f"volume {name} on node {self.node} is in use: {_explain(exc)}") from exc
            raise WorkloadError(f"cannot remove volume {name} on node {self.node}: {_explain(exc)}") from exc

    def _write_files(self, spec: InstanceSpec) -> dict[str, str]:
        """Target -> host path of the instance's secret and config files."""
        if not spec.files:
            return {}
        where = f"{spec.instance_id} on node {self.node}"
        if self._files_ident is None:
            raise StartFailed(f"cannot start {where}: secrets and configs reach a container as files on the "
                              f"engine's host, and node {self.node}'s engine ({self.engine}) is not on this host")
        try:
            written = write_files(files_root(self._files_ident), spec.instance_id, spec.files)
        except FilesError as exc:
            raise StartFailed(f"cannot start {where}: {exc}") from exc
        return {f.target: str(path) for f, path in written.items() if f.target is not None}

    def _create_and_start(self, client: docker.DockerClient, spec: InstanceSpec,
                          file_paths: dict[str, str]) -> Observed:
        where = f"{spec.instance_id} on node {self.node}"
        kwargs = create_kwargs(spec, self._resolv_conf(spec.dns) if spec.dns else None, file_paths)
        api = client.api
        kwargs["host_config"] = api.create_host_config(
            **kwargs["host_config"],
            log_config=LogConfig(type="json-file", config=dict(LOG_OPTIONS)))
        try:
            created = api.create_container(**kwargs)
            container = client.containers.get(created["Id"])
        except docker.errors.APIError as exc:
            if exc.status_code == 409:
                raise InstanceExists(f"instance {where} already exists") from exc
            raise StartFailed(f"cannot create {where}: {_explain(exc)}") from exc
        try:
            container.start()
            container.reload()
        except BaseException as exc:
            # Nothing half-created: a container that did not start is removed again.
            try:
                container.remove(force=True)
            except docker.errors.APIError:
                log.warning("could not remove failed container %s", where, exc_info=True)
            if isinstance(exc, docker.errors.APIError):
                raise StartFailed(f"cannot start {where}: {_explain(exc)}") from exc
            raise
        return observed_from_attrs(container.attrs, self.address)

    def _resolv_conf(self, dns: str) -> str | None:
        """Path of the resolv.conf naming ``dns`` (written once, atomically)."""
        if self._resolv_dir is None:
            return None
        path = self._resolv_dir / f"resolv-{dns}.conf"
        content = resolv_conf(dns)
        try:
            if not path.exists() or path.read_text() != content:
                self._resolv_dir.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
                tmp.write_text(content)
                os.chmod(tmp, 0o644)
                os.replace(tmp, path)
        except OSError as exc:
            raise StartFailed(f"cannot write {path} for node {self.node}: "
                              f"{exc.strerror or exc}") from exc
        return str(path)

    def _ensure_image(self, client: docker.DockerClient, image: str) -> None:
        try:
            client.images.get(image)
            return
        except docker.errors.ImageNotFound:
            pass
        except docker.errors.APIError as exc:
            raise StartFailed(f"cannot inspect image {image} on node {self.node}: "
                              f"{_explain(exc)}") from exc
        repository, tag = parse_repository_tag(image)
        log.info("pulling image %s on node %s", image, self.node)
        try:
            client.images.pull(repository, tag=tag or "latest")
        except (docker.errors.APIError, requests.exceptions.RequestException) as exc:
            raise ImageNotFound(f"image {image} not found on node {self.node} and could not "
                                f"be pulled: {_explain(exc)}") from exc

    # --- stop / remove ----------------------------------------------------------------------

    async def stop(self, instance_id: str, *, grace: float) -> None:
        """The container's stop signal, up to ``grace`` seconds, then SIGKILL. Idempotent:
        an instance that is gone or not running is left as it is."""
        await self._run(self._stop_sync, instance_id, grace)

    def _stop_sync(self, instance_id: str, grace: float) -> None:
        container = self._owned(instance_id)
        if container is None or container.status not in ("running", "paused", "restarting"):
            return
        api = self._docker().api
        stop_signal = (container.attrs.get("Config") or {}).get("StopSignal") or "SIGTERM"
        if not self._signal(api, container.id, stop_signal):
            return
        wait = self._wait_exit_ssh if self.engine.startswith("ssh://") else self._wait_exit
        if grace > 0 and wait(api, container.id, grace):
            return
        if self._signal(api, container.id, "SIGKILL"):
            wait(api, container.id, _KILL_WAIT)

    @staticmethod
    def _signal(api: Any, container_id: str, sig: str) -> bool:
        """False when the container is not running (any more) or gone."""
        try:
            api.kill(container_id, signal=sig)
            return True
        except docker.errors.NotFound:
            return False
        except docker.errors.APIError as exc:
            if exc.status_code == 409:   # "is not running"
                return False
            raise

    @staticmethod
    def _wait_exit_ssh(api: Any, container_id: str, timeout: float) -> bool:
        """``_wait_exit`` over ssh://: the SDK's ssh socket is a pipe to the ssh client and
        ignores read time-outs, so the engine's wait would block until the container exits
        (forever, for a PID 1 that ignores SIGTERM). The wait runs on a thread of its own
        and is given up after ``timeout``; that thread ends when the container does."""
        done = threading.Event()
        result: list[bool] = []

        def run() -> None:
            result.append(DockerRuntime._wait_exit(api, container_id, timeout))
            done.set()

        threading.Thread(target=run, daemon=True, name=f"docker-wait-{container_id[:12]}").start()
        return done.wait(timeout) and bool(result and result[0])

    @staticmethod
    def _wait_exit(api: Any, container_id: str, timeout: float) -> bool:
        """Block until the container exits (the engine's wait API, no polling)."""
        try:
            api.wait(container_id, timeout=timeout)
            return True
        except docker.errors.NotFound:
            return True
        except requests.exceptions.RequestException:
            # ReadTimeout, or a ConnectionError wrapping urllib3's ReadTimeoutError.
            return False

    async def remove(self, instance_id: str) -> None:
        """Remove the container (killing it if still running). Idempotent."""
        await self._run(self._remove_sync, instance_id)

    def _remove_sync(self, instance_id: str) -> None:
        container = self._owned(instance_id)
        remove_files(self._files_ident, instance_id)
        if container is None:
            return
        try:
            container.remove(force=True)
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError as exc:
            if exc.status_code != 409:   # 409: removal already in progress
                raise WorkloadError(f"cannot remove {instance_id} on node {self.node}: "
                                    f"{_explain(exc)}") from exc

    # --- observe ----------------------------------------------------------------------------

    async def list(self) -> list[Observed]:
        """Every meshlet container of this node, running or exited."""
        return await self._run(self._list_sync)

    def _list_sync(self) -> builtins.list[Observed]:
        containers = self._docker().containers.list(all=True, filters=self._filters(),
                                                    ignore_removed=True)
        return [observed_from_attrs(c.attrs, self.address) for c in containers]

    async def inspect(self, instance_id: str) -> Observed:
        container = await self._run(self._owned, instance_id)
        if container is None:
            raise InstanceNotFound(f"no instance {instance_id} on node {self.node}")
        return observed_from_attrs(container.attrs, self.address)

    async def events(self) -> AsyncIterator[RuntimeEvent]:
        self._ensure_watcher()
        async for event in self._events.stream():
            yield event

    def _watch(self) -> None:
        """The event watcher thread: die events -> EventQueue, reconnecting on failure.

        Not over ssh://: the SDK reads a stream through the ssh client's pipe in buffered
        blocks, so a die event would arrive late or never. There the supervisor's re-list
        (every few seconds) notices exits; the engine's health is its answer to /info."""
        if self.engine.startswith("ssh://"):
            self._events_ok.set()
            return
        since = self._since
        seen: deque[tuple[str, int]] = deque(maxlen=1024)
        delay = _WATCH_BACKOFF[0]
        reconnect = False
        while not self._closing.is_set():
            try:
                api = self._docker().api
                stream = api.events(since=f"{since:.9f}", decode=True,
                                    filters={**self._filters(), "type": "container",
                                             "event": ["die"]})
                self._watch_stream = stream
                if self._closing.is_set():
                    stream.close()
                    break
                if reconnect:
                    self._emit(RuntimeEvent("resync", at=time.time()))
                self._events_ok.set()
                delay = _WATCH_BACKOFF[0]
                for event in stream:
                    key = (event.get("id", ""), event.get("timeNano", 0))
                    if key in seen:
                        continue   # replayed after a reconnect
                    seen.append(key)
                    since = max(since, key[1] / 1e9)
                    self._on_die(event)
            except Exception:
                if not self._closing.is_set():
                    log.warning("docker events of node %s: stream failed", self.node,
                                exc_info=True)
            self._events_ok.clear()
            if self._closing.wait(delay):
                break
            reconnect = True
            delay = min(delay * 2, _WATCH_BACKOFF[1])
            log.info("docker events of node %s: reconnecting", self.node)

    def _on_die(self, event: dict[str, Any]) -> None:
        attrs = (event.get("Actor") or {}).get("Attributes") or {}
        if attrs.get("meshlet.node") != self.node:
            return
        try:
            container = self._docker().containers.get(event.get("id", ""))
            observed = observed_from_attrs(container.attrs, self.address)
            if observed.state != "exited":
                # Already started again by someone; report the exit as the event saw it.
                observed = observed_from_event(event, self.address)
        except (docker.errors.NotFound, requests.exceptions.RequestException):
            observed = observed_from_event(event, self.address)
        self._emit(RuntimeEvent("exit", observed.instance_id, observed,
                                at=(event.get("timeNano") or 0) / 1e9 or time.time()))

    def _emit(self, event: RuntimeEvent) -> None:
        if self._loop is not None:
            self._events.put_threadsafe(self._loop, event)

    # --- logs / exec ----------------------------------------------------------------------

    async def logs(self, instance_id: str, *, follow: bool = False,
                   tail: int | None = None) -> AsyncIterator[bytes]:
        """stdout and stderr as the engine kept them; ``follow`` ends when the container
        stops (or when the consumer stops iterating)."""
        container = await self._run(self._owned, instance_id)
        if container is None:
            raise InstanceNotFound(f"no instance {instance_id} on node {self.node}")

        def open_stream() -> Iterator[bytes]:
            api = self._streaming_api() if follow else self._docker().api
            return api.logs(container.id, stream=True, follow=follow,
                                           stdout=True, stderr=True,
                                           tail="all" if tail is None else max(tail, 0))

        async for chunk in iterate_in_thread(open_stream, _close_stream,
                                             name=f"docker-logs-{instance_id}"):
            yield chunk

    async def exec(self, instance_id: str, argv: Sequence[str], *,
                   timeout: float) -> tuple[int, bytes]:
        """Run ``argv`` in the running container; (exit code, stdout+stderr capped at
        EXEC_OUTPUT_LIMIT). On timeout the attachment is closed and, when the engine is
        local, the exec'd process is killed (the engine has no API to kill an exec)."""
        if not argv:
            raise InvalidSpec(instance_id, ["exec: empty command"])
        container = await self._run(self._owned, instance_id)
        if container is None:
            raise InstanceNotFound(f"no instance {instance_id} on node {self.node}")
        if container.status != "running":
            raise InstanceNotRunning(f"instance {instance_id} on node {self.node} is "
                                     f"{container.status}, cannot exec")
        api = self._docker().api
        try:
            exec_id = (await self._run(api.exec_create, container.id, list(argv)))["Id"]
        except docker.errors.APIError as exc:
            if exc.status_code == 409:
                raise InstanceNotRunning(f"instance {instance_id} on node {self.node} is "
                                         f"not running, cannot exec") from exc
            raise WorkloadError(f"exec in {instance_id} on node {self.node}: "
                                f"{_explain(exc)}") from exc
        output = bytearray()

        async def collect() -> None:
            stream = iterate_in_thread(lambda: api.exec_start(exec_id, stream=True),
                                       _close_stream, name=f"docker-exec-{instance_id}")
            try:
                async for chunk in stream:
                    room = EXEC_OUTPUT_LIMIT - len(output)
                    if room > 0:
                        output.extend(chunk[:room])
            finally:
                await stream.aclose()

        try:
            await asyncio.wait_for(collect(), timeout)
        except asyncio.TimeoutError:
            await self._run(self._kill_exec, exec_id, container.id)
            raise ExecTimeout(f"exec {list(argv)!r} in {instance_id} on node {self.node} "
                              f"did not finish in {timeout:g}s") from None
        return await self._run(self._exec_exit_code, exec_id), bytes(output)

    def _exec_exit_code(self, exec_id: str) -> int:
        api = self._docker().api
        deadline = time.monotonic() + 5.0
        while True:
            info = api.exec_inspect(exec_id)
            # The attach stream can end a moment before the engine records the exit code.
            if not info.get("Running") and info.get("ExitCode") is not None:
                return int(info["ExitCode"])
            if time.monotonic() > deadline:
                return -1
            time.sleep(0.01)

    def _kill_exec(self, exec_id: str, container_id: str) -> None:
        if not self.engine.startswith("unix://"):
            return
        try:
            pid = self._docker().api.exec_inspect(exec_id).get("Pid")
            # Only a process that is in this container's cgroup: never a stranger that
            # happens to have the pid in our namespace.
            with open(f"/proc/{pid}/cgroup", encoding="ascii") as f:
                if pid and container_id in f.read():
                    os.kill(pid, 9)
        except (OSError, docker.errors.APIError, requests.exceptions.RequestException):
            pass

    # --- health -------------------------------------------------------------------------

    async def health(self, *, timeout: float) -> Capacity:
        """The engine's CPUs and memory (``GET /info``) within ``timeout``, on a client of
        its own (the pool's threads may all be waiting on a dead engine). Raises
        EngineUnavailable when the engine does not answer or its event stream is down."""
        self._ensure_watcher()
        loop = asyncio.get_running_loop()
        # one look at a time, on a thread of its own: a look stuck on a dead link (an ssh
        # connect, a TCP SYN) must not pile up threads or hold the runtime's pool
        if self._probing is not None and not self._probing.done():
            raise EngineUnavailable(f"no answer to the previous health check yet (over {timeout:g}s)")
        self._probing = loop.run_in_executor(self._probe_pool, self._info_sync, timeout)
        # a look given up on (time-out) may still fail later: its exception is ours, not asyncio's to report
        self._probing.add_done_callback(lambda f: f.cancelled() or f.exception())
        try:
            info = await asyncio.wait_for(asyncio.shield(self._probing), timeout)
        except asyncio.TimeoutError:
            raise EngineUnavailable(f"no answer in {timeout:g}s") from None
        except (docker.errors.DockerException, requests.exceptions.RequestException, OSError) as exc:
            raise EngineUnavailable(_explain(exc)) from exc
        if not self._events_ok.is_set() and not await loop.run_in_executor(None, self._events_ok.wait, timeout):
            raise EngineUnavailable("its event stream is down")
        ncpu, mem = info.get("NCPU"), info.get("MemTotal")
        return Capacity(float(ncpu) if isinstance(ncpu, int) and ncpu > 0 else None,
                        mem if isinstance(mem, int) and mem > 0 else None)

    def _info_sync(self, timeout: float) -> dict[str, Any]:
        with self._client_lock:
            if self._probe_api is None:
                self._probe_api = open_api(self.engine, timeout=timeout, tls=self._tls,
                                           version=None if self._client is None else self._client.api.api_version)
            api = self._probe_api
        try:
            return api.info()
        except Exception:
            # a fresh connection next time: an engine that came back may be a new process
            with self._client_lock:
                if self._probe_api is api:
                    self._probe_api = None
            api.close()
            raise

    # --- lifecycle ----------------------------------------------------------------------

    async def close(self) -> None:
        """Detach: stop the watcher and the pool; containers keep running."""
        if self._closing.is_set():
            return
        self._closing.set()
        stream = self._watch_stream
        if stream is not None:
            _close_stream(stream)
        if self._watcher is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._watcher.join, 5.0)
        self._events.close()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._probe_pool.shutdown(wait=False, cancel_futures=True)
        for client in (self._client, self._stream_api, self._probe_api):
            if client is not None:
                client.close()


def _close_stream(stream: Any) -> None:
    """Close an SDK stream (CancellableStream) from any thread: wakes a blocked reader.

    CancellableStream.close() shuts the socket down but leaves the response's file object
    open, which keeps the descriptor until garbage collection; close those too."""
    close = getattr(stream, "close", None)
    if close is not None:
        try:
            close()
        except Exception:  # noqa: BLE001 - the SDK cannot cancel an ssh:// stream; the response is closed below
            pass
    response = getattr(stream, "_response", None)
    if response is not None:
        fp = getattr(getattr(response.raw, "_fp", None), "fp", None)
        response.close()
        if fp is not None:
            fp.close()
