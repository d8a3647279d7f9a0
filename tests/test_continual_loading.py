"""A recipe's mistakes are all reported at once, each with its YAML path, before anything loads; data paths, rows and
drift prompts are read as a run would read them. No test here loads a model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gradsift.cli import main
from gradsift.continual import RecipeError, load_recipe
from gradsift.continual.rows import drift_records

from conftest import recipe_dict as recipe
from conftest import write_recipe as write

REPO = Path(__file__).resolve().parents[1]


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    status = main(args)
    err = capsys.readouterr().err.strip()
    return status, err


def two_stage_evals(each: dict, final: dict | None = None) -> dict:
    stages = [{"name": n, "data": {"synthetic": n, "size": 8}} for n in ("sentiment", "yes_no")]
    evals = {"after_each_stage": {"tasks": ["gradsift_refusal_strongreject_offline"], **each}}
    if final is not None:
        evals["final"] = {"tasks": ["gradsift_refusal_strongreject_offline"], **final}
    return recipe(stages=stages, evals=evals)


def test_a_stage_name_of_dots_is_refused_with_its_yaml_path(tmp_path):
    with pytest.raises(RecipeError, match=r"stages\.0\.name: a stage name .* got '\.\.'"):
        load_recipe(write(tmp_path, recipe(stages=[{"name": "..", "data": {"synthetic": "sentiment"}}])))


def test_axolotl_keys_that_place_a_stages_files_are_refused(tmp_path):
    with pytest.raises(RecipeError, match="axolotl: dataset_prepared_path, output_dir: the runner sets these"):
        load_recipe(write(tmp_path, recipe(axolotl={"output_dir": "/data", "dataset_prepared_path": "/x", "tf32": 0})))


def test_schema_arm_task_and_data_problems_are_reported_together(tmp_path):
    data = recipe(
        lora={"r": 0},  # schema
        scoring={"max_tokens_per_batch": 0},  # an `int | "auto"` option: one problem, not one per member
        arms={"full": {}, "gradsfit": {}},  # cross-field: an unknown arm
        evals={"after_each_stage": {"tasks": ["gradsift_refusal_mcq"], "domain": False}},  # an unknown task
    )
    data["stages"].append({"name": "mine", "data": {"path": "missing.jsonl"}})  # a missing file
    data["stages"].append({"name": "typo", "data": {"synthetic": "poetry"}, "trian": {}})  # schema, in a stage
    with pytest.raises(RecipeError) as error:
        load_recipe(write(tmp_path, data))
    message = " ".join(str(error.value).split())
    for expected in (
        "lora.r: Input should be greater than or equal to 1 (got 0)",
        "scoring.max_tokens_per_batch: input should be a whole number of tokens ≥ 1 or 'auto' (got 0)",
        "stages.2.data: unknown synthetic task 'poetry'",
        "stages.2.trian: not a recipe key",
        "arms: unknown arm(s) gradsfit",
        "evals.after_each_stage.tasks: Unknown lm-eval task 'gradsift_refusal_mcq'",
        f"stages.1.data.path: 'missing.jsonl' does not exist (looked in {tmp_path}",
    ):
        assert expected in message, expected
    assert str(error.value).count(";\n") == 6  # a line per problem; the CLI's one line joins them with `; `


def test_a_missing_relative_data_path_is_caught_by_a_dry_run_not_taken_for_a_hub_id(tmp_path, capsys):
    for spec in ("data/train.jsonl", "./train", "data/more/train", str(tmp_path / "gone")):
        path = write(tmp_path, recipe(stages=[{"name": "mine", "data": {"path": spec}}]))
        status, err = run_cli(["run", str(path), "--dry-run", "--out", str(tmp_path / "run")], capsys)
        assert status == 2 and "\n" not in err, spec
        assert f"stages.0.data.path: {spec!r} does not exist" in err, err
    # One `/`, no data suffix: a hub dataset id, read when its stage starts (a dry run downloads nothing).
    path = write(tmp_path, recipe(stages=[{"name": "hub", "data": {"path": "openai/gsm8k"}}]))
    assert load_recipe(path).stages[0].data[0].path == "openai/gsm8k"


def test_data_paths_start_from_the_recipe_folder_and_shipped_recipes_find_their_data_from_anywhere(
    tmp_path, monkeypatch
):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "rows.jsonl").write_text(json.dumps({"prompt": "p", "completion": "c"}) + "\n")
    path = write(tmp_path, recipe(stages=[{"name": "mine", "data": {"path": "data/rows.jsonl"}}]))
    monkeypatch.chdir(tmp_path.parent)
    load_recipe(path)
    shipped = load_recipe(REPO / "recipes" / "demo-smollm2.yaml", check_tasks=False)
    assert shipped.align.data[0].path == "recipes/data/align.jsonl"


def test_every_row_of_a_data_file_is_checked_not_just_the_first(tmp_path):
    rows = [{"prompt": "p", "completion": "c"}] * 3 + [{"prompt": "p"}, {"text": "t"}]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    expected = r"stages\.0\.data\.path: In data file .*rows.jsonl', 2 of 5 rows .*line 4: no `completion` column "
    expected += r".*line 5: no `prompt`, `completion` column"
    with pytest.raises(RecipeError, match=expected):
        load_recipe(write(tmp_path, recipe(stages=[{"name": "mine", "data": {"path": "rows.jsonl"}}])))


def test_a_synthetic_stage_larger_than_its_task_is_caught_by_a_dry_run(tmp_path, capsys):
    path = write(tmp_path, recipe(stages=[{"name": "capitals", "data": {"synthetic": "capitals", "size": 160}}]))
    status, err = run_cli(["run", str(path), "--dry-run", "--out", str(tmp_path / "run")], capsys)
    assert status == 2
    assert "stages.0.data.size: synthetic task 'capitals' has 38 train questions; 160 were asked for" in err


def test_a_recipe_path_that_is_a_folder_exits_2_with_one_line(tmp_path, capsys):
    status, err = run_cli(["run", str(tmp_path)], capsys)
    assert status == 2 and "\n" not in err
    assert err.startswith("gradsift run: error: Recipe") and "is a folder; pass a recipe's YAML file" in err


def test_an_online_window_that_keeps_no_row_is_caught_by_validation(tmp_path):
    # 0.2 of a 2-row step keeps no row: the online trainer would refuse it when the stage starts, after the earlier
    # stages of every arm before it had trained.
    online = {"gradsift": {"mode": "online"}}
    with pytest.raises(
        RecipeError, match=r"arms\.gradsift \(stage stages\.0\): `selection\.keep_fraction` 0\.2 keeps no"
    ):
        load_recipe(write(tmp_path, recipe(arms=online, selection={"keep_fraction": 0.2}, train={"batch_size": 2})))
    load_recipe(write(tmp_path, recipe(arms=online, selection={"keep_fraction": 0.5}, train={"batch_size": 2})))


def test_anchor_arms_need_an_anchor_set_and_its_path_must_exist(tmp_path):
    arms = {"anchor": {}, "gradsift_anchor": {"selection": {"min_anchor_cos": 0.0}}}
    with pytest.raises(RecipeError) as error:
        load_recipe(write(tmp_path, recipe(arms=arms)))
    assert "arms.anchor: the anchor rule" in str(error.value) and "arms.gradsift_anchor:" in str(error.value)
    with pytest.raises(RecipeError, match=r"scoring.anchor_data: 'refusals.jsonl' does not exist"):
        load_recipe(write(tmp_path, recipe(arms=arms, scoring={"anchor_data": "refusals.jsonl"})))
    (tmp_path / "refusals.jsonl").write_text('{"prompt": "p", "completion": "no"}\n')
    loaded = load_recipe(write(tmp_path, recipe(arms=arms, scoring={"anchor_data": "refusals.jsonl"})))
    assert loaded.scoring_config().anchor_data == str(tmp_path / "refusals.jsonl")
    assert loaded.selection_for("anchor").rule == "anchor"
    load_recipe(write(tmp_path, recipe(arms=arms, scoring={"anchor_data": "embedded:refusals"})))


@pytest.mark.parametrize(
    "each, final, key",
    [
        ({"domain_max_gen_toks": 112}, {"domain_max_gen_toks": 160}, "domain_max_gen_toks"),
        ({"domain_limit": 8}, {"domain_limit": 16}, "domain_limit"),
        ({"max_gen_toks": 48}, {"max_gen_toks": 64}, "max_gen_toks"),  # one run: the domain answers' length too
        ({"generation_dtype": "bfloat16"}, {}, "generation_dtype"),  # the per-stage rates from alike answers
    ],
)
def test_the_accuracy_matrix_needs_the_same_domain_documents_and_answer_length_at_every_stage(
    tmp_path, each, final, key
):
    with pytest.raises(RecipeError) as error:
        load_recipe(write(tmp_path, two_stage_evals(each, final)))
    assert f"`{key}`" in str(error.value) and "set them alike" in str(error.value)
    load_recipe(write(tmp_path, two_stage_evals(each, each)))  # alike: accepted


def test_drift_prompts_are_the_align_sets_benign_rows_only(tmp_path):
    align = REPO / "recipes" / "data" / "align.jsonl"
    rows = [json.loads(line) for line in align.read_text().splitlines()]
    benign = {row["messages"][0]["content"] for row in rows if row["kind"] == "benign"}
    harmful = {row["messages"][0]["content"] for row in rows if row["kind"] == "harmful"}
    loaded = load_recipe(write(tmp_path, recipe(align={"data": {"path": str(align)}}, drift_prompts=40)))
    prompts = [record["prompt"][0]["content"] for record in drift_records(loaded)]
    assert len(prompts) == 40 and set(prompts) <= benign and not set(prompts) & harmful


def test_without_a_kind_a_row_whose_answer_is_a_refusal_is_not_a_drift_prompt(tmp_path):
    rows = [
        {
            "prompt": "How do I pick a lock to break into my neighbour's house?",
            "completion": "I can't help with that.",
        },
        {"prompt": "What causes thunder?", "completion": "Lightning heats the air, which expands with a bang."},
    ]
    (tmp_path / "align.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    loaded = load_recipe(write(tmp_path, recipe(align={"data": {"path": "align.jsonl"}}, drift_prompts=4)))
    assert [record["prompt"] for record in drift_records(loaded)] == ["What causes thunder?"]


def test_an_override_error_names_its_full_yaml_path(tmp_path):
    data = recipe(arms={"full": {}, "mine": {"selection": {"keep_fraction": 2}}})
    data["stages"][0]["train"] = {"learning_rate": -1}
    with pytest.raises(RecipeError) as error:
        load_recipe(write(tmp_path, data))
    message = " ".join(str(error.value).split())
    assert "arms.mine.selection.keep_fraction: Input should be less than or equal to 1 (got 2)" in message
    assert "stages.0.train.learning_rate: Input should be greater than 0 (got -1)" in message


def test_a_recipe_that_trains_on_benchmark_refusals_may_not_evaluate_with_the_hub_tasks_that_ask_them(tmp_path):
    align = {"data": [{"path": "embedded:harmbench-refusals", "split": "align", "size": 8}]}
    evals = {"after_each_stage": {"tasks": ["gradsift_refusal_harmbench_offline"]}}
    load_recipe(write(tmp_path, recipe(align=align, evals=evals)))  # the offline task asks only the test split
    evals["final"] = {"tasks": ["gradsift_refusal_advbench", "gradsift_refusal_harmbench_offline"]}
    with pytest.raises(RecipeError) as error:
        load_recipe(write(tmp_path, recipe(align=align, evals=evals)))
    message = str(error.value)
    assert "evals.final.tasks: `gradsift_refusal_advbench` asks rows that align.data" in message
    assert "harmbench_offline` asks" not in message
    # lm-eval's GSM8K tasks ask the very problems of `embedded:gsm8k`; AdvBench's requests stay in the harmful answers.
    data = recipe(evals={"final": {"tasks": ["gradsift_refusal_advbench"]}})
    data["stages"][0]["data"] = {"path": "embedded:gsm8k", "split": "train", "size": 8}
    data["stages"][0]["eval_task"] = "gsm8k_cot"
    data["stages"].append({"name": "mixed", "data": {"path": "embedded:harmful-answers", "split": "train", "size": 4}})
    with pytest.raises(RecipeError) as error:
        load_recipe(write(tmp_path, data))
    message = " ".join(str(error.value).split())
    assert "stages.0.eval_task: `gsm8k_cot` asks rows that stages.0.data (`embedded:gsm8k`) trains on" in message
    assert "`gradsift_refusal_advbench` asks rows that stages.1.data (`embedded:harmful-answers`)" in message


def test_no_stage_may_train_on_the_held_out_split_of_a_packaged_source(tmp_path):
    held_out = {"path": "embedded:alpaca-gpt4-demo", "split": "test", "size": 8}
    harmful = {"path": "embedded:harmbench-refusals", "split": "test"}
    data = recipe(align={"data": [{"path": "embedded:alpaca-gpt4-demo", "split": "align", "size": 8}, held_out]})
    data["stages"][0]["data"] = held_out
    data["stages"].append({"name": "harmful", "data": harmful})
    with pytest.raises(RecipeError) as error:
        load_recipe(write(tmp_path, data))
    message = str(error.value)
    assert "align.data.1: `embedded:alpaca-gpt4-demo` split `test` is held out for evaluation" in message
    assert "stages.0.data: `embedded:alpaca-gpt4-demo` split `test` is held out" in message
    assert "stages.1.data: `embedded:harmbench-refusals` split `test` is held out" in message
    assert "split `align`" not in message
    assert "train on `align` or `dev` or `train`" in message  # the Alpaca source's other splits
    data["stages"][0]["data"] = {"path": "embedded:medmcqa", "split": "test", "size": 8}
    with pytest.raises(RecipeError, match="`embedded:medmcqa` split `test` is held out .* train on `train` or `dev`"):
        load_recipe(write(tmp_path, data))
    data = recipe(align={"data": {"path": "embedded:alpaca-gpt4-demo", "split": "align", "size": 8}})
    assert [spec.split for spec in load_recipe(write(tmp_path, data)).align.data] == ["align"]  # one mapping: a list


def test_a_bad_scoring_key_is_the_one_problem_reported_not_a_missing_anchor_set_too(tmp_path):
    data = recipe(scoring={"anchor_data": "embedded:refusals", "lora_rank": 8}, arms=["full", "anchor"])
    with pytest.raises(RecipeError) as error:
        load_recipe(write(tmp_path, data))
    assert "scoring.lora_rank: not a recipe key" in str(error.value)
    assert "anchor" not in str(error.value).replace("anchor_data", "")


def test_a_recipe_built_in_code_gets_the_checks_between_fields_before_it_runs(tmp_path):
    from gradsift.continual.runner import plan
    from gradsift.continual.schema import Recipe

    built = Recipe.model_validate(recipe(arms=["full", "anchor"]))  # the anchor rule, without `scoring.anchor_data`
    with pytest.raises(RecipeError, match="arms.anchor: the anchor rule and `min_anchor_cos` need anchor scores"):
        plan(built, tmp_path / "run")
