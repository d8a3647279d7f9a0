"""Read datasets in any supported format and check every row against its format.

Formats (detected from the columns unless `data.format` is set):
- `prompt_completion`: `prompt` + `completion`, plain strings or lists of chat messages (TRL's conversational form).
- `messages`: a chat in `messages`.
- `alpaca`: `instruction` (+ optional `input`) + `output`.
- `tokenized`: `input_ids` + `labels` (-100 where no loss).

A bad row is reported where one finds it (its line in a JSON Lines file). `gradsift.tokenization` turns checked rows
into tokens and labels.
"""

from __future__ import annotations

import json
import numbers
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gradsift.config import FORMAT_COLUMNS
from gradsift.errors import UserError
from gradsift.fileio import atomic_path, dumps, file_fingerprint
from gradsift.packaged import is_packaged, packaged_rows

IGNORE_INDEX = -100
FILE_SUFFIXES = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet"}
# A bad-rows error shows this many rows, then counts the rest.
MAX_REPORTED_ROWS = 5


class Rows(list):
    """A list of row dicts that remembers where it was read from, so that a bad row is reported where one finds it.

    JSON Lines rows are located by their line in the file (counting from 1, as an editor does; blank lines count);
    other rows by their index (counting from 0, as `index` in `dropped.jsonl`).
    """

    def __init__(self, rows: Iterable[Any] = (), origin: str | None = None, line_numbers: list[int] | None = None):
        super().__init__(rows)
        self.origin = origin
        self.line_numbers = line_numbers

    def locate(self, i: int) -> str:
        """Return where row `i` is: `line 7` or `row 6 (counting from 0)`."""
        return f"line {self.line_numbers[i]}" if self.line_numbers is not None else _row_number(i)


def _row_number(i: int) -> str:
    return f"row {i} (counting from 0)"


@dataclass
class Source:
    """Rows as read from their origin, able to write any subset back in the same format."""

    records: list[dict[str, Any]]
    kind: str  # "jsonl", "json", "parquet", "hub", "dataset" or "embedded" (a packaged source)
    fingerprint: str
    path: str | None = None
    _lines: list[str] | None = field(default=None, repr=False)  # JSON Lines: each row's line, without its end
    dataset: Any = field(default=None, repr=False)  # the `datasets.Dataset` the rows came from, if any

    def __len__(self) -> int:
        return len(self.records)

    def write_subset(self, indices: Sequence[int], path: str | os.PathLike) -> None:
        """Write the rows at `indices` to `path`, in the source's own format where the suffix allows it.

        JSONL sources keep their original lines byte for byte; parquet sources keep their schema.
        """
        path = Path(path)
        suffix = path.suffix.lower()
        if suffix not in FILE_SUFFIXES:
            raise UserError(
                f"Output file {str(path)!r} must end in .jsonl, .json or .parquet; got {suffix or 'no suffix'!r}. "
                "Choose one of these suffixes."
            )
        indices = list(indices)
        with atomic_path(path) as tmp:
            if suffix == ".jsonl":
                with open(tmp, "w", encoding="utf-8") as handle:
                    for i in indices:
                        line = (
                            self._lines[i] if self._lines is not None else dumps(self.records[i], ensure_ascii=False)
                        )
                        handle.write(line + "\n")
            elif suffix == ".json":
                with open(tmp, "w", encoding="utf-8") as handle:
                    handle.write(dumps([self.records[i] for i in indices], ensure_ascii=False, indent=1))
            else:
                import pyarrow as pa
                import pyarrow.parquet as pq

                if self.kind == "parquet":
                    table = pq.read_table(self.path).take(pa.array(indices, type=pa.int64()))
                else:
                    table = pa.Table.from_pylist([self.records[i] for i in indices])
                pq.write_table(table, tmp)


def looks_like_file(spec: str) -> bool:
    """Whether a data spec can only mean a file, never a hub dataset id (`org/name`, or a bare canonical name): a
    .jsonl/.json/.parquet suffix, a start of `.`, `/` or `~`, or more than one `/`."""
    return Path(spec).suffix.lower() in FILE_SUFFIXES or spec.startswith((".", "/", "~")) or spec.count("/") > 1


def load_source(data: Any, split: str = "train") -> Source:
    """Read rows from a JSONL/JSON/parquet file, a `datasets.Dataset`, a saved dataset folder, a packaged source
    (`embedded:alpaca-gpt4-demo`, `gradsift.packaged`) or a hub id."""
    if not isinstance(data, (str, os.PathLike)):
        if hasattr(data, "column_names") and hasattr(data, "to_list"):
            records = Rows(data.to_list(), "the dataset")
            return Source(records=records, kind="dataset", fingerprint=str(data._fingerprint), dataset=data)
        raise TypeError(
            f"`data` must be a file path, a hub dataset id or a datasets.Dataset; got {type(data).__name__}."
        )
    spec = str(data)
    if is_packaged(spec):
        rows, fingerprint = packaged_rows(spec, split)
        return Source(
            records=Rows(rows, f"{spec} split {split!r}"), kind="embedded", fingerprint=fingerprint, path=spec
        )
    path = Path(spec).expanduser()
    suffix = path.suffix.lower()
    if path.is_file():
        if suffix not in FILE_SUFFIXES:
            raise UserError(f"Data file {spec!r} must be .jsonl, .json or .parquet; got {suffix or 'no suffix'!r}.")
        return _load_file(path, FILE_SUFFIXES[suffix])
    if path.is_dir():
        return _load_folder(path, split)
    if looks_like_file(spec):
        raise UserError(
            f"Data file {spec!r} does not exist. Check the path (relative paths start from {os.getcwd()})."
        )
    return _load_hub(spec, split)


def _load_folder(path: Path, split: str) -> Source:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except FileNotFoundError:
        raise UserError(
            f"Data folder {str(path)!r} is not a saved dataset (no `datasets.save_to_disk` files in it). Pass the "
            "folder that `save_to_disk` wrote, or a .jsonl/.json/.parquet file."
        ) from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise UserError(
                f"Data folder {str(path)!r} has no split {split!r}; its splits: {sorted(loaded)}. Set `data.split`."
            )
        loaded = loaded[split]
    records = Rows(loaded.to_list(), f"saved dataset {str(path)!r}")
    return Source(records=records, kind="dataset", fingerprint=str(loaded._fingerprint), path=str(path))


def _load_file(path: Path, kind: str) -> Source:
    fingerprint = file_fingerprint(path)
    if kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except pa.ArrowInvalid as error:
            raise UserError(f"Data file {str(path)!r} is not a readable parquet file ({error}).") from None
        return Source(records=Rows(table.to_pylist(), _file(path)), kind=kind, fingerprint=fingerprint, path=str(path))
    text = _read_utf8(path)
    if kind == "json":
        rows = _json_array(text, path)
        if rows is not None:
            return Source(records=rows, kind=kind, fingerprint=fingerprint, path=str(path))
    records, lines = _json_lines(text, path, kind)
    return Source(records=records, kind=kind, fingerprint=fingerprint, path=str(path), _lines=lines)


def _file(path: Path) -> str:
    return f"data file {str(path)!r}"


def _read_utf8(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")  # a leading byte order mark is not part of the first row
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise UserError(
            f"Data file {str(path)!r} is not UTF-8 text: byte {data[error.start : error.start + 1]!r} at line {line} "
            f"({error.reason}). Save the file as UTF-8."
        ) from None


def _json_array(text: str, path: Path) -> Rows | None:
    """Return the rows of a .json file holding one array of row objects; None when it may be JSON Lines."""
    try:
        loaded = json.loads(text)
    except json.JSONDecodeError as error:
        if text.lstrip().startswith("["):
            raise UserError(
                f"Data file {str(path)!r} starts a JSON array but is not valid JSON: {error.msg} at line "
                f"{error.lineno}, column {error.colno}. Fix the file, or write one JSON object per line (.jsonl)."
            ) from None
        return None  # perhaps JSON Lines
    if isinstance(loaded, list):
        bad = [i for i, row in enumerate(loaded) if not isinstance(row, dict)]
        if bad:
            shown = "; ".join(f"{_row_number(i)}: {_received(loaded[i])}" for i in bad[:MAX_REPORTED_ROWS])
            raise UserError(
                f"Data file {str(path)!r} is a JSON array, but {len(bad):,} of its {len(loaded):,} elements are not "
                f"row objects: {shown}{_more(len(bad))}. Make every element one object, e.g. "
                '{"prompt": "...", "completion": "..."}.'
            )
        return Rows(loaded, _file(path))
    if "\n" in text.strip():
        raise UserError(
            f"Data file {str(path)!r} holds a single JSON {_json_type(loaded)} over several lines, not rows. Write an "
            "array of row objects ([{...}, {...}]) or one row object per line (.jsonl)."
        )
    return None  # a single line: one JSON Lines row


def _json_lines(text: str, path: Path, kind: str) -> tuple[Rows, list[str]]:
    # Only "\n" ends a line: `str.splitlines` would also split inside strings holding U+2028, U+0085, \x1c and the
    # like, which JSON allows. A blank line is skipped, but every row keeps its line number in the file.
    records, lines, numbers, problems = [], [], [], []
    for number, line in enumerate(text.split("\n"), 1):
        line = line.removesuffix("\r")
        if not line.strip(" \t\r"):
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            problems.append(f"line {number}: invalid JSON ({error.msg} at column {error.colno})")
            continue
        if not isinstance(record, dict):
            problems.append(f"line {number}: {_received(record)}, not an object")
            continue
        records.append(record)
        lines.append(line)
        numbers.append(number)
    if problems:
        what = "neither a JSON array of row objects nor JSON Lines" if kind == "json" else "not JSON Lines"
        raise UserError(
            f"Data file {str(path)!r} is {what}: {'; '.join(problems[:MAX_REPORTED_ROWS])}{_more(len(problems))}. "
            'Each line must be one JSON object, one row, e.g. {"prompt": "...", "completion": "..."}.'
        )
    return Rows(records, _file(path), numbers), lines


def _load_hub(spec: str, split: str) -> Source:
    import datasets

    try:
        loaded = datasets.load_dataset(spec, split=split)
    except Exception as error:  # datasets raises many types for "not found" and "offline"
        raise UserError(
            f"Could not load dataset {spec!r} (split {split!r}) from the hub: {error}. "
            "Pass a local .jsonl/.json/.parquet file, or check the id and your network."
        ) from None
    records = Rows(loaded.to_list(), f"hub dataset {spec!r} (split {split!r})")
    return Source(records=records, kind="hub", fingerprint=str(loaded._fingerprint), path=spec, dataset=loaded)


def detect_format(columns: Iterable[str]) -> str:
    """Return the format whose required columns are present, or raise a `UserError` listing the formats."""
    columns = set(columns)
    for name, required in FORMAT_COLUMNS.items():
        if set(required) <= columns:
            return name
    raise UserError(_unknown_format(columns))


def _unknown_format(columns: set[str]) -> str:
    supported = "; ".join(f"{name} ({', '.join(f'`{c}`' for c in cols)})" for name, cols in FORMAT_COLUMNS.items())
    return (
        f"Cannot tell the data format from the columns {sorted(columns)}. Supported formats: {supported}. "
        "Rename the columns or set `data.format`."
    )


def check_rows(records: Sequence[Any], data_format: str = "auto") -> str:
    """Return the rows' format, `data_format` or else the one most rows' columns fit, after checking every row.

    Raises:
        UserError: If no row fits any format, or some rows lack a column of the format or hold a value of the wrong
            type; the message names the first few such rows (by line for JSON Lines) and what each holds.
    """
    place = f"In {records.origin}, " if isinstance(records, Rows) and records.origin else ""
    locate = records.locate if isinstance(records, Rows) else _row_number
    if data_format == "auto":
        fits = Counter(
            name
            for record in records
            if isinstance(record, dict)
            for name, required in FORMAT_COLUMNS.items()
            if all(column in record for column in required)
        )
        if not fits:
            columns = {column for record in records if isinstance(record, dict) for column in record}
            message = _unknown_format(columns)
            raise UserError(f"{place}{message[0].lower()}{message[1:]}" if place else message)
        # Ties go to the earlier format, as for a single row.
        data_format = max(FORMAT_COLUMNS, key=lambda name: fits[name])
        names = ", ".join(f"`{c}`" for c in FORMAT_COLUMNS[data_format])
        how = f"detected from the columns: {fits[data_format]:,} of {len(records):,} rows have {names}"
        fix = "Fix or remove these rows (or set `data.format`)."
    else:
        how = f"`data.format` is {data_format!r}"
        fix = "Fix or remove these rows, or set `data.format` to the rows' format."
    problems = [(i, problem) for i, record in enumerate(records) if (problem := _row_problem(record, data_format))]
    if problems:
        shown = "; ".join(f"{locate(i)}: {problem}" for i, problem in problems[:MAX_REPORTED_ROWS])
        raise UserError(
            f"{place}{len(problems):,} of {len(records):,} rows do not fit the {data_format} format ({how}): "
            f"{shown}{_more(len(problems))}. {fix}"
        )
    return data_format


def _row_problem(record: Any, data_format: str) -> str | None:
    if not isinstance(record, dict):
        return f"{_received(record)}, not a row object"
    missing = [column for column in FORMAT_COLUMNS[data_format] if column not in record]
    if missing:
        return f"no {', '.join(f'`{c}`' for c in missing)} column (it has {sorted(record)})"
    return ROW_CHECKS[data_format](record)


def _check_prompt_completion(record: dict) -> str | None:
    prompt, completion = record["prompt"], record["completion"]
    if isinstance(prompt, str) and isinstance(completion, str):
        return None
    if isinstance(prompt, list) and isinstance(completion, list):
        return _chat_problem(prompt, "prompt") or _chat_problem(completion, "completion")
    for key, value in (("prompt", prompt), ("completion", completion)):
        if not isinstance(value, (str, list)):
            return f"`{key}` must be a string or a list of chat messages; got {_received(value)}"
    return (
        f"`prompt` is {_a(_json_type(prompt))} but `completion` is {_a(_json_type(completion))}; use two strings or "
        "two lists of chat messages"
    )


def _check_messages(record: dict) -> str | None:
    return _chat_problem(record["messages"], "messages")


def _check_alpaca(record: dict) -> str | None:
    for key in ("instruction", "input", "output"):
        value = record.get(key)
        if not isinstance(value, str) and not (key == "input" and value is None):
            return f"`{key}` must be a string; got {_received(value)}"
    return None


def _check_tokenized(record: dict) -> str | None:
    for key in ("input_ids", "labels"):
        value = record[key]
        if not isinstance(value, list) or not _token_ids(value):
            return f"`{key}` must be a list of integer token ids; got {_received(value)}"
    if len(record["input_ids"]) != len(record["labels"]):
        return (
            f"{len(record['input_ids'])} `input_ids` but {len(record['labels'])} `labels`; give one label per token "
            f"({IGNORE_INDEX} where no loss is taken)"
        )
    return None


def _token_ids(values: list) -> bool:
    # The set of types is the fast path for Python ints; numpy integers pass too, booleans (`true`) do not.
    types = set(map(type, values))
    return types <= {int} or all(issubclass(t, numbers.Integral) and t is not bool for t in types)


def _chat_problem(messages: Any, key: str) -> str | None:
    if not isinstance(messages, list):
        return f"`{key}` must be a list of chat messages; got {_received(messages)}"
    for j, message in enumerate(messages):
        if not (
            isinstance(message, dict)
            and isinstance(message.get("role"), str)
            and isinstance(message.get("content"), str)
        ):
            shape = '{"role": "...", "content": "..."}'
            return f"`{key}[{j}]` must be a chat message {shape} with string values; got {_received(message)}"
    return None


# A row's check per format (`gradsift.config.FORMAT_COLUMNS` names them), after its columns are found present.
ROW_CHECKS = {
    "prompt_completion": _check_prompt_completion,
    "messages": _check_messages,
    "alpaca": _check_alpaca,
    "tokenized": _check_tokenized,
}


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _received(value: Any, width: int = 60) -> str:
    """`a number 5`, `an array [1, 2]`, `null`: the value as it reads in the file, cut to `width` characters."""
    if value is None:
        return "null"
    shown = json.dumps(value, ensure_ascii=False, default=repr)
    shown = shown if len(shown) <= width else shown[: width - 1] + "…"
    return f"{_a(_json_type(value))} {shown}"


def _a(noun: str) -> str:
    return f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}"


def _more(total: int) -> str:
    return f"; and {total - MAX_REPORTED_ROWS:,} more" if total > MAX_REPORTED_ROWS else ""


def require_rows(records: Sequence[Any]) -> None:
    """Refuse an empty dataset (`UserError` naming it): there is nothing to score or train on."""
    if not records:
        origin = records.origin if isinstance(records, Rows) and records.origin else "the dataset"
        raise UserError(f"{origin[0].upper()}{origin[1:]} is empty: there are no rows to score. Add rows.")
