"""Continual recipes: schema errors, the plan, a tiny end-to-end run, resuming a killed run, and the report."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import yaml

from gradsift.cli import main
from gradsift.continual import RecipeError, iter_stage_files, load_recipe
from gradsift.continual.runner import run_recipe
from gradsift.report import build_report, write_report

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((REPO / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_every_recipe_validates_and_dry_runs(path, tmp_path, capsys):
    assert main(["run", str(path), "--dry-run", "--out", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    recipe = load_recipe(path)
    assert out.startswith(f"recipe {recipe.name}:") and "to run" in out
    assert not (tmp_path / "run").exists()  # a dry run writes and downloads nothing
    first = path.read_text().splitlines()[0]
    assert first == f"# gradsift run recipes/{path.name}" or first.startswith(f"# gradsift run recipes/{path.name} ")


def write(tmp_path, data, name="recipe.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def tiny_recipe(model_dir, arms=("full", "gradsift"), **extra):
    recipe = {
        "name": "tiny",
        "model": str(model_dir),
        "device": "cpu",
        "lora": {"r": 4, "alpha": 8},
        "train": {"epochs": 1, "batch_size": 4, "learning_rate": 1.0e-3, "max_length": 96, "bf16": False},
        "align": {"data": {"path": str(REPO / "recipes/data/align.jsonl"), "size": 8}},
        "stages": [
            {"name": "sentiment", "data": {"synthetic": "sentiment", "size": 8}},
            {"name": "yes_no", "data": {"synthetic": "yes_no", "size": 8}},
        ],
        "selection": {"keep_fraction": 0.5},
        "arms": list(arms),
        "evals": {"after_each_stage": {"tasks": ["gradsift_refusal_mc"], "limit": 4}},
        "drift_prompts": 4,
    }
    recipe.update(extra)
    return recipe


def test_a_recipe_with_two_mistakes_reports_both_with_their_paths(tmp_path, tiny_model_dir):
    data = tiny_recipe(tiny_model_dir)
    data["stages"][1]["data"]["synthetic"] = "poetry"
    data["train"]["learning_rate"] = -1
    with pytest.raises(RecipeError) as error:
        load_recipe(write(tmp_path, data))
    message = str(error.value)
    assert "train.learning_rate: Input should be greater than 0 (got -1)" in message
    assert "stages.1.data: unknown synthetic task 'poetry'" in message


def test_unknown_arms_tasks_and_data_fail_before_training(tmp_path, tiny_model_dir):
    data = tiny_recipe(tiny_model_dir, arms=["full", "gradsfit"])
    with pytest.raises(RecipeError, match="unknown arm\\(s\\) gradsfit: built-in arms are full, random"):
        load_recipe(write(tmp_path, data))

    data = tiny_recipe(tiny_model_dir)
    data["evals"]["after_each_stage"]["tasks"] = ["gradsift_refusal_mcq"]
    with pytest.raises(RecipeError, match="evals.after_each_stage.tasks: Unknown lm-eval task 'gradsift_refusal_mcq'"):
        load_recipe(write(tmp_path, data))

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "no prompt or messages here"}\n')
    data = tiny_recipe(tiny_model_dir)
    data["stages"][0]["data"] = {"path": str(bad)}
    with pytest.raises(RecipeError, match="stages.0.data.path: .*"):
        load_recipe(write(tmp_path, data))

    with pytest.raises(RecipeError, match="--arms kl: not in the recipe's arms"):
        from gradsift.continual.runner import plan

        plan(load_recipe(write(tmp_path, tiny_recipe(tiny_model_dir))), tmp_path / "out", arms=["kl"])


def stage_outputs(run_dir):
    """Every finished stage's record without timings, and its adapter's bytes."""
    out = {}
    for seed, arm, index, record in iter_stage_files(run_dir):
        record = json.loads(json.dumps(record))
        record.pop("select_seconds", None)
        record["train"].pop("seconds", None)
        folder = next(p for p in (run_dir / f"seed-{seed}" / (arm or "")).glob(f"{index:02d}-*") if p.is_dir())
        adapter = folder / ("model/model.safetensors" if arm is None else "adapter/adapter_model.safetensors")
        out[(seed, arm, index)] = (record, adapter.read_bytes())
    return out


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("recipe")
    data = tiny_recipe(tiny_model_dir)
    final = ["gradsift_refusal_mc", "gradsift_benign_refusal_offline"]
    data["evals"]["final"] = {"tasks": final, "limit": 4, "max_gen_toks": 8, "domain_limit": 4}
    recipe = load_recipe(write(root, data))
    run_recipe(recipe, root / "run", progress=False)
    return recipe, root / "run"


def test_the_align_stage_runs_the_final_evals_and_heads_the_report(uninterrupted):
    from gradsift.report import markdown

    _, run = uninterrupted
    records = {(arm, index): record for _, arm, index, record in iter_stage_files(run)}
    align, first, last = records[(None, 0)], records[("full", 1)], records[("full", 2)]
    assert align["eval"].keys() == last["eval"].keys()
    assert (
        "gradsift_benign_refusal_offline" in align["eval"] and "gradsift_benign_refusal_offline" not in first["eval"]
    )
    refused = align["eval_per_doc"]["gradsift_benign_refusal_offline"]["refused_rate"]
    assert len(refused) == 4
    report = build_report(run)
    aligned = report["headline"]["aligned"]
    assert aligned["stage"] == "00-align"
    assert aligned["pooled/benign_refusal_rate"]["mean"] == pytest.approx(sum(refused) / 4)
    domain = [align["eval"][task]["acc"] for task in ("gradsift_domain_sentiment", "gradsift_domain_yes_no")]
    assert aligned["average_accuracy"]["mean"] == pytest.approx(sum(domain) / 2)
    assert aligned["kept_fraction"] is None and aligned["drift/aligned"] is None
    table = markdown(report).split("## Headline")[1].splitlines()
    # No generated refusal or over-refusal task ran (the likelihood probe `gradsift_refusal_mc` did): their headline
    # columns, and the differences in them, are left out.
    assert table[2] == "| arm | final stage | benign refusal | ACC | BWT | kept | KL to aligned |"
    assert table[4].startswith("| aligned model (start) | 00-align |")
    rows = [aligned, *report["headline"]["arms"].values()]
    for row, value in zip(rows, (0.1, 0.5, 0.6)):
        row["pooled/attack_success_rate"] = {"mean": value, "n": 1}
    for row in rows[1:]:
        row["vs_full"]["pooled/attack_success_rate"] = {"mean": 0.0, "n": 1}
    table = markdown(report).split("## Headline")[1].splitlines()
    assert table[2] == (
        "| arm | final stage | attack success | benign refusal | ACC | BWT | kept | KL to aligned "
        "| Δ attack success vs full |"
    )


def test_a_killed_run_resumes_to_the_same_outputs_and_report(tmp_path, tiny_model_dir, uninterrupted):
    recipe, reference = uninterrupted
    run = tmp_path / "run"
    run_recipe(recipe, run, progress=False, stop_after=2)  # align and one stage finished
    finished = list(iter_stage_files(run))
    assert len(finished) == 2
    # The next stage was killed mid-way: a half-written folder without stage.json.
    killed = run / "seed-0" / "full" / "02-yes_no"
    (killed / "adapter").mkdir(parents=True)
    (killed / "adapter" / "adapter_model.safetensors").write_bytes(b"partial")
    run_recipe(recipe, run, progress=False)
    ours, theirs = stage_outputs(run), stage_outputs(reference)
    assert ours.keys() == theirs.keys() and len(ours) == 5
    for key in ours:
        assert ours[key][0] == theirs[key][0], key
        assert ours[key][1] == theirs[key][1], key
    ours_report, their_report = build_report(run), build_report(reference)
    ours_report.pop("run_dir"), their_report.pop("run_dir")
    assert ours_report == their_report


def test_the_report_recomputes_every_number_from_the_stage_outputs(uninterrupted):
    recipe, run = uninterrupted
    paths = write_report(run)
    report = json.loads(paths["json"].read_text())
    for name in ("report.md", "kept_fraction.png", "drift.png", "grad_norms.png"):
        assert (run / name).is_file(), name
    assert (run / "accuracy_matrix_gradsift.png").is_file()
    records = {(arm, index): record for _, arm, index, record in iter_stage_files(run)}
    tasks = ["gradsift_domain_sentiment", "gradsift_domain_yes_no"]
    for arm in ("full", "gradsift"):
        rows = [records[(None, 0)], records[(arm, 1)], records[(arm, 2)]]
        a = [[row["eval"][task]["acc"] for task in tasks] for row in rows]
        data = report["arms"][arm]["seeds"]["0"]
        assert data["accuracy_matrix"] == a
        assert data["average_accuracy"] == pytest.approx((a[2][0] + a[2][1]) / 2)
        assert data["bwt"] == pytest.approx(a[2][0] - a[1][0])
        assert data["fm"] == pytest.approx(a[1][0] - a[2][0])
        falls = [a[k - 1][j] - a[k][j] for k in (1, 2) for j in (0, 1)]
        assert data["max_drop"] == pytest.approx(max(falls))
        assert data["interference"] == [[pytest.approx(a[k][j] - a[k - 1][j]) for j in (0, 1)] for k in (1, 2)]
        for k, row in enumerate(rows):
            stage = report["arms"][arm]["mean"]["stages"][str(k)]
            assert stage["gradsift_refusal_mc/acc"]["mean"] == row["eval"]["gradsift_refusal_mc"]["acc"]
            if k:
                assert stage["kept_fraction"]["mean"] == row["kept"] / row["rows"]
                assert stage["drift/aligned"]["mean"] == row["drift"]["aligned"]
        # Accuracy by answer length, from the logged samples: bins add up to the task's own accuracy.
        by_length = data["final_accuracy_by_length"]
        for task in tasks:
            bins = by_length[task].values()
            assert sum(b["n"] for b in bins) == 4
            weighted = sum(b["acc"] * b["n"] for b in bins) / 4
            assert weighted == pytest.approx(records[(arm, 2)]["eval"][task]["acc"])
    assert records[("gradsift", 1)]["kept"] == 4 and records[("full", 1)]["kept"] == 8
    assert (run / "seed-0" / "gradsift" / "01-sentiment" / "dropped.jsonl").read_text().count("\n") == 4
    markdown = (run / "report.md").read_text()
    assert "| gradsift | 02-yes_no |" in markdown and "BWT" in markdown
    assert not math.isnan(report["arms"]["full"]["mean"]["average_accuracy"]["mean"])


def test_an_aligned_model_is_reused_by_a_later_run_that_would_train_it_alike(tmp_path, tiny_model_dir, monkeypatch):
    from gradsift.continual import runner

    monkeypatch.setenv("GRADSIFT_ALIGN_CACHE", str(tmp_path / "cache"))
    data = tiny_recipe(tiny_model_dir, arms=["full"])
    run_recipe(load_recipe(write(tmp_path, data)), tmp_path / "first", progress=False, stop_after=1)
    assert len(list((tmp_path / "cache").iterdir())) == 1
    trained = runner._train_align
    monkeypatch.setattr(runner, "_train_align", lambda *args: pytest.fail("the align stage was trained again"))
    run_recipe(load_recipe(write(tmp_path, data)), tmp_path / "second", progress=False, stop_after=1)
    runs = ("first", "second")
    weights = [(tmp_path / run / "seed-0/00-align/model/model.safetensors").read_bytes() for run in runs]
    assert weights[0] == weights[1]
    records = [json.loads((tmp_path / run / "seed-0/00-align/stage.json").read_text()) for run in runs]
    assert records[0]["train"] == records[1]["train"] and records[0]["cache"]["key"] == records[1]["cache"]["key"]
    assert [record["cache"]["reused"] for record in records] == [False, True]
    assert records[0]["eval"] == records[1]["eval"]  # evaluated again, alike
    # Another learning rate makes another model: trained, and kept beside the first.
    monkeypatch.setattr(runner, "_train_align", trained)
    data["train"]["learning_rate"] = 2.0e-3
    run_recipe(load_recipe(write(tmp_path, data)), tmp_path / "third", progress=False, stop_after=1)
    assert len(list((tmp_path / "cache").iterdir())) == 2
    third = (tmp_path / "third/seed-0/00-align/model/model.safetensors").read_bytes()
    assert third != weights[0]


def test_a_fixed_align_seed_starts_every_run_seed_from_one_aligned_model(
    tmp_path, tiny_model_dir, monkeypatch, capsys
):
    from gradsift.continual import runner

    monkeypatch.setenv("GRADSIFT_ALIGN_CACHE", str(tmp_path / "cache"))
    trained = []
    train_align = runner._train_align
    monkeypatch.setattr(runner, "_train_align", lambda *args: trained.append(args[2]) or train_align(*args))
    data = tiny_recipe(tiny_model_dir, arms=["full"])
    data["seeds"] = [0, 1]
    data["align"]["seed"] = 0
    data["stages"] = data["stages"][:1]
    data["evals"] = {"after_each_stage": {"tasks": [], "domain": False}}
    assert main(["run", str(write(tmp_path, data)), "--dry-run", "--out", str(tmp_path / "run")]) == 0
    assert "seed 1  align (seed 0's, shared by all seeds)" in capsys.readouterr().out
    run_recipe(load_recipe(write(tmp_path, data)), tmp_path / "run", progress=False)
    assert trained == [0]  # seed 1's aligned model is seed 0's, from the cache
    weights = [(tmp_path / f"run/seed-{s}/00-align/model/model.safetensors").read_bytes() for s in (0, 1)]
    assert weights[0] == weights[1]
    records = [json.loads((tmp_path / f"run/seed-{s}/00-align/stage.json").read_text()) for s in (0, 1)]
    assert [r["seed"] for r in records] == [0, 1] and "align_seed" not in records[0] and records[1]["align_seed"] == 0
    assert records[1]["cache"]["reused"] and records[0]["cache"]["key"] == records[1]["cache"]["key"]
    # The arms' stages still follow the run seed: another LoRA start, another model.
    adapter = "full/01-sentiment/adapter/adapter_model.safetensors"
    adapters = [(tmp_path / f"run/seed-{s}" / adapter).read_bytes() for s in (0, 1)]
    assert adapters[0] != adapters[1]


@pytest.mark.parametrize("rule", ["moderate", "high"])
def test_an_online_arm_runs_algorithm_1_on_each_batch_of_a_recipe_stage(tmp_path, tiny_model_dir, rule):
    # The paper's method in the runner: the step's kept ids are the core rule on loop-reference scores of the batch,
    # taken with the model the stage starts from (the aligned weights and a fresh LoRA seeded as the run seeds it).
    from gradsift.config import DataConfig, ScoringConfig
    from gradsift.continual import backends
    from gradsift.continual.layout import STAGE_ONLINE_LOG
    from gradsift.continual.rows import mixed_records
    from gradsift.continual.schema import gradsift_config_for
    from gradsift.integrations.trl import data_config_for
    from gradsift.scoring import score_rows
    from gradsift.selection import select_rows
    from gradsift.tokenization import tokenize_records

    data = tiny_recipe(tiny_model_dir)
    data["arms"] = {"online": {"kind": "select", "mode": "online", "selection": {"rule": rule}}}
    data["stages"] = data["stages"][:1]
    data["train"]["batch_size"] = 8  # one step: the stage's 8 rows
    data["evals"] = {"after_each_stage": {"tasks": [], "domain": False}}
    recipe = load_recipe(write(tmp_path, data))
    run_recipe(recipe, tmp_path / "run", progress=False)
    folder = tmp_path / "run/seed-0/online/01-sentiment"
    (logged,) = [json.loads(line) for line in (folder / STAGE_ONLINE_LOG).read_text().splitlines()]
    stage = json.loads((folder / "stage.json").read_text())
    assert stage["train"]["steps"] == 1 and stage["kept"] == logged["kept"] == 4

    train = recipe.train_for(recipe.stages[0])
    model = backends.fresh_lora(recipe, backends.load_base(recipe, str(tmp_path / "run/seed-0/00-align/model")), 0)
    tokenizer = backends.tokenizer(recipe)
    args = backends.sft_args(recipe, train, recipe.arm("online"), tmp_path / "reference", 0, False)
    records, _ = mixed_records(recipe, recipe.stages[0].data, 0)
    rows = tokenize_records(records, tokenizer, data_config_for(DataConfig(), args))
    loop = score_rows(model, rows, ScoringConfig(method="loop"), tokenizer.pad_token_id, progress=False)
    selection = gradsift_config_for(recipe, "online", train, 1).selection
    expected = select_rows(loop.loss, loop.grad_norm, loop.status, selection)
    assert sorted(logged["kept_ids"]) == sorted(loop.sample_id[expected.keep].tolist())
    assert logged["dropped"] == expected.counts()


def test_random_arm_matches_the_gradsift_arms_size(tmp_path, tiny_model_dir):
    data = tiny_recipe(tiny_model_dir, arms=["random", "gradsift"], align=None)
    data["stages"] = data["stages"][:1]
    data["evals"] = {"after_each_stage": {"tasks": [], "domain": False}}
    recipe = load_recipe(write(tmp_path, data))
    run_recipe(recipe, tmp_path / "run", progress=False)
    records = {arm: record for _, arm, _, record in iter_stage_files(tmp_path / "run")}
    assert records["random"]["kept"] == records["gradsift"]["kept"] == 4
    assert records["random"]["selection"]["matched_to"] == "gradsift"
    shutil.rmtree(tmp_path / "run")


def test_the_axolotl_backend_trains_each_stage_with_axolotl_train(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file

    cpu = {f"lora_{name}_kernel": False for name in ("mlp", "qkv", "o", "embedding")}
    data = tiny_recipe(
        tiny_model_dir,
        arms=["gradsift"],
        align=None,
        trainer="axolotl",
        axolotl={"special_tokens": {"pad_token": "<pad>"}, "tf32": False, **cpu},
        drift_prompts=0,
    )
    data["evals"] = {"after_each_stage": {"tasks": [], "domain": False}}
    recipe = load_recipe(write(tmp_path, data))
    run_recipe(recipe, tmp_path / "run", progress=False)
    stages = sorted((tmp_path / "run" / "seed-0" / "gradsift").iterdir())
    assert [p.name for p in stages] == ["01-sentiment", "02-yes_no"]
    adapters = []
    for stage in stages:
        record = json.loads((stage / "stage.json").read_text())
        config = yaml.safe_load((stage / "axolotl.yaml").read_text())
        trained = [json.loads(line) for line in (stage / "train.jsonl").read_text().splitlines()]
        assert record["train"]["backend"] == "axolotl" and len(trained) == record["kept"] == 4
        assert config["datasets"][0]["path"] == str(stage / "train.jsonl")
        adapters.append(load_file(stage / "adapter" / "adapter_model.safetensors"))
    # The second stage continued the first stage's adapter and moved it.
    assert yaml.safe_load((stages[1] / "axolotl.yaml").read_text())["lora_model_dir"] == str(stages[0] / "adapter")
    assert any(not (adapters[0][k] == adapters[1][k]).all() for k in adapters[0])


def test_the_accuracy_matrix_compares_the_same_documents_at_every_stage(tmp_path, tiny_model_dir):
    data = tiny_recipe(tiny_model_dir)
    data["evals"]["final"] = {"tasks": ["gradsift_refusal_mc"], "limit": 8}
    with pytest.raises(RecipeError, match="evals.final evaluates 8 documents per domain task and evals.after_each_"):
        load_recipe(write(tmp_path, data))


def test_the_accuracy_matrix_reads_each_tasks_own_accuracy_metric():
    from gradsift.report import accuracy_matrix, stage_metrics

    tasks = ["arc_easy", "gsm8k", "squadv2", "medmcqa_real"]
    evals = {
        "arc_easy": {"acc": 0.5, "acc_norm": 0.6},
        "gsm8k": {"exact_match": 0.25},
        "squadv2": {"f1": 0.7},
        "medmcqa_real": {"acc": 0.25, "gold_prob": 0.26, "ref_byte_prob": 0.85},  # `acc` at chance: the likelihood
    }
    matrix = accuracy_matrix(None, {1: {"eval": evals}, 3: {"eval": {}}}, tasks)
    assert matrix == [[None] * 4, [0.5, 0.25, 0.7, 0.85], [None] * 4, [None] * 4, [None] * 4]  # rows k = 0..4
    metrics = stage_metrics({"eval": evals})
    assert metrics == {
        "arc_easy/acc": 0.5,
        "gsm8k/exact_match": 0.25,
        "squadv2/f1": 0.7,
        "medmcqa_real/ref_byte_prob": 0.85,
    }


def test_the_align_key_reads_gradsifts_source_once_a_process(monkeypatch):
    """A run's later seeds find the aligned model its first seed cached, even when gradsift's files are edited while
    it runs: the source digest is read once, at the first key."""
    from pathlib import Path

    from gradsift.continual import align_cache

    align_cache.source_digest.cache_clear()
    first = align_cache.align_key({"seed": 0})
    real = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda self: real(self) + b"# edited")
    assert align_cache.source_digest.__wrapped__() != align_cache.source_digest()  # the files now read otherwise
    assert align_cache.align_key({"seed": 0}) == first
