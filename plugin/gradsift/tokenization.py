"""Tokenize rows with response-only labels, the way training sees them, and batch them for the model.

Labels per format (`gradsift.data` reads and checks the rows):
- `prompt_completion`: loss on the completion (all tokens with `data.completion_only_loss: false`).
- `alpaca`: rendered with the Alpaca prompt like axolotl's `alpaca`, then as `prompt_completion`.
- `messages`: loss on every assistant turn, its end-of-turn token included (all tokens with
  `data.assistant_only_loss: false`).
- `tokenized`: the row's own `labels`.

Tokenization mirrors TRL's `SFTTrainer`, so that scored tokens are trained tokens.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from jinja2.exceptions import TemplateError
from tqdm.auto import tqdm

from gradsift.config import DataConfig
from gradsift.data import IGNORE_INDEX, Rows, check_rows, require_rows
from gradsift.errors import UserError

logger = logging.getLogger(__name__)

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
    """Tokenize rows into `TokenizedRow`s with response-only labels, truncated to `data.max_length`, with ids.

    Every row is checked against the format (`data.format`, or the one detected from the rows' columns) before any is
    tokenized, so a bad row fails in seconds with its line; see `gradsift.data.check_rows`.
    """
    require_rows(records)
    fmt = check_rows(records, config.format)
    rows = []
    for i, record in enumerate(tqdm(records, desc="tokenizing", disable=not progress or len(records) < 1000)):
        try:
            input_ids, labels = TOKENIZERS[fmt](record, tokenizer, config)
        except TemplateError as error:
            if type(error) is not TemplateError:  # a broken template (syntax, undefined name): not the row's fault
                raise
            raise UserError(_template_refused(records, i, error)) from None  # the template's `raise_exception`
        truncated = len(input_ids) > config.max_length
        rows.append(TokenizedRow(input_ids[: config.max_length], labels[: config.max_length], truncated))
    assign_sample_ids(rows)
    return rows


def _template_refused(records: Sequence[Any], i: int, error: Exception) -> str:
    """One line: where the row is, what the tokenizer's chat template said of it, and the fix."""
    place = f"In {records.origin}, " if isinstance(records, Rows) and records.origin else ""
    where = records.locate(i) if isinstance(records, Rows) else f"row {i} (counting from 0)"
    said = " ".join(str(error).split())
    roles = [m.get("role") for m in _row_messages(records[i])]
    return (
        f"{place}{where}: the tokenizer's chat template refuses the row: {said!r} (its roles: {roles}). Fix the row "
        "to the template's rules (e.g. user and assistant turns alternating, one system turn first), or remove it."
    )


def row_text(record: dict) -> tuple[str, str]:
    """A row's request and answer as text, whichever format it is in (the first answer and the user turn before it,
    the request the refusal probe asks; alpaca's instruction with its input; a pre-tokenized row has none)."""
    if "instruction" in record and "output" in record:
        request = " ".join(str(part) for part in (record["instruction"], record.get("input") or "") if part)
        return request, str(record["output"])
    messages = _row_messages(record)
    if messages:
        answer = next((i for i, m in enumerate(messages) if m.get("role") == "assistant"), None)
        before = messages[:answer] if answer is not None else messages
        request = next((m.get("content", "") for m in reversed(before) if m.get("role") == "user"), "")
        return str(request), str(messages[answer].get("content", "")) if answer is not None else ""
    if isinstance(record.get("prompt"), str):
        return record["prompt"], str(record.get("completion", ""))
    return "(pre-tokenized row)", ""


def _row_messages(record: dict) -> list[dict]:
    """The chat messages of a row, whichever chat format it is in."""
    if isinstance(record.get("messages"), list):
        return [m for m in record["messages"] if isinstance(m, dict)]
    turns = [record.get("prompt"), record.get("completion")]
    return [m for turn in turns if isinstance(turn, list) for m in turn if isinstance(m, dict)]


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
            raise UserError(
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
    return list(record["input_ids"]), list(record["labels"])


def _chat_ids(tokenizer: Any, messages: list, add_generation_prompt: bool = False) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(
            "The tokenizer has no chat template, so chat rows cannot be rendered. Use a chat model, or plain-text "
            "prompt/completion rows."
        )
    if not messages:
        return []
    encoded = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, add_generation_prompt=add_generation_prompt
    )
    return list(encoded["input_ids"])


# A row's tokenizer per format (`gradsift.config.FORMAT_COLUMNS` names them): (input_ids, labels).
TOKENIZERS = {
    "prompt_completion": _prompt_completion,
    "messages": _messages,
    "alpaca": _alpaca,
    "tokenized": _tokenized,
}


def row_digest(row: TokenizedRow) -> str:
    """A 16-character content hash of a row's tokens and labels."""
    return hashlib.sha256(json.dumps([row.input_ids, row.labels], separators=(",", ":")).encode()).hexdigest()[:16]


def sample_ids(digests: Iterable[str]) -> list[str]:
    """`digest#k` per row, k its occurrence among the rows with the same digest before it."""
    seen: Counter[str] = Counter()
    ids = []
    for digest in digests:
        ids.append(f"{digest}#{seen[digest]}")
        seen[digest] += 1
    return ids


def assign_sample_ids(rows: Sequence[TokenizedRow]) -> None:
    """Give each row `hash#k`: a content hash of its tokens and labels, and k its occurrence among identical rows."""
    for row, sample_id in zip(rows, sample_ids(row_digest(row) for row in rows)):
        row.sample_id = sample_id


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
