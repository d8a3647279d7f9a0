"""The score store: `scores.parquet` + a `scores.json` manifest, written in atomic shards so a killed run resumes.

Layout of a score folder:
```
scores.json          # manifest: version, fingerprints, configs, counts, status (running | complete), table sha256
scores.parquet       # the merged table, one row per dataset row, sorted by `index`
shards/00000.parquet # finished shards of a run (kept after completion for auditing resumes)
.rescore/            # a run with other options while finished scores exist: the same layout, swapped in when complete
.gradsift.lock       # held by the one process writing the folder
```

gradsift writes only into a folder that is new, empty, or holds its own `scores.json`, and deletes only the files it
names here. Finished scores are never deleted to make room for a run with other options: that run works in
`.rescore/` and replaces them only once it is complete, so a killed rescore leaves the finished scores in place.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from gradsift import __version__
from gradsift.data import FILE_SUFFIXES
from gradsift.errors import UserError
from gradsift.fileio import (
    atomic_leftover,
    atomic_path,
    dumps,
    file_fingerprint,
    own_record,
    publish,
    recorded,
    write_json,
)
from gradsift.locking import LOCK_NAME
from gradsift.selection import REASONS
from gradsift.table import ScoreTable

if TYPE_CHECKING:
    from gradsift.config import SelectionConfig
    from gradsift.selection import Selection

MANIFEST = "scores.json"
TABLE = "scores.parquet"
SHARDS = "shards"
STAGING = ".rescore"
SHARD_FILE = re.compile(r"\d{5}\.parquet")
# Keys of the manifest's `fingerprints` that must match for cached scores to be reused (paths may move).
IDENTITY_KEYS = (
    "model_fingerprint",
    "adapter_fingerprint",
    "tokenizer_fingerprint",
    "data_fingerprint",
    "rows_fingerprint",
    "scoring_config",
    "anchor_fingerprint",
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


def read_table(path: Any) -> ScoreTable:
    """Read a score table written by `write_table` (a path, or a pyarrow buffer of the file)."""
    import pyarrow.parquet as pq

    data = pq.read_table(path).to_pydict()
    floats = ("loss", "grad_norm", "anchor_dot", "anchor_cos", "refusal_logprob")
    kinds = {"sample_id": object, "status": object, "truncated": bool, **dict.fromkeys(floats, np.float64)}
    rows = len(data["index"])
    for name in ("anchor_dot", "anchor_cos", "refusal_logprob"):  # tables scored before these columns were
        data.setdefault(name, [np.nan] * rows)
    return ScoreTable(**{name: np.array(values, dtype=kinds.get(name, np.int64)) for name, values in data.items()})


def read_manifest(folder: str | os.PathLike) -> dict[str, Any] | None:
    """Return the manifest of a score folder if it holds one gradsift wrote, else None."""
    path = Path(folder) / MANIFEST
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if is_manifest(data) else None


def is_manifest(data: Any) -> bool:
    """Whether `data` is a score manifest gradsift wrote."""
    return isinstance(data, dict) and "gradsift_version" in data and isinstance(data.get("fingerprints"), dict)


def same_identity(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two fingerprint sets describe the same model, adapter, tokenizer, data and scoring config."""
    return all(a.get(key) == b.get(key) for key in IDENTITY_KEYS)


def finished_table(folder: str | os.PathLike, manifest: dict[str, Any] | None = None) -> ScoreTable | None:
    """The table of a complete manifest, if the table on disk is the one it names (else None)."""
    folder = Path(folder)
    manifest = manifest if manifest is not None else read_manifest(folder)
    if not manifest or manifest.get("status") != "complete" or not (folder / TABLE).is_file():
        return None
    expected = manifest.get("table_sha256")  # absent in manifests written before table hashes: trusted as before
    if expected is None:
        return read_table(folder / TABLE)
    data = (folder / TABLE).read_bytes()  # hashed and parsed from the same bytes
    if hashlib.sha256(data).hexdigest() != expected:
        return None  # a rescore was swapped in half-way; its next run completes the swap
    import pyarrow as pa

    return read_table(pa.BufferReader(data))


def load_finished_scores(folder: Path) -> tuple[dict[str, Any], ScoreTable]:
    """The manifest and table of a folder of finished scores (`UserError` if it holds none)."""
    manifest = read_manifest(folder)
    table = finished_table(folder, manifest)
    if manifest is None or table is None:
        raise UserError(
            f"{str(folder)!r} holds no finished scores (no complete scores.json beside its scores.parquet). Run "
            "`gradsift score` first, or again to finish an interrupted one."
        )
    return manifest, table


class ScoreStore:
    """A score folder for one (model, data, scoring config) identity.

    `cached()` only reads. The writer calls `prepare()` (under `gradsift.locking.folder_lock`) before `begin()`:
    it refuses a folder gradsift did not write and completes a rescore that was killed while being swapped in.
    """

    def __init__(self, folder: str | os.PathLike, fingerprints: dict[str, Any]):
        self.folder = Path(folder)
        self.fingerprints = fingerprints
        self.work = self.folder  # where this run's shards and manifest go: the folder, or `.rescore/` in it

    def cached(self) -> ScoreTable | None:
        """Return the complete table of this identity, if a previous run finished it."""
        manifest = read_manifest(self.folder)
        if manifest and same_identity(manifest["fingerprints"], self.fingerprints):
            return finished_table(self.folder, manifest)
        return None

    def check_writable(self) -> None:
        """Refuse a path that is a file, or a non-empty folder holding no score manifest gradsift wrote."""
        if self.folder.exists() and not self.folder.is_dir():
            raise UserError(
                f"The score folder {str(self.folder)!r} is an existing file, not a folder. Pass a new or empty folder "
                "(or one `gradsift score` wrote) as --out."
            )
        if not self.folder.is_dir():
            return
        entries = sorted(p.name for p in self.folder.iterdir() if p.name != LOCK_NAME)
        if entries and read_manifest(self.folder) is None:
            shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
            raise UserError(
                f"The score folder {str(self.folder)!r} is not empty ({shown}) and holds no scores.json written by "
                "gradsift; gradsift writes only into a new or empty folder, or one it wrote. Choose another --out."
            )

    def prepare(self) -> None:
        """Check the folder is gradsift's to write; complete a finished rescore whose swap was interrupted."""
        self.check_writable()
        staged = read_manifest(self.folder / STAGING)
        if staged and staged.get("status") == "complete":
            self._swap_in()

    def begin(self, extra: dict[str, Any]) -> dict[int, ScoreTable]:
        """Start or resume a run: return its finished shards. Finished scores of another identity stay untouched."""
        main = read_manifest(self.folder)
        if main and main.get("status") == "complete" and not same_identity(main["fingerprints"], self.fingerprints):
            self.work = self.folder / STAGING  # the finished scores stay readable until this run completes
        else:
            self.work = self.folder
        manifest = read_manifest(self.work)
        finished: dict[int, ScoreTable] = {}
        if (
            manifest
            and manifest.get("status") != "complete"
            and same_identity(manifest["fingerprints"], self.fingerprints)
            and manifest.get("shard_size") == extra.get("shard_size")
        ):
            for path in self._shard_files(self.work):
                finished[int(path.stem)] = read_table(path)
        else:  # an unfinished run of another identity, or a complete one of this identity being redone
            self._remove_own_files(self.work)
        self.manifest = {
            "gradsift_version": __version__,
            "status": "running",
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "fingerprints": self.fingerprints,
            **extra,
        }
        write_json(self.manifest, self.work / MANIFEST)
        return finished

    def use(self, work: str) -> None:
        """Point this store at the run folder `begin` chose on rank 0 (`""` or `.rescore`), on another rank."""
        self.work = self.folder / work if work else self.folder

    @property
    def work_name(self) -> str:
        return "" if self.work == self.folder else self.work.name

    def shard_path(self, number: int) -> Path:
        """Return the file of shard `number`."""
        return self.work / SHARDS / f"{number:05d}.parquet"

    def write_shard(self, number: int, table: ScoreTable) -> None:
        """Save one finished shard atomically."""
        write_table(table, self.shard_path(number))

    def finish(self, table: ScoreTable, summary: dict[str, Any]) -> None:
        """Write the merged table, then mark the manifest complete (in that order, so complete means complete).

        A rescore in `.rescore/` is then swapped in over the previous scores.
        """
        write_table(table, self.work / TABLE)
        self.manifest.update(
            status="complete",
            finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            table_sha256=file_fingerprint(self.work / TABLE),
            **summary,
        )
        write_json(self.manifest, self.work / MANIFEST)
        if self.work != self.folder:
            self._swap_in()
            self.work = self.folder

    def _swap_in(self) -> None:
        """Replace the folder's scores by the complete ones in `.rescore/`; each step can be redone after a kill.

        The manifest is replaced last: until then the previous manifest names the previous table's sha256, so a
        half-done swap is never read as finished scores of either run.
        """
        staging = self.folder / STAGING
        shards = self.folder / SHARDS
        for path in self._shard_files(self.folder):
            path.unlink()
        staged_shards = self._shard_files(staging)
        if staged_shards:
            shards.mkdir(exist_ok=True)
        for path in staged_shards:
            os.replace(path, shards / path.name)
        if (staging / TABLE).is_file():
            os.replace(staging / TABLE, self.folder / TABLE)
        os.replace(staging / MANIFEST, self.folder / MANIFEST)
        self._remove_own_files(staging)
        _remove_empty(staging / SHARDS)
        _remove_empty(staging)

    @staticmethod
    def _shard_files(folder: Path) -> list[Path]:
        shards = folder / SHARDS
        if not shards.is_dir():
            return []
        return sorted(p for p in shards.iterdir() if SHARD_FILE.fullmatch(p.name) and p.is_file())

    def _remove_own_files(self, folder: Path) -> None:
        """Delete the shards, table and manifest gradsift wrote in `folder`, and the temporary files a killed write of
        one of them left (`atomic_path`'s name for it): files it names, nothing else."""
        for path in self._shard_files(folder):
            path.unlink()
        (folder / TABLE).unlink(missing_ok=True)
        (folder / MANIFEST).unlink(missing_ok=True)
        for place, final in ((folder, TABLE), (folder, MANIFEST), (folder / SHARDS, SHARD_FILE)):
            if place.is_dir():
                for path in place.iterdir():
                    if path.is_file() and atomic_leftover(path.name, final):
                        path.unlink()


def _remove_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:  # absent, or holds something gradsift did not write: left alone
        pass


# The fields `dropped_entries` writes for each row (a row's own described fields may not take these names).
DROPPED_FIELDS = (
    "index", "sample_id", "reason", "loss", "grad_norm", "anchor_cos", "refusal_logprob", "num_response_tokens",
    "status",
)  # fmt: skip


def dropped_entries(
    table: ScoreTable, selection: Selection, describe: Callable[[int], dict[str, Any]] | None = None
) -> list[dict[str, Any]]:
    """Each dropped row: its dataset index, sample id, reason, scores and status, plus `describe(index)` (its content,
    where the caller has it). A `nonfinite` row's norm is NaN here (`write_dropped` writes it as null)."""
    entries = []
    for position in np.flatnonzero(~selection.keep):
        index = int(table.index[position])
        entries.append(
            {
                "index": index,
                "sample_id": str(table.sample_id[position]),
                "reason": str(selection.reasons[position]),
                "loss": float(table.loss[position]),
                "grad_norm": float(table.grad_norm[position]),
                "anchor_cos": float(table.anchor_cos[position]),
                "refusal_logprob": float(table.refusal_logprob[position]),
                "num_response_tokens": int(table.num_response_tokens[position]),
                "status": str(table.status[position]),
                **(describe(index) if describe is not None else {}),
            }
        )
    return entries


def write_dropped(
    path: str | os.PathLike,
    table: ScoreTable,
    selection: Selection,
    describe: Callable[[int], dict[str, Any]] | None = None,
) -> None:
    """`dropped.jsonl`: `dropped_entries` as strict JSON lines, written atomically. Its one writer."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        for entry in dropped_entries(table, selection, describe):
            handle.write(dumps(entry, ensure_ascii=False) + "\n")


def write_selection(
    path: Path,
    table: ScoreTable,
    selection: Selection,
    config: SelectionConfig,
    extra: dict[str, Any] | None = None,
    staged: dict[Path, Path] | None = None,
) -> None:
    """`selection.json`: the rule's settings, the counts, every reason that occurred with its meaning, the summary
    line, `extra` (where the scores and data came from). With `staged` ({output: its staged file}, `gradsift select`)
    the staged outputs are moved into place, each file's sha256 recorded before it moves (`fileio.publish`), which
    later lets gradsift replace them. Its one writer."""
    counts = selection.counts()
    record = {
        "gradsift_version": __version__,
        "selection": config.model_dump(),
        "num_rows": len(table),
        "num_kept": int(selection.num_kept),
        "dropped": counts,
        "reasons": {reason: REASONS.get(reason, reason) for reason in counts},
        "summary": selection.summary(),
        **(extra or {}),
    }
    if staged is None:
        write_json(record, path)
    else:
        publish(path, _selection_record(path), record, staged)


SELECTION_FILE = "selection.json"
DROPPED_FILE = "dropped.jsonl"
# Names gradsift gives its own files: never the name of a kept-rows file, so one output cannot land on another.
RESERVED_NAMES = frozenset({MANIFEST, TABLE, LOCK_NAME, SELECTION_FILE, DROPPED_FILE})


def selection_paths(out: Path, inputs: list[Path]) -> dict[str, Path]:
    """Where `gradsift select` writes: the kept rows at `out`, `dropped.jsonl` and `selection.json` beside it.

    Refuses (`UserError`) an output that would land on an input, or on a file gradsift cannot show it wrote: an
    existing output is replaced only if the `selection.json` beside it records that file's sha256.
    """
    if out.name in RESERVED_NAMES:
        raise UserError(
            f"--out {str(out)!r}: {out.name!r} is the name of a file gradsift writes itself. Name the kept-rows file "
            "otherwise, e.g. kept.jsonl."
        )
    if out.suffix.lower() not in FILE_SUFFIXES:
        raise UserError(
            f"--out {str(out)!r} must end in .jsonl, .json or .parquet (the kept rows' format); got "
            f"{out.suffix or 'no suffix'!r}."
        )
    if out.is_dir():
        raise UserError(
            f"--out {str(out)!r} is a folder; pass a file for the kept rows, e.g. {str(out / 'kept.jsonl')!r}."
        )
    if out.parent.exists() and not out.parent.is_dir():
        raise UserError(f"--out {str(out)!r}: {str(out.parent)!r} is a file, not a folder. Choose another --out.")
    paths = {"kept": out, "dropped": out.parent / DROPPED_FILE, "selection": out.parent / SELECTION_FILE}
    for name, path in paths.items():
        for source in inputs:
            if _same_file(path, source):
                what = "--out" if name == "kept" else f"{path.name} (written beside --out)"
                raise UserError(
                    f"{what} {str(path)!r} is an input of this command ({str(source)!r}); gradsift never writes over "
                    "its inputs. Choose another --out."
                )
    record = _selection_record(paths["selection"])
    for name in ("kept", "dropped"):
        path = paths[name]
        if path.exists() and not _written_by_us(path, record):
            raise UserError(
                f"{str(path)!r} exists and gradsift cannot show it wrote it (it is not recorded, with its current "
                f"content, in {str(paths['selection'])!r}). Move it away or choose another --out."
            )
    return paths


def _selection_record(path: Path) -> dict[str, Any] | None:
    """The `selection.json` at `path` if gradsift wrote it; None if absent; `UserError` if it is someone else's."""
    fix = "; `gradsift select` writes one beside --out. Move it away or choose another --out folder."
    return own_record(path, {"selection", "num_rows", "num_kept", "summary"}, fix)


def _written_by_us(path: Path, record: dict[str, Any] | None) -> bool:
    if record is None or not path.is_file():
        return False
    if recorded(path, record):
        return True
    if path.name == DROPPED_FILE and "written" not in record:  # before sha256s were recorded: its line count
        with open(path, "rb") as handle:
            return sum(1 for line in handle if line.strip()) == record["num_rows"] - record["num_kept"]
    return False


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False
