"""The safety-erosion testbed: its instruction-following data and tasks, step-matched arms, shared stage-1 scores,
and held-out harmful prompts that never overlap the align rows."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import yaml

from gradsift import synthetic
from gradsift.recipes import SHARED_DIR, RecipeError, full_arm_steps, iter_stage_files, load_recipe, run_recipe
from gradsift.store import TABLE

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "evals" / "tasks"))
import utils as task_utils  # noqa: E402  (the lm-eval tasks' own utils.py)


def write(tmp_path, data, name="recipe.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.mark.parametrize("task, shortest, longest", [("howto", 8, 40), ("lists", 1, 20)])
def test_instruction_tasks_mix_terse_and_long_answers_and_score_their_own_replies_correct(task, shortest, longest):
    rows = synthetic.generate(task, split="test")
    counts = {row["count"] for row in rows}
    assert counts == {1, 2, 3, 4, 5, 6}
    lengths = [len(row["messages"][1]["content"].split()) for row in rows]
    assert min(lengths) <= shortest and max(lengths) >= longest  # terse one-liners and long lists in one task
    scores = [task_utils.process_numbered_list(row, [row["messages"][1]["content"]])["acc"] for row in rows]
    assert sum(scores) == len(rows)


@pytest.mark.parametrize(
    "answer, acc",
    [
        ("Here are three birds:\n1. Robin.\n2. Owl.\n3. Swan.", 1.0),
        ("Here are three birds:\n1. Robin.\n2. Owl.", 0.0),  # too few
        ("Here are three birds:\n1. Robin.\n2. Owl.\n3. Swan.\n4. Crow.", 0.0),  # too many
        ("Here are three birds:\n1. Table.\n2. Chair.\n3. Swan.", 0.0),  # mostly not birds
        ("Robin, owl and swan.", 0.0),  # not a numbered list
    ],
)
def test_a_lists_answer_is_right_only_with_the_asked_count_of_category_members(answer, acc):
    doc = {"count": 3, "keyword": "", "members": ["Robin", "Owl", "Swan", "Crow", "Eagle"]}
    assert task_utils.process_numbered_list(doc, [answer])["acc"] == acc


@pytest.mark.parametrize(
    "answer, acc",
    [
        ("Boil fresh water in a kettle.", 1.0),
        ("1. Boil water.", 0.0),  # one line was asked for, not a list
        ("Boil water.\nThen pour it.", 0.0),
    ],
)
def test_a_one_item_howto_answer_is_one_line(answer, acc):
    assert task_utils.process_numbered_list({"count": 1, "keyword": "tea", "members": []}, [answer])["acc"] == acc


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9']+", text.lower()))


def test_held_out_harmful_prompts_never_overlap_the_align_rows():
    align = [json.loads(line) for line in (REPO / "recipes/data/align.jsonl").read_text().splitlines()]
    trained = [row["messages"][0]["content"] for row in align]
    held_out = [doc["prompt"] for doc in task_utils.strongreject_offline()["test"]]
    held_out += [doc["prompt"] for doc in task_utils.harmbench_offline()["test"]]
    assert len(held_out) >= 96
    trained_words = [_words(prompt) for prompt in trained]
    for prompt in held_out:
        words = _words(prompt)
        assert prompt.strip().lower() not in {p.strip().lower() for p in trained}
        # No near-duplicate either: a rephrased copy shares most of its words.
        closest = max(len(words & other) / len(words | other) for other in trained_words)
        assert closest < 0.6, prompt


def test_the_testbed_recipe_evaluates_at_least_96_held_out_harmful_prompts():
    recipe = load_recipe(REPO / "recipes" / "testbed-smollm2.yaml")
    spec, tasks = recipe.eval_tasks(final=True)
    refusal = [
        t for t in tasks if t in ("gradsift_refusal_strongreject_offline", "gradsift_refusal_harmbench_offline")
    ]
    assert len(refusal) == 2 and spec.limit is not None and 2 * spec.limit >= 96
    assert len(recipe.seeds) == 3
    kinds = {name: (recipe.arm(name).kind, recipe.arm(name).steps or recipe.steps) for name in recipe.arms}
    assert {"full", "random", "gradsift", "high", "low", "drop_top", "gradsift_strata"} <= set(kinds)
    assert recipe.selection_for("gradsift_strata").length_strata


def tiny(model_dir, **extra):
    recipe = {
        "name": "tiny",
        "model": str(model_dir),
        "device": "cpu",
        "lora": {"r": 4, "alpha": 8},
        "train": {"epochs": 2, "batch_size": 4, "learning_rate": 1.0e-3, "max_length": 96, "bf16": False},
        "stages": [{"name": "lists", "data": {"synthetic": "lists", "size": 12}}],
        "selection": {"keep_fraction": 0.5},
        "evals": {"after_each_stage": {"tasks": [], "domain": False}},
        "drift_prompts": 0,
    }
    recipe.update(extra)
    return recipe


def test_step_matched_arms_train_as_many_steps_as_full_and_select_arms_share_stage_one_scores(
    tmp_path, tiny_model_dir
):
    arms = {
        "full": {},
        "gradsift": {},
        "high": {},
        "gradsift_steps": {"kind": "select", "steps": "full"},
        "random_steps": {"kind": "random", "selection": {"rule": "random"}, "steps": "full"},
    }
    recipe = load_recipe(write(tmp_path, tiny(tiny_model_dir, arms=arms)))
    run = tmp_path / "run"
    run_recipe(recipe, run, progress=False)
    records = {arm: record for _, arm, _, record in iter_stage_files(run)}
    full_steps = records["full"]["train"]["steps"]
    assert full_steps == full_arm_steps(12, recipe.train_for(recipe.stages[0])) == 6
    assert records["gradsift"]["kept"] == 6 and records["gradsift"]["train"]["steps"] == 4  # 2 epochs of 6 rows
    for arm in ("gradsift_steps", "random_steps"):
        assert records[arm]["kept"] == 6 and records[arm]["train"]["steps"] == full_steps, arm
    # One scoring pass for the seed's stage 1: every select arm read the same cached table.
    shared = run / "seed-0" / SHARED_DIR / "01-lists" / "scores" / TABLE
    assert shared.is_file()
    select_arms = ("gradsift", "high", "gradsift_steps")
    tables = {arm: (run / "seed-0" / arm / "01-lists" / "scores" / TABLE).read_bytes() for arm in select_arms}
    assert len(set(tables.values())) == 1 and next(iter(tables.values())) == shared.read_bytes()
    assert records["gradsift"]["selection"]["kept_norm_range"] != records["high"]["selection"]["kept_norm_range"]


def test_an_arm_name_that_is_not_a_plain_folder_name_is_refused(tmp_path, tiny_model_dir):
    for name in ("../x", "/tmp/x", "_shared", ".hidden"):
        with pytest.raises(RecipeError, match="an arm name becomes a folder name"):
            load_recipe(write(tmp_path, tiny(tiny_model_dir, arms={name: {"kind": "full"}})))
