"""Files out: written atomically (a reader never sees half a file), JSON strict (RFC 8259: no bare NaN or Infinity).

No torch here, so `select`, `inspect`, the report and the recipe runner write files without importing it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


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
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
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


def staged_path(final: str | os.PathLike) -> Path:
    """A new, unique hidden file beside `final` with its suffix, for `publish` to move onto `final` later."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=f".new{final.suffix}", dir=final.parent)
    os.close(fd)
    return Path(name)


def recorded(path: Path, record: dict[str, Any] | None) -> bool:
    """Whether `record` (a gradsift record file's content) holds `path`'s current sha256 under `written` or
    `pending`: the proof that gradsift wrote the file as it is now."""
    if record is None or not path.is_file():
        return False
    digests = [(record.get(key) or {}).get(path.name) for key in ("written", "pending")]
    digests = [digest for digest in digests if digest]
    return bool(digests) and file_fingerprint(path) in digests


def publish(
    record_path: Path, previous: dict[str, Any] | None, record: dict[str, Any], staged: dict[Path, Path]
) -> None:
    """Move each staged file (`{final: staged}`) onto its final path beside `record_path`, never leaving a file
    gradsift cannot prove it wrote: the staged files' sha256 are recorded (`pending`, in the previous record kept as
    it was) before the first move, then `record` is written with every file's sha256 under `written`. Files of the
    previous record still in place keep their entries."""
    folder = record_path.parent
    kept = {
        name: digest
        for name, digest in ((previous or {}).get("written") or {}).items()
        if (folder / name).is_file() and file_fingerprint(folder / name) == digest
    }
    pending = {final.name: file_fingerprint(source) for final, source in staged.items()}
    before = previous or {"gradsift_version": record.get("gradsift_version")}  # a first record: still marked ours
    write_json({**before, "written": kept, "pending": pending}, record_path)
    for final, source in staged.items():
        os.replace(source, final)
    write_json({**record, "written": {**kept, **pending}}, record_path)


def file_fingerprint(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
