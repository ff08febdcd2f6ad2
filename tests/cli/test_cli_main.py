"""The `meshlet` command: version, hand-over to components, and the minimal `meshlet up`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import consul
from _util import free_port, start_server, stop_process, wait_for

REPO = Path(__file__).resolve().parents[2]


def test_version_and_usage() -> None:
    result = subprocess.run([sys.executable, "-m", "supervisor", "version"], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0 and result.stdout.startswith("meshlet ")
    bare = subprocess.run([sys.executable, "-m", "supervisor"], capture_output=True, text=True, cwd=REPO)
    assert bare.returncode == 2 and "apply" in bare.stderr


def test_catalog_subcommand_hands_over(tmp_path) -> None:
    proc, ready = start_server([sys.executable, "-m", "supervisor", "catalog", "--listen", "127.0.0.1:0",
                                "--data-dir", str(tmp_path / "cat")], cwd=str(REPO))
    try:
        host, _, port = ready["http"].rpartition(":")
        assert consul.Consul(host=host, port=int(port)).kv.put("k", "v")
    finally:
        assert stop_process(proc) == 0


class Lines:
    """Reads a process's stdout lines in a thread (no blocking reads in the test)."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.lines: list[str] = []
        threading.Thread(target=self._read, args=(proc,), daemon=True).start()

    def _read(self, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            self.lines.append(line.rstrip("\n"))


def _up(config: Path) -> tuple[subprocess.Popen, Lines]:
    proc = subprocess.Popen([sys.executable, "-m", "supervisor", "up", "-f", str(config)], cwd=REPO,
                            stdout=subprocess.PIPE, text=True,
                            env={k: v for k, v in os.environ.items() if not k.startswith("CONSUL_HTTP")})
    return proc, Lines(proc)


def test_up_starts_the_catalog_applies_and_stops_cleanly(tmp_path) -> None:
    port = free_port()
    config = tmp_path / "meshlet.yaml"
    config.write_text(f"mesh:\n  catalog_listen: 127.0.0.1:{port}\n  data_dir: state\n"
                      "services:\n  web:\n    command: [x]\n    ports: [{name: http}]\n")
    proc, out = _up(config)
    try:
        wait_for(lambda: any("running" in line for line in out.lines), 30, what="meshlet up running")
        assert out.lines[0].startswith(f"meshlet up: catalog at http://127.0.0.1:{port}")
        assert any(line.startswith("web: created (revision ") for line in out.lines)
        assert (tmp_path / "state" / "catalog").is_dir()  # data_dir is relative to the file
        _, entry = consul.Consul(host="127.0.0.1", port=port).kv.get("meshlet/services/web")
        assert json.loads(entry["Value"])["name"] == "web"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        stop_process(proc)
    # The child catalog is gone with it.
    try:
        consul.Consul(host="127.0.0.1", port=port).status.leader()
        answered = True
    except Exception:  # noqa: BLE001
        answered = False
    assert not answered, "the embedded catalog outlived meshlet up"


def test_up_reuses_a_catalog_that_already_answers(catalog, tmp_path) -> None:
    config = tmp_path / "meshlet.yaml"
    config.write_text(f"mesh:\n  catalog_listen: {catalog.host}:{catalog.port}\n"
                      "services:\n  web:\n    command: [x]\n")
    proc, out = _up(config)
    try:
        wait_for(lambda: any("running" in line for line in out.lines), 30, what="meshlet up running")
        assert out.lines[0] == f"meshlet up: using the catalog already answering at {catalog.url}"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 0
    finally:
        stop_process(proc)
    assert catalog.running  # not ours to stop
