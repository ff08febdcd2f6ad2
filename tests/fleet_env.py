"""Test hosts as network namespaces: a small fleet on one machine.

``NetFleet(hosts)`` makes, for a run:

    mls<id>           a namespace holding only a bridge, the fleet's switch
    mlh<id><name>     one namespace per host, loopback up, and eth0 (a veth whose peer is
                      on the switch) with 10.213.<k>.<n>/24: its own address

Nothing is added to the machine's own namespace: its processes cannot even reach these
addresses, and all traffic stays between namespaces the test made. ``run(host, argv)``
starts a process inside a host with ``nsenter --net`` (not ``ip netns exec``, which
remounts /sys and hides the cgroup mounts dockerd needs), in its own session, so it is
killed as a group. ``link(host, up)`` cuts or restores a host's cable. ``close()`` kills
every process it started, deletes the namespaces (and with them the veths) and runs even
when a test failed; namespaces left by an earlier run that was killed (same prefix, a dead
owner pid) are removed on the next start.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

__all__ = ["NetFleet", "NETNS_DIR", "engine_certs", "ssh_access"]

NETNS_DIR = Path("/var/run/netns")
_PREFIX = "mlh"
_SWITCH = "mls"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True, timeout=30)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _sweep_leftovers() -> None:
    """Namespaces of earlier runs whose test process is gone (the owner's pid is in the name)."""
    if not NETNS_DIR.is_dir():
        return
    for entry in NETNS_DIR.iterdir():
        name = entry.name
        for prefix in (_PREFIX, _SWITCH):
            if name.startswith(prefix) and "p" in name:
                pid_text = name[len(prefix):].split("p", 1)[1].split("x", 1)[0]
                if pid_text.isdigit() and not _alive(int(pid_text)):
                    _ip("netns", "del", name, check=False)


class NetFleet:
    def __init__(self, hosts: Sequence[str], subnet: int = 213, third: int | None = None) -> None:
        _sweep_leftovers()
        self.id = f"p{os.getpid()}x{int(time.monotonic() * 1000) % 100000}"
        self.switch = f"{_SWITCH}{self.id}"
        third = third if third is not None else os.getpid() % 200 + 1
        self.addresses: dict[str, str] = {}
        self.netns: dict[str, str] = {}
        self.procs: list[subprocess.Popen[bytes]] = []
        self._veth: dict[str, str] = {}
        try:
            _ip("netns", "add", self.switch)
            _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.switch, "link", "set", "br0", "up")
            for n, host in enumerate(hosts, start=1):
                ns = f"{_PREFIX}{self.id}{host}"
                _ip("netns", "add", ns)
                _ip("-n", ns, "link", "set", "lo", "up")
                peer = f"ml{os.getpid() % 100000}{host}"[:15]
                _ip("link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", peer,
                    "netns", self.switch)
                _ip("-n", self.switch, "link", "set", peer, "master", "br0")
                _ip("-n", self.switch, "link", "set", peer, "up")
                address = f"10.{subnet}.{third}.{n}"
                _ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
                _ip("-n", ns, "link", "set", "eth0", "up")
                self.netns[host], self.addresses[host], self._veth[host] = ns, address, peer
        except BaseException:
            self.close()
            raise

    def path(self, host: str) -> str:
        return str(NETNS_DIR / self.netns[host])

    def argv(self, host: str, argv: Sequence[str]) -> list[str]:
        return ["nsenter", f"--net={self.path(host)}", *argv]

    def run(self, host: str, argv: Sequence[str], *, log: Path, env: dict[str, str] | None = None,
            cwd: str | None = None) -> subprocess.Popen[bytes]:
        """A long-running process inside ``host``, its output in ``log``."""
        with open(log, "ab") as out:
            proc = subprocess.Popen(self.argv(host, argv), stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True, env=env, cwd=cwd)
        self.procs.append(proc)
        return proc

    def call(self, host: str, argv: Sequence[str], *, timeout: float = 60.0,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """Run a command inside ``host`` to completion."""
        return subprocess.run(self.argv(host, argv), capture_output=True, text=True, timeout=timeout, env=env)

    def link(self, host: str, up: bool) -> None:
        """Plug or unplug ``host``'s cable (its veth's end on the switch)."""
        _ip("-n", self.switch, "link", "set", self._veth[host], "up" if up else "down")

    def stop(self, proc: subprocess.Popen[bytes], grace: float = 20.0) -> None:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(10)

    def close(self) -> None:
        for proc in reversed(self.procs):
            self.stop(proc)
        self.procs.clear()
        for ns in list(self.netns.values()) + [self.switch]:
            _ip("netns", "del", ns, check=False)
        self.netns.clear()


def engine_certs(dest: Path, server_ip: str) -> Path:
    """A throwaway CA (ca.pem), the engine's certificate for ``server_ip`` (server.pem,
    server.key) and the supervisor's (client.pem, client.key), as dockerd's --tlsverify
    and its client want them, in ``dest``; also other-ca.pem, a CA that signed neither."""
    from _certs import Authority
    dest.mkdir(parents=True, exist_ok=True)
    ca = Authority("meshlet test engine CA")
    ca.write(dest, "ca")
    Authority("another CA").write(dest, "other-ca")
    ca.issue(dest, "server", [], ips=[server_ip])
    ca.issue(dest, "client", ["meshlet-supervisor"])
    return dest


def ssh_access(net: NetFleet, host: str, dest: Path, docker_socket: Path) -> Path:
    """sshd inside ``host`` (its own host key, root by key only) whose sessions reach that
    host's engine (``DOCKER_HOST``), and a client set-up for it: returns a directory to put
    first on PATH, whose ``ssh`` runs the system's ssh with a config naming the key, the
    host's known key, strict host key checking and short time-outs. The engine is then
    ``ssh://root@<address>``, as a user reaches a remote engine with ``docker -H ssh://``."""
    import shutil as _shutil
    address = net.addresses[host]
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("host", "client"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"meshlet-test-{name}",
                        "-f", str(dest / name)], check=True, timeout=30)
    (dest / "authorized_keys").write_text((dest / "client.pub").read_text())
    kind, key = (dest / "host.pub").read_text().split()[:2]
    (dest / "known_hosts").write_text(f"{address} {kind} {key}\n")
    (dest / "sshd_config").write_text(f"""ListenAddress {address}
Port 22
HostKey {dest / 'host'}
AuthorizedKeysFile {dest / 'authorized_keys'}
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PidFile {dest / 'sshd.pid'}
SetEnv DOCKER_HOST=unix://{docker_socket}
""")
    (dest / "ssh_config").write_text(f"""Host {address}
  User root
  IdentityFile {dest / 'client'}
  IdentitiesOnly yes
  UserKnownHostsFile {dest / 'known_hosts'}
  StrictHostKeyChecking yes
  BatchMode yes
  ConnectTimeout 5
  ServerAliveInterval 2
  ServerAliveCountMax 2
""")
    bindir = dest / "bin"
    bindir.mkdir(exist_ok=True)
    ssh = _shutil.which("ssh") or "/usr/bin/ssh"
    (bindir / "ssh").write_text(f'#!/bin/sh\nexec {ssh} -F {dest / "ssh_config"} "$@"\n')
    (bindir / "ssh").chmod(0o755)
    Path("/run/sshd").mkdir(parents=True, exist_ok=True)     # sshd's privilege separation directory
    sshd = _shutil.which("sshd") or "/usr/sbin/sshd"
    net.run(host, [sshd, "-D", "-e", "-f", str(dest / "sshd_config")], log=dest / "sshd.log")
    return bindir
