"""The `meshlet` command: version, hand-over to components, the supervisor's commands."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import consul
import pytest
from _util import refusing_port, start_server, stop_process

pytestmark = pytest.mark.slow   # real processes, sockets or engines (tests/conftest.py)

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
        token = (tmp_path / "cat" / "management-token").read_text().strip()
        assert consul.Consul(host=host, port=int(port), token=token).kv.put("k", "v")
    finally:
        assert stop_process(proc) == 0


@pytest.mark.parametrize("command", ["dns", "proxy", "catalog"])
def test_components_own_their_command_line(command: str) -> None:
    result = subprocess.run([sys.executable, "-m", "supervisor", "--log-level", "INFO", command, "--help"],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: meshlet {command} ") and "--listen" in result.stdout


def test_supervisor_commands_are_wired(tmp_path) -> None:
    """`up`, `status`, `logs`, `down` go to supervisor.commands.admin_client (tested end to end there)."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("services:\n  web:\n    replicas: -1\n")
    up = subprocess.run([sys.executable, "-m", "supervisor", "up", "-f", str(bad)],
                        capture_output=True, text=True, cwd=REPO, timeout=60)
    assert up.returncode == 2 and "services.web.replicas" in up.stderr
    admin = f"127.0.0.1:{refusing_port()}"
    status = subprocess.run([sys.executable, "-m", "supervisor", "status", "--admin", admin],
                            capture_output=True, text=True, cwd=REPO, timeout=60)
    assert status.returncode == 1 and f"no supervisor answers at {admin}" in status.stderr
