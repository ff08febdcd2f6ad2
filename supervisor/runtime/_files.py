"""Secrets and configs as files on a tmpfs of the runtime's: the values never reach a disk.

Layout, on a tmpfs (``/dev/shm`` when it is one; ``$MESHLET_TMPFS`` to name another)::

    <tmpfs>/meshlet-<id>/                 0700, one per runtime (``id``: its data dir's hash)
        <instance_id>/                    0700
            secrets/<name>                the secret's mode (0400), owner uid/gid when given
            configs/<name>                the config's mode (0444)

A container gets each file bind-mounted read-only at its target (the engine resolves the
host path, so the 0700 directories keep everyone else out without hiding the file from the
container); a process, which runs as the runtime's user, gets the two directories in
``$MESHLET_SECRETS_DIR`` / ``$MESHLET_CONFIGS_DIR``. ``remove_files`` drops
an instance's directory when the instance is removed. A path that is not on a tmpfs is
refused (``FilesError``): a secret written there would be on a disk.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from .base import DeliveredFile

__all__ = ["FilesError", "files_root", "write_files", "remove_files", "is_tmpfs"]

TMPFS_ENV = "MESHLET_TMPFS"


class FilesError(Exception):
    """No tmpfs to hold secrets, or a file that cannot be written there."""


def _mounts() -> list[tuple[str, str]]:
    """(mount point, filesystem type) of this process's mounts (/proc/self/mountinfo)."""
    out = []
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                head, _, tail = line.partition(" - ")
                fields = head.split()
                if len(fields) >= 5 and tail:
                    point = fields[4].replace("\\040", " ")
                    out.append((point, tail.split()[0]))
    except OSError:
        pass
    return out


def is_tmpfs(path: str | os.PathLike[str]) -> bool:
    """Is ``path`` on a tmpfs (the mount with the longest prefix of it)?"""
    target = os.path.realpath(path)
    best, kind = "", ""
    for point, fstype in _mounts():
        if (target == point or target.startswith(point.rstrip("/") + "/")) and len(point) >= len(best):
            best, kind = point, fstype
    return kind == "tmpfs"


def _root_path(ident: str) -> Path:
    base = os.environ.get(TMPFS_ENV) or "/dev/shm"
    return Path(base) / f"meshlet-{hashlib.sha256(ident.encode()).hexdigest()[:12]}"


def files_root(ident: str) -> Path:
    """This runtime's directory on a tmpfs (created 0700). ``ident``: what tells one
    runtime's files from another's on the same machine (its data dir)."""
    root = _root_path(ident)
    if not root.parent.is_dir() or not is_tmpfs(root.parent):
        raise FilesError(f"no tmpfs to hold secrets and configs: {root.parent} is not a tmpfs "
                         f"(mount one, or set ${TMPFS_ENV} to a directory on one)")
    root.mkdir(mode=0o700, exist_ok=True)
    os.chmod(root, 0o700)
    return root


def write_files(root: Path, instance_id: str, files: Iterable[DeliveredFile]) -> dict[DeliveredFile, Path]:
    """Write an instance's files; their paths by file. On an error nothing is left."""
    base = root / instance_id
    written: dict[DeliveredFile, Path] = {}
    try:
        for kind in ("secrets", "configs"):
            (base / kind).mkdir(mode=0o700, parents=True, exist_ok=True)
        for f in files:
            path = base / ("secrets" if f.kind == "secret" else "configs") / f.name
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            try:
                os.write(fd, f.data)
                if f.uid is not None or f.gid is not None:
                    os.fchown(fd, -1 if f.uid is None else f.uid, -1 if f.gid is None else f.gid)
                os.fchmod(fd, f.mode)
            finally:
                os.close(fd)
            written[f] = path
    except OSError as exc:
        shutil.rmtree(base, ignore_errors=True)
        raise FilesError(f"cannot write the files of {instance_id} under {root}: {exc.strerror or exc}") from None
    return written


def remove_files(ident: str | None, instance_id: str) -> None:
    """Drop an instance's files (if it had any)."""
    if ident is not None:
        shutil.rmtree(_root_path(ident) / instance_id, ignore_errors=True)
