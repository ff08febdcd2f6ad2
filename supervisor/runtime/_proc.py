"""Helpers of the process runtime: /proc parsing, the state file record, log tails.

A state file (``<data_dir>/instances/<instance_id>.json``) is the process runtime's
equivalent of a container's labels: it names the instance (the spec), the pid, and the
pid's start time (field 22 of /proc/<pid>/stat, clock ticks since boot). A pid whose start
time differs is another process that reused the number, never ours.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .base import InstanceSpec, spec_from_dict, spec_to_dict

__all__ = ["parse_stat_starttime", "read_starttime", "Record", "write_record", "read_record",
           "tail_offset", "RECORD_FORMAT"]

RECORD_FORMAT = 1


def parse_stat_starttime(stat: str) -> int:
    """Field 22 (starttime) of a /proc/<pid>/stat line. The command name (field 2) is in
    parentheses and may itself contain spaces and ')', so split after the last ')'."""
    rest = stat[stat.rindex(")") + 2:].split()
    # rest[0] is field 3 (state); starttime is field 22 -> rest[19].
    return int(rest[19])


def read_starttime(pid: int) -> int | None:
    """The start time of ``pid``, or None if there is no such process or it has exited.

    An orphan that exits stays a zombie until PID 1 reaps it, and a PID 1 that does not
    reap (a container without an init, some VMs' agents) leaves it forever, with its
    /proc entry and start time: a workload that exited while no supervisor watched would
    look alive. Zombie ('Z') and dead ('X') processes count as gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as f:
            stat = f.read()
        if stat[stat.rindex(")") + 2] in "ZX":
            return None
        return parse_stat_starttime(stat)
    except (OSError, ValueError, IndexError):
        return None


@dataclass(frozen=True)
class Record:
    spec: InstanceSpec
    pid: int
    starttime: int | None          # None: the process was gone before we could read it
    started_at: float
    exit_code: int | None = None
    finished_at: float | None = None
    exited: bool = False

    def to_json(self) -> str:
        return json.dumps({
            "format": RECORD_FORMAT, "spec": spec_to_dict(self.spec), "pid": self.pid,
            "starttime": self.starttime, "started_at": self.started_at,
            "exited": self.exited, "exit_code": self.exit_code,
            "finished_at": self.finished_at,
        }, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "Record":
        data: Mapping[str, Any] = json.loads(text)
        if data.get("format") != RECORD_FORMAT:
            raise ValueError(f"unknown state file format {data.get('format')!r}")
        return cls(spec=spec_from_dict(data["spec"]), pid=int(data["pid"]),
                   starttime=data.get("starttime"), started_at=float(data["started_at"]),
                   exit_code=data.get("exit_code"), finished_at=data.get("finished_at"),
                   exited=bool(data.get("exited")))


def write_record(path: Path, record: Record, *, exclusive: bool = False) -> None:
    """Write atomically (temp file + rename). ``exclusive``: fail with FileExistsError if
    the file exists (link(2) does not overwrite), so two starts of one id cannot both win."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    # 0600: the spec holds the service's env, which may carry credentials of the user's
    with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w", encoding="utf-8") as f:
        f.write(record.to_json())
        f.flush()
        os.fsync(f.fileno())
    try:
        if exclusive:
            os.link(tmp, path)
        else:
            os.replace(tmp, path)
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass


def read_record(path: Path) -> Record:
    return Record.from_json(path.read_text(encoding="utf-8"))


def tail_offset(f: Any, lines: int, *, block: int = 8192) -> int:
    """Offset in the binary file ``f`` where its last ``lines`` lines begin (a final line
    without newline counts as a line)."""
    if lines <= 0:
        return f.seek(0, os.SEEK_END)
    end = f.seek(0, os.SEEK_END)
    pos = end
    newlines = 0
    # A trailing newline ends the last line; it does not start another one.
    skip_last = False
    if end:
        f.seek(end - 1)
        skip_last = f.read(1) == b"\n"
    while pos > 0:
        step = min(block, pos)
        pos -= step
        f.seek(pos)
        chunk = f.read(step)
        for i in range(len(chunk) - 1, -1, -1):
            if chunk[i] != 0x0A:
                continue
            if skip_last and pos + i == end - 1:
                continue
            newlines += 1
            if newlines == lines:
                return pos + i + 1
    return 0
