"""Script checks: off by default as in Consul; when enabled, the Args argv runs directly
(no shell) as a real subprocess, with Consul's exit-code rules, timeout and output cap."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import consul
import pytest

from _util import wait_for

pytestmark = pytest.mark.slow   # real processes, sockets (tests/conftest.py)

Check = consul.Check


def _check(c, check_id: str) -> dict | None:
    return c.agent.checks().get(check_id)


def _status(c, check_id: str) -> str | None:
    check = _check(c, check_id)
    return check and check["Status"]


@pytest.mark.parametrize("flags", [pytest.param((), id="default"),
                                   pytest.param(("--enable-local-script-checks",), id="local-only")])
def test_script_checks_over_http_are_refused_unless_enabled(catalog_factory, flags) -> None:
    cat = catalog_factory(*flags)
    c = cat.client()
    remote = "Scripts are disabled on this agent from remote calls; to enable, configure 'enable_script_checks' to true"
    with pytest.raises(consul.ConsulException) as err:
        c.agent.check.register("script_check", Check.script(["/bin/true"], "10s"))
    assert str(err.value) == f"500 {remote}"
    r = cat.http.put(cat.url + "/v1/agent/service/register", timeout=5,
                     json={"Name": "s", "Check": {"Args": ["/bin/true"], "Interval": "10s"}})
    assert (r.status_code, r.text) == (500, remote)
    assert c.agent.checks() == {} and c.agent.services() == {}  # nothing half-registered


def test_exit_codes_map_to_passing_warning_critical(catalog_factory, tmp_path: Path) -> None:
    code = tmp_path / "code"
    code.write_text("0")
    script = f"import sys; print('exit', open({str(code)!r}).read()); sys.exit(int(open({str(code)!r}).read()))"
    c = catalog_factory("--enable-script-checks").client()
    assert c.agent.service.register("job", check=Check.script([sys.executable, "-c", script], "100ms"))
    wait_for(lambda: _status(c, "service:job") == "passing", timeout=15, what="passing on exit 0")
    assert _check(c, "service:job")["Output"] == "exit 0\n"
    assert _check(c, "service:job")["Type"] == "script"
    for value, status in (("1", "warning"), ("2", "critical"), ("0", "passing")):
        code.write_text(value)
        wait_for(lambda: (ch := _check(c, "service:job"))["Status"] == status and ch["Output"] == f"exit {value}\n",
                 timeout=15, what=f"{status} on exit {value}")
    assert c.health.service("job", passing=True)[1] != []


def test_args_run_without_a_shell(catalog_factory) -> None:
    c = catalog_factory("--enable-script-checks").client()
    c.agent.check.register("echo", Check.script(["/bin/echo", "$HOME;", "false", "|", "`id`"], "100ms"))
    wait_for(lambda: _status(c, "echo") == "passing", timeout=15)
    assert _check(c, "echo")["Output"] == "$HOME; false | `id`\n"  # no expansion, no pipeline


def test_missing_executable_is_critical_with_the_reason(catalog_factory) -> None:
    c = catalog_factory("--enable-script-checks").client()
    c.agent.check.register("nope", Check.script(["no-such-command-here"], "100ms"))
    got = wait_for(lambda: (ch := _check(c, "nope")) and ch["Output"] and ch, timeout=15)
    assert (got["Status"], got["Output"]) == ("critical", 'exec: "no-such-command-here": executable file not found in $PATH')


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_timeout_kills_the_process_group(catalog_factory, tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    # The script starts a child that would outlive it, then hangs: both must go.
    script = ("import subprocess, sys, time; "
              f"p = subprocess.Popen(['sleep', '60']); open({str(pidfile)!r}, 'w').write(str(p.pid)); "
              "print('started', flush=True); time.sleep(60)")
    cat = catalog_factory("--enable-script-checks")
    c = cat.client()
    body = {"Name": "slow", "Args": [sys.executable, "-c", script], "Interval": "60s", "Timeout": "500ms"}
    assert cat.http.put(cat.url + "/v1/agent/check/register", json=body, timeout=5).status_code == 200
    got = wait_for(lambda: (ch := _check(c, "slow")) and ch["Output"] and ch, timeout=20)
    assert got["Status"] == "critical"
    assert got["Output"] == "Timed out (500ms) running check\n\nstarted\n"
    child = int(pidfile.read_text())
    wait_for(lambda: not _alive(child), timeout=10, what="the script's child killed with its group")


def test_output_keeps_the_last_4_kib(catalog_factory) -> None:
    script = "import sys; sys.stdout.write('a' * 6000 + 'END')"
    c = catalog_factory("--enable-script-checks").client()
    c.agent.check.register("big", Check.script([sys.executable, "-c", script], "100ms"))
    got = wait_for(lambda: (ch := _check(c, "big")) and ch["Output"] and ch, timeout=15)
    assert got["Status"] == "passing"
    assert got["Output"] == "Captured 4096 of 6003 bytes\n...\n" + "a" * 4093 + "END"


def test_stderr_is_captured_too(catalog_factory) -> None:
    script = "import sys; sys.stderr.write('to stderr'); sys.exit(3)"
    c = catalog_factory("--enable-script-checks").client()
    c.agent.check.register("err", Check.script([sys.executable, "-c", script], "100ms"))
    got = wait_for(lambda: (ch := _check(c, "err")) and ch["Output"] and ch, timeout=15)
    assert (got["Status"], got["Output"]) == ("critical", "to stderr")


def test_script_check_survives_a_restart_and_runs_again(catalog_factory, tmp_path: Path) -> None:
    marker = tmp_path / "runs"
    script = f"open({str(marker)!r}, 'a').write('x')"
    cat = catalog_factory("--enable-script-checks")
    c = cat.client()
    c.agent.check.register("count", Check.script([sys.executable, "-c", script], "100ms"))
    wait_for(lambda: marker.exists() and len(marker.read_text()) >= 2, timeout=15)
    cat.kill()
    cat.restart()
    before = len(marker.read_text())
    wait_for(lambda: len(marker.read_text()) > before + 1, timeout=15, what="runs again after restart")
    assert cat.client().agent.checks()["count"]["Status"] == "passing"
    assert os.path.exists(marker)
