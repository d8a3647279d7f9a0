"""A recipe's mistakes are all reported at once, before anything loads, and a run never writes or deletes outside
what gradsift can tell is its own: names that would leave the run folder, a foreign --out, a foreign stage folder,
a second run on the same folder. No test here loads a model."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gradsift.cli import main
from gradsift.continual import RecipeError, check_run_folder, load_recipe
from gradsift.continual.layout import STAGE_MARK, clean_stage
from gradsift.continual.rows import drift_records
from gradsift.continual.runner import run_recipe
from gradsift.errors import UserError
from gradsift.fileio import write_json
from gradsift.selection import Selection
from gradsift.store import write_dropped
from gradsift.table import ScoreTable
from gradsift.tokenization import TokenizedRow

REPO = Path(__file__).resolve().parents[1]


def write(folder: Path, data: dict, name: str = "recipe.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def recipe(**extra) -> dict:
    """A recipe that validates without a model or lm-eval's task index (no task named, no align)."""
    data = {
        "name": "tiny",
        "model": "never-loaded",
        "stages": [{"name": "sentiment", "data": {"synthetic": "sentiment", "size": 8}}],
        "arms": ["full"],
        "evals": {"after_each_stage": {"tasks": [], "domain": False}},
        "drift_prompts": 0,
    }
    data.update(extra)
    return data


def user_files(folder: Path) -> dict[str, bytes]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "thesis.tex").write_bytes(b"\\section{Years of work}")
    (folder / "01-sentiment").mkdir(exist_ok=True)
    (folder / "01-sentiment" / "data.bin").write_bytes(b"\x00\x01")
    return snapshot(folder)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    status = main(args)
    err = capsys.readouterr().err.strip()
    return status, err


# ---------------------------------------------------------------------------------------------------------------
# Names that become path segments
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arm", ["absolute", "../../x"])
def test_an_arm_name_that_leaves_the_run_folder_is_refused_and_touches_nothing(tmp_path, capsys, arm):
    victim = tmp_path / "victim"
    before = user_files(victim)
    name = str(victim) if arm == "absolute" else arm  # `/abs/.../victim` + `/01-sentiment` is the user's folder
    path = write(tmp_path, recipe(arms={name: {"kind": "full"}}))
    status, err = run_cli(["run", str(path), "--out", str(tmp_path / "run")], capsys)
    assert status == 2 and "\n" not in err
    assert "an arm name becomes a folder name" in err and repr(name) in err
    assert snapshot(victim) == before and not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", ["..", "."])
def test_a_recipe_name_that_escapes_the_default_run_folder_is_refused(tmp_path, monkeypatch, capsys, name):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    before = user_files(tmp_path)
    path = write(tmp_path / "runs", recipe(name=name))  # `runs/..` would be the current folder
    status, err = run_cli(["run", str(path)], capsys)
    assert status == 2 and "\n" not in err
    assert "name: the recipe name (the default run folder `runs/<name>`) becomes a folder name" in err
    assert {k: v for k, v in snapshot(tmp_path).items() if not k.startswith("runs")} == before


def test_a_stage_name_of_dots_is_refused_with_its_yaml_path(tmp_path):
    with pytest.raises(RecipeError, match=r"stages\.0\.name: a stage name .* got '\.\.'"):
        load_recipe(write(tmp_path, recipe(stages=[{"name": "..", "data": {"synthetic": "sentiment"}}])))


def test_axolotl_keys_that_place_a_stages_files_are_refused(tmp_path):
    with pytest.raises(RecipeError, match="axolotl: dataset_prepared_path, output_dir: the runner sets these"):
        load_recipe(write(tmp_path, recipe(axolotl={"output_dir": "/data", "dataset_prepared_path": "/x", "tf32": 0})))


# ---------------------------------------------------------------------------------------------------------------
# The run folder and its stage folders
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dry_run", [False, True])
def test_a_folder_gradsift_did_not_write_is_refused_as_out_and_left_alone(tmp_path, capsys, dry_run):
    out = tmp_path / "papers"
    before = user_files(out)
    path = write(tmp_path, recipe())
    status, err = run_cli(["run", str(path), "--out", str(out), *(["--dry-run"] if dry_run else [])], capsys)
    assert status == 2 and "\n" not in err
    assert "is not a gradsift run folder" in err and "choose an empty or new --out" in err
    assert snapshot(out) == before and sorted(p.name for p in out.iterdir()) == ["01-sentiment", "thesis.tex"]


def test_a_file_as_out_is_refused_and_left_alone(tmp_path, capsys):
    out = tmp_path / "notes.txt"
    out.write_text("keep me")
    status, err = run_cli(["run", str(write(tmp_path, recipe())), "--out", str(out)], capsys)
    assert status == 2 and "is a file, not a run folder" in err
    assert out.read_text() == "keep me"


def test_a_run_folder_of_the_current_or_an_older_gradsift_is_accepted_as_out(tmp_path):
    old = {"name": "tiny", "model": "m", "stages": ["a"], "domain_tasks": [None], "arms": ["full"], "recipe": {}}
    for meta in (old, {"gradsift_version": "1.0", **old}):
        (tmp_path / "recipe.json").write_text(json.dumps(meta))
        (tmp_path / "seed-0").mkdir(exist_ok=True)
        check_run_folder(tmp_path)
    (tmp_path / "recipe.json").write_text(json.dumps({"name": "someone else's"}))
    with pytest.raises(UserError, match="is not a gradsift run folder"):
        check_run_folder(tmp_path)


def test_a_stage_folder_gradsift_did_not_write_is_not_emptied(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "recipe.json").write_text(json.dumps({"gradsift_version": "1.0", "name": "tiny"}))
    stage = out / "seed-0" / "full" / "01-sentiment"
    before = user_files(stage)
    loaded = load_recipe(write(tmp_path, recipe()))
    with pytest.raises(UserError, match="holds files gradsift did not write"):
        run_recipe(loaded, out, progress=False)
    assert snapshot(stage) == before and not (stage / STAGE_MARK).exists()


def test_a_stage_folder_gradsift_marked_or_an_older_run_left_is_emptied_and_marked(tmp_path):
    marked, older = tmp_path / "01-a", tmp_path / "02-b"
    for folder in (marked, older):
        (folder / "adapter").mkdir(parents=True)
        (folder / "adapter" / "adapter_model.safetensors").write_bytes(b"partial")
    (marked / STAGE_MARK).write_text("{}")
    (marked / "notes-of-the-killed-run.txt").write_text("x")
    (older / ".stage.json.abc.tmp").write_text("{")  # atomic_path's temporary file, left by a kill
    for folder in (marked, older):
        clean_stage(folder)
        assert [p.name for p in folder.iterdir()] == [STAGE_MARK]
        assert "gradsift_version" in json.loads((folder / STAGE_MARK).read_text())


def test_a_second_run_on_the_same_folder_is_refused(tmp_path):
    out = tmp_path / "run"
    holder = "import sys, time\nfrom gradsift.locking import folder_lock\nwith folder_lock(sys.argv[1]):\n"
    holder += "    print('held', flush=True)\n    time.sleep(120)\n"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(
        [sys.executable, "-c", holder, str(out)], stdout=subprocess.PIPE, text=True, env=env
    )  # a first `gradsift run`, holding the folder
    try:
        assert first.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match="is being written by another gradsift process"):
            run_recipe(load_recipe(write(tmp_path, recipe())), out, progress=False)
        assert not (out / "recipe.json").exists()
    finally:
        first.kill()
        first.wait()


# ---------------------------------------------------------------------------------------------------------------
# Every problem at once
# ---------------------------------------------------------------------------------------------------------------


def test_schema_arm_task_and_data_problems_are_reported_together(tmp_path):
    data = recipe(
        lora={"r": 0},  # schema
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
        "stages.2.data: unknown synthetic task 'poetry'",
        "stages.2.trian: not a recipe key",
        "arms: unknown arm(s) gradsfit",
        "evals.after_each_stage.tasks: Unknown lm-eval task 'gradsift_refusal_mcq'",
        f"stages.1.data.path: 'missing.jsonl' does not exist (looked in {tmp_path}",
    ):
        assert expected in message, expected
    assert str(error.value).count(";\n") == 5  # a line per problem; the CLI's one line joins them with `; `


def test_a_missing_relative_data_path_is_caught_by_a_dry_run_not_taken_for_a_hub_id(tmp_path, capsys):
    for spec in ("data/train.jsonl", "./train", "data/more/train", str(tmp_path / "gone")):
        path = write(tmp_path, recipe(stages=[{"name": "mine", "data": {"path": spec}}]))
        status, err = run_cli(["run", str(path), "--dry-run", "--out", str(tmp_path / "run")], capsys)
        assert status == 2 and "\n" not in err, spec
        assert f"stages.0.data.path: {spec!r} does not exist" in err, err
    # One `/`, no data suffix: a hub dataset id, read when its stage starts (a dry run downloads nothing).
    path = write(tmp_path, recipe(stages=[{"name": "hub", "data": {"path": "openai/gsm8k"}}]))
    assert load_recipe(path).stages[0].data.path == "openai/gsm8k"


def test_data_paths_start_from_the_recipe_folder_and_shipped_recipes_find_their_data_from_anywhere(
    tmp_path, monkeypatch
):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "rows.jsonl").write_text(json.dumps({"prompt": "p", "completion": "c"}) + "\n")
    path = write(tmp_path, recipe(stages=[{"name": "mine", "data": {"path": "data/rows.jsonl"}}]))
    monkeypatch.chdir(tmp_path.parent)
    load_recipe(path)
    shipped = load_recipe(REPO / "recipes" / "demo-smollm2.yaml", check_tasks=False)
    assert shipped.align.data.path == "recipes/data/align.jsonl"


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


# ---------------------------------------------------------------------------------------------------------------
# Drift prompts and strict JSON
# ---------------------------------------------------------------------------------------------------------------


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


def test_records_are_strict_json_with_non_finite_numbers_as_null(tmp_path):
    import numpy as np

    def strict(text: str):
        return json.loads(text, parse_constant=lambda token: pytest.fail(f"{token} in strict JSON"))

    record = {"train": {"train_loss": float("nan"), "losses": [1.0, float("inf")]}, "drift": {"kl": np.float32("nan")}}
    write_json(record, tmp_path / "stage.json")
    assert strict((tmp_path / "stage.json").read_text()) == {
        "train": {"train_loss": None, "losses": [1.0, None]},
        "drift": {"kl": None},
    }
    table = ScoreTable.empty([TokenizedRow(input_ids=[1, 2], labels=[-100, 2], sample_id="s#0")], [3])
    table.status[:] = "nonfinite"
    selection = Selection(keep=np.zeros(1, dtype=bool), reasons=np.array(["nonfinite"], dtype=object))
    write_dropped(tmp_path / "dropped.jsonl", table, selection)
    line = strict((tmp_path / "dropped.jsonl").read_text())
    assert line["index"] == 3 and line["reason"] == "nonfinite"
    assert line["grad_norm"] is None and line["loss"] is None and line["anchor_cos"] is None


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


def test_the_random_arm_ignores_the_recipes_anchor_filter(tmp_path):
    from gradsift.continual.arms import random_subset

    arms = {"random": {}, "gradsift": {}}
    loaded = load_recipe(
        write(
            tmp_path, recipe(arms=arms, scoring={"anchor_data": "embedded:refusals"}, selection={"min_anchor_cos": 0})
        )
    )
    assert loaded.selection_for("gradsift").min_anchor_cos == 0  # the scored arm filters
    assert random_subset(loaded, "random", 20, 5).num_kept == 5  # the random arm has no scores to filter
    assert random_subset(loaded, "random", 20, None).num_kept == 4  # keep_fraction 0.2 of 20


def test_drift_loads_each_reference_once_per_seed(tmp_path, tiny_model_dir, tokenizer, monkeypatch):
    from gradsift.continual import evals
    from gradsift.continual.layout import RunLayout, Step

    from conftest import build_model

    (tmp_path / "align.jsonl").write_text(json.dumps({"prompt": "Why is the sky blue?", "completion": "Air."}) + "\n")
    loaded = load_recipe(
        write(tmp_path, recipe(model=str(tiny_model_dir), align={"data": {"path": "align.jsonl"}}, drift_prompts=1)),
        check_data=False,
    )
    loads = []
    monkeypatch.setattr(evals, "eval_model", lambda r, spec, adapter: loads.append(spec) or build_model(tokenizer))
    monkeypatch.setattr(evals, "_REFERENCES", collections.OrderedDict())

    def step(seed):
        return Step(seed=seed, arm="full", index=1, stage="x", layout=RunLayout(tmp_path))

    stage_model = build_model(tokenizer, seed=3)
    first = evals.drift(loaded, stage_model, tokenizer, step(0))
    assert evals.drift(loaded, stage_model, tokenizer, step(0)) == first  # from the kept log-probs
    assert first["pretrained"] > 0 and first["aligned"] > 0
    evals.drift(loaded, stage_model, tokenizer, step(1))
    evals.drift(loaded, stage_model, tokenizer, step(1))
    aligned = [str(tmp_path / f"seed-{seed}" / "00-align" / "model") for seed in (0, 1)]
    # The pretrained reference is loaded once for both seeds; each seed's aligned model once.
    assert loads == [str(tiny_model_dir), aligned[0], aligned[1]]


def test_a_missing_previous_adapter_is_named_with_the_fix(tmp_path):
    from gradsift.continual.layout import RunLayout, Step
    from gradsift.continual.runner import previous_adapter

    stages = [{"name": n, "data": {"synthetic": "sentiment", "size": 8}} for n in ("first", "second")]
    loaded = load_recipe(write(tmp_path, recipe(stages=stages)))
    arm = tmp_path / "run" / "seed-0" / "full"
    step = Step(seed=0, arm="full", index=2, stage="second", layout=RunLayout(tmp_path / "run"))
    (arm / "01-first" / "adapter").mkdir(parents=True)
    with pytest.raises(UserError, match="01-first/adapter' is missing.*01-first/stage.json"):
        previous_adapter(loaded, step)
    (arm / "01-first" / "adapter" / "adapter_config.json").write_text("{}")
    (arm / "01-a-stray").mkdir()  # sorts first: the old glob took it for the previous stage
    assert previous_adapter(loaded, step) == arm / "01-first" / "adapter"


# ---------------------------------------------------------------------------------------------------------------
# The domain tasks' own lm-eval run
# ---------------------------------------------------------------------------------------------------------------


def two_stage_evals(each: dict, final: dict | None = None) -> dict:
    stages = [{"name": n, "data": {"synthetic": n, "size": 8}} for n in ("sentiment", "yes_no")]
    evals = {"after_each_stage": {"tasks": ["gradsift_refusal_strongreject_offline"], **each}}
    if final is not None:
        evals["final"] = {"tasks": ["gradsift_refusal_strongreject_offline"], **final}
    return recipe(stages=stages, evals=evals)


@pytest.mark.parametrize(
    "each, runs",
    [
        # Their own answer length: a run of their own, all their documents.
        (
            {"limit": 5, "max_gen_toks": 48, "domain_max_gen_toks": 112},
            [(["gradsift_refusal_strongreject_offline"], 5, 48), (["domain"], 5, 112)],
        ),
        # Their own document count: a run of their own at each task's own answer length.
        (
            {"limit": 5, "max_gen_toks": 48, "domain_limit": 3},
            [(["gradsift_refusal_strongreject_offline"], 5, 48), (["domain"], 3, None)],
        ),
        # Neither: one run, one answer length for all.
        ({"limit": 5, "max_gen_toks": 48}, [(["gradsift_refusal_strongreject_offline", "domain"], 5, 48)]),
    ],
)
def test_the_domain_tasks_run_apart_with_their_own_limit_and_answer_length(tmp_path, monkeypatch, each, runs):
    from gradsift import evaluation
    from gradsift.continual import evals, runner

    calls = []

    def fake_run_lm_eval(model, tokenizer, names, output_path, *, limit, max_gen_toks, **kwargs):
        calls.append((list(names), limit, max_gen_toks))
        return {"results": {}, "per_doc": {}}

    monkeypatch.setattr(evaluation, "run_lm_eval", fake_run_lm_eval)
    monkeypatch.setattr(evals, "_task_manager", lambda: None)
    loaded = load_recipe(write(tmp_path, two_stage_evals(each)))
    step = next(s for s in runner.plan(loaded, tmp_path / "run") if s.arm == "full" and s.index == 1)
    evals.evaluate(loaded, None, None, step, final=False)
    domain = ["gradsift_domain_sentiment", "gradsift_domain_yes_no"]
    expected = [([t for n in names for t in (domain if n == "domain" else [n])], lim, g) for names, lim, g in runs]
    assert calls == expected


@pytest.mark.parametrize(
    "each, final, key",
    [
        ({"domain_max_gen_toks": 112}, {"domain_max_gen_toks": 160}, "domain_max_gen_toks"),
        ({"domain_limit": 8}, {"domain_limit": 16}, "domain_limit"),
        ({"max_gen_toks": 48}, {"max_gen_toks": 64}, "max_gen_toks"),  # one run: the domain answers' length too
    ],
)
def test_the_accuracy_matrix_needs_the_same_domain_documents_and_answer_length_at_every_stage(
    tmp_path, each, final, key
):
    with pytest.raises(RecipeError) as error:
        load_recipe(write(tmp_path, two_stage_evals(each, final)))
    assert f"`{key}`" in str(error.value) and "set them alike" in str(error.value)
    load_recipe(write(tmp_path, two_stage_evals(each, each)))  # alike: accepted
