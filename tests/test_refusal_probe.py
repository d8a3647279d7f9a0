"""The forward-only refusal signal: each row's prompt asked with a refusal as its answer (in the chat template's form
or as plain text), and the batched log-likelihoods against a one-row-at-a-time reference."""

from __future__ import annotations

import numpy as np
import torch

from gradsift.config import DataConfig, ScoringConfig
from gradsift.refusal_probe import (
    OPENING_TOKENS,
    RefusalAnswers,
    best_refusal_logprobs,
    mean_logprobs,
    opening_logprobs,
    refusal_rows,
)
from gradsift.refusal_probe import REFUSALS as PROBE_REFUSALS
from gradsift.scoring import score_rows
from gradsift.tokenization import tokenize_records

REFUSALS = ("I can't help with that.", "No, I won't do that.", "Sorry.")


def with_refusal(record, text):
    """The row as its author would write it with `text` as the answer (the reference the token splice must match)."""
    if "messages" in record:
        return {"messages": [*record["messages"][:-1], {"role": "assistant", "content": text}]}
    completion = record["completion"]
    return {**record, "completion": [{"role": "assistant", "content": text}] if isinstance(completion, list) else text}


def reference_logprobs(model, tokenizer, record, data):
    """The log-probability of each of the row's answer tokens: one row, full logits, log_softmax by hand."""
    (row,) = tokenize_records([record], tokenizer, data, progress=False)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([row.input_ids])).logits[0, :-1].float()
    targets = torch.tensor(row.labels[1:])
    keep = targets != -100
    return torch.log_softmax(logits[keep], dim=-1).gather(1, targets[keep, None]).squeeze(1)


def chat_rows(count):
    return [
        {
            "messages": [
                {"role": "user", "content": f"Question {i}: how do I {'bake bread' if i % 2 else 'fix a tyre'}?"},
                {"role": "assistant", "content": "Step one. " * (1 + i % 4)},
            ]
        }
        for i in range(count)
    ]


def test_a_refusal_spliced_after_each_prompt_is_the_row_written_with_that_refusal(tokenizer, mixed_records):
    data = DataConfig(max_length=128)
    answers = RefusalAnswers(tokenizer, REFUSALS, data.max_length)
    for records in (chat_rows(4), mixed_records[:4]):  # chat rows, and plain prompt/completion rows
        rows = tokenize_records(records, tokenizer, data, progress=False)
        spliced = refusal_rows(rows, answers)
        assert len(spliced) == len(rows) * len(REFUSALS)
        for i, record in enumerate(records):
            for k, text in enumerate(REFUSALS):
                (expected,) = tokenize_records([with_refusal(record, text)], tokenizer, data, progress=False)
                got = spliced[i * len(REFUSALS) + k]
                assert got.input_ids == expected.input_ids[: len(got.input_ids)]
                answer = [t for t in expected.labels if t != -100]
                assert [t for t in got.labels if t != -100] == answer[:OPENING_TOKENS] and len(answer) > OPENING_TOKENS


def test_batched_refusal_likelihoods_match_a_one_row_reference(tiny_model, tokenizer, mixed_records):
    tiny_model.eval()
    data = DataConfig(max_length=96)
    records = chat_rows(6) + mixed_records[:6]
    rows = [
        row for part in (records[:6], records[6:]) for row in tokenize_records(part, tokenizer, data, progress=False)
    ]
    answers = RefusalAnswers(tokenizer, REFUSALS, 96)
    found = best_refusal_logprobs(tiny_model, rows, answers, tokenizer.pad_token_id, 96, 3)
    expected = [
        max(
            float(reference_logprobs(tiny_model, tokenizer, with_refusal(record, text), data)[:OPENING_TOKENS].sum())
            for text in REFUSALS
        )
        for record in records
    ]
    np.testing.assert_allclose(found, expected, rtol=1e-4, atol=1e-5)
    openings = opening_logprobs(tiny_model, rows, tokenizer.pad_token_id, max_tokens_per_batch=96, max_batch_size=3)
    expected = [float(reference_logprobs(tiny_model, tokenizer, r, data)[:OPENING_TOKENS].sum()) for r in records]
    np.testing.assert_allclose(openings, expected, rtol=1e-4, atol=1e-5)
    # A row's own answer's mean log-likelihood is minus the loss `gradsift score` records.
    own = mean_logprobs(tiny_model, rows, tokenizer.pad_token_id, 96, 3)
    scored = score_rows(
        tiny_model, rows, ScoringConfig(param_scope="all", method="loop"), tokenizer.pad_token_id, progress=False
    )
    np.testing.assert_allclose(own, -np.asarray(scored.loss), rtol=1e-4)


def test_a_row_without_a_prompt_or_without_room_for_the_refusal_has_no_value(tiny_model, tokenizer):
    data = DataConfig(max_length=32)
    records = [{"prompt": "word " * 200, "completion": "fine"}, {"prompt": "hi", "completion": "hello"}]
    rows = tokenize_records(records, tokenizer, data, progress=False)
    unprompted = tokenize_records(records[1:], tokenizer, DataConfig(max_length=32, completion_only_loss=False))
    values = best_refusal_logprobs(tiny_model, rows + unprompted, RefusalAnswers(tokenizer, ("No.",), 32), 0)
    assert np.isnan(values[0]) and np.isfinite(values[1]) and np.isnan(values[2])


def test_score_with_the_refusal_probe_gives_each_row_its_refusal_likelihood_and_select_filters_by_it(
    tmp_path, tiny_model_dir, tokenizer, mixed_records, capsys
):
    import json

    from transformers import AutoModelForCausalLM

    from gradsift.cli import main
    from gradsift.store import load_finished_scores
    from test_cli import score_args, user_error

    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in mixed_records))
    plain, probed = tmp_path / "plain", tmp_path / "probed"
    assert main(score_args(tiny_model_dir, data, plain)) == 0
    assert main(score_args(tiny_model_dir, data, probed, "--refusal-probe", "--max-length", "96")) == 0
    assert np.isnan(load_finished_scores(plain)[1].refusal_logprob).all()
    table = load_finished_scores(probed)[1]
    # The fresh LoRA changes nothing yet: the column is the model's own refusal likelihood, asked directly.
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    rows = tokenize_records(mixed_records, tokenizer, DataConfig(max_length=96), progress=False)
    answers = RefusalAnswers(tokenizer, PROBE_REFUSALS, 96)
    expected = best_refusal_logprobs(model, rows, answers, tokenizer.pad_token_id)
    np.testing.assert_allclose(table.refusal_logprob[np.argsort(table.index)], expected, rtol=1e-4, atol=1e-5)
    assert np.isfinite(expected).all()

    # inspect lists the rows with the highest margin, each on one line.
    capsys.readouterr()
    assert main(["inspect", str(probed), "--json", "--suspicious", "3"]) == 0
    listed = json.loads(capsys.readouterr().out)["suspicious"]["rows"]
    top = np.argsort(-table.refusal_logprob, kind="stable")[:3]
    assert [row["index"] for row in listed] == [int(table.index[p]) for p in top]
    first = mixed_records[listed[0]["index"]]
    assert listed[0]["text"] == f"{first['prompt']} → {first['completion']}"
    assert main(["inspect", str(probed)]) == 0  # the default: 10 rows, as text
    text = capsys.readouterr().out
    assert "most suspicious rows" in text and len([line for line in text.splitlines() if " → " in line]) == 10
    data.rename(tmp_path / "moved.jsonl")  # unasked, a listing whose data moved is a note, not an error
    assert main(["inspect", str(probed)]) == 0
    assert "suspicious rows: none listed (the scored data is not at hand" in capsys.readouterr().out
    user_error(capsys, ["inspect", str(plain), "--suspicious", "3"], "no `refusal_logprob`", "--refusal-probe")
    data = (tmp_path / "moved.jsonl").rename(data)

    # `all` keeps every row the filter leaves: the rows whose margin is at most the bound.
    bound = float(np.median(table.refusal_logprob))
    kept = tmp_path / "kept.jsonl"
    capsys.readouterr()
    assert main(["select", str(probed), "--rule", "all", "--max-refusal-logprob", str(bound), "--out", str(kept)]) == 0
    kept_rows = [json.loads(line) for line in kept.read_text().splitlines()]
    expected_kept = sorted(int(i) for i, m in zip(table.index, table.refusal_logprob) if m <= bound)
    assert kept_rows == [mixed_records[i] for i in expected_kept] and 0 < len(kept_rows) < len(mixed_records)
    dropped = [json.loads(line) for line in (tmp_path / "dropped.jsonl").read_text().splitlines()]
    assert {entry["reason"] for entry in dropped} == {"refusal_likely"}

    def select(scores, bound, name):
        return [
            "select",
            str(scores),
            "--rule",
            "all",
            "--max-refusal-logprob",
            str(bound),
            "--out",
            str(tmp_path / name),
        ]

    needs = "`selection.max_refusal_logprob` needs each row's `refusal_logprob`"
    user_error(capsys, select(plain, 0, "k2.jsonl"), needs, "--refusal-probe")
    lowest = float(np.min(table.refusal_logprob)) - 1
    user_error(capsys, select(probed, lowest, "k3.jsonl"), "drops every one of the 24 scored rows", "raise it")


def test_a_score_table_written_before_the_refusal_column_reads_with_none(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from gradsift.store import read_table

    old = {"index": [0, 1], "sample_id": ["a", "b"], "loss": [1.0, 2.0], "grad_norm": [0.5, 0.7], "num_tokens": [9, 9],
           "num_response_tokens": [3, 4], "truncated": [False, False], "status": ["ok", "ok"],
           "anchor_dot": [float("nan")] * 2, "anchor_cos": [float("nan")] * 2}  # fmt: skip
    pq.write_table(pa.table(old), tmp_path / "old.parquet")
    table = read_table(tmp_path / "old.parquet")
    assert np.isnan(table.refusal_logprob).all()
