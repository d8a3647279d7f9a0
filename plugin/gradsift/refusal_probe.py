"""How readily the scored model would refuse each row's request: a forward-only signal for harmful rows in data.

An aligned model refuses harmful requests, so the likelihood it gives a refusal *as the answer to a row's request*
says how harmful it judges the request, whatever the row's own answer says. `refusal_logprob` is the best, over the
`REFUSALS` texts, mean per-token log-likelihood of the refusal as the assistant's answer; `refusal_margin` is that
minus the row's own answer's (−`loss`): high where the model would rather refuse than give the row's answer. One
forward pass per row and refusal text over short answers, no backward (`refusal_logprobs`).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import numpy as np

from gradsift.config import DataConfig
from gradsift.errors import UserError

# Refusal openings in the forms chat models use; the shipped align stage trains the first five
# (`gradsift.harmful_sets`). The best of them counts, so one style the model uses is enough.
REFUSALS = (
    "I can't help with that.",
    "I won't help with this.",
    "Sorry, but I can't assist with that.",
    "I'm not able to help with that.",
    "No, I won't do that.",
    "I'm sorry, but I cannot help with that request.",
)


def with_answer(record: dict[str, Any], text: str) -> dict[str, Any]:
    """`record` with its answer replaced by `text`, in the record's own format (the request as the row has it)."""
    record = copy.deepcopy(dict(record))
    messages = record.get("messages")
    if isinstance(messages, list):
        last = max(
            (i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "assistant"), default=-1
        )
        if last < 0:
            raise UserError("a `messages` row has no assistant turn whose answer could be replaced by a refusal")
        record["messages"] = [*messages[:last], {"role": "assistant", "content": text}]
        return record
    if "completion" in record:
        completion = record["completion"]
        record["completion"] = [{"role": "assistant", "content": text}] if isinstance(completion, list) else text
        return record
    if "output" in record:
        record["output"] = text
        return record
    raise UserError(
        "the refusal signal needs rows with text (`messages`, `prompt`/`completion` or alpaca columns); pre-tokenized "
        "rows have no request to ask it of"
    )


def refusal_logprobs(
    model: Any,
    tokenizer: Any,
    records: Sequence[dict[str, Any]],
    data: DataConfig,
    refusals: Sequence[str] = REFUSALS,
    max_tokens_per_batch: int = 4096,
    max_batch_size: int = 32,
    progress: bool = False,
) -> np.ndarray:
    """Per row, the best over `refusals` of the mean per-token log-likelihood of the refusal as the row's answer
    (NaN where truncation leaves no refusal token)."""
    asked = [with_answer(record, text) for record in records for text in refusals]
    values = answer_logprobs(model, tokenizer, asked, data, max_tokens_per_batch, max_batch_size, progress)
    values = values.reshape(len(records), len(refusals))
    found = np.isfinite(values).any(axis=1)
    best = np.full(len(records), np.nan)
    best[found] = np.nanmax(values[found], axis=1)
    return best


def answer_logprobs(
    model: Any,
    tokenizer: Any,
    records: Sequence[dict[str, Any]],
    data: DataConfig,
    max_tokens_per_batch: int = 4096,
    max_batch_size: int = 32,
    progress: bool = False,
) -> np.ndarray:
    """Per row, the mean per-token log-likelihood of its answer (−its loss), one forward pass per batch."""
    import torch
    from tqdm.auto import tqdm

    from gradsift.model_mode import scoring_mode
    from gradsift.scoring import _batch_losses, _device_of
    from gradsift.tokenization import collate, make_batches, tokenize_records

    rows = tokenize_records(records, tokenizer, data, progress=False)
    losses = np.full(len(rows), np.nan)
    batches = make_batches([len(row.input_ids) for row in rows], max_tokens_per_batch, max_batch_size)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = _device_of(model)
    with torch.no_grad(), scoring_mode(model):
        for batch in tqdm(batches, desc="answer likelihood", disable=not progress):
            values, _, finite = _batch_losses(model, collate([rows[i] for i in batch], pad, device))
            losses[batch] = torch.where(finite, values.float(), float("nan")).cpu().numpy()
    return -losses
