"""The online mode (the paper's Algorithm 1) in `GradSiftSFTTrainer`: each step scores its window, keeps rows by the
core rule and trains on them, with the `reuse` update equal to a plain step on the kept rows."""

from __future__ import annotations

import json

import datasets
import pytest
import torch
from trl import SFTTrainer

from gradsift.config import DataConfig, GradSiftConfig, ScoringConfig, SelectionConfig
from gradsift.integrations.trl import GradSiftSFTTrainer, data_config_for
from gradsift.scoring import score_rows
from gradsift.selection import select_rows
from gradsift.tokenization import tokenize_records

from conftest import lora_model, sft_config


def online_config(keep_fraction=0.5, window="step"):
    return GradSiftConfig(
        mode="online", selection=SelectionConfig(keep_fraction=keep_fraction), online={"window": window}
    )


def lora_state(model):
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(
    "update, checkpointing, accumulation",
    [
        ("reuse", False, 1),
        ("reuse", True, 1),
        ("reuse", False, 2),
        ("recompute", False, 1),
        ("recompute", True, 2),
    ],
)
def test_online_step_equals_a_plain_step_on_the_kept_rows(
    tmp_path, tokenizer, mixed_records, update, checkpointing, accumulation
):
    dataset = datasets.Dataset.from_list(mixed_records[:8])
    batch = 8 // accumulation
    args = sft_config(
        tmp_path,
        gradient_checkpointing=checkpointing,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation,
    )

    model = lora_model(tokenizer)
    start = lora_state(model)
    config = online_config()
    config.online.update = update
    trainer = GradSiftSFTTrainer(
        model=model, args=args, train_dataset=dataset, processing_class=tokenizer, gradsift_config=config
    )
    assert trainer.gradsift_reuse == (update == "reuse")
    trainer.train()
    online_delta = {name: p.detach() - start[name] for name, p in lora_state(model).items()}
    step = json.loads((tmp_path / "out" / "gradsift_online.jsonl").read_text().splitlines()[0])
    assert step["rows"] == 8 and step["kept"] == 4

    ids = [
        row.sample_id for row in tokenize_records(mixed_records[:8], tokenizer, data_config_for(DataConfig(), args))
    ]
    kept_positions = [ids.index(sample_id) for sample_id in step["kept_ids"]]
    plain_model = lora_model(tokenizer)
    plain = SFTTrainer(
        model=plain_model,
        args=sft_config(tmp_path / "plain", gradient_checkpointing=checkpointing),
        train_dataset=dataset.select(kept_positions),
        processing_class=tokenizer,
    )
    plain.train()
    plain_delta = {name: p.detach() - start[name] for name, p in lora_state(plain_model).items()}
    assert max(float(d.abs().max()) for d in online_delta.values()) > 1e-3  # the step did move the weights
    worst = max(float((online_delta[name] - plain_delta[name]).abs().max()) for name in online_delta)
    assert worst <= 1e-6
    # The logged training loss is the kept rows' loss, as the plain trainer reports it.
    online_loss = next(e["loss"] for e in trainer.state.log_history if "loss" in e)
    plain_loss = next(e["loss"] for e in plain.state.log_history if "loss" in e)
    assert online_loss == pytest.approx(plain_loss, rel=1e-5)


def test_reuse_is_refused_with_the_reason_when_the_loss_is_not_cross_entropy(tmp_path, tokenizer, mixed_records):
    config = online_config()
    config.online.update = "reuse"
    with pytest.raises(ValueError, match="'reuse' is not possible here: the loss is not plain token cross-entropy"):
        GradSiftSFTTrainer(
            model=lora_model(tokenizer),
            args=sft_config(tmp_path, label_smoothing_factor=0.1),
            train_dataset=datasets.Dataset.from_list(mixed_records[:8]),
            processing_class=tokenizer,
            gradsift_config=config,
        )
    config.online.update = "auto"
    trainer = GradSiftSFTTrainer(
        model=lora_model(tokenizer),
        args=sft_config(tmp_path, label_smoothing_factor=0.1),
        train_dataset=datasets.Dataset.from_list(mixed_records[:8]),
        processing_class=tokenizer,
        gradsift_config=config,
    )
    assert not trainer.gradsift_reuse


@pytest.mark.parametrize(
    "anchor,selection",
    [(None, {}), ("embedded:refusals", {"rule": "anchor"}), ("embedded:refusals", {"min_anchor_cos": 0.0})],
    ids=["moderate", "anchor", "moderate-min-anchor-cos"],
)
def test_online_selection_equals_the_core_rule_on_loop_reference_scores(
    tmp_path, tokenizer, mixed_records, anchor, selection
):
    from gradsift.anchors import anchor_rows
    from gradsift.scoring import anchor_gradient

    records = mixed_records[:8]
    args = sft_config(tmp_path)
    model = lora_model(tokenizer)
    data = data_config_for(DataConfig(), args)
    rows = tokenize_records(records, tokenizer, data)
    loop_config = ScoringConfig(method="loop", anchor_data=anchor)
    mean = None
    if anchor is not None:
        mean = anchor_gradient(model, anchor_rows(anchor, tokenizer, data), loop_config, tokenizer.pad_token_id)
    loop = score_rows(model, rows, loop_config, tokenizer.pad_token_id, progress=False, anchor=mean)
    config = GradSiftConfig(
        mode="online",
        scoring={"anchor_data": anchor},
        selection=SelectionConfig(keep_fraction=0.5, **selection),
        online={"window": "step"},
    )
    expected = select_rows(loop.loss, loop.grad_norm, loop.status, config.selection, anchor_dot=loop.anchor_dot,
                           anchor_cos=loop.anchor_cos)  # fmt: skip
    assert 0 < expected.num_kept < 8
    trainer = GradSiftSFTTrainer(
        model=model,
        args=args,
        train_dataset=datasets.Dataset.from_list(records),
        processing_class=tokenizer,
        gradsift_config=config,
    )
    trainer.train()
    step = json.loads((tmp_path / "out" / "gradsift_online.jsonl").read_text().splitlines()[0])
    assert sorted(step["kept_ids"]) == sorted(loop.sample_id[expected.keep].tolist())
    assert step["dropped"] == expected.counts()


def test_the_anchor_rule_online_needs_an_anchor_set(tmp_path, tokenizer, mixed_records):
    from gradsift.errors import UserError

    with pytest.raises(UserError, match="set `scoring.anchor_data`"):
        GradSiftSFTTrainer(
            model=lora_model(tokenizer),
            args=sft_config(tmp_path),
            train_dataset=datasets.Dataset.from_list(mixed_records[:8]),
            processing_class=tokenizer,
            gradsift_config=GradSiftConfig(mode="online", selection=SelectionConfig(rule="anchor", keep_fraction=0.5)),
        )


@pytest.mark.parametrize("refresh,expected_steps", [(None, [0, 2]), (1, [0, 1, 2, 3])])
def test_the_online_anchor_gradient_is_taken_each_epoch_or_every_n_steps(
    tmp_path, tokenizer, mixed_records, monkeypatch, refresh, expected_steps
):
    import gradsift.online

    taken = []
    real = gradsift.online.anchor_gradient

    def counting(model, rows, config, pad_token_id):
        taken.append(trainer.state.global_step)
        return real(model, rows, config, pad_token_id)

    monkeypatch.setattr(gradsift.online, "anchor_gradient", counting)
    args = sft_config(tmp_path, per_device_train_batch_size=4, max_steps=-1, num_train_epochs=2)
    config = GradSiftConfig(
        mode="online",
        scoring={"anchor_data": "embedded:refusals"},
        selection=SelectionConfig(rule="anchor", keep_fraction=0.5),
        online={"anchor_refresh_steps": refresh},
    )
    trainer = GradSiftSFTTrainer(
        model=lora_model(tokenizer),
        args=args,
        train_dataset=datasets.Dataset.from_list(mixed_records[:8]),
        processing_class=tokenizer,
        gradsift_config=config,
    )
    trainer.train()
    assert trainer.state.global_step == 4 and taken == expected_steps


def test_micro_batch_window_selects_inside_each_micro_batch(tmp_path, tokenizer, mixed_records):
    args = sft_config(tmp_path, per_device_train_batch_size=4, gradient_accumulation_steps=2)
    trainer = GradSiftSFTTrainer(
        model=lora_model(tokenizer),
        args=args,
        train_dataset=datasets.Dataset.from_list(mixed_records[:8]),
        processing_class=tokenizer,
        gradsift_config=online_config(keep_fraction=0.5, window="micro_batch"),
    )
    trainer.train()
    step = json.loads((tmp_path / "out" / "gradsift_online.jsonl").read_text().splitlines()[0])
    assert step["rows"] == 8 and step["kept"] == 4  # 2 of each micro-batch of 4
    logged = [entry for entry in trainer.state.log_history if "gradsift/kept_fraction" in entry]
    assert logged and logged[0]["gradsift/kept_fraction"] == 0.5


def test_a_window_that_keeps_no_row_fails_at_start(tmp_path, tokenizer, mixed_records):
    args = sft_config(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=2)
    with pytest.raises(ValueError, match="`selection.keep_fraction` 0.2 keeps no row of a selection window of 4 rows"):
        GradSiftSFTTrainer(
            model=lora_model(tokenizer),
            args=args,
            train_dataset=datasets.Dataset.from_list(mixed_records),
            processing_class=tokenizer,
            gradsift_config=online_config(keep_fraction=0.2),
        )


@pytest.mark.parametrize("rule", ["moderate", "random", "high", "low", "anchor"])
def test_every_fraction_rule_whose_window_keeps_no_row_fails_the_start_up_check(rule):
    from gradsift.online import check_online_config

    scoring = ScoringConfig(anchor_data="embedded:refusals") if rule == "anchor" else ScoringConfig()
    config = GradSiftConfig(mode="online", scoring=scoring, selection=SelectionConfig(rule=rule, keep_fraction=0.2))
    with pytest.raises(ValueError, match="`selection.keep_fraction` 0.2 keeps no row of a selection window of 4 rows"):
        check_online_config(config, micro_batch_size=2, gradient_accumulation_steps=2)
    assert check_online_config(config, micro_batch_size=5, gradient_accumulation_steps=1) == 5  # 0.2 × 5 keeps 1


def test_steps_without_response_tokens_are_skipped_and_counted(tmp_path, tokenizer, caplog):
    rows = [{"input_ids": [4, 10 + i, 11, 12, 5], "labels": [-100] * 5} for i in range(8)]
    # TRL drops fully masked rows while preparing a dataset; hand it the rows as they are.
    args = sft_config(
        tmp_path,
        per_device_train_batch_size=4,
        max_steps=-1,
        num_train_epochs=1,
        dataset_kwargs={"skip_prepare_dataset": True},
    )
    model = lora_model(tokenizer)
    start = lora_state(model)
    trainer = GradSiftSFTTrainer(
        model=model,
        args=args,
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=tokenizer,
        gradsift_config=online_config(),
    )
    trainer.train()
    assert trainer.gradsift_skipped_steps == 2
    assert "had no row to keep: none of its rows could be scored (4 no_response_tokens)" in caplog.text
    assert all(torch.equal(p, start[name]) for name, p in lora_state(model).items())
    # Strict JSON (no bare NaN): a window without a scored row has no norm quantiles.
    record = json.loads(
        (tmp_path / "out" / "gradsift_online.jsonl").read_text().splitlines()[0], parse_constant=strict_constant
    )
    assert record["kept"] == 0 and record["dropped"] == {"no_response_tokens": 4}
    assert record["grad_norm_q50"] is None


def strict_constant(name):
    raise AssertionError(f"not strict JSON: {name}")


def test_a_window_with_few_scoreable_rows_still_keeps_one(tmp_path, tokenizer, caplog):
    # keep_fraction 0.25 of a 4-row window passes the start-up check (⌊0.25·4⌋ = 1); with only 2 rows scoring,
    # ⌊0.25·2⌋ = 0, but a window keeps at least one row whenever one scores: the step trains, nothing is skipped.
    rows = [{"input_ids": [4, 10 + i, 11, 12, 5], "labels": [-100] * 5} for i in range(2)]
    rows += [{"input_ids": [4, 20 + i, 11, 12, 5], "labels": [-100, -100, 11, 12, 5]} for i in range(2)]
    args = sft_config(tmp_path, per_device_train_batch_size=4, dataset_kwargs={"skip_prepare_dataset": True})
    model = lora_model(tokenizer)
    start = lora_state(model)
    trainer = GradSiftSFTTrainer(
        model=model,
        args=args,
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=tokenizer,
        gradsift_config=online_config(keep_fraction=0.25),
    )
    trainer.train()
    record = json.loads((tmp_path / "out" / "gradsift_online.jsonl").read_text().splitlines()[0])
    assert record["rows"] == 4 and record["kept"] == 1
    assert record["dropped"] == {"no_response_tokens": 2, "far_from_median": 1}
    assert trainer.gradsift_skipped_steps == 0 and "no row to keep" not in caplog.text
    assert any(not torch.equal(p, start[name]) for name, p in lora_state(model).items())


def test_online_mode_on_a_qlora_model_with_gradient_checkpointing(tmp_path, tiny_model_dir, tokenizer, mixed_records):
    from gradsift.models import load_model

    model = load_model(ScoringConfig(model=str(tiny_model_dir), quantization="nf4", lora_r=4, device="cpu"))
    assert any(type(m).__name__ == "Linear4bit" for m in model.modules())
    records = mixed_records[:8]
    args = sft_config(tmp_path, gradient_checkpointing=True)
    rows = tokenize_records(records, tokenizer, data_config_for(DataConfig(), args))
    loop = score_rows(model, rows, ScoringConfig(method="loop"), tokenizer.pad_token_id, progress=False)
    expected = select_rows(loop.loss, loop.grad_norm, loop.status, SelectionConfig(keep_fraction=0.5))
    start = lora_state(model)
    trainer = GradSiftSFTTrainer(
        model=model,
        args=args,
        train_dataset=datasets.Dataset.from_list(records),
        processing_class=tokenizer,
        gradsift_config=online_config(),
    )
    trainer.train()
    step = json.loads((tmp_path / "out" / "gradsift_online.jsonl").read_text().splitlines()[0])
    assert sorted(step["kept_ids"]) == sorted(loop.sample_id[expected.keep].tolist())
    assert any(not torch.equal(p, start[name]) for name, p in lora_state(model).items())


def test_online_random_draws_afresh_each_step_and_alike_for_a_step():
    # `random` inside each batch (the `random_online` baseline): a fixed seed would keep the same batch positions
    # every step; the draw follows the step, and every rank (the same step) draws the same rows.
    import numpy as np

    from gradsift.online_step import OnlineStep
    from gradsift.online_window import Window

    n = 20
    config = GradSiftConfig(mode="online", selection=SelectionConfig(rule="random", keep_fraction=0.2))
    window = Window(
        losses=np.linspace(1.0, 2.0, n),
        norms=np.linspace(0.1, 3.0, n),
        counts=np.full(n, 8),
        tokens=np.full(n, 16),
        status=np.array(["ok"] * n, dtype=object),
        digests=[f"d{i}" for i in range(n)],
        sizes=[[n]],
    )
    step = OnlineStep(config, team=None, reuse=False, pad_token_id=0)
    draws = [tuple(np.flatnonzero(step.select(window, s)[0])) for s in range(6)]
    assert all(len(kept) == 4 for kept in draws)  # ⌊0.2 · 20⌋
    assert len(set(draws)) == 6
    assert draws[3] == tuple(np.flatnonzero(step.select(window, 3)[0]))
    # Each step's draw is `select_rows`' own seeded draw, nothing else.
    for s, kept in enumerate(draws):
        reference = select_rows(
            window.losses, window.norms, window.status, config.selection.model_copy(update={"seed": s * 1_000_003}),
            num_response_tokens=window.counts, min_kept=1,
        )  # fmt: skip
        assert tuple(np.flatnonzero(reference.keep)) == kept
