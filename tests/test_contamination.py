"""Contaminated stages: a stage's data as a list of sources mixed together, each row's label (`label_column`) kept
beside the rows and carried into dropped.jsonl, selection.json, stage.json and the report, and the `clean` arm."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest

from gradsift.continual import RecipeError, load_recipe
from gradsift.continual.rows import mixed_records, stage_records
from gradsift.continual.runner import run_recipe
from gradsift.errors import UserError
from gradsift.report import build_report
from test_continual_runner import REPO, tiny_recipe, write


def labelled_files(tmp_path, benign=10, harmful=3):
    """Two jsonl files of align.jsonl's rows: `benign` rows labelled benign, `harmful` rows labelled harmful."""
    rows = [json.loads(line) for line in (REPO / "recipes/data/align.jsonl").read_text().splitlines() if line]
    paths = {}
    for kind, count in (("benign", benign), ("harmful", harmful)):
        chosen = [row for row in rows if row["kind"] == kind][:count]
        assert len(chosen) == count
        paths[kind] = tmp_path / f"{kind}.jsonl"
        paths[kind].write_text("".join(json.dumps(row) + "\n" for row in chosen))
    return paths


def mixed_recipe(tmp_path, tiny_model_dir, arms=("full",), benign=10, harmful=3, **extra):
    paths = labelled_files(tmp_path, benign, harmful)
    data = tiny_recipe(tiny_model_dir, arms=list(arms), **extra)
    data["stages"] = [
        {"name": "mixed", "data": [{"path": str(paths["benign"])}, {"path": str(paths["harmful"])}]},
    ]
    data["evals"] = {"after_each_stage": {"tasks": []}}
    data["drift_prompts"] = 0
    return data


def test_a_mixed_stage_holds_every_sources_rows_shuffled_by_the_seed_each_with_its_label(tmp_path, tiny_model_dir):
    recipe = load_recipe(write(tmp_path, mixed_recipe(tmp_path, tiny_model_dir)))
    records, labels = mixed_records(recipe, recipe.stages[0].data, 0)
    assert Counter(labels) == {"benign": 10, "harmful": 3}
    # Each label belongs to its own row: the row of that content in its source file.
    by_prompt = {}
    for kind in ("benign", "harmful"):
        for line in (tmp_path / f"{kind}.jsonl").read_text().splitlines():
            by_prompt[json.loads(line)["messages"][0]["content"]] = kind
    assert [by_prompt[row["prompt"][0]["content"]] for row in records] == labels
    assert all(set(row) == {"prompt", "completion"} for row in records)  # the label is never trained
    assert labels != sorted(labels) and labels != sorted(labels, reverse=True)  # mixed, not one source after another
    again, _ = mixed_records(recipe, recipe.stages[0].data, 0)
    other, _ = mixed_records(recipe, recipe.stages[0].data, 1)
    assert again == records and other != records
    # One source: the rows `stage_records` gives, in its order (a finished single-source run's rows are unchanged).
    single = recipe.stages[0].data[:1]
    assert mixed_records(recipe, single, 0)[0] == stage_records(recipe, single[0], 0)


def test_a_template_keeps_the_rows_label(tmp_path, tiny_model_dir):
    source = tmp_path / "qa.jsonl"
    source.write_text(
        "".join(json.dumps({"q": f"q{i}", "a": f"a{i}", "kind": ["x", "y"][i % 2]}) + "\n" for i in range(4))
    )
    data = tiny_recipe(tiny_model_dir)
    data["stages"] = [
        {"name": "qa", "data": {"path": str(source), "prompt_template": "{q}", "completion_template": "{a}"}}
    ]
    recipe = load_recipe(write(tmp_path, data))
    records, labels = mixed_records(recipe, recipe.stages[0].data, 0)
    assert {row["prompt"][0]["content"]: label for row, label in zip(records, labels)} == {
        "q0": "x", "q1": "y", "q2": "x", "q3": "y"
    }  # fmt: skip


def test_schema_paths_name_the_source_as_written(tmp_path, tiny_model_dir):
    data = mixed_recipe(tmp_path, tiny_model_dir)
    data["stages"][0]["data"][1]["size"] = 0
    with pytest.raises(RecipeError, match=r"stages\.0\.data\.1\.size: Input should be greater than or equal to 1"):
        load_recipe(write(tmp_path, data))
    data = tiny_recipe(tiny_model_dir)
    data["stages"][0]["data"]["size"] = 0
    with pytest.raises(RecipeError, match=r"stages\.0\.data\.size: Input should be greater than or equal to 1"):
        load_recipe(write(tmp_path, data))
    data = mixed_recipe(tmp_path, tiny_model_dir)
    data["stages"][0]["data"][1]["path"] = str(tmp_path / "missing.jsonl")
    with pytest.raises(RecipeError, match=r"stages\.0\.data\.1\.path: .*missing\.jsonl' does not exist"):
        load_recipe(write(tmp_path, data))


def test_a_clean_arm_needs_a_label_column(tmp_path, tiny_model_dir):
    data = mixed_recipe(tmp_path, tiny_model_dir, arms=("full", "clean"), label_column=None)
    with pytest.raises(
        RecipeError, match="arms: clean: a `clean` arm keeps rows by their label, and `label_column` is null"
    ):
        load_recipe(write(tmp_path, data))


def test_labels_are_counted_per_arm_and_carried_into_the_selection_files_and_the_report(tmp_path, tiny_model_dir):
    data = mixed_recipe(tmp_path, tiny_model_dir, arms=("full", "clean", "random", "gradsift"))
    data["selection"] = {"keep_fraction": 0.5, "seed": 3}
    # A random arm sized to another select arm than `gradsift` (`match`): the size that arm kept.
    strict = {"kind": "select", "selection": {"keep_fraction": 0.25}}
    random_strict = {"kind": "random", "match": "strict"}
    data["arms"] = {**dict.fromkeys(data["arms"], {}), "strict": strict, "random_strict": random_strict}
    run = tmp_path / "run"
    recipe = load_recipe(write(tmp_path, data))
    run_recipe(recipe, run, progress=False)
    records, labels = mixed_records(recipe, recipe.stages[0].data, 0)
    stage = {arm: json.loads((run / f"seed-0/{arm}/01-mixed/stage.json").read_text()) for arm in data["arms"]}

    assert stage["full"]["labels"] == {"benign": {"rows": 10, "kept": 10}, "harmful": {"rows": 3, "kept": 3}}
    assert stage["clean"]["labels"] == {"benign": {"rows": 10, "kept": 10}, "harmful": {"rows": 3, "kept": 0}}
    assert stage["clean"]["kept"] == 10
    for arm in ("random", "gradsift"):
        counts = stage[arm]["labels"]
        assert {label: c["rows"] for label, c in counts.items()} == {"benign": 10, "harmful": 3}
        assert sum(c["kept"] for c in counts.values()) == stage[arm]["kept"]
    assert stage["random"]["kept"] == stage["gradsift"]["kept"] == 6  # ⌊0.5 · 13⌋
    assert stage["random_strict"]["kept"] == stage["strict"]["kept"] == 3  # ⌊0.25 · 13⌋
    assert stage["random"]["selection"]["matched_to"] == "gradsift"
    assert stage["random_strict"]["selection"]["matched_to"] == "strict"

    # gradsift's counts agree with its dropped.jsonl, whose every entry names its row's label.
    folder = run / "seed-0/gradsift/01-mixed"
    dropped = [json.loads(line) for line in (folder / "dropped.jsonl").read_text().splitlines()]
    assert dropped and all(entry["kind"] == labels[entry["index"]] for entry in dropped)
    dropped_by_label = Counter(entry["kind"] for entry in dropped)
    assert {label: c["rows"] - c["kept"] for label, c in stage["gradsift"]["labels"].items()} == {
        label: dropped_by_label.get(label, 0) for label in ("benign", "harmful")
    }
    selection = json.loads((folder / "selection.json").read_text())
    assert selection["labels"] == stage["gradsift"]["labels"] and selection["label_column"] == "kind"

    report = build_report(run, n_resamples=50)
    headline = report["headline"]["arms"]
    assert headline["clean"]["labels/harmful/kept"]["mean"] == 0
    assert headline["full"]["labels/harmful/kept"]["mean"] == 3
    assert headline["full"]["labels/benign/kept_fraction"]["mean"] == 1
    assert headline["gradsift"]["labels/harmful/kept"]["mean"] == stage["gradsift"]["labels"]["harmful"]["kept"]


def test_a_clean_arm_compares_labels_as_text_and_trains_every_row_of_an_unlabelled_stage(tmp_path, tiny_model_dir):
    numbered = tmp_path / "numbered.jsonl"
    rows = [json.loads(line) for line in (REPO / "recipes/data/align.jsonl").read_text().splitlines() if line][:6]
    numbered.write_text("".join(json.dumps({**row, "kind": i % 2}) + "\n" for i, row in enumerate(rows)))
    data = mixed_recipe(tmp_path, tiny_model_dir, arms=("clean",))
    data["arms"] = {"clean": {"clean_label": "0"}}
    data["stages"] = [
        {"name": "numbered", "data": {"path": str(numbered)}},
        {"name": "plain", "data": {"synthetic": "sentiment", "size": 4}},
    ]
    run_recipe(load_recipe(write(tmp_path, data)), tmp_path / "run", progress=False)
    first, second = (
        json.loads((tmp_path / f"run/seed-0/clean/{s}/stage.json").read_text()) for s in ("01-numbered", "02-plain")
    )
    assert first["kept"] == 3 and first["labels"] == {"0": {"rows": 3, "kept": 3}, "1": {"rows": 3, "kept": 0}}
    assert second["kept"] == second["rows"] == 4 and "labels" not in second  # no label: nothing known to drop


def test_a_clean_arm_without_rows_of_its_label_stops_with_one_line(tmp_path, tiny_model_dir):
    data = mixed_recipe(tmp_path, tiny_model_dir, arms=("clean",))
    data["arms"] = {"clean": {"clean_label": "safe"}}
    expected = r"arm `clean` \(clean\) trains the rows whose `kind` is 'safe'; stage `mixed` has none \(its labels: "
    with pytest.raises(UserError, match=expected + r"benign, harmful\)"):
        run_recipe(load_recipe(write(tmp_path, data)), tmp_path / "run", progress=False)


def test_the_kept_mask_maps_score_table_positions_to_the_stages_rows():
    import numpy as np

    from gradsift.continual.arms import kept_mask

    index = np.array([3, 0, 4, 1, 2])  # the table's rows in another order than the stage's (length-sorted shards)
    keep = np.array([True, False, True, False, False])  # positions 0 and 2: the stage's rows 3 and 4
    assert kept_mask(index, keep, 6).tolist() == [False, False, False, True, True, False]


def test_a_label_column_may_not_take_a_dropped_rows_field_name(tmp_path, tiny_model_dir):
    data = mixed_recipe(tmp_path, tiny_model_dir, label_column="reason")
    with pytest.raises(RecipeError, match="label_column: 'reason' names a field gradsift writes for each dropped row"):
        load_recipe(write(tmp_path, data))


def test_a_bad_domain_setting_is_one_line(tmp_path, tiny_model_dir):
    data = mixed_recipe(tmp_path, tiny_model_dir)
    data["evals"]["after_each_stage"]["domain"] = "all"
    with pytest.raises(RecipeError) as error:
        load_recipe(write(tmp_path, data))
    lines = [line for line in str(error.value).splitlines() if "after_each_stage.domain" in line]
    assert len(lines) == 1 and "evals.after_each_stage.domain: Input should be True, False or 'seen'" in lines[0]


def test_a_random_arms_match_names_an_offline_select_arm(tmp_path, tiny_model_dir):
    data = mixed_recipe(tmp_path, tiny_model_dir)
    data["arms"] = {
        "full": {"match": "gradsift"},
        "gradsift": {},
        "live": {"kind": "select", "mode": "online"},
        "random": {"match": "live"},
        "random_typo": {"kind": "random", "match": "gradsfit"},
        "random_ok": {"kind": "random", "match": "gradsift"},
        "random_rule": {"kind": "random", "selection": {"rule": "moderate"}},
    }
    with pytest.raises(RecipeError) as error:
        load_recipe(write(tmp_path, data))
    lines = str(error.value).splitlines()
    full = "arms.full.match: got 'gradsift'; `match` sizes a `random` arm, and a `full` arm has no use for it; remove"
    assert any(full in line for line in lines), lines
    for arm, got in (("random", "'live'"), ("random_typo", "'gradsfit'")):
        assert any(
            f"arms.{arm}.match: got {got}, which is not an offline `select` arm of this recipe; name one of its "
            "offline select arms (gradsift) or remove `match`" in line
            for line in lines
        ), lines
    assert any("arms.random_rule.selection.rule: got 'moderate'; a `random` arm keeps a random subset" in line
               for line in lines), lines  # fmt: skip
    assert not any("random_ok" in line for line in lines)


def test_offset_passes_over_rows_so_that_two_stages_of_one_source_train_disjoint_rows(tmp_path, tiny_model_dir):
    source = tmp_path / "qa.jsonl"
    source.write_text("".join(json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}) + "\n" for i in range(10)))
    data = tiny_recipe(tiny_model_dir)
    data["stages"] = [
        {"name": "first", "data": {"path": str(source), "size": 4}},
        {"name": "second", "data": {"path": str(source), "size": 4, "offset": 4}},
        {"name": "rest", "data": {"path": str(source), "offset": 8}},
    ]
    recipe = load_recipe(write(tmp_path, data))
    stages = [[row["prompt"] for row in mixed_records(recipe, stage.data, 5)[0]] for stage in recipe.stages]
    import random

    shuffled = [f"q{i}" for i in range(10)]
    random.Random(5).shuffle(shuffled)  # the order `size` and `offset` cut: the source shuffled by the seed
    assert stages == [shuffled[:4], shuffled[4:8], shuffled[8:]]

    # A recipe whose offset leaves no row, or fewer than `size`, is refused with the key before anything runs.
    data["stages"][2]["data"] = {"path": str(source), "offset": 10}
    with pytest.raises(RecipeError, match=r"stages\.2\.data\.offset: got 10; `.*qa\.jsonl` \(split 'train'\) has 10 "
                       r"rows, so none is left after it; lower `offset`"):  # fmt: skip
        load_recipe(write(tmp_path, data))
    data["stages"][2]["data"] = {"path": str(source), "offset": 8, "size": 4}
    with pytest.raises(RecipeError, match=r"stages\.2\.data\.size: got 4 after `offset` 8; .* has 10 rows, so 2 are "
                       r"left; lower `size` or `offset`"):  # fmt: skip
        load_recipe(write(tmp_path, data))
    # A hub dataset is read when its stage starts: the run stops there with the source named.
    past_the_end = recipe.stages[2].data[0].model_copy(update={"offset": 10})
    with pytest.raises(UserError, match=r"has 10 rows and `offset` is 10: no row is left to take; lower `offset`"):
        mixed_records(recipe, [past_the_end], 0)
    data["stages"][2]["data"] = {"synthetic": "sentiment", "size": 4, "offset": 2}
    with pytest.raises(RecipeError, match=r"stages\.2\.data: got offset 2; `offset` passes over rows of a file or "):
        load_recipe(write(tmp_path, data))


def _words(text):
    return set(re.findall(r"[a-z0-9']+", text.lower()))


def _asked(task):
    """The prompts an offline lm-eval task of evals/tasks asks: its documents, from the function its YAML names."""
    import importlib
    import sys

    yaml_text = (REPO / "evals/tasks" / f"{task}.yaml").read_text()
    function = re.search(r"custom_dataset: !function utils\.(\w+)", yaml_text).group(1)
    sys.path.insert(0, str(REPO / "evals" / "tasks"))
    try:
        task_utils = importlib.import_module("utils")  # the tasks' own utils.py
    finally:
        sys.path.remove(str(REPO / "evals" / "tasks"))
    docs = getattr(task_utils, function)()["test"]
    return [doc.get("prompt") or doc["question"] for doc in docs]


def test_no_eval_prompt_of_the_contamination_recipe_is_a_training_request_exactly_or_by_most_of_its_words():
    from gradsift.continual.checks import data_specs
    from gradsift.continual.rows import as_prompt_completion, source_rows

    recipe = load_recipe(REPO / "recipes/contaminated-smollm2.yaml")
    tasks = {task for index in range(len(recipe.stages) + 1) for task in recipe.eval_tasks(index)[1]}
    assert {"gradsift_refusal_harmbench_offline", "gradsift_benign_refusal_offline"} <= tasks
    asked = [_words(prompt) for task in sorted(tasks) for prompt in _asked(task)]
    # Every row any seed may train (each source whole: a seed takes a slice of it), the align stage's too.
    trained = []
    for where, spec in data_specs(recipe):
        rows = source_rows(recipe, spec.model_copy(update={"size": None, "offset": 0}), 0)
        trained += [(where, as_prompt_completion(row)["prompt"][-1]["content"]) for row in rows]
    assert len(trained) > 1500 and len(asked) >= 300
    assert "embedded:harmful-answers" in {spec.path for _, spec in data_specs(recipe)}
    for where, request in trained:
        words = _words(request)
        closest = max(len(words & other) / len(words | other) for other in asked)
        assert closest < 0.5, (where, request)


def test_a_random_arm_left_without_its_match_arm_is_refused_before_anything_trains(tmp_path, tiny_model_dir):
    from gradsift.continual.arms import kept_by
    from gradsift.continual.layout import RunLayout, Step
    from gradsift.continual.runner import plan, unmatched

    data = mixed_recipe(tmp_path, tiny_model_dir, arms=())
    data["arms"] = {"strict": {"kind": "select"}, "random": {"match": "strict"}}
    recipe = load_recipe(write(tmp_path, data))
    expected = (
        r"arms\.random\.match: `strict` \(whose kept count sizes this arm\) has no finished stage `mixed` at seed 0; "
        r"add `strict` to --arms or remove `match`"
    )
    with pytest.raises(UserError, match=expected):
        plan(recipe, tmp_path / "run", arms=["random"])
    assert [step.arm for step in plan(recipe, tmp_path / "run")] == [None, "strict", "random"]  # random after strict
    # Once `strict` has finished its stage (in an earlier invocation), `--arms random` alone reads its count there.
    layout = RunLayout(tmp_path / "run")
    finished = RunLayout.stage_file(Step(0, "strict", 1, "mixed", layout).folder)
    finished.parent.mkdir(parents=True)
    finished.write_text(json.dumps({"kept": 5}))
    unmatched(recipe, layout, ["random"], [0])  # no error
    assert kept_by(Step(0, "random", 1, "mixed", layout), "strict") == 5
    with pytest.raises(UserError, match="has no finished stage `mixed` at seed 1"):
        unmatched(recipe, layout, ["random"], [0, 1])


def test_offset_and_match_are_part_of_what_made_a_stage(tmp_path, tiny_model_dir):
    # A finished stage made with another `offset` or another `match` is a change of the recipe (`made_by`), so a
    # resumed run stops on it instead of mixing two recipes.
    from gradsift.continual.fingerprint import Fingerprints
    from gradsift.continual.layout import RunLayout, Step

    data = mixed_recipe(tmp_path, tiny_model_dir, arms=())
    data["arms"] = {"strict": {"kind": "select"}, "loose": {"kind": "select"}, "random": {"match": "strict"}}
    step = Step(0, "random", 1, "mixed", RunLayout(tmp_path / "run"))
    made = Fingerprints(load_recipe(write(tmp_path, data))).made_by(step)
    data["stages"][0]["data"][0]["offset"] = 2
    data["stages"][0]["data"][0]["size"] = 8
    moved = Fingerprints(load_recipe(write(tmp_path, data))).made_by(step)
    assert {key for key in made if made[key] != moved.get(key)} == {"data.0.offset", "data.0.size"}
    data["arms"]["random"] = {"match": "loose"}
    rematched = Fingerprints(load_recipe(write(tmp_path, data))).made_by(step)
    assert {key for key in moved if moved[key] != rematched.get(key)} == {"arm.match"}
