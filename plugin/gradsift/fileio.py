"""Files out: written atomically (a reader never sees half a file), JSON strict (RFC 8259: no bare NaN or Infinity).

No torch here, so `select`, `inspect`, the report and the recipe runner write files without importing it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gradsift.errors import UserError


def atomic_leftover(name: str, final: str | re.Pattern[str]) -> bool:
    """Whether file `name` is what `atomic_path` leaves beside a file named `final` (a name or a full-match pattern)
    when its process is killed mid-write: `.<final>.<mkstemp's 8 characters>.tmp`."""
    match = re.fullmatch(r"\.(.+)\.[a-z0-9_]{8}\.tmp", name)
    if match is None:
        return False
    return bool(final.fullmatch(match[1])) if isinstance(final, re.Pattern) else match[1] == final


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it over `path`, on an exception remove it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    usual_mode(tmp)
    os.replace(tmp, path)


def strict_json(value: Any) -> Any:
    """`value` with every non-finite float (NaN, ±inf) as None and numpy/torch scalars and arrays as Python values."""
    if isinstance(value, dict):
        return {key: strict_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(item) for item in value]
    if hasattr(value, "tolist") and hasattr(value, "ndim"):  # numpy/torch scalars and arrays
        return strict_json(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def dumps(value: Any, **kwargs: Any) -> str:
    """`json.dumps` of `strict_json(value)`; it never writes a bare NaN or Infinity. Other objects (paths) as text."""
    return json.dumps(strict_json(value), allow_nan=False, **{"default": str, **kwargs})


def write_json(data: Any, path: str | os.PathLike) -> None:
    """Write `data` as indented, key-sorted strict JSON, atomically (a reader never sees half a file)."""
    with atomic_path(path) as tmp:
        Path(tmp).write_text(dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


@contextlib.contextmanager
def staged(finals: Iterator[Path] | list[Path]) -> Iterator[dict[Path, Path]]:
    """{final: a new, unique hidden file beside it with its suffix} for `publish` to move into place; on an exception
    the staged files that did not move are removed."""
    files = {}
    try:
        for final in finals:
            final.parent.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=f".new{final.suffix}", dir=final.parent)
            os.close(fd)
            usual_mode(Path(name))
            files[final] = Path(name)
        yield files
    except BaseException:
        for source in files.values():
            source.unlink(missing_ok=True)
        raise


def usual_mode(path: Path) -> None:
    """mkstemp makes 0600 files and mkdtemp 0700 folders; give `path` the permissions a new file or folder gets."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def own_record(path: Path, legacy_keys: set[str], fix: str) -> dict[str, Any] | None:
    """The record file at `path` if gradsift wrote it (marked with `gradsift_version`, or holding `legacy_keys` as an
    older gradsift wrote it); None if absent; `UserError` (ending in `fix`) if it is someone else's file."""
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        data = None
    if isinstance(data, dict) and ("gradsift_version" in data or legacy_keys <= set(data)):
        return data
    raise UserError(f"{str(path)!r} exists and is not a {path.name} gradsift wrote{fix}")


def _digests(record: dict[str, Any], name: str) -> list[str]:
    """The sha256s `record` holds for the file `name` under `written` and `pending` (a digest or a list of them)."""
    digests: list[str] = []
    for key in ("written", "pending"):
        found = (record.get(key) or {}).get(name)
        digests += found if isinstance(found, list) else [found] if found else []
    return digests


def recorded(path: Path, record: dict[str, Any] | None) -> bool:
    """Whether `record` (a gradsift record file's content) holds `path`'s current sha256 under `written` or
    `pending`: the proof that gradsift wrote the file as it is now."""
    if record is None or not path.is_file():
        return False
    digests = _digests(record, path.name)
    return bool(digests) and file_fingerprint(path) in digests


def publish(
    record_path: Path, previous: dict[str, Any] | None, record: dict[str, Any], staged: dict[Path, Path]
) -> None:
    """Move each staged file (`{final: staged}`) onto its final path beside `record_path`, never leaving a file
    gradsift cannot prove it wrote: the staged files' sha256 are recorded (`pending`, in the previous record kept as
    it was) before the first move, then `record` is written with every file's sha256 under `written`. What the
    previous record proves of the files still in place (`written` or `pending`) is kept, so a second kill cannot orphan
    a file the first one left."""
    folder = record_path.parent
    proven = {}
    for name in {name for key in ("written", "pending") for name in ((previous or {}).get(key) or {})}:
        found = (folder / name).is_file() and file_fingerprint(folder / name)
        if found and found in _digests(previous or {}, name):
            proven[name] = found
    pending = {final.name: file_fingerprint(source) for final, source in staged.items()}
    before = dict(previous or {"gradsift_version": record.get("gradsift_version"), "written": {}})  # marked ours
    if "written" in before:
        before.update(written=proven, pending=pending)
    else:  # an older gradsift's record without `written` keeps its own proof (line counts): no `written` added
        before["pending"] = {
            name: [d for d in (proven.get(name), pending.get(name)) if d] for name in {**proven, **pending}
        }
    write_json(before, record_path)
    for final, source in staged.items():
        os.replace(source, final)
    kept = {name: digest for name, digest in proven.items() if name not in pending}
    write_json({**record, "written": {**kept, **pending}}, record_path)


def file_fingerprint(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
