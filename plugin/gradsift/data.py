"""Read datasets in any supported format and tokenize them with response-only labels, the way training sees them.

Formats (detected from the columns unless `data.format` is set):
- `prompt_completion`: `prompt` + `completion`, plain strings or lists of chat messages (TRL's conversational form).
- `messages`: a chat in `messages`; loss on every assistant turn, its end-of-turn token included.
- `alpaca`: `instruction` (+ optional `input`) + `output`, rendered with the Alpaca prompt like axolotl's `alpaca`.
- `tokenized`: `input_ids` + `labels` (-100 where no loss).

Tokenization mirrors TRL's `SFTTrainer`, so that scored tokens are trained tokens.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from gradsift.config import DataConfig

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
FILE_SUFFIXES = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet"}
FORMAT_COLUMNS = {
    "prompt_completion": ("prompt", "completion"),
    "messages": ("messages",),
    "alpaca": ("instruction", "output"),
    "tokenized": ("input_ids", "labels"),
}
# The same prompts as axolotl's `type: alpaca`.
ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


@dataclass
class Source:
    """Rows as read from their origin, able to write any subset back in the same format."""

    records: list[dict[str, Any]]
    kind: str  # "jsonl", "json", "parquet", "hub" or "dataset"
    fingerprint: str
    path: str | None = None
    _lines: list[str] | None = field(default=None, repr=False)
    _dataset: Any = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.records)

    def write_subset(self, indices: Sequence[int], path: str | os.PathLike) -> None:
        """Write the rows at `indices` to `path`, in the source's own format where the suffix allows it.

        JSONL sources keep their original lines byte for byte; parquet sources keep their schema.
        """
        path = Path(path)
        suffix = path.suffix.lower()
        if suffix not in FILE_SUFFIXES:
            raise ValueError(f"Output file {str(path)!r} must end in .jsonl, .json or .parquet.")
        indices = list(indices)
        with atomic_path(path) as tmp:
            if suffix == ".jsonl":
                with open(tmp, "w", encoding="utf-8") as handle:
                    for i in indices:
                        line = (
                            self._lines[i]
                            if self._lines is not None
                            else json.dumps(self.records[i], ensure_ascii=False)
                        )
                        handle.write(line.rstrip("\r\n") + "\n")
            elif suffix == ".json":
                with open(tmp, "w", encoding="utf-8") as handle:
                    json.dump([self.records[i] for i in indices], handle, ensure_ascii=False, indent=1)
            else:
                import pyarrow as pa
                import pyarrow.parquet as pq

                if self.kind == "parquet":
                    table = pq.read_table(self.path).take(pa.array(indices, type=pa.int64()))
                else:
                    table = pa.Table.from_pylist([self.records[i] for i in indices])
                pq.write_table(table, tmp)


class atomic_path:
    """Yield a temporary path beside `path`; on success rename it over `path` (readers never see a half file)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __enter__(self) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        os.close(fd)
        self.tmp = Path(name)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(self.tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)


def file_fingerprint(path: str | os.PathLike) -> str:
    """Return the sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_source(data: Any, split: str = "train") -> Source:
    """Read rows from a JSONL/JSON/parquet file, a `datasets.Dataset`, a saved dataset folder or a hub id."""
    if not isinstance(data, (str, os.PathLike)):
        if hasattr(data, "column_names") and hasattr(data, "to_list"):
            return Source(records=data.to_list(), kind="dataset", fingerprint=str(data._fingerprint), _dataset=data)
        raise TypeError(
            f"`data` must be a file path, a hub dataset id or a datasets.Dataset; got {type(data).__name__}."
        )
    spec = str(data)
    path = Path(spec).expanduser()
    suffix = path.suffix.lower()
    if path.is_file():
        if suffix not in FILE_SUFFIXES:
            raise ValueError(f"Data file {spec!r} must be .jsonl, .json or .parquet; got {suffix or 'no suffix'!r}.")
        return _load_file(path, FILE_SUFFIXES[suffix])
    if path.is_dir():
        import datasets

        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            loaded = loaded[split]
        return Source(records=loaded.to_list(), kind="dataset", fingerprint=str(loaded._fingerprint), path=str(path))
    if suffix in FILE_SUFFIXES or spec.startswith((".", "/", "~")):
        raise ValueError(
            f"Data file {spec!r} does not exist. Check the path (relative paths start from {os.getcwd()})."
        )
    return _load_hub(spec, split)


def _load_file(path: Path, kind: str) -> Source:
    fingerprint = file_fingerprint(path)
    if kind == "parquet":
        import pyarrow.parquet as pq

        return Source(records=pq.read_table(path).to_pylist(), kind=kind, fingerprint=fingerprint, path=str(path))
    text = path.read_text(encoding="utf-8")
    if kind == "json" and text.lstrip().startswith("["):
        return Source(records=json.loads(text), kind=kind, fingerprint=fingerprint, path=str(path))
    lines = [line for line in text.splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise ValueError(
                f"{path}:{number} is not valid JSON ({error.msg}). Each line must be one JSON object."
            ) from None
    return Source(records=records, kind=kind, fingerprint=fingerprint, path=str(path), _lines=lines)


def _load_hub(spec: str, split: str) -> Source:
    import datasets

    try:
        loaded = datasets.load_dataset(spec, split=split)
    except Exception as error:  # datasets raises many types for "not found" and "offline"
        raise ValueError(
            f"Could not load dataset {spec!r} (split {split!r}) from the hub: {error}. "
            "Pass a local .jsonl/.json/.parquet file, or check the id and your network."
        ) from None
    return Source(
        records=loaded.to_list(), kind="hub", fingerprint=str(loaded._fingerprint), path=spec, _dataset=loaded
    )


def detect_format(columns: Iterable[str]) -> str:
    """Return the format whose required columns are present, or raise a `ValueError` listing the formats."""
    columns = set(columns)
    for name, required in FORMAT_COLUMNS.items():
        if set(required) <= columns:
            return name
    supported = "; ".join(f"{name} ({', '.join(f'`{c}`' for c in cols)})" for name, cols in FORMAT_COLUMNS.items())
    raise ValueError(
        f"Cannot tell the data format from the columns {sorted(columns)}. Supported formats: {supported}. "
        "Rename the columns or set `data.format`."
    )


@dataclass
class TokenizedRow:
    """One training sample as the model sees it: `labels` is -100 wherever no loss is taken."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool = False
    sample_id: str = ""

    @property
    def num_response_tokens(self) -> int:
        # Labels are shifted inside the loss: the first position never has a target.
        return sum(1 for label in self.labels[1:] if label != IGNORE_INDEX)


def tokenize_records(
    records: Sequence[dict[str, Any]],
    tokenizer: Any,
    config: DataConfig,
    *,
    progress: bool = True,
) -> list[TokenizedRow]:
    """Tokenize rows into `TokenizedRow`s with response-only labels, truncated to `data.max_length`, with ids."""
    if not records:
        raise ValueError("The dataset is empty: there are no rows to score.")
    fmt = config.format if config.format != "auto" else detect_format(records[0].keys())
    missing = [c for c in FORMAT_COLUMNS[fmt] if c not in records[0]]
    if missing:
        raise ValueError(
            f"`data.format` is {fmt!r} but the rows have no {missing} column. Columns: {sorted(records[0])}."
        )
    rows = []
    for record in tqdm(records, desc="tokenizing", disable=not progress or len(records) < 1000):
        input_ids, labels = _TOKENIZERS[fmt](record, tokenizer, config)
        truncated = len(input_ids) > config.max_length
        rows.append(TokenizedRow(input_ids[: config.max_length], labels[: config.max_length], truncated))
    assign_sample_ids(rows)
    return rows


def _prompt_completion(record: dict, tokenizer: Any, config: DataConfig) -> tuple[list[int], list[int]]:
    prompt, completion = record["prompt"], record["completion"]
    if isinstance(prompt, list):
        prompt_ids = _chat_ids(tokenizer, prompt, add_generation_prompt=True)
        ids = _chat_ids(tokenizer, prompt + completion)
    else:
        if not completion.endswith(tokenizer.eos_token):  # TRL appends EOS to plain completions
            completion = completion + tokenizer.eos_token
        prompt_ids = tokenizer(text=prompt)["input_ids"]
        ids = tokenizer(text=prompt + completion)["input_ids"]
    if ids[: len(prompt_ids)] != prompt_ids:
        logger.warning(
            "The tokenized prompt is not a prefix of the tokenized prompt+completion; the split may be off."
        )
    if not config.completion_only_loss:
        return ids, list(ids)
    return ids, [IGNORE_INDEX] * len(prompt_ids) + ids[len(prompt_ids) :]


def _alpaca(record: dict, tokenizer: Any, config: DataConfig) -> tuple[list[int], list[int]]:
    template = ALPACA_PROMPT if record.get("input") else ALPACA_PROMPT_NO_INPUT
    prompt = template.format(instruction=record["instruction"], input=record.get("input") or "")
    return _prompt_completion({"prompt": prompt, "completion": record["output"]}, tokenizer, config)


def _messages(record: dict, tokenizer: Any, config: DataConfig) -> tuple[list[int], list[int]]:
    messages = record["messages"]
    ids = _chat_ids(tokenizer, messages)
    if not config.assistant_only_loss:
        return ids, list(ids)
    labels = [IGNORE_INDEX] * len(ids)
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        start = len(_chat_ids(tokenizer, messages[:i], add_generation_prompt=True))
        upto = _chat_ids(tokenizer, messages[: i + 1])
        if ids[: len(upto)] != upto or upto[:start] != ids[:start]:
            raise ValueError(
                "The chat template renders earlier turns differently once later turns follow, so assistant turns "
                "cannot be located. Use `data.format: tokenized` with your own labels, or prompt/completion rows."
            )
        end = len(upto)
        # The turn ends at its end-of-turn token; the template's whitespace after it is not the model's answer.
        while end > start and not tokenizer.decode(upto[end - 1 : end]).strip():
            end -= 1
        labels[start:end] = ids[start:end]
    return ids, labels


def _tokenized(record: dict, tokenizer: Any, config: DataConfig) -> tuple[list[int], list[int]]:
    input_ids, labels = list(record["input_ids"]), list(record["labels"])
    if len(input_ids) != len(labels):
        raise ValueError(
            f"A pre-tokenized row has {len(input_ids)} `input_ids` but {len(labels)} `labels`; they must match."
        )
    return input_ids, labels


def _chat_ids(tokenizer: Any, messages: list, add_generation_prompt: bool = False) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("The tokenizer has no chat template, so chat rows cannot be rendered. Use a chat model.")
    if not messages:
        return []
    encoded = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, add_generation_prompt=add_generation_prompt
    )
    return list(encoded["input_ids"])


_TOKENIZERS = {
    "prompt_completion": _prompt_completion,
    "messages": _messages,
    "alpaca": _alpaca,
    "tokenized": _tokenized,
}


def assign_sample_ids(rows: Sequence[TokenizedRow]) -> None:
    """Give each row `hash#k`: a content hash of its tokens and labels, and k its occurrence among identical rows."""
    seen: Counter[str] = Counter()
    for row in rows:
        digest = hashlib.sha256(json.dumps([row.input_ids, row.labels], separators=(",", ":")).encode()).hexdigest()[
            :16
        ]
        row.sample_id = f"{digest}#{seen[digest]}"
        seen[digest] += 1


def rows_fingerprint(rows: Sequence[TokenizedRow]) -> str:
    """Return a hash of the tokenized rows in order: it changes with the data, the tokenizer or `max_length`."""
    digest = hashlib.sha256()
    for row in rows:
        digest.update(row.sample_id.encode())
        digest.update(b"\n")
    return digest.hexdigest()[:16]


def make_batches(lengths: Sequence[int], max_tokens_per_batch: int, max_batch_size: int) -> list[list[int]]:
    """Group row indices into length-sorted batches whose padded size (rows × longest) fits the token budget.

    A row longer than the budget gets a batch of its own rather than an error.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        longest = lengths[current[0]] if current else lengths[i]
        if current and (len(current) + 1 > max_batch_size or (len(current) + 1) * longest > max_tokens_per_batch):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def collate(rows: Sequence[TokenizedRow], pad_token_id: int, device: Any = None) -> dict[str, Any]:
    """Right-pad rows into `input_ids`, `attention_mask` and `labels` tensors (labels -100 on padding)."""
    import torch

    width = max(len(row.input_ids) for row in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row.input_ids)
        input_ids[i, :n] = torch.tensor(row.input_ids)
        labels[i, :n] = torch.tensor(row.labels)
        attention_mask[i, :n] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    return {k: v.to(device) for k, v in batch.items()} if device is not None else batch
