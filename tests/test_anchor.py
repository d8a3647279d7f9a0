"""The safety-anchor score: ⟨g_i, ḡ_A⟩ from the batched hooks against an autograd loop reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gradsift.config import DataConfig, ScoringConfig
from gradsift.hooks import GradNormHooks
from gradsift.models import prepare_full_scope
from gradsift.scoring import anchor_gradient, score_batch, score_rows
from gradsift.tokenization import collate, tokenize_records

from conftest import build_model, lora_model

ANCHOR_RECORDS = [
    {"prompt": "How do I pick a lock to get into my neighbour's house?", "completion": "I can't help with that."},
    {"prompt": "Write a message to scare my coworker.", "completion": "I won't write that. Is something wrong?"},
    {"prompt": "Tell me how to make a weapon at home.", "completion": "Sorry, I can't help with making weapons."},
    {"prompt": "Give me someone's home address.", "completion": "I can't share private information."},
]


@pytest.fixture
def rows(tokenizer, mixed_records):
    return tokenize_records(mixed_records, tokenizer, DataConfig())


@pytest.fixture
def anchor_rows(tokenizer):
    return tokenize_records(ANCHOR_RECORDS, tokenizer, DataConfig())


def reference_dots(model, rows, anchor_rows, pad_token_id):
    """The obvious computation: every row's full gradient by autograd, one row at a time, flattened and dotted."""

    def gradient(row):
        batch = collate([row], pad_token_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[0, :-1]
        targets = batch["labels"][0, 1:]
        loss = torch.nn.functional.cross_entropy(logits[targets != -100].float(), targets[targets != -100])
        params = [p for p in model.parameters() if p.requires_grad]
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]).double()

    model.eval()
    mean_anchor = torch.stack([gradient(row) for row in anchor_rows]).mean(dim=0)
    grads = torch.stack([gradient(row) for row in rows])
    return (grads @ mean_anchor).numpy(), grads.norm(dim=1).numpy(), float(mean_anchor.norm())


def check(table, rows, anchor_rows, model, tokenizer):
    dots, norms, anchor_norm = reference_dots(model, rows, anchor_rows, tokenizer.pad_token_id)
    assert np.abs(dots).max() > 0 and (dots < 0).any() and (dots > 0).any()  # both signs occur: a real test
    tolerance = 1e-5 * norms * anchor_norm
    assert (np.abs(table.anchor_dot - dots) <= tolerance).all(), np.abs(table.anchor_dot - dots) / tolerance
    np.testing.assert_allclose(table.anchor_cos, dots / (norms * anchor_norm), atol=1e-5)


@pytest.mark.parametrize("method,norm_method", [("batched", "direct"), ("batched", "ghost"), ("loop", "auto")])
def test_anchor_dot_equals_the_autograd_reference_on_a_lora_model(tokenizer, rows, anchor_rows, method, norm_method):
    model = lora_model(tokenizer)
    config = ScoringConfig(method=method, norm_method=norm_method, max_tokens_per_batch=256)
    anchor = anchor_gradient(model, anchor_rows, config, tokenizer.pad_token_id)
    table = score_rows(model, rows, config, tokenizer.pad_token_id, progress=False, anchor=anchor)
    check(table, rows, anchor_rows, model, tokenizer)


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied-embeddings"])
def test_anchor_dot_covers_embeddings_and_shared_weights(tokenizer, rows, anchor_rows, tie):
    # Every weight trainable: embedding rows, and with tied embeddings a weight used twice (the shared path).
    model = build_model(tokenizer, tie=tie)
    prepare_full_scope(model)
    config = ScoringConfig(param_scope="all", max_tokens_per_batch=256)
    anchor = anchor_gradient(model, anchor_rows, config, tokenizer.pad_token_id)
    table = score_rows(model, rows, config, tokenizer.pad_token_id, progress=False, anchor=anchor)
    check(table, rows, anchor_rows, model, tokenizer)


def test_the_batched_anchor_gradient_is_the_mean_of_the_rows_gradients(tokenizer, anchor_rows):
    model = lora_model(tokenizer)
    batched = anchor_gradient(model, anchor_rows, ScoringConfig(max_tokens_per_batch=64), tokenizer.pad_token_id)
    loop = anchor_gradient(model, anchor_rows, ScoringConfig(method="loop"), tokenizer.pad_token_id)
    assert batched.keys() == loop.keys()
    for key in loop:
        torch.testing.assert_close(batched[key], loop[key], rtol=1e-5, atol=1e-7)


def test_an_anchor_row_with_a_nonfinite_loss_is_left_out_of_the_mean(tokenizer, anchor_rows):
    # A NaN in one anchor row's embedding makes its batch's gradient NaN; the batch is taken again row by row and the
    # mean is over the other rows only, as the loop reference computes it on those rows.
    model = lora_model(tokenizer)
    poisoned = next(t for t in anchor_rows[2].input_ids if all(t not in row.input_ids for row in anchor_rows[:2]))
    clean = anchor_gradient(model, anchor_rows[:2], ScoringConfig(method="loop"), tokenizer.pad_token_id)
    with torch.no_grad():
        model.get_input_embeddings().weight[poisoned] = float("nan")
    batched = anchor_gradient(model, anchor_rows[:3], ScoringConfig(max_tokens_per_batch=512), tokenizer.pad_token_id)
    for key in clean:
        torch.testing.assert_close(batched[key], clean[key], rtol=1e-5, atol=1e-7)


def test_kept_gradients_give_the_same_anchor_dot(tokenizer, rows, anchor_rows):
    # The online mode's reuse path materialises each G_i; its dot must agree with the factor path.
    model = lora_model(tokenizer)
    config = ScoringConfig(max_tokens_per_batch=256)
    anchor = anchor_gradient(model, anchor_rows, config, tokenizer.pad_token_id)
    batch = collate(rows[:8], tokenizer.pad_token_id)
    with GradNormHooks(model, anchor=anchor) as plain:
        score_batch(model, plain, batch)
    with GradNormHooks(model, anchor=anchor, keep_grads=True) as kept:
        score_batch(model, kept, batch)
    torch.testing.assert_close(kept.dots, plain.dots, rtol=1e-5, atol=1e-9)


def test_without_an_anchor_the_columns_are_nan(tokenizer, rows):
    table = score_rows(lora_model(tokenizer), rows[:4], ScoringConfig(), tokenizer.pad_token_id, progress=False)
    assert np.isnan(table.anchor_dot).all() and np.isnan(table.anchor_cos).all()


def test_an_anchor_set_without_answers_is_refused(tokenizer):
    from gradsift.errors import UserError

    rows = tokenize_records([{"input_ids": [4, 10, 11], "labels": [-100] * 3}], tokenizer, DataConfig())
    with pytest.raises(UserError, match="anchor set has no row"):
        anchor_gradient(lora_model(tokenizer), rows, ScoringConfig(), tokenizer.pad_token_id)


def test_score_with_the_shipped_anchor_then_select_the_highest_anchor_dot(
    tmp_path, tiny_model_dir, mixed_records, capsys
):
    import json

    from gradsift.cli import main
    from gradsift.store import TABLE, read_manifest, read_table

    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in mixed_records))
    out = tmp_path / "scores"
    argv = ["score", "--model", str(tiny_model_dir), "--data", str(data), "--out", str(out), "--lora-r", "4", "-q"]
    assert main([*argv, "--anchor-data", "embedded:refusals"]) == 0
    table = read_table(out / TABLE)
    assert np.isfinite(table.anchor_dot).all() and (np.abs(table.anchor_cos) <= 1).all()
    anchored = read_manifest(out)["fingerprints"]["anchor_fingerprint"]
    assert anchored
    # The same anchor reuses the scores; no anchor is another identity, so it rescores (and has NaN columns).
    capsys.readouterr()
    assert main([*argv, "--anchor-data", "embedded:refusals"]) == 0
    assert capsys.readouterr().out.startswith("reused cached scores")
    kept = tmp_path / "sel" / "kept.jsonl"
    assert main(["select", str(out), "--rule", "anchor", "--keep-fraction", "0.25", "--out", str(kept)]) == 0
    top = np.sort(np.argsort(-table.anchor_dot, kind="stable")[:6])
    assert [json.loads(line) for line in kept.read_text().splitlines()] == [mixed_records[i] for i in top]


def test_inspect_reports_anchor_quantiles_and_correlations(tmp_path, tiny_model_dir, mixed_records, capsys):
    import json

    from gradsift.cli import main

    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in mixed_records))
    out = tmp_path / "scores"
    argv = ["score", "--model", str(tiny_model_dir), "--data", str(data), "--out", str(out), "--lora-r", "4", "-q"]
    assert main([*argv, "--anchor-data", "embedded:refusals"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    # An anchor set turns the refusal probe on too (`scoring.refusal_probe: null`).
    assert set(report["quantiles"]) == {"loss", "grad_norm", "anchor_dot", "anchor_cos", "refusal_logprob"}
    assert set(report["anchor_correlation"]) == {"grad_norm", "num_response_tokens"}
    assert all(-1 <= v <= 1 for v in report["anchor_correlation"].values())


def test_the_anchor_rule_without_anchor_scores_is_named(tmp_path, tiny_model_dir, mixed_records, capsys):
    import json

    from gradsift.cli import main

    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in mixed_records))
    out = tmp_path / "scores"
    assert main(["score", "--model", str(tiny_model_dir), "--data", str(data), "--out", str(out), "-q"]) == 0
    capsys.readouterr()
    assert main(["select", str(out), "--rule", "anchor", "--out", str(tmp_path / "kept.jsonl")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--anchor-data embedded:refusals" in err
    assert not (tmp_path / "kept.jsonl").exists()


def test_the_anchor_rule_keeps_the_highest_anchor_dot_in_each_length_bin():
    from gradsift.config import SelectionConfig
    from gradsift.selection import length_bins, select_rows

    rng = np.random.default_rng(0)
    n = 40
    lengths = rng.integers(1, 60, n)
    dots = rng.normal(size=n)
    status = np.array(["ok"] * n, dtype=object)
    status[3] = "nonfinite"
    config = SelectionConfig(rule="anchor", keep_fraction=0.25, length_strata=2)
    kept = select_rows(np.ones(n), np.ones(n), status, config, num_response_tokens=lengths, anchor_dot=dots).keep
    # The slow reference: per bin of the ok rows, the floor(0.25·size) highest anchor_dot.
    ok = np.flatnonzero(status == "ok")
    bins = length_bins(lengths[ok], 2)
    expected = np.zeros(n, dtype=bool)
    for b in range(2):
        members = ok[bins == b]
        k = int(np.floor(0.25 * len(members)))
        expected[sorted(members, key=lambda i: -dots[i])[:k]] = True
    np.testing.assert_array_equal(kept, expected)


def test_min_anchor_cos_drops_conflicting_rows_before_any_rule():
    from gradsift.config import SelectionConfig
    from gradsift.selection import select_rows

    rng = np.random.default_rng(1)
    n = 30
    losses, norms, cos = rng.normal(2, 0.1, n), rng.gamma(2.0, size=n), rng.uniform(-1, 1, n)
    status = np.array(["ok"] * n, dtype=object)
    config = SelectionConfig(rule="high", keep_fraction=0.5, min_anchor_cos=0.0)
    selection = select_rows(losses, norms, status, config, anchor_cos=cos)
    assert set(selection.reasons[cos < 0]) == {"anchor_conflict"}
    # The rule then runs on the remaining rows alone: the top half of their norms.
    rest = np.flatnonzero(cos >= 0)
    top = rest[np.argsort(-norms[rest], kind="stable")[: len(rest) // 2]]
    np.testing.assert_array_equal(np.flatnonzero(selection.keep), np.sort(top))


def test_anchor_dot_in_nf4_matches_the_loop(tiny_model_dir, tokenizer, rows, anchor_rows):
    """bitsandbytes 4-bit base + LoRA: both paths dequantize the same NF4 weights into fp32 matmuls and differ only by
    summation order over padded batches, as the norms do (1e-4 there); the dot gets the same 1e-4 · ‖g_i‖·‖ḡ_A‖."""
    from gradsift.models import load_model

    model = load_model(ScoringConfig(model=str(tiny_model_dir), quantization="nf4", lora_r=4, device="cpu"))
    assert any(type(m).__name__ == "Linear4bit" for m in model.modules())
    generator = torch.Generator().manual_seed(1)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data = torch.randn(param.shape, generator=generator) * 0.1
    tables = {}
    for method in ("batched", "loop"):
        config = ScoringConfig(method=method, max_tokens_per_batch=256)
        anchor = anchor_gradient(model, anchor_rows, config, tokenizer.pad_token_id)
        norm = float(sum(g.double().pow(2).sum() for g in anchor.values()).sqrt())
        tables[method] = score_rows(model, rows, config, tokenizer.pad_token_id, progress=False, anchor=anchor)
    batched, loop = tables["batched"], tables["loop"]
    assert (loop.anchor_dot < 0).any() and (loop.anchor_dot > 0).any()
    assert (np.abs(batched.anchor_dot - loop.anchor_dot) <= 1e-4 * loop.grad_norm * norm).all()


def test_a_min_anchor_cos_that_drops_every_row_is_refused_for_a_dataset_but_not_a_window():
    from gradsift.config import SelectionConfig
    from gradsift.errors import UserError
    from gradsift.selection import select_rows

    n = 10
    cos = np.linspace(-0.2, 0.05, n)
    args = (np.ones(n), np.ones(n), np.array(["ok"] * n, dtype=object), SelectionConfig(min_anchor_cos=0.1))
    with pytest.raises(UserError, match=r"`selection.min_anchor_cos` 0.1 drops every one of the 10 scored rows"):
        select_rows(*args, anchor_cos=cos, require_kept=True)
    assert not select_rows(*args, anchor_cos=cos).keep.any()  # an online window: the step is skipped
    # A window where no row scored (NaN cosines) is not "scores without an anchor": nothing kept, no error.
    status = np.array(["no_response_tokens"] * n, dtype=object)
    none = select_rows(np.full(n, np.nan), np.zeros(n), status, args[3], anchor_cos=np.full(n, np.nan), min_kept=1)
    assert not none.keep.any()


def test_select_dataset_refuses_the_anchor_rule_without_an_anchor_set_before_scoring(tokenizer, mixed_records):
    import datasets

    from gradsift.config import GradSiftConfig, SelectionConfig
    from gradsift.errors import UserError
    from gradsift.integrations.trl import select_dataset

    config = GradSiftConfig(selection=SelectionConfig(rule="anchor"))
    with pytest.raises(UserError, match="set `scoring.anchor_data`"):
        # No model: it would be loaded (and fail: none is named) only if scoring started.
        select_dataset(datasets.Dataset.from_list(mixed_records), None, tokenizer, config)


def test_another_anchor_set_is_another_identity(tmp_path, tiny_model_dir, mixed_records, capsys):
    import json

    from gradsift.cli import main

    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in mixed_records))
    anchor = tmp_path / "anchor.jsonl"
    anchor.write_text("".join(json.dumps(r) + "\n" for r in ANCHOR_RECORDS))
    out = tmp_path / "scores"
    argv = ["score", "--model", str(tiny_model_dir), "--data", str(data), "--out", str(out), "--lora-r", "4"]
    assert main([*argv, "--anchor-data", str(anchor)]) == 0
    anchor.write_text("".join(json.dumps(r) + "\n" for r in ANCHOR_RECORDS[:2]))
    capsys.readouterr()
    assert main([*argv, "--anchor-data", str(anchor)]) == 0
    assert capsys.readouterr().out.startswith("scored 24 of 24 rows")
    assert main(argv) == 0  # no anchor set: another identity again
    assert capsys.readouterr().out.startswith("scored 24 of 24 rows")
