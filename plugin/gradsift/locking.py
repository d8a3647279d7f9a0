"""One writer per folder: an exclusive `flock` on `<folder>/.gradsift.lock`, which names its holder.

The kernel holds the lock for the process and drops it when the process ends, however it ends, so a lock is never
taken from a live process and never left behind by a dead one (no pid guessing across hosts, containers or reboots).
The file also records the holder's pid, host, start time and command, for the error a second writer gets, and the
warning when a process takes over a folder whose last writer died. On NFS, Linux maps `flock` to NFS byte-range locks.
The lock is re-entrant within one process, so a recipe that locks its run folder can score into a folder under it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gradsift.errors import UserError

logger = logging.getLogger(__name__)

LOCK_NAME = ".gradsift.lock"
_HELD: dict[Path, int] = {}  # lock files this process holds -> nesting depth


def _holder() -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join(sys.argv[:3]),
    }


def _read(fd: int) -> dict[str, Any]:
    try:
        data = json.loads(os.pread(fd, 4096, 0).decode("utf-8") or "{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _describe(holder: dict[str, Any]) -> str:
    if not holder:
        return "a process that did not say which"
    return (
        f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, since {holder.get('since', '?')}: "
        f"{holder.get('command') or 'gradsift'}"
    )


def _acquire(path: Path) -> int:
    """Open and lock `path`; return the descriptor. The file must still be `path` once locked (see the loop)."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise UserError(
                f"Cannot create the lock file {str(path)!r}: {error.strerror}. Choose an output folder you can write."
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd)
            os.close(fd)
            raise UserError(
                f"{str(path.parent)!r} is being written by another gradsift process ({_describe(holder)}). Wait for "
                "it to finish or choose another output folder."
            ) from None
        # A releasing holder unlinks the file: if it did between our open and our lock, we locked a file no one else
        # will see, so start again on the path's current file.
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike) -> Iterator[Path]:
    """Hold `<folder>/.gradsift.lock` while the block runs; raise `UserError` if another process holds it."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(
            f"Cannot create the output folder {str(folder)!r}: {error.strerror}. Choose another output folder."
        ) from None
    path = (folder / LOCK_NAME).resolve()
    if path in _HELD:  # re-entrant: an outer block of this process holds it and will release it
        _HELD[path] += 1
        try:
            yield path
        finally:
            _HELD[path] -= 1
        return
    fd = _acquire(path)
    previous = _read(fd)
    if previous:  # a writer that ended without releasing (killed): the kernel dropped its lock
        logger.warning("Taking over %s, last held by %s, which is no longer running.", path, _describe(previous))
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(_holder()).encode("utf-8"), 0)
    _HELD[path] = 1
    try:
        yield path
    finally:
        del _HELD[path]
        path.unlink(missing_ok=True)  # before unlocking, so a waiting opener of this file sees it is gone
        os.close(fd)
