"""The forward-only refusal signal: a row's request asked with a refusal as its answer, in every row format, and the
batched log-likelihoods against a one-row-at-a-time reference."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from gradsift.config import DataConfig, ScoringConfig
from gradsift.errors import UserError
from gradsift.refusal_probe import answer_logprobs, refusal_logprobs, with_answer
from gradsift.scoring import score_rows
from gradsift.tokenization import tokenize_records

CHAT = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "How do I bake bread?"},
        {"role": "assistant", "content": "Mix, knead, proof, bake."},
    ]
}


def test_with_answer_replaces_only_the_answer_in_each_format():
    before = copy.deepcopy(CHAT)
    asked = with_answer(CHAT, "No.")
    assert asked["messages"][:2] == CHAT["messages"][:2] and asked["messages"][2] == {
        "role": "assistant",
        "content": "No.",
    }
    assert CHAT == before  # the row itself is untouched
    chat_pc = {"prompt": CHAT["messages"][:2], "completion": CHAT["messages"][2:]}
    assert with_answer(chat_pc, "No.") == {
        "prompt": CHAT["messages"][:2],
        "completion": [{"role": "assistant", "content": "No."}],
    }
    assert with_answer({"prompt": "Q: hi", "completion": "A: hello"}, "No.") == {
        "prompt": "Q: hi",
        "completion": "No.",
    }
    alpaca = {"instruction": "Add", "input": "2 and 2", "output": "4"}
    assert with_answer(alpaca, "No.") == {**alpaca, "output": "No."}
    with pytest.raises(UserError, match="pre-tokenized rows have no request"):
        with_answer({"input_ids": [1, 2], "labels": [1, 2]}, "No.")
    with pytest.raises(UserError, match="no assistant turn"):
        with_answer({"messages": [{"role": "user", "content": "hi"}]}, "No.")


def reference_logprob(model, tokenizer, record, data):
    """The mean log-probability of the row's answer tokens: one row, full logits, log_softmax by hand."""
    (row,) = tokenize_records([record], tokenizer, data, progress=False)
    ids = torch.tensor([row.input_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1].float()
    targets = torch.tensor(row.labels[1:])
    keep = targets != -100
    picked = torch.log_softmax(logits[keep], dim=-1).gather(1, targets[keep, None]).squeeze(1)
    return float(picked.mean())


def test_batched_refusal_and_answer_likelihoods_match_a_one_row_reference(tiny_model, tokenizer, mixed_records):
    tiny_model.eval()
    data = DataConfig(max_length=96)
    refusals = ("I can't help with that.", "No, I won't do that.", "Sorry.")
    records = mixed_records[:10]
    found = refusal_logprobs(tiny_model, tokenizer, records, data, refusals, max_tokens_per_batch=96, max_batch_size=3)
    expected = [
        max(reference_logprob(tiny_model, tokenizer, with_answer(record, text), data) for text in refusals)
        for record in records
    ]
    np.testing.assert_allclose(found, expected, rtol=1e-4, atol=1e-5)
    own = answer_logprobs(tiny_model, tokenizer, records, data, max_tokens_per_batch=96, max_batch_size=3)
    np.testing.assert_allclose(own, [reference_logprob(tiny_model, tokenizer, r, data) for r in records], rtol=1e-4)
    # The row's own answer's log-likelihood is minus the loss `gradsift score` records.
    rows = tokenize_records(records, tokenizer, data, progress=False)
    scored = score_rows(
        tiny_model, rows, ScoringConfig(param_scope="all", method="loop"), tokenizer.pad_token_id, progress=False
    )
    np.testing.assert_allclose(own, -np.asarray(scored.loss), rtol=1e-4)


def test_a_row_whose_refusal_is_cut_away_has_no_value(tiny_model, tokenizer):
    long = {"prompt": "word " * 200, "completion": "fine"}
    short = {"prompt": "hi", "completion": "hello"}
    values = refusal_logprobs(tiny_model, tokenizer, [long, short], DataConfig(max_length=32), ("No.",))
    assert np.isnan(values[0]) and np.isfinite(values[1])
