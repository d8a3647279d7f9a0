"""How readily the scored model would refuse each row's request: a forward-only signal for harmful rows in data.

An aligned model refuses harmful requests, so how likely it is to *open its answer to a row's request with a refusal*
says how harmful it judges the request, whatever the row's own answer says. `refusal_logprob` is the best, over the
refusal texts (`REFUSALS` unless `scoring.refusal_texts` names others), summed log-probability of the refusal's first
`OPENING_TOKENS` tokens as the assistant's answer: the opening carries the decision to refuse; the rest of a refusal
follows from it and only dilutes a mean (measured in the README).

The request is the row's tokens before its first answer token (its prompt; for a multi-turn row, the turns before the
first answer), so the signal needs no text: a refusal is the same answer tokens after every prompt, rendered by the
tokenizer's chat template where the prompt ends with the template's generation prompt, else as plain text with EOS.
One forward pass per row and refusal over the prompt and the refusal's opening, no backward.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from gradsift.harmful_sets import OPENING_TOKENS, PROBE_REFUSALS
from gradsift.tokenization import IGNORE_INDEX, TokenizedRow

REFUSALS = PROBE_REFUSALS  # the default texts (`scoring.refusal_texts`), kept with the align stage's openings
__all__ = ["OPENING_TOKENS", "REFUSALS", "RefusalAnswers", "best_refusal_logprobs", "opening_logprobs", "refusal_rows"]


class RefusalAnswers:
    """The answer tokens of each refusal text after a prompt: in the chat template's form, and as plain text."""

    def __init__(self, tokenizer: Any, texts: Sequence[str]):
        self.texts = list(texts)
        self.generation_prompt: list[int] = []
        self.chat: list[list[int]] | None = None
        self.chat_prefix: list[int] = []
        if getattr(tokenizer, "chat_template", None):
            self.chat, self.generation_prompt, self.chat_prefix = _chat_answers(tokenizer, self.texts)
        eos = tokenizer.eos_token or ""
        self.plain = [list(tokenizer(text=text + eos, add_special_tokens=False)["input_ids"]) for text in texts]

    def after(self, prompt: list[int]) -> tuple[list[int], list[list[int]]]:
        """The tokens asked before any refusal after `prompt`, and each refusal's answer tokens: the chat form where
        the prompt ends with the generation prompt."""
        chat = self.chat is not None and self.generation_prompt
        if chat and prompt[len(prompt) - len(self.generation_prompt) :] == self.generation_prompt:
            return self.chat_prefix, self.chat
        return [], self.plain


def _chat_answers(tokenizer: Any, texts: list[str]) -> tuple[list[list[int]] | None, list[int], list[int]]:
    """Each refusal's tokens as the assistant turn after a user turn, the generation prompt they follow, and the
    tokens the template puts before every answer (an empty reasoning block: they decide nothing, so they are asked
    as prompt, not counted); (None, [], []) where the template renders the user turn otherwise once an answer
    follows."""

    def ids(messages: list[dict[str, str]], generation: bool = False) -> list[int]:
        encoded = tokenizer.apply_chat_template(
            messages, tokenize=True, return_dict=True, add_generation_prompt=generation
        )
        return list(encoded["input_ids"])

    user = [{"role": "user", "content": "Hello"}]
    prompt, bare = ids(user, generation=True), ids(user)
    if prompt[: len(bare)] != bare:
        return None, [], []

    def answer(text: str) -> list[int] | None:
        full = ids([*user, {"role": "assistant", "content": text}])
        if full[: len(prompt)] != prompt:
            return None
        end = len(full)
        while end > len(prompt) and not tokenizer.decode(full[end - 1 : end]).strip():
            end -= 1  # the template's whitespace after the end-of-turn token is not the answer (as `_messages`)
        return full[len(prompt) : end]

    answers = [answer(text) for text in texts]
    probes = [answer(text) for text in ("Zebra", "1")]  # two answers alike only in what the template adds
    if any(a is None for a in (*answers, *probes)):
        return None, [], []
    shared = 0
    while all(len(p) > shared for p in probes) and probes[0][shared] == probes[1][shared]:
        shared += 1
    prefix = probes[0][:shared]
    answers = [a[shared:] if a[:shared] == prefix else a for a in answers]
    return answers, prompt[len(bare) :], prefix


def refusal_rows(rows: Sequence[TokenizedRow], answers: RefusalAnswers) -> list[TokenizedRow]:
    """For each row, one row per refusal: its prompt (the tokens before its first answer token) with the refusal's
    first `OPENING_TOKENS` tokens as the answer (past the data's `max_length` if need be: nothing trains on it). A
    row with no prompt (its loss covers it from the first token) gets rows with no answer tokens."""
    out = []
    for row in rows:
        start = prompt_end(row)
        prefix, refusals = answers.after(list(row.input_ids[:start]))
        prompt = list(row.input_ids[:start]) + prefix
        for answer in refusals:
            opening = answer[:OPENING_TOKENS] if start and len(answer) >= OPENING_TOKENS else []
            labels = [IGNORE_INDEX] * len(prompt) + opening
            out.append(TokenizedRow(prompt + opening, labels) if opening else TokenizedRow([], []))
    return out


def prompt_end(row: TokenizedRow) -> int:
    """Where the row's first answer token is: its prompt's length (0: its loss covers it from the first token)."""
    return next((i for i, label in enumerate(row.labels) if label != IGNORE_INDEX), 0)


def best_refusal_logprobs(
    model: Any,
    rows: Sequence[TokenizedRow],
    answers: RefusalAnswers,
    pad_token_id: int,
    max_tokens_per_batch: int = 4096,
    max_batch_size: int = 32,
) -> np.ndarray:
    """Per row, the best over the refusals of their opening's summed log-probability as its answer (NaN where the
    row has no prompt; a refusal shorter than the opening does not count)."""
    asked = refusal_rows(rows, answers)
    values = summed_logprobs(model, asked, pad_token_id, max_tokens_per_batch, max_batch_size)
    values = values.reshape(len(rows), len(answers.texts))
    found = np.isfinite(values).any(axis=1)
    best = np.full(len(rows), np.nan)
    best[found] = np.nanmax(values[found], axis=1)
    return best


def opening_logprobs(model: Any, rows: Sequence[TokenizedRow], pad_token_id: int, **batching: int) -> np.ndarray:
    """Per row, the summed log-probability of its own answer's first `OPENING_TOKENS` tokens (what a refusal's
    opening is compared with in `bench/detector_probe.py`'s margin)."""
    openings = []
    for row in rows:
        start = prompt_end(row)
        end = start + OPENING_TOKENS
        openings.append(TokenizedRow(row.input_ids[:end], row.labels[:end]) if start else TokenizedRow([], []))
    return summed_logprobs(model, openings, pad_token_id, **batching)


def summed_logprobs(
    model: Any,
    rows: Sequence[TokenizedRow],
    pad_token_id: int,
    max_tokens_per_batch: int = 4096,
    max_batch_size: int = 32,
) -> np.ndarray:
    """Per row, the summed log-probability of its answer tokens (NaN without one)."""
    means = mean_logprobs(model, rows, pad_token_id, max_tokens_per_batch, max_batch_size)
    return means * np.array([row.num_response_tokens for row in rows])


def mean_logprobs(
    model: Any,
    rows: Sequence[TokenizedRow],
    pad_token_id: int,
    max_tokens_per_batch: int = 4096,
    max_batch_size: int = 32,
) -> np.ndarray:
    """Per row, the mean per-token log-likelihood of its answer tokens (−its loss; NaN without one): forward only."""
    import torch

    from gradsift.model_mode import scoring_mode
    from gradsift.scoring import batch_losses, device_of
    from gradsift.tokenization import collate, make_batches

    values = np.full(len(rows), np.nan)
    todo = np.flatnonzero([row.num_response_tokens > 0 for row in rows])
    if not len(todo):
        return values
    device = device_of(model)
    lengths = [len(rows[i].input_ids) for i in todo]
    with torch.no_grad(), scoring_mode(model):
        for positions in make_batches(lengths, max_tokens_per_batch, max_batch_size):
            members = todo[positions]
            losses, _, finite = batch_losses(model, collate([rows[i] for i in members], pad_token_id, device))
            values[members] = -torch.where(finite, losses.float(), float("nan")).cpu().numpy()
    return values


def refusal_logprobs(
    model: Any, tokenizer: Any, records: Sequence[dict[str, Any]], data: Any, texts: Sequence[str] = REFUSALS
) -> np.ndarray:
    """`best_refusal_logprobs` of data rows as gradsift tokenizes them (`data`: a `DataConfig`)."""
    from gradsift.tokenization import tokenize_records

    rows = tokenize_records(records, tokenizer, data, progress=False)
    return best_refusal_logprobs(model, rows, RefusalAnswers(tokenizer, texts), tokenizer.pad_token_id)
