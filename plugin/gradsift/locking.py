"""One writer per folder: a lock file holding the writer's pid, host and command.

`folder_lock(folder)` creates `<folder>/.gradsift.lock` with `O_CREAT | O_EXCL` (atomic on local and NFSv3+ file
systems). A second writer gets a `UserError` naming the holder. A lock left by a process that died on this host is
taken over with a warning; a lock from another host is never taken over (its process cannot be checked from here).
The lock is re-entrant within one process, so a recipe that locks its run folder can score into a folder under it.
"""

from __future__ import annotations

import contextlib
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


def _holder() -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join(sys.argv[:3]),
    }


def _read(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # being written this instant, or not ours: treated as held by someone else
    return data if isinstance(data, dict) else {}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _mine(holder: dict[str, Any] | None) -> bool:
    return bool(holder) and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname()


def _stale(holder: dict[str, Any]) -> bool:
    pid = holder.get("pid")
    return holder.get("host") == socket.gethostname() and isinstance(pid, int) and not _alive(pid)


def _create(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(_holder(), handle)
    return True


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike) -> Iterator[Path]:
    """Hold `<folder>/.gradsift.lock` while the block runs; raise `UserError` if another live process holds it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    if _mine(_read(path)):  # re-entrant: an outer block of this process holds it and will release it
        yield path
        return
    for _ in range(3):
        if _create(path):
            break
        holder = _read(path)
        if holder is None:  # released between our attempt and the read
            continue
        if _stale(holder):
            logger.warning(
                "Taking over the lock %s of process %s (%s), which is no longer running.",
                path,
                holder.get("pid"),
                holder.get("command") or "gradsift",
            )
            path.unlink(missing_ok=True)
            continue
        raise UserError(
            f"{str(folder)!r} is being written by another gradsift process (pid {holder.get('pid', '?')} on "
            f"{holder.get('host', '?')}, since {holder.get('since', '?')}: {holder.get('command') or 'unknown'}). "
            f"Wait for it to finish or choose another output folder; if no such process runs, delete {str(path)!r}."
        )
    else:
        raise UserError(f"Could not take the lock {str(path)!r}: other processes keep taking it. Try again.")
    try:
        yield path
    finally:
        if _mine(_read(path)):
            path.unlink(missing_ok=True)
