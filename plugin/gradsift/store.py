"""The score store: `scores.parquet` + a `scores.json` manifest, written in atomic shards so a killed run resumes.

Layout of a score folder:
```
scores.json          # manifest: version, fingerprints, configs, counts, status (running | complete)
scores.parquet       # the merged table, one row per dataset row, sorted by `index`
shards/00000.parquet # finished shards of a run (kept after completion for auditing resumes)
```
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from gradsift import __version__
from gradsift.data import atomic_path
from gradsift.scoring import ScoreTable

MANIFEST = "scores.json"
TABLE = "scores.parquet"
SHARDS = "shards"
# Keys of the manifest's `fingerprints` that must match for cached scores to be reused (paths may move).
IDENTITY_KEYS = (
    "model_fingerprint",
    "adapter_fingerprint",
    "tokenizer_fingerprint",
    "data_fingerprint",
    "rows_fingerprint",
    "scoring_config",
)


def write_table(table: ScoreTable, path: str | os.PathLike) -> None:
    """Write a score table to parquet atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = table.columns()
    arrays = {
        name: pa.array(column.tolist() if column.dtype == object else column) for name, column in columns.items()
    }
    with atomic_path(path) as tmp:
        pq.write_table(pa.table(arrays), tmp)


def read_table(path: str | os.PathLike) -> ScoreTable:
    """Read a score table written by `write_table`."""
    import pyarrow.parquet as pq

    data = pq.read_table(path).to_pydict()
    kinds = {"sample_id": object, "status": object, "truncated": bool, "loss": np.float64, "grad_norm": np.float64}
    return ScoreTable(**{name: np.array(values, dtype=kinds.get(name, np.int64)) for name, values in data.items()})


def write_json(data: dict[str, Any], path: str | os.PathLike) -> None:
    """Write JSON atomically."""
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")


def read_manifest(folder: str | os.PathLike) -> dict[str, Any] | None:
    """Return the manifest of a score folder, or None if there is none."""
    path = Path(folder) / MANIFEST
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def same_identity(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two fingerprint sets describe the same model, adapter, tokenizer, data and scoring config."""
    return all(a.get(key) == b.get(key) for key in IDENTITY_KEYS)


class ScoreStore:
    """A score folder for one (model, data, scoring config) identity; other identities' files are cleared."""

    def __init__(self, folder: str | os.PathLike, fingerprints: dict[str, Any]):
        self.folder = Path(folder)
        self.fingerprints = fingerprints

    def cached(self) -> ScoreTable | None:
        """Return the complete table of this identity, if a previous run finished it."""
        manifest = read_manifest(self.folder)
        if (
            manifest
            and manifest.get("status") == "complete"
            and same_identity(manifest["fingerprints"], self.fingerprints)
        ):
            return read_table(self.folder / TABLE)
        return None

    def begin(self, extra: dict[str, Any]) -> dict[int, ScoreTable]:
        """Start or resume a run: return the finished shards of this identity, clearing any other identity's files."""
        manifest = read_manifest(self.folder)
        shards_dir = self.folder / SHARDS
        finished: dict[int, ScoreTable] = {}
        if (
            manifest
            and same_identity(manifest["fingerprints"], self.fingerprints)
            and manifest.get("shard_size") == extra.get("shard_size")
        ):
            for path in sorted(shards_dir.glob("*.parquet")):
                finished[int(path.stem)] = read_table(path)
        else:
            shutil.rmtree(shards_dir, ignore_errors=True)
            (self.folder / TABLE).unlink(missing_ok=True)
        self.manifest = {
            "gradsift_version": __version__,
            "status": "running",
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "fingerprints": self.fingerprints,
            **extra,
        }
        write_json(self.manifest, self.folder / MANIFEST)
        return finished

    def shard_path(self, number: int) -> Path:
        """Return the file of shard `number`."""
        return self.folder / SHARDS / f"{number:05d}.parquet"

    def write_shard(self, number: int, table: ScoreTable) -> None:
        """Save one finished shard atomically."""
        write_table(table, self.shard_path(number))

    def finish(self, table: ScoreTable, summary: dict[str, Any]) -> None:
        """Write the merged table, then mark the manifest complete (in that order, so complete means complete)."""
        write_table(table, self.folder / TABLE)
        self.manifest.update(status="complete", finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"), **summary)
        write_json(self.manifest, self.folder / MANIFEST)


def write_dropped(
    path: str | os.PathLike, table: ScoreTable, selection: Any, describe: Callable[[int], dict[str, Any]]
) -> None:
    """Write each dropped row with its scores and reason, plus `describe(index)` (its content), as JSON lines."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        for position in np.flatnonzero(~selection.keep):
            index = int(table.index[position])
            entry = {
                "index": index,
                "sample_id": str(table.sample_id[position]),
                "reason": str(selection.reasons[position]),
                "loss": _finite_or_none(table.loss[position]),
                "grad_norm": _finite_or_none(table.grad_norm[position]),
                "num_response_tokens": int(table.num_response_tokens[position]),
                "status": str(table.status[position]),
                **describe(index),
            }
            handle.write(json.dumps(entry, ensure_ascii=False, default=str) + "\n")


def _finite_or_none(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None
