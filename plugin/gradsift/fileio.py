"""Files out: written atomically (a reader never sees half a file), JSON strict (RFC 8259: no bare NaN or Infinity).

No torch here, so `select`, `inspect`, the report and the recipe runner write files without importing it.
"""

from __future__ import annotations

import contextlib
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
