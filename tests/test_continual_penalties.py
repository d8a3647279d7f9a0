"""The `ewc` and `olora` arms: each penalty against its formula computed here, what a training step does with it,
O-LoRA's summed adapters, and a two-stage recipe with both arms that resumes after a kill and reports."""

from __future__ import annotations

import os
from pathlib import Path

import datasets
import pytest
import torch
from safetensors.torch import load_file

from gradsift.cli import main
from gradsift.continual import iter_stage_files, load_recipe
from gradsift.continual.penalties import (
    Anchor,
    ewc_penalty,
    fisher_diagonal,
    load_anchors,
    olora_model,
    olora_penalty,
    penalty_trainer_class,
    save_anchors,
)
from gradsift.continual.runner import run_recipe
from gradsift.report import build_report
from test_continual_runner import tiny_recipe

from conftest import build_model, lora_model, sft_config
from conftest import write_recipe as write

REPO = Path(__file__).resolve().parents[1]


def trainable(model) -> dict[str, torch.Tensor]:
    return {name: param for name, param in model.named_parameters() if param.requires_grad}


def plain_and_penalised_loss(tmp_path, model, tokenizer, records, penalty):
    """The plain SFT loss and the penalty trainer's loss on the same first batch."""
    from trl import SFTTrainer

    args = sft_config(tmp_path, per_device_train_batch_size=4)
    data = datasets.Dataset.from_list(records[:4])
    plain = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    trainer = penalty_trainer_class()(
        model=model, args=args, train_dataset=data, processing_class=tokenizer, penalty=penalty
    )
    inputs = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        return plain.compute_loss(model, inputs), trainer.compute_loss(model, inputs)


def test_the_ewc_loss_is_the_plain_loss_plus_half_lambda_fisher_weighted_squared_distance(
    tmp_path, tokenizer, mixed_records
):
    model = lora_model(tokenizer)
    generator = torch.Generator().manual_seed(3)
    params = trainable(model)
    anchors = [
        Anchor(
            name,
            {
                key: (p.detach() + 0.05 * torch.randn(p.shape, generator=generator)).float()
                for key, p in params.items()
            },
            {key: torch.rand(p.shape, generator=generator) for key, p in params.items()},
            rows=8,
        )
        for name in ("00-align", "01-stage")
    ]
    plain, loss = plain_and_penalised_loss(
        tmp_path, model, tokenizer, mixed_records, lambda m: ewc_penalty(m, anchors, 40.0)
    )
    expected = 0.0
    for anchor in anchors:  # element by element, in float64
        for key, param in params.items():
            diff = param.detach().double() - anchor.theta[key].double()
            expected += float((anchor.fisher[key].double() * diff * diff).sum())
    assert expected > 0
    torch.testing.assert_close(loss.double(), plain.double() + 40.0 / 2 * expected, rtol=1e-5, atol=1e-6)


def test_a_huge_ewc_lambda_keeps_the_weights_at_the_anchor_and_none_lets_them_move(tmp_path, tokenizer, mixed_records):
    def train(lam: float) -> float:
        model = lora_model(tokenizer)
        params = trainable(model)
        theta = {key: p.detach().float().clone() for key, p in params.items()}
        anchor = Anchor("start", theta, {key: torch.ones_like(t) for key, t in theta.items()}, rows=1)
        args = sft_config(tmp_path / str(lam), max_steps=12, optim="adamw_torch", learning_rate=1e-2)
        trainer = penalty_trainer_class()(
            model=model,
            args=args,
            train_dataset=datasets.Dataset.from_list(mixed_records),
            processing_class=tokenizer,
            penalty=lambda m: ewc_penalty(m, [anchor], lam),
        )
        trainer.train()
        return max(float((p.detach() - theta[key]).abs().max()) for key, p in params.items())

    held, free = train(1e9), train(0.0)
    # Adam steps every weight by about the learning rate: the penalty pulls each step back to θ*.
    assert held <= 1e-2 < 5e-2 < free


def test_the_penalty_counts_once_per_optimizer_step_under_gradient_accumulation(tmp_path, tokenizer, mixed_records):
    def step(batch: int, accumulation: int) -> dict[str, torch.Tensor]:
        model = lora_model(tokenizer)
        params = trainable(model)
        theta = {key: p.detach().float() + 0.1 for key, p in params.items()}
        anchor = Anchor("start", theta, {key: torch.ones_like(t) for key, t in theta.items()}, rows=1)
        args = sft_config(
            tmp_path / f"{batch}x{accumulation}",
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=accumulation,
        )
        trainer = penalty_trainer_class()(
            model=model,
            args=args,
            train_dataset=datasets.Dataset.from_list(mixed_records[:8]),
            processing_class=tokenizer,
            penalty=lambda m: ewc_penalty(m, [anchor], 2.0),
        )
        trainer.train()
        return {key: p.detach().clone() for key, p in params.items()}

    # One SGD step over the same 8 rows, as one batch or as two accumulated halves: the same update.
    whole, halves = step(8, 1), step(4, 2)
    for key in whole:
        torch.testing.assert_close(halves[key], whole[key], rtol=1e-4, atol=1e-6)


def test_the_fisher_is_the_mean_squared_gradient_of_each_rows_response_loss(tokenizer, mixed_records):
    from gradsift.config import DataConfig
    from gradsift.tokenization import tokenize_records

    model = lora_model(tokenizer)
    records = mixed_records[:5]
    fisher, counted = fisher_diagonal(model, records, tokenizer, max_length=64)
    assert counted == 5
    # The obvious computation: each row alone, the loss from the model's own labels, torch's gradient.
    rows = tokenize_records(records, tokenizer, DataConfig(max_length=64), progress=False)
    params = trainable(model)
    expected = {key: torch.zeros_like(p) for key, p in params.items()}
    for row in rows:
        ids = torch.tensor([row.input_ids])
        loss = model(input_ids=ids, labels=torch.tensor([row.labels])).loss
        for (key, _), grad in zip(params.items(), torch.autograd.grad(loss, list(params.values()))):
            expected[key] += grad**2 / len(rows)
    assert fisher.keys() == expected.keys()
    for key in fisher:
        torch.testing.assert_close(fisher[key], expected[key], rtol=1e-4, atol=1e-10)
    assert any(float(value.sum()) > 0 for value in fisher.values())


def test_anchors_written_are_the_anchors_read(tmp_path):
    anchors = [
        Anchor("00-align", {"a.weight": torch.randn(3, 2)}, {"a.weight": torch.rand(3, 2)}, rows=128),
        Anchor("01-howto", {"a.weight": torch.randn(3, 2)}, {"a.weight": torch.rand(3, 2)}, rows=40),
    ]
    save_anchors(anchors, tmp_path / "ewc.safetensors")
    read = load_anchors(tmp_path / "ewc.safetensors")
    assert [(a.name, a.rows) for a in read] == [("00-align", 128), ("01-howto", 40)]
    for ours, theirs in zip(read, anchors):
        torch.testing.assert_close(ours.theta, theirs.theta)
        torch.testing.assert_close(ours.fisher, theirs.fisher)


def two_adapter_model(tmp_path, tokenizer):
    """A tiny Llama with a trained adapter saved as stage 1's, then loaded frozen beside a fresh adapter."""
    from gradsift.models import fresh_lora

    first = lora_model(tokenizer)  # lora_B != 0: an adapter as after training
    first.save_pretrained(tmp_path / "stage-1")
    model = olora_model(fresh_lora(build_model(tokenizer), 4, 8, "all-linear", seed=5), [tmp_path / "stage-1"])
    return model, load_file(str(tmp_path / "stage-1" / "adapter_model.safetensors"))


def test_the_olora_loss_is_the_plain_loss_plus_the_orthogonality_and_l2_terms(tmp_path, tokenizer, mixed_records):
    model, previous = two_adapter_model(tmp_path, tokenizer)
    plain, loss = plain_and_penalised_loss(
        tmp_path, model, tokenizer, mixed_records, lambda m: olora_penalty(m, 0.5, 0.25)
    )
    # The formula from the files and the weights: Σ ‖A_prev A_newᵀ‖² and Σ ‖A_new‖² over the adapted layers.
    news = {key.replace(".default", ""): p.detach().double() for key, p in trainable(model).items() if "lora_A" in key}
    assert news and news.keys() == {key for key in previous if "lora_A" in key}
    orthogonal = sum(float(((previous[key].double() @ new.T) ** 2).sum()) for key, new in news.items())
    l2 = sum(float((new**2).sum()) for new in news.values())
    assert orthogonal > 0
    torch.testing.assert_close(loss.double(), plain.double() + 0.5 * orthogonal + 0.25 * l2, rtol=1e-5, atol=1e-6)


def test_olora_trains_only_the_new_adapter_and_its_orthogonality_term_falls(tmp_path, tokenizer, mixed_records):
    model, previous = two_adapter_model(tmp_path, tokenizer)
    frozen = {key: p.detach().clone() for key, p in model.named_parameters() if ".stage-1." in key}
    ids = torch.tensor([[5, 17, 33, 60, 2, 90]])
    with torch.no_grad():  # the new adapter starts at B = 0: the model is the base plus stage 1's adapter, active
        from peft import PeftModel

        alone = PeftModel.from_pretrained(build_model(tokenizer), str(tmp_path / "stage-1"))
        torch.testing.assert_close(model(input_ids=ids).logits, alone(input_ids=ids).logits)
        assert not torch.allclose(model(input_ids=ids).logits, build_model(tokenizer)(input_ids=ids).logits)
    assert frozen and not any(p.requires_grad for key, p in model.named_parameters() if ".stage-1." in key)
    penalty = lambda m: olora_penalty(m, 1.0, 0.0)  # noqa: E731
    with torch.no_grad():
        before = float(penalty(model))
    args = sft_config(tmp_path, max_steps=10, optim="adamw_torch", learning_rate=1e-2)
    trainer = penalty_trainer_class()(
        model=model,
        args=args,
        train_dataset=datasets.Dataset.from_list(mixed_records),
        processing_class=tokenizer,
        penalty=penalty,
    )
    trainer.train()
    with torch.no_grad():
        after = float(penalty(model))
    assert after < 0.5 * before
    for key, param in model.named_parameters():
        if key in frozen:
            assert torch.equal(param, frozen[key]), key


def test_the_olora_model_after_stage_k_is_the_base_plus_the_sum_of_its_k_adapters(tmp_path, tokenizer, tiny_model_dir):
    from gradsift.config import ScoringConfig
    from gradsift.models import load_for_eval

    paths = []
    for k in range(3):  # three stages' adapters, as after training (lora_B != 0), each with its own init
        adapter = lora_model(tokenizer, seed=10 * k)
        adapter.save_pretrained(tmp_path / f"stage-{k + 1}")
        paths.append(str(tmp_path / f"stage-{k + 1}"))
    # By hand: W + (α/r)·B·A of each adapter, on a copy of the base's weights.
    expected = build_model(tokenizer)
    expected.load_state_dict(type(expected).from_pretrained(tiny_model_dir).state_dict())
    modules = dict(expected.named_modules())
    for path in paths:
        weights = load_file(str(Path(path) / "adapter_model.safetensors"))
        for key, a in weights.items():
            if ".lora_A." in key:
                b = weights[key.replace(".lora_A.", ".lora_B.")]
                name = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
                with torch.no_grad():
                    modules[name].weight += (8 / 4) * b @ a
    ids = torch.tensor([[5, 17, 33, 60, 2, 90]])
    with torch.no_grad():
        reference = expected(input_ids=ids).logits
        config = ScoringConfig(model=str(tiny_model_dir), device="cpu")
        for merge in (True, False):
            summed = load_for_eval(config, merge=merge, adapters=paths)(input_ids=ids).logits
            torch.testing.assert_close(summed, reference, rtol=1e-4, atol=1e-5)


def penalty_recipe(model_dir) -> dict:
    """The runner tests' tiny two-stage recipe, with `full`, `ewc` (anchored after each stage) and `olora` arms."""
    data = tiny_recipe(model_dir, drift_prompts=2)
    data["arms"] = {"full": {}, "ewc": {"ewc_every_stage": True, "fisher_rows": 6}, "olora": {}}
    return data


def outputs(run: Path) -> dict:
    """Every finished stage's record without timings, and the bytes of what its arm wrote to train the next."""
    out = {}
    for seed, arm, index, record in iter_stage_files(run):
        record.pop("select_seconds", None)
        record["train"].pop("seconds", None)
        folder = next(p for p in (run / f"seed-{seed}" / (arm or "")).glob(f"{index:02d}-*") if p.is_dir())
        files = ["model/model.safetensors"] if arm is None else ["adapter/adapter_model.safetensors"]
        files += ["ewc.safetensors"] + (["ewc-end.safetensors"] if index == 1 else []) if arm == "ewc" else []
        out[(seed, arm, index)] = (record, [(folder / name).read_bytes() for name in files])
    return out


@pytest.fixture(scope="module")
def penalty_run(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("penalties")
    path = write(root, penalty_recipe(tiny_model_dir))
    run_recipe(load_recipe(path), root / "reference", progress=False)
    return path, root / "reference"


def test_a_recipe_with_ewc_and_olora_arms_runs_resumes_after_a_kill_and_reports(tmp_path, penalty_run, monkeypatch):
    from gradsift.continual import penalties, runner

    path, reference = penalty_run
    recipe = load_recipe(path)
    killed = tmp_path / "killed"
    run_recipe(recipe, killed, progress=False, stop_after=4)  # align, full's two stages, ewc's first: then killed
    assert len(list(iter_stage_files(killed))) == 4
    # The resumed run estimates no Fisher (ewc's stage 1 saved both its anchors) and evaluates olora's stage 2 as the
    # aligned model plus both its stages' adapters.
    estimated, evaluated = [], []
    fisher, eval_model = penalties.fisher_diagonal, runner.eval_model

    def counted_fisher(*args, **kwargs):
        estimated.append(1)
        return fisher(*args, **kwargs)

    def recorded_eval(recipe, base, adapters):
        evaluated.append(list(adapters))
        return eval_model(recipe, base, adapters)

    monkeypatch.setattr(penalties, "fisher_diagonal", counted_fisher)
    monkeypatch.setattr(runner, "eval_model", recorded_eval)
    run_recipe(recipe, killed, progress=False)
    assert estimated == []
    assert evaluated[-1] == [
        str(killed / "seed-0/olora/01-sentiment/adapter"),
        str(killed / "seed-0/olora/02-yes_no/adapter"),
    ]
    ours, theirs = outputs(killed), outputs(reference)
    assert ours.keys() == theirs.keys() and len(ours) == 7
    for key in ours:
        assert ours[key] == theirs[key], key

    records = {(arm, index): record for _, arm, index, record in iter_stage_files(reference)}
    assert records[("ewc", 1)]["arm_kind"] == "ewc" and records[("olora", 2)]["arm_kind"] == "olora"
    # EWC: stage 1 holds the aligned start (Fisher on 6 align rows); stage 2 reuses it and adds stage 1's end.
    first = load_anchors(reference / "seed-0/ewc/01-sentiment/ewc.safetensors")
    second = load_anchors(reference / "seed-0/ewc/02-yes_no/ewc.safetensors")
    assert [(a.name, a.rows) for a in first] == [("00-align", 6)]
    assert [(a.name, a.rows) for a in second] == [("00-align", 6), ("01-sentiment", 6)]
    torch.testing.assert_close(second[0].fisher, first[0].fisher)
    assert records[("ewc", 1)]["train"]["penalty"]["start"] == 0.0  # training starts at the anchor
    assert records[("ewc", 1)]["train"]["penalty"]["end"] > 0
    # O-LoRA: each stage saves only its own adapter; stage 2's term is measured against stage 1's.
    second_adapter = load_file(str(reference / "seed-0/olora/02-yes_no/adapter/adapter_model.safetensors"))
    assert (
        second_adapter.keys()
        == load_file(str(reference / "seed-0/olora/01-sentiment/adapter/adapter_model.safetensors")).keys()
    )
    assert records[("olora", 1)]["train"]["penalty"]["start"] == 0.0  # λ2 = 0 and no earlier adapter
    assert records[("olora", 2)]["train"]["penalty"]["start"] > 0

    report = build_report(reference)
    assert {arm: report["arms"][arm]["kind"] for arm in ("full", "ewc", "olora")} == {
        "full": "full",
        "ewc": "ewc",
        "olora": "olora",
    }
    full = report["headline"]["arms"]["full"]
    filled = [key for key in report["headline"]["columns"] if full[key] is not None]
    assert filled
    for arm in ("ewc", "olora"):  # a headline row like the others, filled where `full`'s is
        row = report["headline"]["arms"][arm]
        assert row["stage"] == "02-yes_no" and row.keys() == full.keys()
        assert all(row[key] is not None for key in filled), arm


def test_the_ewc_scale_bench_measures_the_penalty_at_the_full_arms_adapters(penalty_run):
    import subprocess
    import sys

    path, run = penalty_run
    env = {**os.environ, "PYTHONPATH": str(REPO / "plugin")}
    result = subprocess.run(
        [sys.executable, "bench/ewc_scale.py", str(path), str(run)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines() if line.startswith("stage="))
    assert list(lines) == ["stage=01-sentiment", "stage=02-yes_no"]
    # The same anchor the `ewc` arm saved (the same 6 rows and model), at `full`'s stage-1 adapter, by hand.
    anchor = load_anchors(run / "seed-0/ewc/01-sentiment/ewc.safetensors")[0]
    adapter = load_file(str(run / "seed-0/full/01-sentiment/adapter/adapter_model.safetensors"))
    expected = 0.5 * sum(
        float(
            (fisher.double() * (adapter[key.replace(".default", "")].double() - anchor.theta[key].double()) ** 2).sum()
        )
        for key, fisher in anchor.fisher.items()
    )
    measured = float(lines["stage=01-sentiment"].split()[0].removeprefix("penalty_at_lambda1="))
    assert expected > 0 and measured == pytest.approx(expected, rel=2e-3)


def test_a_recipe_with_full_ewc_and_olora_arms_dry_runs(tmp_path, capsys):
    data = penalty_recipe("never-loaded") | {"arms": ["full", "ewc", "olora"]}
    assert main(["run", str(write(tmp_path, data)), "--dry-run", "--out", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "ewc: sentiment [8 rows, EWC λ 100000]" in out and "olora: yes_no [8 rows, O-LoRA λ1 0.5 λ2 0]" in out


@pytest.mark.parametrize(
    ("arms", "message"),
    [
        ({"ewc": {"ewc_lambda": -1}}, "arms.ewc.ewc_lambda: Input should be greater than 0 (got -1)"),
        ({"ewc": {"fisher_rows": 0}}, "arms.ewc.fisher_rows: Input should be greater than or equal to 1 (got 0)"),
        ({"mine": {"kind": "olora", "olora_lambda1": -0.5}}, "arms.mine.olora_lambda1: Input should be greater than"),
        ({"olora": {"olora_lambda2": "much"}}, "arms.olora.olora_lambda2: Input should be a valid number"),
    ],
)
def test_a_bad_penalty_option_is_one_line_naming_its_key(tmp_path, capsys, arms, message):
    data = penalty_recipe("never-loaded") | {"arms": arms}
    assert main(["run", str(write(tmp_path, data)), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_ewc_and_olora_need_trl_and_ewc_needs_an_anchor(tmp_path):
    from gradsift.continual import RecipeError

    data = penalty_recipe("never-loaded") | {"trainer": "axolotl", "arms": ["full", "ewc", "olora"]}
    with pytest.raises(RecipeError) as error:
        load_recipe(write(tmp_path, data))
    assert "arms.ewc: the `ewc` arm kind adds to TRL's loss, so it needs `trainer: trl`" in str(error.value)
    assert "arms.olora: the `olora` arm kind adds to TRL's loss" in str(error.value)
    data = penalty_recipe("never-loaded") | {"arms": ["ewc"]}
    del data["align"]
    with pytest.raises(RecipeError, match="arms.ewc: an `ewc` arm's first Fisher is estimated on the align stage"):
        load_recipe(write(tmp_path, data))
    data["arms"] = {"ewc": {"ewc_every_stage": True}}
    assert load_recipe(write(tmp_path, data)).arm("ewc").kind == "ewc"
