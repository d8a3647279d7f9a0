"""Strict JSON out: every file gradsift writes parses with a strict (RFC 8259) parser, and is written atomically.

No torch here, so the report and the recipe runner can write JSON without importing it.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from gradsift.data import atomic_path


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
