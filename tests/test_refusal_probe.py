"""The forward-only refusal signal: each row's prompt asked with a refusal as its answer (in the chat template's form
or as plain text), and the batched log-likelihoods against a one-row-at-a-time reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError

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
    answers = RefusalAnswers(tokenizer, REFUSALS)
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
    answers = RefusalAnswers(tokenizer, REFUSALS)
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


def test_a_row_without_a_prompt_has_no_value_and_one_cut_after_its_prompt_still_gets_one(tiny_model, tokenizer):
    records = [{"prompt": "word " * 20, "completion": "fine and well"}, {"prompt": "hi", "completion": "hello"}]
    (whole,) = tokenize_records(records[:1], tokenizer, DataConfig(max_length=256), progress=False)
    prompt = whole.labels.index(next(t for t in whole.labels if t != -100))
    (cut,) = tokenize_records(records[:1], tokenizer, DataConfig(max_length=prompt + 1), progress=False)
    assert cut.truncated and cut.num_response_tokens == 1  # the refusal's opening goes past the length: nothing trains
    short = tokenize_records(records[1:], tokenizer, DataConfig(max_length=32), progress=False)
    unprompted = tokenize_records(records[1:], tokenizer, DataConfig(max_length=32, completion_only_loss=False))
    values = best_refusal_logprobs(
        tiny_model, [cut, *short, *unprompted], RefusalAnswers(tokenizer, ("No, never.",)), 0
    )
    assert np.isfinite(values[0]) and np.isfinite(values[1]) and np.isnan(values[2])


def test_tokens_a_template_puts_before_every_answer_are_asked_not_counted(tokenizer):
    import copy

    thinking = copy.deepcopy(tokenizer)
    thinking.chat_template = tokenizer.chat_template.replace(
        "'\n' + message['content']",
        "'\n' + ('<think></think>' if message['role'] == 'assistant' else '') + message['content']",
    )
    assert "<think>" in thinking.apply_chat_template(
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], tokenize=False
    )
    answers = RefusalAnswers(thinking, REFUSALS)
    think = thinking(text="<think></think>", add_special_tokens=False)["input_ids"]
    assert answers.chat_prefix == think
    plain = RefusalAnswers(tokenizer, REFUSALS)
    assert plain.chat_prefix == [] and answers.chat == plain.chat  # the same refusal tokens after the block
    (row,) = tokenize_records(chat_rows(1), thinking, DataConfig(max_length=128), progress=False)
    spliced = refusal_rows([row], answers)[0]
    start = spliced.labels.index(next(t for t in spliced.labels if t != -100))
    assert spliced.input_ids[start - len(think) : start] == think and len(spliced.input_ids) - start == OPENING_TOKENS


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
    answers = RefusalAnswers(tokenizer, PROBE_REFUSALS)
    expected = best_refusal_logprobs(model, rows, answers, tokenizer.pad_token_id)
    np.testing.assert_allclose(table.refusal_logprob[np.argsort(table.index)], expected, rtol=1e-4, atol=1e-5)
    assert np.isfinite(expected).all()

    # inspect lists the rows with the highest refusal_logprob, each on one line.
    capsys.readouterr()
    assert main(["inspect", str(probed), "--json", "--suspicious", "3"]) == 0
    listed = json.loads(capsys.readouterr().out)["suspicious"]
    top = np.argsort(-table.refusal_logprob, kind="stable")[:3]
    assert [row["index"] for row in listed] == [int(table.index[p]) for p in top]
    first = mixed_records[listed[0]["index"]]
    assert listed[0]["text"] == f"{first['prompt']} → {first['completion']}"
    assert main(["inspect", str(probed)]) == 0  # unasked: quantiles, no listing (it would read the data)
    text = capsys.readouterr().out
    assert "refusal_logprob" in text and "most suspicious rows" not in text
    moved = data.rename(tmp_path / "moved.jsonl")
    assert main(["inspect", str(probed), "--suspicious", "10", "--data", str(moved), "--label-column", "kind"]) == 2
    capsys.readouterr()  # the rows carry no `kind`: a user error, after the listing's own checks
    assert main(["inspect", str(probed), "--suspicious", "10", "--data", str(moved)]) == 0
    text = capsys.readouterr().out
    assert "most suspicious rows" in text and len([line for line in text.splitlines() if " → " in line]) == 10
    user_error(capsys, ["inspect", str(plain), "--suspicious", "3"], "no `refusal_logprob`", "--refusal-probe")
    user_error(capsys, ["inspect", str(probed), "--suspicious", "0"], "`--suspicious` must be >= 1", "e.g. 10")
    data = moved.rename(data)

    # `all` keeps every row the filter leaves: the rows whose refusal_logprob is at most the bound.
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


def test_the_probe_is_in_the_scores_identity_and_scoring_without_it_keeps_the_identity_it_had():
    plain = ScoringConfig().fingerprint()
    assert plain == "1419f4a708aabe0f"  # gradsift before the probe gave this default config this identity
    assert ScoringConfig(anchor_data="a.jsonl", refusal_probe=False).fingerprint() == plain  # (the anchor set's own
    # identity is the manifest's anchor_fingerprint)
    probed = ScoringConfig(refusal_probe=True).fingerprint()
    assert probed != plain and ScoringConfig(anchor_data="a.jsonl").fingerprint() == probed
    assert ScoringConfig(refusal_probe=True, refusal_texts=["No, I will not."]).fingerprint() != probed
    with pytest.raises(ValidationError, match="a refusal text is empty"):
        ScoringConfig(refusal_texts=["  "])


def test_a_recipe_runs_the_probe_only_where_a_selection_reads_it_and_never_online(tmp_path):
    from gradsift.continual import RecipeError, load_recipe
    from gradsift.continual.arms import random_subset
    from gradsift.continual.schema import TrainSpec, gradsift_config_for

    from conftest import recipe_dict, write_recipe

    arms = {"full": {}, "gradsift": {}, "detector": {"selection": {"rule": "all", "max_refusal_logprob": -2.5}}}
    arms["random"] = {"selection": {"max_refusal_logprob": -2.5}}
    recipe = load_recipe(write_recipe(tmp_path, recipe_dict(arms=arms, scoring={"anchor_data": "embedded:refusals"})))
    train = TrainSpec()
    probes = {
        (arm, k): gradsift_config_for(recipe, arm, train, k).scoring.probes_refusal()
        for arm in ("gradsift", "detector")
        for k in (1, 2)
    }
    # Stage 1's scores are shared, so they carry the probe every select arm may read; later only the reader's do.
    assert probes == {("gradsift", 1): True, ("detector", 1): True, ("gradsift", 2): False, ("detector", 2): True}
    assert random_subset(recipe, "random", 10, 4).keep.sum() == 4  # a random subset has no scores to filter on
    arms["detector"]["mode"] = "online"
    with pytest.raises(
        RecipeError, match="arms.detector: `max_refusal_logprob` filters on the refusal probe of offline"
    ):
        load_recipe(write_recipe(tmp_path, recipe_dict(arms=arms)))
