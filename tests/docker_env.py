"""A real Docker engine for the tests: private ``dockerd`` processes and locally built images.

Use from any conftest under tests/ (pyproject.toml puts tests/ on pytest's import path)::

    from docker_env import docker_engines, docker_engine  # noqa: F401 (fixtures)

    def test_x(docker_engine):            # one engine, "node1", started once per session
        client = docker_engine.client()
    def test_y(docker_engines):           # several engines = several nodes
        a, b = docker_engines.get("node1"), docker_engines.get("node2")

Outside pytest (benches): ``start_engine(name)`` then ``build_test_images(engine)``, and
``engine.stop()``.

Requirements: root, and Debian's ``docker.io`` (dockerd, containerd, runc) and
``busybox-static`` (the statically linked /bin/busybox that the test image is made of).
scripts/test.sh installs them; when dockerd is missing the fixtures fail (they never skip:
a suite that silently skips its engine tests would pass without testing anything).

How each engine is started, and why::

    dockerd
      --data-root <root>/data      images/containers of this engine only: nothing touches
                                   /var/lib/docker, and engines never share state
      --exec-root <root>/exec      runtime state (containerd socket, netns) per engine
      --pidfile <root>/docker.pid  not /var/run/docker.pid (a system dockerd may own it)
      -H unix://<root>/docker.sock the only listener: no TCP port, nothing off-loopback
      --bridge=none                no docker0 bridge: containers use host networking, the
                                   only network meshlet workloads have
      --iptables=false --ip6tables=false --ip-masq=false --ip-forward=false
                                   leave the host's firewall and sysctls alone
      --storage-driver overlay2    falls back to vfs where overlay mounts fail (nested
                                   overlay, old kernels); MESHLET_TEST_DOCKER_STORAGE forces one
      --containerd-namespace / --containerd-plugins-namespace meshlet-test-<name>
                                   if a system containerd is running, dockerd uses it; its
                                   own namespace keeps each engine's containers apart
      --shutdown-timeout 2         containers still running at session end get 2 s, not 15
      --exec-opt native.cgroupdriver=cgroupfs
                                   no systemd/D-Bus dependency (CI containers, plain VMs)
      --log-level warn             its log is <root>/dockerd.log, quoted in start errors

The process also gets ``HTTP(S)_PROXY=http://127.0.0.1:9`` (a closed loopback port): no
registry is reachable here, so an attempted pull fails at once, on loopback, instead of
sending DNS and TCP off the machine; meshlet's "image missing -> pull -> clear error" path
is tested against exactly that. It runs in its own session; started from the main thread
it also gets PR_SET_PDEATHSIG=SIGTERM, so it goes away with the test process even when
pytest is killed.

Stopping: SIGTERM, SIGKILL after a deadline, then any containerd/shim process left that
names this engine's root is killed by pid, leftover mounts under the root are detached
and the root is deleted.

Images: ``meshlet-test/busybox:1`` is ``FROM scratch`` + /bin/busybox (static) with a
symlink per applet (sh, httpd, nc, sleep, env, wget, ...) and /www (tests/images/busybox):
its default command serves /www with ``httpd`` on 127.0.0.1:$PORT; /www/cgi-bin/env
prints the instance id and the environment. Built through the engine's build API from a
local context (no pull: nothing ``FROM`` a registry); skipped when the engine already has
the image with the same content hash.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from config import die_with_parent

__all__ = ["DockerEngine", "EngineSet", "EngineUnavailable", "start_engine",
           "build_test_images", "ensure_packages", "static_busybox", "TEST_IMAGE",
           "docker_engines", "docker_engine"]

TEST_IMAGE = "meshlet-test/busybox:1"
IMAGES_DIR = Path(__file__).resolve().parent / "images"
REQUIRED_DEBS = ("docker.io", "busybox-static")
_START_DEADLINE = 60.0
_STOP_DEADLINE = 20.0
# The storage driver that worked last (so the second engine does not retry overlay2).
_working_driver: str | None = None


class EngineUnavailable(RuntimeError):
    """The test engine cannot run here; the message says what to install or what failed."""


# --- prerequisites ------------------------------------------------------------------------

def _is_static_elf(path: Path) -> bool:
    """True for an ELF executable without a PT_INTERP program header (no dynamic loader)."""
    with open(path, "rb") as f:
        head = f.read(64)
        if head[:4] != b"\x7fELF" or head[4] != 2:   # ELFCLASS64 only
            return False
        endian = "<" if head[5] == 1 else ">"
        phoff, = struct.unpack_from(endian + "Q", head, 32)
        phentsize, phnum = struct.unpack_from(endian + "HH", head, 54)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    return all(struct.unpack_from(endian + "I", table, i * phentsize)[0] != 3
               for i in range(phnum))


def static_busybox() -> Path:
    """Path of a statically linked busybox (Debian's busybox-static)."""
    for candidate in ("/bin/busybox", "/usr/bin/busybox"):
        path = Path(candidate)
        if path.is_file() and _is_static_elf(path.resolve()):
            return path.resolve()
    raise EngineUnavailable("no statically linked busybox at /bin/busybox: install Debian's "
                            "busybox-static (apt-get install busybox-static)")


def ensure_packages() -> None:
    """Raise EngineUnavailable naming the Debian packages to install if any is missing."""
    missing = []
    if not (shutil.which("dockerd") or Path("/usr/sbin/dockerd").exists()):
        missing.append("docker.io")
    try:
        static_busybox()
    except EngineUnavailable:
        missing.append("busybox-static")
    if missing:
        raise EngineUnavailable(
            "the Docker test engine needs Debian packages " + " ".join(missing) +
            f" (apt-get install {' '.join(missing)}; scripts/test.sh installs them)")
    if os.geteuid() != 0:
        raise EngineUnavailable("the Docker test engine runs dockerd and must run as root")


# --- one engine ---------------------------------------------------------------------------

def _ping(sock_path: Path, timeout: float = 2.0) -> bool:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(sock_path))
            s.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            data = b""
            while chunk := s.recv(4096):
                data += chunk
        return data.startswith(b"HTTP/1.") and b" 200 " in data[:16] and data.endswith(b"OK")
    except OSError:
        return False


class DockerEngine:
    """A running private dockerd. ``url`` is what DockerRuntime and the SDK take."""

    def __init__(self, name: str, root: Path, proc: subprocess.Popen[bytes],
                 storage_driver: str, netns: str | None = None, tcp: str | None = None) -> None:
        self.name = name
        self.netns = netns          # the network namespace it runs in (a test host), if any
        self.tcp_url = f"tcp://{tcp}" if tcp else None   # also listening there, inside netns
        self.tls: Path | None = None    # the certificates of its --tlsverify listener
        self.root = root
        self.proc = proc
        self.storage_driver = storage_driver
        self.socket_path = root / "docker.sock"
        self.url = f"unix://{self.socket_path}"
        self._clients: list[object] = []

    def __repr__(self) -> str:
        return f"<DockerEngine {self.name} {self.url} {self.storage_driver} pid={self.proc.pid}>"

    @property
    def log_path(self) -> Path:
        return self.root / "dockerd.log"

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def ping(self) -> bool:
        return self.proc.poll() is None and _ping(self.socket_path)

    def client(self):  # -> docker.DockerClient
        import docker
        client = docker.DockerClient(base_url=self.url, version="auto", timeout=60)
        self._clients.append(client)
        return client

    def restart(self, deadline: float = _START_DEADLINE) -> None:
        """Stop dockerd (its containers stop with it) and start it again on the same root,
        as after an engine upgrade or crash."""
        _terminate(self.proc, _STOP_DEADLINE)
        for pid in _pids_naming(self.root):   # a containerd that outlived its dockerd
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc = _start_once(self.name, self.root, self.storage_driver, deadline, netns=self.netns,
                                tcp=self.tcp_url[6:] if self.tcp_url else None, tls=self.tls).proc

    def stop(self, deadline: float = _STOP_DEADLINE) -> None:
        """Kill its containers (dockerd would give each its own stop timeout, 10 s by
        default), then stop dockerd and remove everything under the root."""
        if self.ping():
            try:
                import docker
                client = docker.DockerClient(base_url=self.url, version="auto", timeout=10)
                try:
                    for container in client.containers.list():
                        container.kill()
                finally:
                    client.close()
            except Exception:
                pass   # best effort: dockerd stops them on SIGTERM anyway
        for client in self._clients:
            try:
                client.close()  # type: ignore[attr-defined]
            except Exception:
                pass
        self._clients.clear()
        _terminate(self.proc, deadline)
        _cleanup_root(self.root)


def _terminate(proc: subprocess.Popen[bytes], deadline: float) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(deadline)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _pids_naming(root: Path) -> list[int]:
    """Processes whose command line names ``root``: this engine's containerd and shims."""
    needle = str(root).encode()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if needle in f.read():
                    pids.append(int(entry))
        except OSError:
            continue
    return pids


def _mounts_under(root: Path) -> list[str]:
    prefix = str(root).rstrip("/") + "/"
    out = []
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            target = line.split()[4].replace("\\040", " ")
            if target.startswith(prefix):
                out.append(target)
    return sorted(out, key=len, reverse=True)   # deepest first


def _cleanup_root(root: Path) -> None:
    for pid in _pids_naming(root):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for target in _mounts_under(root):
        subprocess.run(["umount", "-l", target], check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shutil.rmtree(root, ignore_errors=True)


def _dockerd_argv(name: str, root: Path, driver: str, netns: str | None = None,
                  tcp: str | None = None, tls: Path | None = None) -> list[str]:
    ns = f"meshlet-test-{name}"
    # in a test host's namespace: nsenter, not `ip netns exec`, which remounts /sys and
    # hides the cgroup mounts dockerd needs (DESIGN.md, test environment)
    enter = ["nsenter", f"--net=/var/run/netns/{netns}"] if netns else []
    listen = ["-H", f"tcp://{tcp}"] if tcp else []
    if tls is not None:   # --tlsverify: only clients with a certificate of this CA get in
        listen += ["--tlsverify", f"--tlscacert={tls / 'ca.pem'}", f"--tlscert={tls / 'server.pem'}",
                   f"--tlskey={tls / 'server.key'}"]
    return [
        *enter, shutil.which("dockerd") or "/usr/sbin/dockerd", *listen,
        "--data-root", str(root / "data"),
        "--exec-root", str(root / "exec"),
        "--pidfile", str(root / "docker.pid"),
        "-H", f"unix://{root / 'docker.sock'}",
        "--bridge=none", "--iptables=false", "--ip6tables=false", "--ip-masq=false",
        "--ip-forward=false",
        "--storage-driver", driver,
        "--containerd-namespace", ns, "--containerd-plugins-namespace", ns + "-plugins",
        "--shutdown-timeout", "2",
        "--exec-opt", "native.cgroupdriver=cgroupfs",
        "--log-level", "warn",
    ]


def _start_once(name: str, root: Path, driver: str, deadline: float, *, netns: str | None = None,
                tcp: str | None = None, tls: Path | None = None) -> DockerEngine:
    root.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.upper().endswith("_PROXY")}
    env.update({"HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9",
                "NO_PROXY": ""})
    with open(root / "dockerd.log", "ab") as log:
        # PDEATHSIG fires when the *thread* that forked exits: only tie dockerd to the main
        # thread, never to a pool thread that may end long before the session.
        in_main = threading.current_thread() is threading.main_thread()
        proc = subprocess.Popen(_dockerd_argv(name, root, driver, netns, tcp, tls), stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True,
                                preexec_fn=die_with_parent if in_main else None)
    engine = DockerEngine(name, root, proc, driver, netns, tcp)
    engine.tls = tls
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise EngineUnavailable(f"dockerd ({driver}) exited with {proc.returncode}:\n"
                                    f"{engine.log_tail()}")
        if _ping(engine.socket_path):
            return engine
        time.sleep(0.05)   # waiting for a condition, with a deadline
    tail = engine.log_tail()
    engine.stop(5)
    raise EngineUnavailable(f"dockerd ({driver}) did not answer /_ping within {deadline:g}s:"
                            f"\n{tail}")


def _driver_works(engine: DockerEngine) -> bool:
    """dockerd may start with overlay2 and only fail on the first container's mount."""
    if engine.storage_driver == "vfs":
        return True
    client = engine.client()
    try:
        client.containers.create(TEST_IMAGE, ["true"], network_mode="host").remove()
        return True
    except Exception:
        return False


def start_engine(name: str = "node1", root: Path | None = None, *,
                 deadline: float = _START_DEADLINE, netns: str | None = None,
                 tcp: str | None = None, tls: Path | None = None) -> DockerEngine:
    """Start a private dockerd called ``name`` and build the test images on it; with
    ``netns``, inside that network namespace (a test host), also listening on ``tcp``
    (HOST:PORT, an address of that namespace), with ``tls`` (a directory holding ca.pem,
    server.pem, server.key: ``fleet_env.engine_certs``) requiring client certificates there."""
    global _working_driver
    ensure_packages()
    forced = os.environ.get("MESHLET_TEST_DOCKER_STORAGE")
    drivers = [forced] if forced else ([_working_driver] if _working_driver
                                       else ["overlay2", "vfs"])
    errors = []
    for driver in drivers:
        # Short paths: unix socket paths are limited to 107 bytes.
        base = Path(tempfile.mkdtemp(prefix=f"mlt-{name}-", dir=root or "/tmp"))
        try:
            engine = _start_once(name, base, driver, deadline, netns=netns, tcp=tcp, tls=tls)
        except EngineUnavailable as exc:
            errors.append(str(exc))
            _cleanup_root(base)
            continue
        try:
            build_test_images(engine)
            if _driver_works(engine):
                _working_driver = driver
                return engine
            errors.append(f"storage driver {driver} cannot mount a container here")
        except Exception as exc:
            errors.append(f"{driver}: {exc}")
        engine.stop(5)
    raise EngineUnavailable("cannot start a test Docker engine:\n" + "\n".join(errors))


# --- images -------------------------------------------------------------------------------

def _busybox_context(dest: Path) -> str:
    """Fill ``dest`` with the build context of TEST_IMAGE; return its content hash."""
    busybox = static_busybox()
    src = IMAGES_DIR / "busybox"
    shutil.copytree(src, dest, symlinks=True, dirs_exist_ok=True)
    bin_dir = dest / "bin"
    bin_dir.mkdir(exist_ok=True)
    shutil.copy2(busybox, bin_dir / "busybox")
    applets = subprocess.run([str(busybox), "--list"], check=True, capture_output=True,
                             text=True).stdout.split()
    for applet in applets:
        if applet != "busybox" and "/" not in applet:
            (bin_dir / applet).symlink_to("busybox")
    (dest / "tmp").mkdir(exist_ok=True)
    (dest / "tmp" / ".keep").touch()
    digest = hashlib.sha256()
    for path in sorted(p for p in dest.rglob("*")):
        digest.update(str(path.relative_to(dest)).encode())
        if path.is_symlink():
            digest.update(os.readlink(path).encode())
        elif path.is_file():
            digest.update(path.read_bytes())
            digest.update(b"x" if os.access(path, os.X_OK) else b"-")
    return digest.hexdigest()[:16]


def build_test_images(engine: DockerEngine) -> list[str]:
    """Build TEST_IMAGE on ``engine`` unless it already has this exact version."""
    import docker.errors

    client = engine.client()
    with tempfile.TemporaryDirectory(prefix="mlt-ctx-") as ctx:
        content = _busybox_context(Path(ctx))
        try:
            existing = client.images.get(TEST_IMAGE)
            if (existing.labels or {}).get("meshlet.test.content") == content:
                return [TEST_IMAGE]
        except docker.errors.ImageNotFound:
            pass
        try:
            client.images.build(path=ctx, tag=TEST_IMAGE, rm=True, forcerm=True, pull=False,
                                labels={"meshlet.test.content": content})
        except docker.errors.BuildError as exc:
            log = "".join(str(c.get("stream", c.get("error", ""))) for c in exc.build_log)
            raise EngineUnavailable(f"building {TEST_IMAGE} failed: {exc}\n{log}") from exc
    return [TEST_IMAGE]


# --- pytest -------------------------------------------------------------------------------

class EngineSet:
    """Engines by name, started on first use, all stopped by ``stop_all``."""

    def __init__(self) -> None:
        self._engines: dict[str, DockerEngine] = {}

    def get(self, name: str = "node1") -> DockerEngine:
        engine = self._engines.get(name)
        if engine is None:
            engine = self._engines[name] = start_engine(name)
        return engine

    def stop(self, name: str) -> None:
        engine = self._engines.pop(name, None)
        if engine is not None:
            engine.stop()

    def __iter__(self) -> Iterator[DockerEngine]:
        return iter(list(self._engines.values()))

    def stop_all(self) -> None:
        errors = []
        for name in reversed(list(self._engines)):
            try:
                self._engines.pop(name).stop()
            except Exception as exc:
                errors.append(f"{name}: {exc}")
        if errors:
            raise RuntimeError("stopping test engines: " + "; ".join(errors))


# One set for the whole test process: several conftests may import the fixtures, and each
# import registers them anew; they all share these engines, stopped by the last user.
_SESSION_ENGINES = EngineSet()
_session_users = 0


@pytest.fixture(scope="session")
def docker_engines() -> Iterator[EngineSet]:
    global _session_users
    _session_users += 1
    try:
        yield _SESSION_ENGINES
    finally:
        _session_users -= 1
        if _session_users == 0:
            _SESSION_ENGINES.stop_all()


@pytest.fixture(scope="session")
def docker_engine(docker_engines: EngineSet) -> DockerEngine:
    try:
        return docker_engines.get("node1")
    except EngineUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)
