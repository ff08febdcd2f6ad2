"""Running one script check: the ``Args`` argv, no shell, in its own process group.

Consul's CheckMonitor (agent/checks/check.go) semantics, with the verdict in
``_checkdef.script_result``:

* the argv is executed directly (``Args[0]`` looked up on PATH), never through a shell,
  with stdin from /dev/null and stdout and stderr into one buffer that keeps the *last*
  ``OutputMaxSize`` bytes (4 KiB by default), as Consul's circular buffer does;
* past the check's ``Timeout`` (30s by default) the whole process group is killed
  (SIGKILL), so a script's children do not outlive it, and the check is critical with
  "Timed out (30s) running check";
* a command that cannot be started is critical with the reason, in Go's words.

Errors: none escape; every outcome is a (status, output) pair.
"""

from __future__ import annotations

import asyncio
import os
import signal

from ._checkdef import CRITICAL, script_result

__all__ = ["run_script"]


def _start_error(arg0: str, exc: OSError) -> str:
    if isinstance(exc, FileNotFoundError) and "/" not in arg0:
        return f'exec: "{arg0}": executable file not found in $PATH'
    reason = (exc.strerror or str(exc)).lower()
    return f"fork/exec {arg0}: {reason}"


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)  # start_new_session: the group id is the pid
    except ProcessLookupError:
        pass


async def run_script(args: list[str], timeout_ns: int, limit: int) -> tuple[str, str]:
    """Run ``args`` once; return the check's (status, output)."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *args, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT, start_new_session=True,
        )
    except OSError as exc:
        return CRITICAL, _start_error(args[0], exc)
    assert proc.stdout is not None
    tail = bytearray()
    total = 0

    async def collect() -> None:
        nonlocal total
        while chunk := await proc.stdout.read(65536):  # type: ignore[union-attr]
            total += len(chunk)
            tail.extend(chunk)
            if len(tail) > limit:
                del tail[: len(tail) - limit]
        await proc.wait()

    timed_out = False
    try:
        await asyncio.wait_for(collect(), timeout_ns / 1e9)
    except asyncio.TimeoutError:
        timed_out = True
    finally:
        if proc.returncode is None:  # timed out, or the runner is stopping (cancelled)
            _kill_group(proc.pid)
            await asyncio.shield(proc.wait())
    return script_result(proc.returncode, bytes(tail), total, limit, timed_out, timeout_ns)
