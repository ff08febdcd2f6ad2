"""What every bench/*/run.py needs: free ports, starting a meshlet server and reading its
``ready`` line, a process's CPU time, and replacing one section of bench/RESULTS.md.

Benches run as scripts (``python bench/dns/run.py``); they put ``bench/`` on sys.path and
``from _common import ...``.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "RESULTS.md"
TICKS = os.sysconf("SC_CLK_TCK")


def free_port(udp_too: bool = False) -> int:
    """A TCP port free on 127.0.0.1 right now; ``udp_too``: free for UDP as well (for
    servers that need a number for both, like dnsmasq)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM if udp_too else socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            if not udp_too:
                return port
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
                try:
                    t.bind(("127.0.0.1", port))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free port")


def start_ready(cmd: list[str], log: Path, timeout: float = 30.0, cwd: Path | None = None,
                ) -> tuple[subprocess.Popen, dict]:
    """Start a meshlet server process (stderr to ``log``) and read its ``ready {...}`` line.
    ``cwd``: the source tree it runs from (default: this checkout)."""
    with open(log, "wb") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, cwd=cwd or REPO, text=True)
    deadline = time.monotonic() + timeout
    line = ""
    while time.monotonic() < deadline:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        if line.startswith("ready "):
            return proc, json.loads(line[6:])
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise RuntimeError(f"{cmd[:3]} did not become ready: {line!r}; see {log}")


def with_children(pid: int) -> list[int]:
    """``pid`` and its child processes now (Linux /proc), e.g. a server and its helpers."""
    pids = [pid]
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return pids
    for tid in tasks:
        try:
            pids += [int(x) for x in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
        except OSError:
            continue
    return pids


def cpu_times(*pids: int) -> tuple[float, float]:
    """(user, system) CPU seconds of the processes so far (gone ones count 0)."""
    user = system = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        user += int(fields[11]) / TICKS
        system += int(fields[12]) / TICKS
    return user, system


def cpu_seconds(*pids: int) -> float:
    """utime + stime of the processes so far, in seconds (gone ones count 0)."""
    return sum(cpu_times(*pids))


def replace_section(heading: str, text: str, path: Path = RESULTS) -> Path:
    """Put ``text`` (which starts with the ``heading`` line, e.g. "## DNS") in place of that
    section of bench/RESULTS.md, or append it; the other sections stay as they are."""
    current = path.read_text() if path.exists() else "# Benchmark results\n"
    m = re.search(rf"^{re.escape(heading)}\n.*?(?=^## |\Z)", current, flags=re.S | re.M)
    section = text.rstrip() + "\n\n"
    current = current[:m.start()] + section + current[m.end():] if m else current.rstrip() + "\n\n" + section
    path.write_text(current.rstrip() + "\n")
    return path


# The catalog's management token: `meshlet up`'s catalog makes it at its first start, in
# <data_dir>/catalog/management-token. Once read, every request to the catalog carries it
# (``catalog_auth()``) and the meshlet commands a bench runs find it in their environment.
_TOKEN = ""


def catalog_auth() -> dict[str, str]:
    return {"X-Consul-Token": _TOKEN}


def use_catalog_token(data_dir: Path) -> str:
    global _TOKEN
    _TOKEN = (data_dir / "catalog" / "management-token").read_text().strip()
    os.environ["CONSUL_HTTP_TOKEN"] = _TOKEN
    return _TOKEN
