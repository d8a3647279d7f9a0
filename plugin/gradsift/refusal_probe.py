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

from gradsift.harmful_sets import REFUSAL_OPENINGS
from gradsift.tokenization import IGNORE_INDEX, TokenizedRow

# The refusal openings the shipped align stage trains (`gradsift.harmful_sets`), and one other common form. The best
# of them counts, so one style the model uses is enough.
REFUSALS = (*(f"{opening}." for opening in REFUSAL_OPENINGS), "I'm sorry, but I cannot help with that request.")
# The refusal tokens whose log-probability counts: the opening that decides to refuse.
OPENING_TOKENS = 3


class RefusalAnswers:
    """The answer tokens of each refusal text after a prompt: in the chat template's form, and as plain text."""

    def __init__(self, tokenizer: Any, texts: Sequence[str], max_length: int):
        self.texts = list(texts)
        self.max_length = max_length  # a refusal row is cut to it, as data rows are
        self.generation_prompt: list[int] = []
        self.chat: list[list[int]] | None = None
        if getattr(tokenizer, "chat_template", None):
            self.chat, self.generation_prompt = _chat_answers(tokenizer, self.texts)
        eos = tokenizer.eos_token or ""
        self.plain = [list(tokenizer(text=text + eos, add_special_tokens=False)["input_ids"]) for text in texts]

    def after(self, prompt: list[int]) -> list[list[int]]:
        """The answer tokens of each refusal after `prompt`: the chat form where it ends with the generation prompt."""
        chat = self.chat is not None and self.generation_prompt
        if chat and prompt[len(prompt) - len(self.generation_prompt) :] == self.generation_prompt:
            return self.chat
        return self.plain


def _chat_answers(tokenizer: Any, texts: list[str]) -> tuple[list[list[int]] | None, list[int]]:
    """Each refusal's tokens as the assistant turn after a user turn, and the generation prompt they follow; (None,
    []) where the template renders the user turn otherwise once an answer follows."""

    def ids(messages: list[dict[str, str]], generation: bool = False) -> list[int]:
        encoded = tokenizer.apply_chat_template(
            messages, tokenize=True, return_dict=True, add_generation_prompt=generation
        )
        return list(encoded["input_ids"])

    user = [{"role": "user", "content": "Hello"}]
    prompt, bare = ids(user, generation=True), ids(user)
    if prompt[: len(bare)] != bare:
        return None, []
    answers = []
    for text in texts:
        full = ids([*user, {"role": "assistant", "content": text}])
        if full[: len(prompt)] != prompt:
            return None, []
        end = len(full)
        while end > len(prompt) and not tokenizer.decode(full[end - 1 : end]).strip():
            end -= 1  # the template's whitespace after the end-of-turn token is not the answer (as `_messages`)
        answers.append(full[len(prompt) : end])
    return answers, prompt[len(bare) :]


def refusal_rows(rows: Sequence[TokenizedRow], answers: RefusalAnswers) -> list[TokenizedRow]:
    """For each row, one row per refusal: its prompt (the tokens before its first answer token) with the refusal's
    first `OPENING_TOKENS` tokens as the answer. A row with no prompt (its labels start at once), or whose prompt
    leaves no room for the whole opening within `answers.max_length`, gets rows with no answer tokens."""
    out = []
    for row in rows:
        start = next((i for i, label in enumerate(row.labels) if label != IGNORE_INDEX), 0)
        prompt = list(row.input_ids[:start])
        for answer in answers.after(prompt):
            opening = answer[:OPENING_TOKENS]
            if not start or start + len(opening) > answers.max_length:
                out.append(TokenizedRow([], []))
                continue
            out.append(TokenizedRow(prompt + opening, [IGNORE_INDEX] * len(prompt) + opening))
    return out


def best_refusal_logprobs(
    model: Any,
    rows: Sequence[TokenizedRow],
    answers: RefusalAnswers,
    pad_token_id: int,
    max_tokens_per_batch: int = 4096,
    max_batch_size: int = 32,
) -> np.ndarray:
    """Per row, the best over the refusals of their opening's summed log-probability as its answer (NaN where the
    row has no prompt, or no room for the opening)."""
    asked = refusal_rows(rows, answers)
    means = mean_logprobs(model, asked, pad_token_id, max_tokens_per_batch, max_batch_size)
    values = (means * np.array([row.num_response_tokens for row in asked])).reshape(len(rows), len(answers.texts))
    found = np.isfinite(values).any(axis=1)
    best = np.full(len(rows), np.nan)
    best[found] = np.nanmax(values[found], axis=1)
    return best


def opening_logprobs(model: Any, rows: Sequence[TokenizedRow], pad_token_id: int, **batching: int) -> np.ndarray:
    """Per row, the summed log-probability of its own answer's first `OPENING_TOKENS` tokens (what a refusal's
    opening is compared with in `bench/detector_probe.py`'s margin)."""
    openings = []
    for row in rows:
        start = next((i for i, label in enumerate(row.labels) if label != IGNORE_INDEX), 0)
        end = start + OPENING_TOKENS
        openings.append(TokenizedRow(row.input_ids[:end], row.labels[:end]) if start else TokenizedRow([], []))
    means = mean_logprobs(model, openings, pad_token_id, **batching)
    return means * np.array([row.num_response_tokens for row in openings])


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
    answers = RefusalAnswers(tokenizer, texts, data.max_length)
    return best_refusal_logprobs(model, rows, answers, tokenizer.pad_token_id)
